"""The small ViT of omihub777/ViT-CIFAR, which the official ZSharp code trains.

Why this model and these details: the ZSharp paper's ViT results ("ViT-7/8/8-384")
come from the official code, built on omihub777/ViT-CIFAR with its command-line
defaults (``--patch 8 --num-layers 7 --hidden 384 --mlp-hidden 384 --head 12
--dropout 0``). We reproduce that network, including its quirks, because the
optimizer comparison is only meaningful on the same model:

* the image is cut into non-overlapping ``patch_size`` x ``patch_size`` patches
  (omihub's ``--patch 8`` is the number of patches per side: 8 x 8 patches of 4 px
  on a 32 px image); each patch is flattened in (row, column, channel) order and
  embedded by one ``nn.Linear`` -- a 2-D weight, as in the original, which matters
  for ZSharp's per-tensor z-score filtering;
* a learned class token and learned position embeddings (``torch.randn`` init, std
  1, as the original), 65 tokens at 32 px;
* ``depth`` pre-norm encoder layers: ``x + MSA(LN(x))`` then ``x + MLP(LN(x))``;
  q, k, v and the output projection are separate ``nn.Linear`` layers (separate
  tensors, again for per-tensor filtering);
* **quirk 1**: attention logits are divided by sqrt(hidden) (omihub's
  ``sqrt_d = feats**0.5``), not by sqrt(hidden / heads) as in the ViT paper.
  ``attn_scale="head_dim"`` switches to the standard scale;
* **quirk 2**: the MLP is Linear-GELU-Dropout-Linear-GELU-Dropout (a GELU after the
  second linear too), with hidden width ``mlp_hidden`` (384, not 4 x 384);
* dropout only after the attention output projection and in the MLP (none on the
  attention probabilities);
* a final LayerNorm and a linear head on the class token.

With the defaults at 32 px, 3 channels and 10 classes it has 6,268,810 parameters.

Speed: attention runs through ``F.scaled_dot_product_attention`` (fused kernels on
GPU, traceable by ``torch.compile``); patching is a reshape/permute with static
sizes, so the forward pass has no data-dependent control flow.

Adaptation: ``in_channels`` enters the patch vector length (omihub hard-codes 3);
the number of patches is derived from ``image_size / patch_size``, which must divide
(16 px digits with ``patch_size=4`` give 4 x 4 = 16 patches + class token).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zsharp_sweeps.models.registry import (
    check_dropout,
    check_param,
    check_positive_int,
    register_model,
)

ATTN_SCALES = ("hidden", "head_dim")


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections."""

    def __init__(self, hidden: int, heads: int, dropout: float, scale: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.hidden = hidden
        self.scale = scale
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        # (b, n, hidden) -> (b, heads, n, head_dim)
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        attn = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        attn = attn.transpose(1, 2).flatten(2)  # (b, n, hidden)
        return self.dropout(self.o(attn))


class TransformerEncoder(nn.Module):
    """Pre-norm encoder layer: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self, hidden: int, mlp_hidden: int, heads: int, dropout: float, scale: float
    ) -> None:
        super().__init__()
        self.la1 = nn.LayerNorm(hidden)
        self.msa = MultiHeadSelfAttention(hidden, heads, dropout, scale)
        self.la2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.msa(self.la1(x))
        return x + self.mlp(self.la2(x))


class ViT(nn.Module):
    """Patch embedding + class token + position embedding, encoder stack, LN + head."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        image_size: int,
        patch_size: int,
        hidden: int,
        depth: int,
        heads: int,
        mlp_hidden: int,
        dropout: float,
        attn_scale: str,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.num_patches = self.grid * self.grid
        scale_dim = hidden if attn_scale == "hidden" else hidden // heads
        scale = 1.0 / math.sqrt(scale_dim)

        self.emb = nn.Linear(patch_size * patch_size * in_channels, hidden)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden))
        self.pos_emb = nn.Parameter(torch.randn(1, self.num_patches + 1, hidden))
        self.enc = nn.Sequential(
            *(TransformerEncoder(hidden, mlp_hidden, heads, dropout, scale) for _ in range(depth))
        )
        self.fc = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, num_classes))

    def _to_words(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, H, W) -> (b, patches, p*p*c), patches row-major, features (row, col, c)."""
        g, p, c = self.grid, self.patch_size, self.in_channels
        x = x.reshape(-1, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(-1, g * g, p * p * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.emb(self._to_words(x))
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        out = torch.cat([cls, tokens], dim=1) + self.pos_emb
        out = self.enc(out)
        return self.fc(out[:, 0])


@register_model("vit")
def vit(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    patch_size: int = 4,
    hidden: int = 384,
    depth: int = 7,
    heads: int = 12,
    mlp_hidden: int = 384,
    dropout: float = 0.0,
    attn_scale: str = "hidden",
) -> ViT:
    """ViT-CIFAR as the ZSharp paper runs it (6.27M parameters for CIFAR-10)."""
    for key, value in (
        ("patch_size", patch_size), ("hidden", hidden), ("depth", depth),
        ("heads", heads), ("mlp_hidden", mlp_hidden),
    ):
        check_positive_int(key, value)
    check_param(
        image_size % patch_size == 0, "patch_size", patch_size,
        f"a divisor of the image size {image_size}",
        hint=f"The image is cut into (image_size / patch_size)^2 patches; "
        f"{image_size} / {patch_size} is not an integer.",
    )
    check_param(
        hidden % heads == 0, "heads", heads, f"a divisor of model.params.hidden={hidden}"
    )
    check_dropout("dropout", dropout)
    check_param(attn_scale in ATTN_SCALES, "attn_scale", attn_scale, "one of " + ", ".join(ATTN_SCALES))
    return ViT(
        in_channels=in_channels, num_classes=num_classes, image_size=image_size,
        patch_size=patch_size, hidden=hidden, depth=depth, heads=heads,
        mlp_hidden=mlp_hidden, dropout=float(dropout), attn_scale=attn_scale,
    )
