"""fastmae's ops: one public function per op, each dispatched to a backend through the registry.

    attention(q, k, v, *, scale=None, backend=None)                         [B, H, N, D] -> [B, H, N, D]
    attention_qkv(qkv, num_heads, *, scale=None, backend=None)              [B, N, 3*H*D] -> [B, H, N, D]
    gather_patches(imgs, ids_keep, patch_size, *, backend=None)             kept patches' pixels, [N, K, C*p*p]
    gather_tokens(x, ids_keep, pos_embed, cls_token=None, *, gathered=False, backend=None)
                                                                            encoder input, [N, K+1, D]
    unshuffle_tokens(x, ids_restore, mask_token, pos_embed, *, backend=None)
                                                                            decoder input, [N, L+1, Dd]
    masked_mse_loss(pred, imgs, mask, patch_size, norm_pix=False, *, pred_ids=None, backend=None)
                                                                            scalar loss

The exact semantics of each op are the docstrings of `fastmae.ops.reference`, the ground truth.
`backend` is None (use the context / environment / automatic choice), a backend name, or a mapping from
op name to backend name; see `fastmae.ops.registry` for the rules.
"""
from __future__ import annotations

import operator

import torch

from ..kernels.utils import qkv_head_dim, split_qkv  # torch only, never triton
from . import reference
from .registry import (BACKENDS, ENV_VAR, OPS, BackendSpec, BackendUnavailable, Inputs, OpImpl, get_impl,
                       not_supported_reasons, parse_backend, priority, record_choices, requested, resolve,
                       set_priority, use_backend)

__all__ = [
    "attention", "attention_qkv", "AttentionPlan", "gather_patches", "gather_tokens", "unshuffle_tokens",
    "masked_mse_loss", "backend_for", "use_backend", "parse_backend", "BackendUnavailable", "BACKENDS", "OPS",
    "ENV_VAR", "reference", "resolve", "Inputs", "OpImpl", "get_impl", "record_choices", "not_supported_reasons",
    "priority", "set_priority", "requested",
]


def _float_dtype(name: str, t: torch.Tensor) -> torch.dtype:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16 or bfloat16), got {t.dtype}")
    return t.dtype


def _index(name: str, t: torch.Tensor, ndim: int, n: int) -> None:
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {t.dtype}")
    if t.dim() != ndim or t.shape[0] != n:
        raise ValueError(f"{name} must be [N, ...] with N = {n} and {ndim} dims, got {tuple(t.shape)}")


