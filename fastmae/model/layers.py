"""ViT building blocks with the timm parameter names the official MAE checkpoints use.

Owned here rather than imported from timm (MAE broke when timm changed its layers). Attention goes
through `fastmae.ops.attention`, so the backend is chosen per call.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .lean import norm_linear, norm_mlp


def _square(name: str, size) -> int:
    """An int, or a (h, w) pair with h == w as timm's layers accept it; MAE's grids are square."""
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"{name} must be an int or a square (h, w) pair, got {tuple(size)}")
        size = size[0]
    return int(size)


class PatchEmbed(nn.Module):
    """Image [N, C, H, W] -> patch tokens [N, L, D] with a Conv2d(C, D, kernel=p, stride=p) named `proj`."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        img_size, patch_size = _square("img_size", img_size), _square("patch_size", patch_size)
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [N, K, C*p*p] in (c, p, q) order (`ops.gather_patches`) -> tokens [N, K, D]; equals the
        convolution at those patches."""
        w = self.proj.weight
        return F.linear(pixels, w.reshape(w.shape[0], -1), self.proj.bias)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, backend=None) -> torch.Tensor:
        return self.attend(self.qkv(x), backend)

    def attend(self, qkv: torch.Tensor, backend=None) -> torch.Tensor:
        """Attention and output projection from the packed qkv projection [B, N, 3 * C]."""
        B, N, C3 = qkv.shape
        # the packed projection goes to the op as it is: q, k, v are strided views of it (no copies before the
        # kernel), and backends with a packed form write its gradient in one piece (no stack and copy after)
        x = ops.attention_qkv(qkv, self.num_heads, scale=self.scale, backend=backend)
        return self.proj(x.transpose(1, 2).reshape(B, N, C3 // 3))


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.lean_blocks = False  # recompute norm1, norm2 and GELU in the backward (fastmae.model.lean)

    def forward(self, x: torch.Tensor, backend=None) -> torch.Tensor:
        if self.lean_blocks:
            x = x + self.attn.attend(norm_linear(x, self.norm1, self.attn.qkv), backend)
            return x + norm_mlp(x, self.norm2, self.mlp.fc1, self.mlp.fc2)
        x = x + self.attn(self.norm1(x), backend=backend)
        return x + self.mlp(self.norm2(x))
