"""``hardware=auto``: per device, the fastest mode shown to learn the same; the compile cache.

Why: a GPU run in fp32 eager (``hardware=cuda``, the faithful reference) is 3-5x slower than
bf16 + channels-last + the whole step in one CUDA graph, and docs/benchmarks.md ("Fast path
learns the same (statistics)") shows that mode learns what fp32 eager learns. So the default,
``hardware=auto``, resolves each setting left at ``auto`` from the device the run computes on
and the work ahead, prints what it chose and why, and the run records the resolved values (its
config, hence its MLflow params) and the reason (MLflow tags ``hardware_mode`` and
``hardware_auto``). A setting given explicitly always wins (``hardware=auto
hardware.precision=fp32`` runs fp32; the other settings still resolve around it).

What ``auto`` resolves to:

==========  ==========================  =============  =====================  ===============
device      precision                   channels_last  cuda_graph             compile
==========  ==========================  =============  =====================  ===============
CUDA        bf16 (compute capability    with bf16      on with fp32/bf16      when the run
            >= 8.0, else fp32)                         (off with fp16)        trains >=
                                                                              ``compile_min_
                                                                              steps`` steps
MPS         fp32                        off            off                    off
CPU         fp32                        off            off                    off
==========  ==========================  =============  =====================  ===============

The compile threshold (``hardware.compile_min_steps``, default :data:`COMPILE_MIN_STEPS`):
``torch.compile`` of the model cost about 49 s per worker on an H200 (issue 23: a 2-epoch
ResNet-20 trial took 55.5 s first and 6.0 s after) and, once compiled, saves 2.4 ms per
batch-128 step on ResNet-56 (SAM 12.56 -> 10.16 ms with the CUDA graph, docs/benchmarks.md)
and 3.9 ms on ViT (11.34 -> 7.45 ms). At the smaller saving, 49 s pay back after about
20,000 steps: a 200-epoch CIFAR-10 run (about 68,000 steps at batch 128) compiles, a 10-epoch
sweep trial (about 3,400) does not. The persistent cache below makes later compiles of the
same model cheaper, but the threshold does not depend on the cache's state, so two runs of one
configuration always run the same mode.

The compile cache (:func:`use_compile_cache`): TorchInductor's and Triton's on-disk caches
(FX graphs, AOTAutograd graphs, compiled Triton kernels, ZSharp's own Triton kernels) go to
one persistent directory per user, ``${XDG_CACHE_HOME:-~/.cache}/zsharp-sweeps/inductor``
(``hardware.compile_cache`` or ``$ZSHARP_COMPILE_CACHE`` to move it, ``off`` for torch's own
``/tmp`` default). Every run and every sweep worker points its process there before anything
compiles, so the workers of a host and later sweeps reuse what the first one compiled.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from zsharp_sweeps.config import HardwareConfig, TrainConfig

log = logging.getLogger(__name__)

AUTO = "auto"
PRECISIONS = ("fp32", "bf16", "fp16")
#: The settings ``auto`` may resolve, in the order a mode is named (``bf16+cl+compile+graph``).
SETTINGS = ("precision", "channels_last", "compile", "cuda_graph")
#: ``hardware.compile=auto`` compiles on CUDA when the run trains at least this many steps
#: (module docstring: about 49 s of compile against about 2.4 ms saved per step).
COMPILE_MIN_STEPS = 20_000
#: Training images per dataset (the official train split), to estimate the steps ahead.
#: digits: the 80 % of scikit-learn's 1797 images that its fixed split trains on.
TRAIN_IMAGES = {
    "cifar10": 50_000, "cifar100": 50_000, "svhn": 73_257, "tiny_imagenet": 100_000,
    "mnist": 60_000, "fashion_mnist": 60_000, "digits": 1_437,
}
#: Environment variable naming the compile cache directory (the setting wins over it).
CACHE_ENV = "ZSHARP_COMPILE_CACHE"
CACHE_OFF = "off"


def check_switch(value: Any, setting: str, error: type[ValueError] = ValueError) -> bool | str:
    """A speed switch's value: ``True``, ``False`` or ``"auto"`` (``"true"``/``"false"``
    strings, as a YAML or command-line value may arrive, become booleans)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    if text == AUTO:
        return AUTO
    raise error(f"{setting}={value!r} is invalid: allowed true, false or auto.")


def check_precision(value: str, error: type[ValueError] = ValueError) -> str:
    if value not in (*PRECISIONS, AUTO):
        raise error(
            f"hardware.precision={value!r} is invalid: allowed one of fp32, bf16, fp16, auto."
        )
    return value


