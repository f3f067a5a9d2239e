"""The `triton` backend: fastmae's own fused kernels (the `fastmae.kernels` package, folder `kernels/`).

Serves CUDA tensors on GPUs of compute capability 8.0 or newer, and CPU tensors only under Triton's
interpreter (`TRITON_INTERPRET=1` set before triton is imported), which the CPU test suite uses.
The kernel modules are imported on first use, so importing fastmae never compiles anything.
"""
from __future__ import annotations

import torch

from ..kernels.utils import interpreter_enabled, interpreter_problem, recording_capability  # torch only, no triton
from .registry import FLOAT_DTYPES, Inputs, LazyFn, OpImpl, register

ATTENTION_HEAD_DIMS = (16, 128)


def _lazy(module: str, name: str) -> LazyFn:
    return LazyFn(f"fastmae.kernels.{module}", name)


def _device_reasons(inputs: Inputs) -> list[str]:
    if inputs.device.type == "cpu" and recording_capability() is None:  # (recorded launches run nowhere)
        if not interpreter_enabled():
            return ["triton runs CPU tensors only under its interpreter (set TRITON_INTERPRET=1 before importing "
                    "triton)"]
        problem = interpreter_problem()
        if problem:
            return [problem]
    return []


def _checks(*, no_grad: tuple[str, ...] = (), float_dtypes: tuple[str, ...] = ()):
    """The device's reasons, then: tensors named in `float_dtypes` must be fp32, fp16 or bf16 (the registry checks
    the op's main input; these are the others, which a kernel reads in fp32 too), and tensors named in `no_grad`
    must not require a gradient (the kernels give them none)."""
    def check(inputs: Inputs) -> list[str]:
        out = _device_reasons(inputs)
        op = inputs.options.get("op", "op")
        for name in float_dtypes:
            t = inputs.tensors.get(name)
            if t is not None and t.dtype not in FLOAT_DTYPES:
                out.append(f"triton's {op} takes {name} in float32, float16 or bfloat16, got {t.dtype}")
        for name in no_grad:
            t = inputs.tensors.get(name)
            if t is not None and t.requires_grad and torch.is_grad_enabled():
                fixed = " (fixed sine-cosine position embeddings do not)" if name == "pos_embed" else ""
                out.append(f"triton's {op} gives no gradient to {name}, which requires one{fixed}")
        return out

    return check


_TRITON = dict(backend="triton", devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES, min_capability=(8, 0),
               requires=("triton",))

register(OpImpl(op="attention", fn=_lazy("attention", "attention"), head_dims=ATTENTION_HEAD_DIMS,
                check=_device_reasons, packed=_lazy("attention", "attention_packed"), **_TRITON))
register(OpImpl(op="gather_patches", fn=_lazy("tokens", "gather_patches"), check=_checks(no_grad=("imgs",)),
                **_TRITON))
register(OpImpl(op="gather_tokens", fn=_lazy("tokens", "gather_tokens"),
                check=_checks(no_grad=("pos_embed",), float_dtypes=("pos_embed", "cls_token")), **_TRITON))
register(OpImpl(op="unshuffle_tokens", fn=_lazy("tokens", "unshuffle_tokens"),
                check=_checks(no_grad=("pos_embed",), float_dtypes=("mask_token", "pos_embed")), **_TRITON))
register(OpImpl(op="masked_mse_loss", fn=_lazy("loss", "masked_mse_loss"),
                check=_checks(no_grad=("imgs", "mask"), float_dtypes=("imgs",)), **_TRITON))
