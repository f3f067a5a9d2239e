"""Fixed 2-D sine-cosine position embeddings, numerically as the official MAE builds them (float64 maths,
float32 result), and resizing of a stored position embedding to another grid."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: [M] positions -> [M, embed_dim]: sin in the first half, cos in the second."""
    if embed_dim % 2:
        raise ValueError(f"sine-cosine position embedding needs an even width, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """[gh*gw (+1), embed_dim] float32, patches in row-major order; row 0 all zeros when `cls_token`.

    As in the official code, the first half of the channels encodes the column (w) coordinate and the
    second half the row (h) coordinate.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sine-cosine position embedding needs a width divisible by 4, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    hh, ww = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    emb = torch.cat([sincos_1d(embed_dim // 2, ww), sincos_1d(embed_dim // 2, hh)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_extra_tokens: int = 1) -> torch.Tensor:
    """Bicubic resize of a [1, extra + g*g, D] position embedding to [1, extra + new_grid^2, D]."""
    extra, grid = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    old = int(math.isqrt(grid.shape[1]))
    if old * old != grid.shape[1]:
        raise ValueError(f"position embedding with {grid.shape[1]} patch rows is not a square grid")
    if old == new_grid:
        return pos_embed
    d = grid.shape[-1]
    grid = grid.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=1)