# ----- what the device offers (functions of their own, so tests can pretend) -------------
def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The CUDA card's compute capability (8.0 and later have bf16 tensor cores)."""
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def compile_supported() -> bool:
    """Whether ``torch.compile`` can run here (Dynamo supports this Python, Triton imports)."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return False
    except Exception:  # pragma: no cover - depends on the installation
        return False
    from zsharp_sweeps.optim.fused import _triton_importable

    return _triton_importable()


# ----- the decision ----------------------------------------------------------------------
@dataclass(frozen=True)
class Resolution:
    """What ``auto`` chose on one device: concrete values and one reason per setting."""

    device: str
    precision: str
    channels_last: bool
    compile: bool
    cuda_graph: bool
    #: The settings that were ``auto`` (the others were given explicitly).
    auto: tuple[str, ...] = ()
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        """``bf16+cl+graph`` (python -m zsharp_sweeps.bench --modes names modes so)."""
        parts = [self.precision] + [
            name for name, on in (("cl", self.channels_last), ("compile", self.compile),
                                  ("graph", self.cuda_graph)) if on
        ]
        return "+".join(parts)

    def summary(self) -> str:
        """One line: the mode and, for each setting ``auto`` chose, why."""
        why = "; ".join(f"{name}: {self.reasons[name]}" for name in self.auto
                        if name in self.reasons)
        head = f"hardware on {self.device}: {self.mode}"
        return f"{head} (auto: {why})" if why else f"{head} (all settings explicit)"

    def tags(self) -> dict[str, str]:
        """MLflow tags: the mode, and why (when anything was ``auto``)."""
        out = {"hardware_mode": self.mode}
        if self.auto:
            out["hardware_auto"] = self.summary()[:5000]
        return out


def resolve(hw: HardwareConfig, device: torch.device, steps_ahead: int | None) -> Resolution:
    """Resolve every ``auto`` setting of ``hw`` for ``device`` and ``steps_ahead`` training
    steps (None: unknown). Explicit values are kept as given."""
    auto = tuple(name for name in SETTINGS if getattr(hw, name) == AUTO)
    reasons: dict[str, str] = {}
    chosen: dict[str, Any] = {name: getattr(hw, name) for name in SETTINGS}
    if device.type == "cuda":
        _resolve_cuda(hw, device, steps_ahead, chosen, reasons)
    else:  # cpu, mps: fp32 eager, the faithful mode (nothing faster is measured there)
        defaults = {
            "precision": ("fp32", f"fp32 (no faster mode is measured to learn the same on "
                                  f"{device.type})"),
            "channels_last": (False, "off"),
            "compile": (False, "off"),
            "cuda_graph": (False, "off (needs CUDA)"),
        }
        for name in auto:
            chosen[name], reasons[name] = defaults[name]
    return Resolution(str(device), chosen["precision"], bool(chosen["channels_last"]),
                      bool(chosen["compile"]), bool(chosen["cuda_graph"]), auto, reasons)


def _resolve_cuda(hw: HardwareConfig, device: torch.device, steps_ahead: int | None,
                  chosen: dict[str, Any], reasons: dict[str, str]) -> None:
    if chosen["precision"] == AUTO:
        major, minor = cuda_capability(device)
        if (major, minor) >= (8, 0):
            chosen["precision"] = "bf16"
            reasons["precision"] = (f"bf16 (compute capability {major}.{minor} has bf16; "
                                    "learns what fp32 learns, docs/benchmarks.md)")
        else:
            chosen["precision"] = "fp32"
            reasons["precision"] = f"fp32 (compute capability {major}.{minor} lacks bf16)"
    precision = chosen["precision"]
    if chosen["channels_last"] == AUTO:
        chosen["channels_last"] = precision == "bf16"
        reasons["channels_last"] = ("on (NHWC convolutions on bf16 tensor cores)"
                                    if precision == "bf16" else f"off (pays with bf16, not {precision})")
    if chosen["cuda_graph"] == AUTO:
        chosen["cuda_graph"] = precision in ("fp32", "bf16")
        reasons["cuda_graph"] = ("on (replays the eager step bit for bit, one launch per step)"
                                 if chosen["cuda_graph"]
                                 else "off (fp16's loss scaler reads the host every step)")
    if chosen["compile"] == AUTO:
        min_steps = hw.compile_min_steps
        if not compile_supported():
            chosen["compile"] = False
            reasons["compile"] = "off (torch.compile cannot run here)"
        elif steps_ahead is None:
            chosen["compile"] = False
            reasons["compile"] = "off (steps ahead unknown for this dataset)"
        else:
            chosen["compile"] = steps_ahead >= min_steps
            reasons["compile"] = (f"{'on' if chosen['compile'] else 'off'} ({steps_ahead:,} "
                                  f"steps ahead {'>=' if chosen['compile'] else '<'} "
                                  f"hardware.compile_min_steps={min_steps:,})")


def train_images(dataset: str) -> int | None:
    """Images in ``dataset``'s official training split (data/specs.py, else this module's
    table); None if unknown."""
    from zsharp_sweeps.data.specs import SPECS

    spec = SPECS.get(dataset)
    return getattr(spec, "train_images", 0) or TRAIN_IMAGES.get(dataset)


def estimate_steps(cfg: TrainConfig) -> int | None:
    """Training steps the run will take: epochs x full batches per epoch (the train loader
    drops the last partial batch), capped by ``trainer.max_steps_per_epoch``. None when the
    dataset's size is not known here."""
    data = cfg.data
    images = data.synthetic_size if data.name == "synthetic" else train_images(data.name)
    if images is None:
        return None
    images = max(images - data.val_size, 0)
    if data.train_subset is not None:
        images = min(images, data.train_subset)
    per_epoch = images // data.batch_size
    if cfg.trainer.max_steps_per_epoch is not None:
        per_epoch = min(per_epoch, cfg.trainer.max_steps_per_epoch)
    return per_epoch * cfg.trainer.epochs