def _pixels_per_patch(imgs: torch.Tensor, patch_size: int) -> tuple[int, int]:
    if imgs.dim() != 4:
        raise ValueError(f"imgs must be [N, C, H, W], got shape {tuple(imgs.shape)}")
    try:
        ok = not isinstance(patch_size, bool) and operator.index(patch_size) >= 1
    except TypeError:  # not an integer (2.0, a string)
        ok = False
    if not ok:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    _, c, h, w = imgs.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image sides {h}x{w} are not divisible by the patch size {patch_size}")
    return (h // patch_size) * (w // patch_size), c * patch_size * patch_size


def backend_for(op: str, inputs: Inputs, backend: BackendSpec = None) -> str:
    """The name of the backend that would serve `op` for `inputs` (raises like the op would)."""
    return resolve(op, inputs, backend).backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              backend: BackendSpec = None) -> torch.Tensor:
    """Softmax attention. q, k, v: [B, H, N, D] (strided views allowed); returns [B, H, N, D]."""
    dtype = _float_dtype("q", q)
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention takes q, k, v of one shape [B, H, N, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != dtype or v.dtype != dtype:
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    inputs = Inputs(q.device, dtype, head_dim=q.shape[-1], tensors={"q": q, "k": k, "v": v},
                    options={"op": "attention"})
    return resolve("attention", inputs, backend).fn(q, k, v, scale)


def attention_qkv(qkv: torch.Tensor, num_heads: int, *, scale: float | None = None,
                  backend: "BackendSpec | AttentionPlan" = None) -> torch.Tensor:
    """`attention` on the packed output of one qkv projection, [B, N, 3 * H * D] in timm's (3, H, D) order.

    The backend is the `attention` op's. Backends with a packed form (triton) compute the gradient of qkv in one
    piece; the others run `attention` on q, k, v views of qkv, which is what the model did before.
    `backend` may also be an `AttentionPlan`, which reuses the choice it made for an earlier call.
    """
    if type(backend) is AttentionPlan:
        return backend(qkv, num_heads, scale)
    return _attention_qkv(qkv, num_heads, scale, backend)


def _attention_qkv(qkv: torch.Tensor, num_heads: int, scale: float | None, backend: BackendSpec) -> torch.Tensor:
    return _run_qkv(_resolve_qkv(qkv, num_heads, backend), qkv, num_heads, scale)


def _resolve_qkv(qkv: torch.Tensor, num_heads: int, backend: BackendSpec) -> OpImpl:
    _float_dtype("qkv", qkv)
    # q, k and v share qkv's device, dtype and requires_grad: the choice is made on qkv, and views are made
    # only for a backend without a packed form (a packed one splits inside its launcher)
    inputs = Inputs(qkv.device, qkv.dtype, head_dim=qkv_head_dim(qkv, num_heads), tensors={"qkv": qkv},
                    options={"op": "attention"})
    return resolve("attention", inputs, backend)


def _run_qkv(impl: OpImpl, qkv: torch.Tensor, num_heads: int, scale: float | None) -> torch.Tensor:
    """`impl` on a packed projection: its packed form where it has one, else its `fn` on q, k, v views."""
    if impl.packed is not None:
        return impl.packed(qkv, num_heads, scale)
    return impl.fn(*split_qkv(qkv, num_heads), scale)


class AttentionPlan:
    """`attention_qkv` for a run of calls alike, such as the blocks of one stack in one forward: the first call
    chooses the backend as `attention_qkv` does (the registry, its reasons, `record_choices`), and later calls with
    the same device, dtype, shape, head count and requires_grad reuse that choice instead of asking the registry
    again (at MAE's shapes the registry's answer costs a block tens of microseconds of host time, as much as
    launching one kernel). A call that differs is chosen afresh; under torch.compile every call is (the choice is
    a constant of the graph there anyway). The registry's state (backend contexts, priorities, the environment)
    is read when a choice is made: make a new plan after changing it.

        plan = AttentionPlan(model.backend)
        out = ops.attention_qkv(qkv, num_heads, backend=plan)    # or plan(qkv, num_heads)
    """

    __slots__ = ("backend", "_key", "_impl")

    def __init__(self, backend: BackendSpec = None):
        if type(backend) is AttentionPlan:
            raise TypeError("an AttentionPlan takes a backend (name, mapping or None), not another plan")
        self.backend = backend
        self._key = None
        self._impl: OpImpl | None = None

    def __call__(self, qkv: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _attention_qkv(qkv, num_heads, scale, self.backend)
        key = (qkv.shape, qkv.dtype, qkv.device, qkv.requires_grad, num_heads)
        if key != self._key:
            self._impl = _resolve_qkv(qkv, num_heads, self.backend)
            self._key = key
        return _run_qkv(self._impl, qkv, num_heads, scale)


def gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, *,
                   backend: BackendSpec = None) -> torch.Tensor:
    """Patchify and gather in one step: the kept patches' pixels [N, K, C*p*p] in conv-weight (c, p, q) order."""
    dtype = _float_dtype("imgs", imgs)
    _pixels_per_patch(imgs, patch_size)  # checks the image against the patch size
    _index("ids_keep", ids_keep, 2, imgs.shape[0])
    inputs = Inputs(imgs.device, dtype, tensors={"imgs": imgs}, options={"op": "gather_patches"})
    return resolve("gather_patches", inputs, backend).fn(imgs, ids_keep, patch_size)


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor,
                  cls_token: torch.Tensor | None = None, *, gathered: bool = False,
                  backend: BackendSpec = None) -> torch.Tensor:
    """The masking gather with position embedding and class token; see `reference.gather_tokens`."""
    dtype = _float_dtype("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be [N, L, D] or [N, K, D], got {tuple(x.shape)}")
    _index("ids_keep", ids_keep, 2, x.shape[0])
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[-1] != x.shape[-1]:
        raise ValueError(f"pos_embed must be [1, L+1, D] with D = {x.shape[-1]}, got {tuple(pos_embed.shape)}")
    if not gathered and pos_embed.shape[1] != x.shape[1] + 1:
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} rows, expected L+1 = {x.shape[1] + 1}")
    if gathered and x.shape[1] != ids_keep.shape[1]:
        raise ValueError(f"gathered x has {x.shape[1]} tokens but ids_keep keeps {ids_keep.shape[1]}")
    inputs = Inputs(x.device, dtype, tensors={"x": x, "pos_embed": pos_embed, "cls_token": cls_token},
                    options={"op": "gather_tokens"})
    return resolve("gather_tokens", inputs, backend).fn(x, ids_keep, pos_embed, cls_token, gathered)


