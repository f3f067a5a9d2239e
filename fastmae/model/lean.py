"""The memory-lean transformer block: `mlp(norm2(x))` and `qkv(norm1(x))` that keep only what their matmuls need.

Plain autograd keeps, per token of every block, the LayerNorm outputs (cast for qkv and fc1), the fc1 output
(for GELU's backward) and the GELU output (fc2's input): 1 + 1 + 4 + 4 widths. These functions keep the
LayerNorms' inputs (which the LayerNorms need anyway) with their mean and rstd, and the fc1 output, and
recompute the LayerNorm outputs and the GELU in the backward: 6 widths fewer per token. At MAE's shapes that
is about a third of the activation memory of a training step, for extra elementwise passes in the backward.

Numerics follow the plain path op for op, autocast included: under autocast the LayerNorm runs in fp32 and
the matmuls, GELU and their gradients in the autocast dtype, with weight gradients returned in the weights'
dtype. Only aten ops are used in the backward (no nested autograd), so `torch.compile` traces it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _compute_dtype(x: torch.Tensor) -> tuple[torch.dtype, bool]:
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.dtype != torch.float64:  # autocast leaves float64 alone
        return torch.get_autocast_dtype(dev), True
    return x.dtype, False


def _ln_inputs(x, ln_w, ln_b, autocast):
    """What layer_norm computes on: under autocast fp32 (its policy casts fp16 and bf16 inputs, weights too)."""
    if not autocast:
        return x, ln_w, ln_b
    return x.float(), ln_w.float(), ln_b.float()


def _norm_linear_forward(x, ln_w, ln_b, eps, w, b, cdt, autocast):
    """(LayerNorm(x) @ w^T + b in cdt, mean, rstd); autocast runs layer_norm in fp32."""
    x_ln, ln_w, ln_b = _ln_inputs(x, ln_w, ln_b, autocast)
    y, mean, rstd = torch.ops.aten.native_layer_norm(x_ln, [x.shape[-1]], ln_w, ln_b, eps)
    return F.linear(y.to(cdt), w.to(cdt), b.to(cdt)), mean, rstd


def _norm_linear_backward(dh, x, ln_w, ln_b, mean, rstd, eps, w, cdt, autocast, need):
    """Gradients (dx, dln_w, dln_b, dw, db) of `_norm_linear_forward` from dh = dL/d(output) [T, out] in cdt,
    with the LayerNorm output recomputed; `need` says which of the five are wanted."""
    x_ln, w_ln, b_ln = _ln_inputs(x, ln_w, ln_b, autocast)
    y = torch.ops.aten.native_layer_norm(x_ln, [x.shape[-1]], w_ln, b_ln, eps)[0]  # recomputed
    dw = (dh.t() @ y.to(cdt).reshape(-1, y.shape[-1])).to(w.dtype) if need[3] else None
    db = dh.sum(0).to(w.dtype) if need[4] else None
    dx = dlnw = dlnb = None
    if need[0] or need[1] or need[2]:
        dy = (dh @ w.to(cdt)).reshape(y.shape).to(y.dtype)
        dx, dlnw, dlnb = torch.ops.aten.native_layer_norm_backward(
            dy, x_ln, [x.shape[-1]], mean, rstd, w_ln, b_ln, [need[0], need[1], need[2]])
        dx = dx.to(x.dtype) if dx is not None else None
        dlnw = dlnw.to(ln_w.dtype) if dlnw is not None else None
        dlnb = dlnb.to(ln_b.dtype) if dlnb is not None else None
    return dx, dlnw, dlnb, dw, db


class _NormLinear(torch.autograd.Function):
    """linear(norm(x)), keeping x and the LayerNorm statistics (not the normalised x) for the backward."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, eps, w, b):
        cdt, autocast = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            out, mean, rstd = _norm_linear_forward(x, ln_w, ln_b, eps, w, b, cdt, autocast)
        ctx.save_for_backward(x, ln_w, ln_b, mean, rstd, w)
        ctx.cdt, ctx.autocast, ctx.eps = cdt, autocast, eps
        return out

    @staticmethod
    @once_differentiable  # the saved statistics carry no graph: a double backward raises
    def backward(ctx, dout):
        x, ln_w, ln_b, mean, rstd, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.autocast(x.device.type, enabled=False):
            dh = dout.to(ctx.cdt).reshape(-1, dout.shape[-1])
            dx, dlnw, dlnb, dw, db = _norm_linear_backward(dh, x, ln_w, ln_b, mean, rstd, ctx.eps, w, ctx.cdt,
                                                           ctx.autocast, need[:3] + need[4:6])
        return dx, dlnw, dlnb, None, dw, db


