"""The `xformers` backend: `xformers.ops.memory_efficient_attention`, attention only, CUDA only.

xformers takes `[B, N, H, D]`; fastmae's API is `[B, H, N, D]`, so inputs and output are transposed
(views, no copies where xformers accepts the strides). Imported lazily: an optional extra, never required.
"""
from __future__ import annotations

import torch

from .registry import Inputs, OpImpl, register


def attention(q, k, v, scale=None):
    import xformers.ops as xops

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def _check(inputs: Inputs) -> list[str]:
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # a broken install (for example built for another torch) says why
        return [f"xformers is installed but does not import: {type(exc).__name__}: {exc}"]
    return []


register(OpImpl(op="attention", backend="xformers", fn=attention, devices=("cuda",),
                dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dims=(8, 256), min_capability=(7, 0),
                requires=("xformers",), check=_check))
