"""ViT building blocks with the timm parameter names the official MAE checkpoints use.

Owned here rather than imported from timm (MAE broke when timm changed its layers). Attention goes
through `fastmae.ops.attention`, so the backend is chosen per call.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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

    def attend(self, qkv: torch.Tensor, backend=None, proj: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> torch.Tensor:
        """Attention and output projection from the packed qkv projection [B, N, 3 * C]; `proj`: the output
        projection's (weight, bias) to use instead of `self.proj`'s (already cast, see `Block`)."""
        B, N, C3 = qkv.shape
        # the packed projection goes to the op as it is: q, k, v are strided views of it (no copies before the
        # kernel), and backends with a packed form write its gradient in one piece (no stack and copy after)
        x = ops.attention_qkv(qkv, self.num_heads, scale=self.scale, backend=backend)
        x = x.transpose(1, 2).reshape(B, N, C3 // 3)
        return self.proj(x) if proj is None else F.linear(x, *proj)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _CastWeights(torch.autograd.Function):
    """Weights cast to `dtype` by one multi-tensor copy, their gradients cast back by another: the numbers of
    autocast's casts (one kernel per weight in the forward, one per gradient in the backward)."""

    @staticmethod
    def forward(ctx, dtype, *weights):
        ctx.dtypes = [w.dtype for w in weights]
        ctx.set_materialize_grads(False)
        return tuple(_cast_all(weights, dtype))

    @staticmethod
    @once_differentiable  # _foreach_copy_ has no derivative: a double backward raises
    def backward(ctx, *grads):
        wanted = [i for i, g in enumerate(grads) if g is not None and ctx.needs_input_grad[1 + i]]
        out = [None] * len(grads)
        for i, g in zip(wanted, _cast_all([grads[i] for i in wanted], [ctx.dtypes[i] for i in wanted])):
            out[i] = g
        return (None, *out)


def _cast_all(tensors, dtypes) -> list[torch.Tensor]:
    """Contiguous copies of `tensors` in `dtypes` (one dtype, or one per tensor), made by `_foreach_copy_`: one
    kernel for all on CUDA where each list holds one dtype (torch loops over the tensors otherwise)."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(tensors)
    out = [torch.empty_like(t, dtype=dt, memory_format=torch.contiguous_format) for t, dt in zip(tensors, dtypes)]
    if out:
        torch._foreach_copy_(out, list(tensors))
    return out


def _no_hooks(modules) -> bool:
    from torch.nn.modules import module as _m
    if _m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks \
            or _m._global_backward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in modules)


def _block_params(blk) -> tuple[torch.Tensor, ...] | None:
    """(weight, bias) of qkv, proj, fc1 and fc2 of a plain block, lean or not: the layers `Block.forward(...,
    weights=)` replaces by their weights, all of their own types (no subclass, wrapper, adapter or
    parametrization, which keep their own forward), with fp32 parameters and no hooks (those modules are not
    called). None otherwise."""
    if type(blk) is not Block:
        return None
    attn, mlp = blk.attn, blk.mlp
    if type(attn) is not Attention or type(mlp) is not Mlp:
        return None
    linears = (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)
    if any(type(lin) is not nn.Linear for lin in linears) or not _no_hooks((attn, mlp, *linears)):
        return None
    out = []
    for lin in linears:
        for t in (lin._parameters.get("weight"), lin._parameters.get("bias")):
            if type(t) is not nn.Parameter or t.dtype != torch.float32:
                return None
            out.append(t)
    return tuple(out)


BLOCKS_PER_CAST = 4
# where the model groups the casts by default (`MaskedAutoencoderViT.group_weight_casts=None`): devices whose
# kernels the host launches one by one at a cost (on a CPU, grouping measured neither faster nor slower)
GROUPED_CAST_DEVICES = ("cuda",)


def cast_block_weights(blocks, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]] | None:
    """The linear weights and biases of `blocks` (qkv, proj, fc1, fc2 of each) cast to the autocast dtype of
    x's device, BLOCKS_PER_CAST blocks to one multi-tensor copy, and their gradients cast
    back the same way: [8 tensors per block], for `Block.forward(..., weights=)`. The same numbers as
    autocast's own casts, with one kernel where autocast launches one per weight and one per gradient.

    None (the blocks run as they would without it) where it does not apply: autocast off, torch.compile tracing
    (it fuses the casts itself), some weights requiring grad and others not, or a block that is not plain
    (`_block_params`); lean blocks take the cast weights into their own functions. A group's gradients reach
    its parameters once the backward has passed through all of its blocks (a few blocks' worth, about what one
    of DDP's buckets takes)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or torch.compiler.is_compiling():
        return None
    params = [_block_params(blk) for blk in blocks]
    if not params or any(p is None for p in params):
        return None
    needs = {t.requires_grad for p in params for t in p}
    if len(needs) > 1:  # frozen weights would get gradients computed for nothing
        return None
    dtype = torch.get_autocast_dtype(device)
    grad = torch.is_grad_enabled() and needs == {True}
    step = BLOCKS_PER_CAST
    out = []
    for i in range(0, len(params), step):
        flat = [t for p in params[i:i + step] for t in p]
        cast = _CastWeights.apply(dtype, *flat) if grad else _cast_all(flat, dtype)
        out += [tuple(cast[j:j + 8]) for j in range(0, len(cast), 8)]
    return out


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    `weights`: the linear layers' (weight, bias) pairs of qkv, proj, fc1 and fc2, already cast
    (`cast_block_weights`), to use instead of calling those modules. `backend`: attention's, as
    `ops.attention_qkv` takes it (a backend spec, or the `ops.AttentionPlan` the model gives a stack's blocks).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.lean_blocks = False  # recompute norm1, norm2 and GELU in the backward (fastmae.model.lean)

    def forward(self, x: torch.Tensor, backend=None, weights: tuple[torch.Tensor, ...] | None = None
                ) -> torch.Tensor:
        w = weights
        if self.lean_blocks:
            qkv_w, proj_w, mlp_w = (None, None, None) if w is None else (w[:2], w[2:4], w[4:])
            x = x + self.attn.attend(norm_linear(x, self.norm1, self.attn.qkv, qkv_w), backend, proj=proj_w)
            return x + norm_mlp(x, self.norm2, self.mlp.fc1, self.mlp.fc2, mlp_w, act=self.mlp.act)
        if w is not None:
            x = x + self.attn.attend(F.linear(self.norm1(x), w[0], w[1]), backend, proj=(w[2], w[3]))
            return x + F.linear(self.mlp.act(F.linear(self.norm2(x), w[4], w[5])), w[6], w[7])
        x = x + self.attn(self.norm1(x), backend=backend)
        return x + self.mlp(self.norm2(x))
