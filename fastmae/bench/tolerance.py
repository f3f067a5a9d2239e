"""The tolerance rule for fast paths, stated once; the tests and `fastmae bench tune` both apply it.

A fast path's error against an fp32 reference must be at most `ERROR_FACTOR` times the plain PyTorch path's
error in the same dtype, plus a floor of `ERROR_FLOOR[dtype]` times the reference's largest magnitude (at
least 1), so that the floor means the same for values of any size. The plain path is the reference
implementation run in the tested dtype.
"""
from __future__ import annotations

import torch

ERROR_FACTOR = 2.0
ERROR_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, in float64 (0 for empty tensors)."""
    if not actual.numel():
        return 0.0
    return float((actual.detach().double() - expected.detach().double()).abs().max().cpu())


def floor_scale(ref32: torch.Tensor) -> float:
    """The reference's largest magnitude, at least 1: what the dtype's floor is multiplied by."""
    return max(1.0, float(ref32.detach().abs().max().cpu())) if ref32.numel() else 1.0


def error_bound(plain: torch.Tensor, ref32: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest error against `ref32` that the rule allows a fast path in `dtype`."""
    return ERROR_FACTOR * max_error(plain, ref32) + ERROR_FLOOR[dtype] * floor_scale(ref32)
