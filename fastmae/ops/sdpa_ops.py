"""The `sdpa` backend: PyTorch built-ins with no wasted work.

attention: `torch.nn.functional.scaled_dot_product_attention`, which picks its own kernel (flash,
memory-efficient, cuDNN or math). The token ops are written with PyTorch's native indexing, in the order
that avoids wasted work (no `[N, L, D]` expanded index tensors, only the visible patches embedded), so that
on a CPU, where Triton does not run, the model still does only the work MAE needs. Autograd gives the
gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .registry import ALL_FLOAT_DTYPES, OpImpl, register


def attention(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: [N, L, D], ids: [N, K] -> x[n, ids[n, j]] as [N, K, D], by one flat index_select."""
    n, L, d = x.shape
    flat = (ids + torch.arange(n, device=ids.device).unsqueeze(1) * L).reshape(-1)
    return x.reshape(n * L, d).index_select(0, flat).reshape(n, ids.shape[1], d)


def gather_patches(imgs, ids_keep, patch_size):
    n, c, h, w = imgs.shape
    p = patch_size
    gw = w // p
    # [N, gh, gw, C, p, q] as a view; advanced indexing copies the K kept patches only, not all L.
    x = imgs.reshape(n, c, h // p, p, gw, p).permute(0, 2, 4, 1, 3, 5)
    rows = torch.arange(n, device=ids_keep.device).unsqueeze(1)
    out = x[rows, ids_keep // gw, ids_keep % gw]
    return out.reshape(n, ids_keep.shape[1], c * p * p)


def gather_tokens(x, ids_keep, pos_embed, cls_token=None, gathered=False):
    n, K = ids_keep.shape
    pos = pos_embed[0, 1:, :].index_select(0, ids_keep.reshape(-1)).reshape(n, K, -1)
    body = (x if gathered else _rows(x, ids_keep)) + pos
    if cls_token is None:
        return body
    cls = (cls_token + pos_embed[:, :1, :]).expand(n, -1, -1)
    return torch.cat([cls, body], dim=1)


def unshuffle_tokens(x, ids_restore, mask_token, pos_embed):
    n, L = ids_restore.shape
    K = x.shape[1] - 1
    # one padded table per sample: visible tokens then the mask token; index it in patch order.
    table = torch.cat([x[:, 1:, :], mask_token.expand(n, 1, -1)], dim=1)
    idx = ids_restore.clamp(max=K)
    body = _rows(table, idx)
    return torch.cat([x[:, :1, :], body], dim=1) + pos_embed


_ANYWHERE = dict(devices=None, dtypes=ALL_FLOAT_DTYPES)  # plain PyTorch: any device, any float dtype
register(OpImpl(op="attention", backend="sdpa", fn=attention, **_ANYWHERE))
register(OpImpl(op="gather_patches", backend="sdpa", fn=gather_patches, **_ANYWHERE))
register(OpImpl(op="gather_tokens", backend="sdpa", fn=gather_tokens, **_ANYWHERE))
register(OpImpl(op="unshuffle_tokens", backend="sdpa", fn=unshuffle_tokens, **_ANYWHERE))
register(OpImpl(op="masked_mse_loss", backend="sdpa", fn=reference.masked_mse_loss, **_ANYWHERE))
