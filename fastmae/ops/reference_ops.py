"""Registers the reference path (`reference.py`) for every op: plain PyTorch, any device, any float dtype."""
from __future__ import annotations

from . import reference
from .registry import ALL_FLOAT_DTYPES, OpImpl, register

for _op in ("attention", "gather_patches", "gather_tokens", "unshuffle_tokens", "masked_mse_loss"):
    register(OpImpl(op=_op, backend="reference", fn=getattr(reference, _op), devices=None, dtypes=ALL_FLOAT_DTYPES))
