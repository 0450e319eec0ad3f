"""Tests of the model zoo: published sizes, shapes across datasets, errors, configs.

Kept fast on a small CPU: parameter counts are taken on the ``meta`` device (no
memory, no init), forward/backward passes use batches of 2, and the 36M-parameter
WRN-28-10 runs its forward/backward at width 2 (same code path) plus one
full-width batch of 1 at 8 px.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from zsharp_sweeps.config import ConfigError, ModelConfig, register_configs
from zsharp_sweeps.models import MODELS, build_model, model_param_defaults, register_model
from zsharp_sweeps.models.resnet_cifar import PadShortcut
from zsharp_sweeps.models.vgg import VGG
from zsharp_sweeps.models.vit import MultiHeadSelfAttention, ViT

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"

ALL_MODELS = (
    "resnet20", "resnet56", "resnet110", "resnet18", "wrn28_10",
    "vgg16_bn", "vgg19_bn", "vit", "mlp",
)

# Exact counts for 3 channels, 32 px, 10 classes, checked against the published ones:
# akamaster's resnet20/56/110 script prints 269,722 / 853,018 / 1,727,962 (0.27M /
# 0.85M / 1.7M in He et al.); kuangliu's ResNet18 11,173,962 (11.2M); WRN-28-10
# 36,479,194 (36.5M in Zagoruyko & Komodakis); kuangliu's VGG16/19 with BN 14,728,266
# / 20,040,522 (~15M / ~20M). ViT-CIFAR (7 x 384, MLP 384, 65 tokens) is computed
# by hand in test_vit_param_count_by_hand. The MLP: 3072*512+512 + 512*512+512 + 5130.
PARAM_COUNTS = {
    "resnet20": 269_722,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "resnet18": 11_173_962,
    "wrn28_10": 36_479_194,
    "vgg16_bn": 14_728_266,
    "vgg19_bn": 20_040_522,
    "vit": 6_268_810,
    "mlp": 1_841_162,
}
PUBLISHED_MILLIONS = {
    "resnet20": 0.27, "resnet56": 0.85, "resnet110": 1.7, "resnet18": 11.2,
    "wrn28_10": 36.5, "vgg16_bn": 14.7, "vgg19_bn": 20.0,
}

# Cheap stand-ins for the forward/backward tests where the default is expensive on CPU.
SMALL_PARAMS: dict[str, dict] = {"wrn28_10": {"width": 2}}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(name: str, params: dict | None = None, *, c: int = 3, n: int = 10, s: int = 32):
    return build_model(ModelConfig(name, dict(params or {})), in_channels=c, num_classes=n,
                       image_size=s)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: extra OpenMP threads only contend
    yield
    torch.set_num_threads(threads)


def test_registry_holds_every_model_and_one_yaml_each():
    assert set(ALL_MODELS) == set(MODELS)
    assert {p.stem for p in CONF_MODEL.glob("*.yaml")} == set(ALL_MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_param_count_matches_published(name):
    with torch.device("meta"):
        model = build(name)
    count = n_params(model)
    assert count == PARAM_COUNTS[name]
    if name in PUBLISHED_MILLIONS:  # and the rounded figure the papers / repos quote
        assert count / 1e6 == pytest.approx(PUBLISHED_MILLIONS[name], rel=0.02)


def test_vit_param_count_by_hand():
    h, tokens, depth, mlp, patch_vec, classes = 384, 65, 7, 384, 4 * 4 * 3, 10
    layer = 2 * 2 * h + 4 * (h * h + h) + (h * mlp + mlp) + (mlp * h + h)
    expected = (patch_vec * h + h) + h + tokens * h + depth * layer + 2 * h + (h * classes + classes)
    assert PARAM_COUNTS["vit"] == expected


def test_param_count_follows_channels_and_classes():
    with torch.device("meta"):
        rgb = n_params(build("resnet20", c=3, n=10))
        gray = n_params(build("resnet20", c=1, n=100))
    # stem loses 2 * 16 * 9 weights, the head gains 90 * (64 + 1)
    assert gray - rgb == -2 * 16 * 9 + 90 * 65


@pytest.mark.parametrize("shape", [(3, 32, 10), (1, 16, 10)], ids=["rgb32", "gray16"])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward(name, shape):
    c, s, n = shape
    model = build(name, SMALL_PARAMS.get(name), c=c, n=n, s=s).train()
    x = torch.randn(2, c, s, s)
    out = model(x)
    assert out.shape == (2, n)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    # The loss must reach the input end of the network (WRN's zero-init head blocks
    # gradients to earlier layers at step 0, so look at the head instead there).
    head = list(model.parameters())[-2]
    first = next(model.parameters())
    assert head.grad.abs().sum() > 0
    if name != "wrn28_10":
        assert first.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [8, 28])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_other_image_sizes(name, size):
    model = build(name, SMALL_PARAMS.get(name), c=1, n=7, s=size).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, size, size))
    assert out.shape == (1, 7)


@pytest.mark.parametrize(
    "name,params",
    [("resnet20", {}), ("vgg16_bn", {}), ("vit", {"patch_size": 8, "depth": 2}), ("mlp", {})],
)
def test_tiny_imagenet_size(name, params):
    model = build(name, params, c=3, n=200, s=64).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 200)


def test_wrn28_10_full_width_runs_on_a_tiny_batch():
    model = build("wrn28_10", s=8).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 8, 8))
    # davda54's init zeroes the classifier: uniform logits at step 0
    assert torch.equal(out, torch.zeros(1, 10))


@pytest.mark.parametrize(
    "size,plan",
    [
        (32, [True] * 5),
        (64, [True] * 5),
        (28, [True, True, True, True, False]),
        (16, [True, True, True, True, False]),
        (8, [True, True, True, False, False]),
    ],
)
def test_vgg_skips_pools_that_would_empty_the_map(size, plan):
    model = build("vgg16_bn", s=size)
    assert isinstance(model, VGG)
    assert model.pools_applied == plan


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()
    # option A has no 1x1 projection convs: every conv of the CIFAR ResNets is 3x3
    kernels = {m.kernel_size for m in build("resnet20").modules() if isinstance(m, torch.nn.Conv2d)}
    assert kernels == {(3, 3)}


def test_cifar_resnet_uses_kaiming_normal_init():
    torch.manual_seed(0)
    w = build("resnet110").layer3[5].conv1.weight  # fan-in 64 * 9
    assert w.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)


@pytest.mark.parametrize("size,tokens", [(32, 65), (16, 17), (28, 50)])
def test_vit_tokens_follow_image_and_patch_size(size, tokens):
    model = build("vit", {"depth": 1}, s=size)
    assert model.pos_emb.shape == (1, tokens, 384)


def test_vit_patches_match_omihub_unfold_order():
    model = build("vit", {"depth": 1, "hidden": 24, "heads": 3, "mlp_hidden": 24}, c=3, s=16)
    assert isinstance(model, ViT)
    x = torch.randn(2, 3, 16, 16)
    p = 4
    ref = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 4, 5, 1).reshape(2, 16, -1)
    assert torch.equal(model._to_words(x), ref)
    # channels-last input gives the same words
    assert torch.equal(model._to_words(x.contiguous(memory_format=torch.channels_last)), ref)


@pytest.mark.parametrize("attn_scale,divisor", [("hidden", 24), ("head_dim", 8)])
def test_vit_attention_matches_the_einsum_reference(attn_scale, divisor):
    """SDPA reproduces omihub's softmax(q k^T / sqrt(d)) v, with d = hidden by default."""
    hidden, heads = 24, 3
    model = build("vit", {"depth": 1, "hidden": hidden, "heads": heads, "mlp_hidden": 24,
                          "attn_scale": attn_scale}, s=8)
    msa = model.enc[0].msa
    assert isinstance(msa, MultiHeadSelfAttention)
    x = torch.randn(2, 5, hidden)
    b, n, f = x.shape
    q = msa.q(x).view(b, n, heads, f // heads).transpose(1, 2)
    k = msa.k(x).view(b, n, heads, f // heads).transpose(1, 2)
    v = msa.v(x).view(b, n, heads, f // heads).transpose(1, 2)
    score = F.softmax(torch.einsum("bhif,bhjf->bhij", q, k) / divisor**0.5, dim=-1)
    ref = msa.o(torch.einsum("bhij,bhjf->bihf", score, v).flatten(2))
    torch.testing.assert_close(msa(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name,params", [("resnet20", {}), ("vit", {"depth": 1}), ("vgg16_bn", {})]
)
def test_channels_last_input_gives_the_same_output(name, params):
    model = build(name, params, s=16).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,params", [("resnet20", {}), ("vit", {"depth": 1}), ("mlp", {})])
def test_bf16_autocast_forward_is_finite(name, params):
    model = build(name, params, s=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 16, 16))
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize(
    "name,params", [("vit", {"depth": 1}), ("wrn28_10", {"depth": 10, "width": 1})]
)
def test_traces_as_one_graph(name, params):
    """No Python control flow on tensor values: dynamo traces forward+backward whole."""
    model = build(name, params, c=1, s=16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    compiled(torch.randn(2, 1, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ---- errors -------------------------------------------------------------------------


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"model\.name='resnet21'") as info:
        build("resnet21")
    assert all(name in str(info.value) for name in ALL_MODELS)
    assert isinstance(info.value, ConfigError)


def test_unknown_param_names_the_key_and_the_accepted_ones():
    with pytest.raises(ValueError, match=r"model\.params\.depht") as info:
        build("vit", {"depht": 6})
    for key in ("patch_size", "hidden", "depth", "heads", "mlp_hidden", "dropout"):
        assert key in str(info.value)


def test_param_on_a_model_without_params():
    with pytest.raises(ValueError, match=r"model\.params\.width.*takes no params"):
        build("vgg16_bn", {"width": 2})


def test_dataset_arguments_are_not_params():
    with pytest.raises(ValueError, match=r"model\.params\.in_channels.*set by the dataset"):
        build("resnet20", {"in_channels": 1})


def test_vit_patch_size_must_divide_the_image():
    with pytest.raises(ValueError, match=r"model\.params\.patch_size=5.*32"):
        build("vit", {"patch_size": 5}, s=32)
    with pytest.raises(ValueError, match=r"model\.params\.patch_size=8.*28"):
        build("vit", {"patch_size": 8}, s=28)


@pytest.mark.parametrize(
    "name,params,setting",
    [
        ("vit", {"heads": 5}, "heads"),
        ("vit", {"dropout": 1.5}, "dropout"),
        ("vit", {"attn_scale": "sqrt"}, "attn_scale"),
        ("wrn28_10", {"depth": 27}, "depth"),
        ("wrn28_10", {"width": 0}, "width"),
        ("mlp", {"hidden": 0}, "hidden"),
        ("resnet20", {"base_width": -16}, "base_width"),
    ],
)
def test_bad_param_values_name_the_setting(name, params, setting):
    with pytest.raises(ValueError, match=rf"model\.params\.{setting}="):
        build(name, params)


def test_bad_dataset_shape_is_rejected():
    with pytest.raises(ValueError, match=r"num_classes=0"):
        build("mlp", n=0)


def test_register_model_refuses_duplicates_and_bad_signatures():
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(lambda *, in_channels, num_classes, image_size: None)
    with pytest.raises(TypeError, match="image_size"):
        register_model("broken")(lambda *, in_channels, num_classes: None)
    assert "broken" not in MODELS


# ---- configs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_model():
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_MODEL.parent), version_base=None):
        yield lambda name, *overrides: compose(overrides=[f"+model={name}", *overrides]).model
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_yaml_spells_out_the_constructor_defaults(compose_model, name):
    cfg = compose_model(name)
    assert cfg.name == name
    assert OmegaConf.to_container(cfg.params) == model_param_defaults(name)


def test_yaml_param_overrides_reach_the_model(compose_model):
    cfg = OmegaConf.to_object(compose_model("vit", "model.params.depth=2", "model.params.hidden=48",
                                            "model.params.heads=4"))
    assert isinstance(cfg, ModelConfig)  # the _schema default makes it a ModelConfig
    model = build_model(cfg, in_channels=1, num_classes=10, image_size=16)
    assert len(model.enc) == 2 and model.pos_emb.shape == (1, 17, 48)