class _NormMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_w, ln_b, eps, w1, b1, w2, b2):
        cdt, autocast = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            h, mean, rstd = _norm_linear_forward(x, ln_w, ln_b, eps, w1, b1, cdt, autocast)
            out = F.linear(F.gelu(h), w2.to(cdt), b2.to(cdt))
        ctx.save_for_backward(x, ln_w, ln_b, mean, rstd, w1, h, w2)
        ctx.cdt, ctx.autocast, ctx.eps = cdt, autocast, eps
        return out

    @staticmethod
    @once_differentiable  # the saved statistics carry no graph: a double backward raises
    def backward(ctx, dout):
        x, ln_w, ln_b, mean, rstd, w1, h, w2 = ctx.saved_tensors
        cdt = ctx.cdt
        need = ctx.needs_input_grad
        with torch.autocast(x.device.type, enabled=False):
            d_out = dout.to(cdt).reshape(-1, dout.shape[-1])
            h2 = h.reshape(-1, h.shape[-1])
            a = F.gelu(h2)  # recomputed
            dw2 = (d_out.t() @ a).to(w2.dtype) if need[6] else None
            db2 = d_out.sum(0).to(w2.dtype) if need[7] else None
            del a
            dh = torch.ops.aten.gelu_backward(d_out @ w2.to(cdt), h2)
            dx, dlnw, dlnb, dw1, db1 = _norm_linear_backward(dh, x, ln_w, ln_b, mean, rstd, ctx.eps, w1, cdt,
                                                             ctx.autocast, need[:3] + need[4:6])
        return dx, dlnw, dlnb, None, dw1, db1, dw2, db2


def _check_layers(norm, *linears, act=None) -> None:
    """The layers these functions compute in place of calling them must be exactly what they compute: a
    subclass's forward or a replaced activation would otherwise be bypassed without a word (their forward
    hooks do not run either: documented)."""
    if type(norm) is not torch.nn.LayerNorm or len(norm.normalized_shape) != 1:
        raise TypeError(f"lean_blocks computes torch.nn.LayerNorm over the last dimension itself, got "
                        f"{type(norm).__name__} (whose forward it would bypass); turn lean_blocks off")
    if any(type(lin) is not torch.nn.Linear for lin in linears):
        raise TypeError(f"lean_blocks computes torch.nn.Linear itself, got "
                        f"{', '.join(type(lin).__name__ for lin in linears)}; turn lean_blocks off")
    if act is not None and (type(act) is not torch.nn.GELU or act.approximate != "none"):
        raise TypeError(f"lean_blocks computes the exact GELU itself, got {act!r}; turn lean_blocks off")
    if any(lin.bias is None for lin in linears) or norm.weight is None:
        raise TypeError("the lean block takes Linear layers with biases and an affine LayerNorm")


def norm_mlp(x: torch.Tensor, norm: torch.nn.LayerNorm, fc1: torch.nn.Linear, fc2: torch.nn.Linear,
             weights: tuple[torch.Tensor, ...] | None = None, act: torch.nn.Module | None = None) -> torch.Tensor:
    """fc2(gelu(fc1(norm(x)))), keeping x, the LayerNorm statistics and fc1's output for the backward.
    `weights`: (fc1 weight, fc1 bias, fc2 weight, fc2 bias) to use instead of the layers' own, such as the ones
    `layers.cast_block_weights` cast in a group (already in the autocast dtype: no cast here either way).
    `act`: the block's activation module, checked to be the exact GELU this computes."""
    _check_layers(norm, fc1, fc2, act=act)
    w1, b1, w2, b2 = (fc1.weight, fc1.bias, fc2.weight, fc2.bias) if weights is None else weights
    return _NormMlp.apply(x, norm.weight, norm.bias, norm.eps, w1, b1, w2, b2)


def norm_linear(x: torch.Tensor, norm: torch.nn.LayerNorm, linear: torch.nn.Linear,
                weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """linear(norm(x)), keeping x and the LayerNorm statistics for the backward (the attention half's qkv).
    `weights`: (weight, bias) to use instead of the layer's own, as `norm_mlp` takes them."""
    _check_layers(norm, linear)
    w, b = (linear.weight, linear.bias) if weights is None else weights
    return _NormLinear.apply(x, norm.weight, norm.bias, norm.eps, w, b)