def resolve_config(cfg: TrainConfig, device: torch.device) -> tuple[TrainConfig, Resolution]:
    """``cfg`` with its hardware settings resolved for ``device`` (no ``auto`` left)."""
    res = resolve(cfg.hardware, device, estimate_steps(cfg))
    hw = replace(cfg.hardware, **{name: getattr(res, name) for name in SETTINGS})
    return replace(cfg, hardware=hw), res


def resolve_hardware(cfg: TrainConfig, device: torch.device) -> tuple[TrainConfig, dict[str, str]]:
    """What a run calls before it builds anything: resolve ``auto`` (logging what was chosen
    and why), point the compile cache at its directory; returns the resolved config and the
    MLflow tags that record the choice."""
    cache = use_compile_cache(cfg.hardware.compile_cache)
    cfg, res = resolve_config(cfg, device)
    if res.auto:
        log.info(res.summary())
    tags = res.tags()
    if cache is not None:
        tags["compile_cache"] = cache
    return cfg, tags


# ----- the compile cache -----------------------------------------------------------------
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zsharp-sweeps" / "inductor"


def compile_cache_dir(setting: str | None) -> Path | None:
    """The directory ``hardware.compile_cache`` names: the setting, else ``$ZSHARP_COMPILE_CACHE``,
    else :func:`default_cache_dir`; None for ``off`` (torch's own default stays)."""
    value = setting if setting else os.environ.get(CACHE_ENV) or None
    if value is not None and str(value).strip().lower() == CACHE_OFF:
        return None
    return Path(value).expanduser().absolute() if value else default_cache_dir()


#: Caches that must be on for a second compile of the same graph to be a hit (on by default
#: in recent PyTorch; set explicitly so an older one on a GPU host does the same).
_CACHE_SWITCHES = {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


def use_compile_cache(setting: str | None) -> str | None:
    """Point this process's TorchInductor and Triton caches at :func:`compile_cache_dir`
    (environment variables, read when they first compile, and inherited by their compile
    workers). An explicit setting or ``$ZSHARP_COMPILE_CACHE`` wins over a
    ``TORCHINDUCTOR_CACHE_DIR`` already in the environment; the default does not. A
    ``TRITON_CACHE_DIR`` of the user's is kept. Returns the inductor cache directory in
    effect (None when ``off`` left torch's default)."""
    directory = compile_cache_dir(setting)
    if directory is None:
        return os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    explicit = bool(setting) or bool(os.environ.get(CACHE_ENV))
    if explicit or "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    inductor = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    os.environ.setdefault("TRITON_CACHE_DIR", str(inductor / "triton"))
    for name, value in _CACHE_SWITCHES.items():
        os.environ.setdefault(name, value)
    try:
        inductor.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only home: compile still works, uncached
        log.warning(f"compile cache {inductor} cannot be created ({exc}); "
                    "set hardware.compile_cache to a writable directory")
    return str(inductor)


# ----- python -m zsharp_sweeps.training.hardware -----------------------------------------
#: What ``main`` resolves: the default run (CIFAR-10, ResNet-20, 200 epochs) and shorter ones.
EXAMPLE_EPOCHS = {"a 200-epoch CIFAR-10 run (the default)": 200,
                  "a 10-epoch sweep trial": 10, "a 2-epoch sweep trial": 2}


def auto_hardware() -> HardwareConfig:
    """``hardware=auto`` as conf/hardware/auto.yaml writes it."""
    from zsharp_sweeps.config import HardwareConfig

    return HardwareConfig(precision=AUTO, channels_last=AUTO, compile=AUTO, cuda_graph=AUTO)


def main(argv: Sequence[str] | None = None) -> int:
    """Print what ``hardware=auto`` resolves to on this machine for a few runs."""
    import argparse

    from zsharp_sweeps.config import TrainConfig, TrainerConfig

    parser = argparse.ArgumentParser(prog="python -m zsharp_sweeps.training.hardware",
                                     description=main.__doc__)
    parser.add_argument("--device", default=None, help="default: cuda, then mps, then cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else torch.device(
        "cuda" if torch.cuda.is_available()
        else "mps" if torch.backends.mps.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"hardware=auto on {name} (torch {torch.__version__}); compile cache "
          f"{compile_cache_dir(None)}")
    for label, epochs in EXAMPLE_EPOCHS.items():
        cfg = TrainConfig(hardware=auto_hardware(), trainer=TrainerConfig(epochs=epochs))
        res = resolve(cfg.hardware, device, estimate_steps(cfg))
        print(f"- {label}: {res.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