def unshuffle_tokens(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                     pos_embed: torch.Tensor, *, backend: BackendSpec = None) -> torch.Tensor:
    """Decoder input: visible + mask tokens in patch order, plus position embedding; see the reference."""
    dtype = _float_dtype("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be [N, K+1, Dd], got {tuple(x.shape)}")
    _index("ids_restore", ids_restore, 2, x.shape[0])
    L = ids_restore.shape[1]
    if not 1 <= x.shape[1] <= L + 1:  # row 0 is the class token: x holds it and at most L visible tokens
        raise ValueError(f"x must be [N, K+1, Dd] with 0 <= K <= L = {L} (the class token first), got "
                         f"{tuple(x.shape)}")
    if tuple(pos_embed.shape) != (1, L + 1, x.shape[-1]):
        raise ValueError(f"pos_embed must be [1, {L + 1}, {x.shape[-1]}], got {tuple(pos_embed.shape)}")
    inputs = Inputs(x.device, dtype, tensors={"x": x, "mask_token": mask_token, "pos_embed": pos_embed},
                    options={"op": "unshuffle_tokens"})
    return resolve("unshuffle_tokens", inputs, backend).fn(x, ids_restore, mask_token, pos_embed)


def masked_mse_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                    norm_pix: bool = False, *, pred_ids: torch.Tensor | None = None,
                    backend: BackendSpec = None) -> torch.Tensor:
    """Pixel reconstruction loss on removed patches; see `reference.masked_mse_loss`."""
    dtype = _float_dtype("pred", pred)
    _float_dtype("imgs", imgs)
    L, P = _pixels_per_patch(imgs, patch_size)
    if pred_ids is not None:
        _index("pred_ids", pred_ids, 2, imgs.shape[0])
    rows = L if pred_ids is None else pred_ids.shape[1]
    if pred.dim() != 3 or tuple(pred.shape) != (imgs.shape[0], rows, P):
        raise ValueError(f"pred must be [N, {rows}, {P}] for these images, got {tuple(pred.shape)}")
    if tuple(mask.shape) != (imgs.shape[0], L):
        raise ValueError(f"mask must be [N, L] = [{imgs.shape[0]}, {L}], got {tuple(mask.shape)}")
    inputs = Inputs(pred.device, dtype, tensors={"pred": pred, "imgs": imgs, "mask": mask},
                    options={"op": "masked_mse_loss"})
    return resolve("masked_mse_loss", inputs, backend).fn(pred, imgs, mask, patch_size, norm_pix, pred_ids)
