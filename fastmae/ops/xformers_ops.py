"""The `xformers` backend: `xformers.ops.memory_efficient_attention`, attention only, CUDA only.

xformers takes `[B, N, H, D]`; fastmae's API is `[B, H, N, D]`, so inputs and output are transposed
(views, no copies where xformers accepts the strides). Imported lazily: an optional extra, never required.
"""
from __future__ import annotations

import functools

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
    needs_grad = any(getattr(t, "requires_grad", False) for t in inputs.tensors.values() if t is not None)
    head_dim = inputs.head_dim or 64
    return list(dispatch_reasons(inputs.device, inputs.dtype, head_dim, needs_grad and torch.is_grad_enabled()))


@functools.lru_cache(maxsize=None)
def dispatch_reasons(device: torch.device, dtype: torch.dtype, head_dim: int, needs_grad: bool) -> tuple[str, ...]:
    """xformers' own answer, once per device, dtype, head dim and need of gradients: () when one of its operators
    serves the forward (and the backward), else its reasons, condensed. An xformers whose C++ extensions were
    built for another torch still serves through the operators that call PyTorch's own kernels; this says
    whether any does. Asked with a one-token input, as the choice does not depend on the sequence length."""
    try:
        from xformers.ops.fmha import common, dispatch
    except Exception:  # another layout of xformers' internals: the call itself will say
        return ()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    q = torch.zeros(1, 1, 1, head_dim, device=device, dtype=dtype)  # [B, M, H, K]
    inp = common.Inputs(query=q, key=q, value=q)
    try:
        dispatch._dispatch_fw(inp, needs_grad)
        if needs_grad:
            try:
                dispatch._dispatch_bw(inp, varlen_lse_packed=None)
            except TypeError:  # releases whose _dispatch_bw takes the inputs alone
                dispatch._dispatch_bw(inp)
    except NotImplementedError as exc:
        return (_condense(str(exc)),)
    except Exception:  # internals changed: the call itself will say
        return ()
    return ()


def _condense(message: str) -> str:
    """xformers' 'No operator found' message as one line: which pass, then each operator and its reasons."""
    lines = [ln.strip() for ln in message.splitlines()]
    which = "backward" if "backward" in (lines[0] if lines else "") else "forward"
    ops, current = [], None
    for ln in lines[1:]:
        if ln.endswith("is not supported because:"):
            current = [ln.split(" is not supported")[0].strip("`"), []]
            ops.append(current)
        elif current is not None and ln:
            current[1].append(ln)
    detail = "; ".join(f"{name}: {', '.join(why)}" for name, why in ops) or (lines[0] if lines else message)
    return f"xformers has no {which} operator for this input ({detail})"


register(OpImpl(op="attention", backend="xformers", fn=attention, devices=("cuda",),
                dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dims=(8, 256), min_capability=(7, 0),
                requires=("xformers",), check=_check))
