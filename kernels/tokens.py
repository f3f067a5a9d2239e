"""Fused token kernels of the MAE: patch gather, masking gather, decoder unshuffle.

    gather_patches(imgs, ids_keep, patch_size)                 -> [N, K, C*p*p]   (no autograd)
    gather_tokens(x, ids_keep, pos_embed, cls_token, gathered) -> [N, K+1, D] or [N, K, D]
    unshuffle_tokens(x, ids_restore, mask_token, pos_embed)    -> [N, L+1, Dd]

Exact semantics: the docstrings of `fastmae.ops.reference`. What the kernels do instead of the reference:

- `gather_patches` reads the kept patches straight from the image `[N, C, H, W]` (any strides, so
  channels-last images need no copy) and writes each one as a (c, p, q) vector: no patchified copy of
  the whole image, no `[N, K, P]` int64 index tensor. It gives no gradient (pixels are data).
- `gather_tokens` writes the class token row (`cls_token + pos_embed[0, 0]`) and the K kept rows
  (`x[n, ids_keep[n, j]] + pos_embed[0, 1 + ids_keep[n, j]]`) in one pass: no `torch.cat`, no `[N, L, D]`
  int64 index tensor. With `gathered=True`, x is already `[N, K, D]` in kept order and only the position
  rows are gathered. Backward: grad to x (for `gathered=False` every row of grad_x is written exactly once,
  finding its row of grad_out by searching ids_keep[n] in the kernel: kept rows get their grad, the others
  zero, no inverse map, no atomics and no zero fill; the identity for `gathered=True`) and to cls_token (a
  fixed-order sum over the batch).
- `unshuffle_tokens` writes `[N, L+1, Dd]` in one pass: row 0 from x's class token, then for each patch l
  either the visible token x[n, 1 + ids_restore[n, l]] or the mask token, plus the position embedding.
  Backward: each output row's gradient goes to the single x row it came from (no atomics: ids_restore is a
  permutation), and the mask token's gradient is a two-stage fixed-order sum over the removed positions
  (per-program fp32 partial sums, then one column sum), so it is bitwise deterministic run to run.

Limits:
- No gradient to pos_embed (fixed sine-cosine embeddings; the registry refuses pos_embed requiring grad
  and these functions raise) and none to imgs.
- The last dim of x, pos_embed, cls_token and mask_token must be contiguous (a copy is made otherwise);
  ids are made contiguous. Indices are not bounds-checked on the device: they must be valid, and each
  row of ids_keep must hold distinct patches (as `argsort` gives), each row of ids_restore a permutation.
- fp32, fp16 and bf16; arithmetic in fp32 after each load, stores convert to the output's dtype.
  The output dtype follows PyTorch's type promotion of the inputs, as the reference does
  (x fp16 + pos_embed fp32 gives fp32); with one dtype throughout it is that dtype.
- Row and index arithmetic is int32 (row counts stay far below 2**31: no 64-bit divisions); memory offsets
  are int64 where a tensor can pass 2**31 elements.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from .launch import launch
from .utils import (FP_FUSION, NUM_STAGES, CompileSpec, cdiv, check_device, custom_op, image_patches,
                    launches_on_device_of, next_power_of_2)

# Launch choices (constants, not tuned on a GPU yet; the compile specs below follow them).
TOKEN_MAX_BLOCK_D = 1024  # row-copy kernels: one program per (block of rows, block of D)
TOKEN_TILE = 1024  # elements per program tile: rows per program = TOKEN_TILE // BLOCK_D
TOKEN_MAX_ROWS = 16
BWD_BLOCK_L = 16  # unshuffle backward: rows per tile
BWD_MAX_BLOCK_D = 64  # unshuffle backward: width of a tile
BWD_TARGET_PROGRAMS = 1024  # unshuffle backward: split rows until about this many programs
GATHER_BWD_BLOCK_K = 64  # gather_tokens backward (official order): kept indices compared per step of its search
COLSUM_BLOCK_R = 32  # stage-2 column sums
COLSUM_MAX_BLOCK_D = 64


def _warps(elements: int) -> int:
    """4 elements per thread, 1 to 8 warps. (8 per thread made ptxas spill on sm_80 where the row strides are not
    known to be multiples of 16, i.e. without vector loads, with one 64-bit address per element.)"""
    return max(1, min(8, elements // 128))


def _row_settings(d: int) -> tuple[int, int, int]:
    """(rows per program, BLOCK_D, num_warps) for the [rows, D] tiles of the row-copy kernels."""
    block_d = min(next_power_of_2(d), TOKEN_MAX_BLOCK_D)
    block_r = max(1, min(TOKEN_MAX_ROWS, TOKEN_TILE // block_d))
    return block_r, block_d, _warps(block_r * block_d)


def _patch_settings(channels: int, patch_size: int) -> tuple[int, int, int, int]:
    """(rows per program, BLOCK_C, BLOCK_P, num_warps) for the [rows, C, p, p] tiles of the patch gather."""
    block_c, block_p = next_power_of_2(channels), next_power_of_2(patch_size)
    tile = block_c * block_p * block_p
    block_r = max(1, min(TOKEN_MAX_ROWS, TOKEN_TILE // tile))
    return block_r, block_c, block_p, _warps(block_r * tile)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _no_grad_to(name: str, t: torch.Tensor | None) -> None:
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"fastmae.kernels.tokens gives no gradient to {name}, which requires one; "
                         f"detach it or use backend='reference'")


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _gather_patches_kernel(img_ptr, ids_ptr, out_ptr, n_rows, K, C, gw, p,
                           stride_n, stride_c, stride_h, stride_w,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program per BLOCK_R kept patches (row = n * K + j): a [BLOCK_R, C, p, p] tile of the image
    -> out[n, j] in (c, p, q) order."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # int32 index math; int64 for memory offsets
    rvalid = rows < n_rows
    n = (rows // K).to(tl.int64)
    idx = tl.load(ids_ptr + rows, mask=rvalid, other=0).to(tl.int32)
    ph = (idx // gw)[:, None, None, None]
    pw = (idx % gw)[:, None, None, None]
    c = tl.arange(0, BLOCK_C)[None, :, None, None]
    pi = tl.arange(0, BLOCK_P)[None, None, :, None]
    qi = tl.arange(0, BLOCK_P)[None, None, None, :]
    m = rvalid[:, None, None, None] & (c < C) & (pi < p) & (qi < p)
    src = (img_ptr + n[:, None, None, None] * stride_n + c * stride_c + (ph * p + pi) * stride_h
           + (pw * p + qi) * stride_w)
    v = tl.load(src, mask=m, other=0.0)
    dst = out_ptr + rows.to(tl.int64)[:, None, None, None] * (C * p * p) + c * (p * p) + pi * p + qi
    tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gather_tokens_fwd_kernel(x_ptr, ids_ptr, pos_ptr, cls_ptr, out_ptr, n_rows, K, D,
                              stride_xn, stride_xl, stride_pos, stride_on, stride_ol,
                              HAS_CLS: tl.constexpr, GATHERED: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (block of BLOCK_R output rows, block of D); output row = n * (K + HAS_CLS) + jo."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # int32 index math; int64 for memory offsets
    rvalid = rows < n_rows
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    rows_per_n = K + HAS_CLS
    n32 = rows // rows_per_n
    jo = rows % rows_per_n
    n = n32.to(tl.int64)
    is_tok = rvalid & (jo >= HAS_CLS)
    j = tl.maximum(jo - HAS_CLS, 0)
    idx = tl.load(ids_ptr + n32 * K + j, mask=is_tok, other=0).to(tl.int32)
    if GATHERED:
        src_row = j
    else:
        src_row = idx
    val = tl.load(x_ptr + (n * stride_xn + src_row * stride_xl)[:, None] + offs[None, :],
                  mask=is_tok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    if HAS_CLS:
        is_cls = rvalid & (jo == 0)
        val += tl.load(cls_ptr + tl.zeros([BLOCK_R], dtype=tl.int32)[:, None] + offs[None, :],
                       mask=is_cls[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    pos_row = tl.where(is_tok, 1 + idx, 0)
    val += tl.load(pos_ptr + (pos_row * stride_pos)[:, None] + offs[None, :],
                   mask=rvalid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + (n * stride_on + jo * stride_ol)[:, None] + offs[None, :], val.to(out_ptr.dtype.element_ty),
             mask=rvalid[:, None] & dmask[None, :])


@triton.jit
def _gather_tokens_bwd_kernel(go_ptr, ids_ptr, gx_ptr, L, K, D, stride_idn, stride_gon, stride_gol, stride_gxn,
                              stride_gxl, HAS_CLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_D: tl.constexpr):
    """Program (sample n and a block of its rows l, block of D): grad_x[n, l] = grad_out[n, HAS_CLS + j] where
    ids_keep[n, j] = l, else 0. j is found by comparing the rows with ids_keep[n], BLOCK_K at a time (a sample's
    indices are distinct: one match at most), so no inverse map is built. Every row of grad_x is written once: no
    zero fill, no atomics."""
    l_blocks = tl.cdiv(L, BLOCK_R)
    pid = tl.program_id(0)
    n = (pid // l_blocks).to(tl.int64)  # int32 index math; int64 for memory offsets
    l = (pid % l_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    lvalid = l < L
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    j = tl.full([BLOCK_R], -1, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ids = tl.load(ids_ptr + n * stride_idn + ks, mask=ks < K, other=-1).to(tl.int32)
        j = tl.maximum(j, tl.max(tl.where(ids[None, :] == l[:, None], ks[None, :], -1), axis=1))
    kept = j >= 0
    src = go_ptr + (n * stride_gon + (HAS_CLS + tl.maximum(j, 0)) * stride_gol)[:, None] + offs[None, :]
    g = tl.load(src, mask=kept[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    tl.store(gx_ptr + (n * stride_gxn + l * stride_gxl)[:, None] + offs[None, :], g.to(gx_ptr.dtype.element_ty),
             mask=lvalid[:, None] & dmask[None, :])


@triton.jit
def _unshuffle_fwd_kernel(x_ptr, ids_ptr, mtok_ptr, pos_ptr, out_ptr, n_rows, L, K, D,
                          stride_xn, stride_xk, stride_pos, stride_on, stride_ol,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (block of rows n * (L+1) + lo, block of D): out[n, lo] from x's row 0, a visible row, or the
    mask token, plus pos_embed[lo]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # int32 index math; int64 for memory offsets
    rvalid = rows < n_rows
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    n32 = rows // (L + 1)
    lo = rows % (L + 1)
    n = n32.to(tl.int64)
    is_first = lo == 0
    r = tl.load(ids_ptr + n32 * L + tl.maximum(lo - 1, 0), mask=rvalid & (lo > 0), other=0).to(tl.int32)
    visible = rvalid & (is_first | (r < K))
    removed = rvalid & (visible == 0)
    src_row = tl.where(is_first, 0, 1 + r)
    val = tl.load(x_ptr + (n * stride_xn + src_row * stride_xk)[:, None] + offs[None, :],
                  mask=visible[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    val += tl.load(mtok_ptr + tl.zeros([BLOCK_R], dtype=tl.int32)[:, None] + offs[None, :],
                   mask=removed[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    val += tl.load(pos_ptr + (lo * stride_pos)[:, None] + offs[None, :],
                   mask=rvalid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + (n * stride_on + lo * stride_ol)[:, None] + offs[None, :], val.to(out_ptr.dtype.element_ty),
             mask=rvalid[:, None] & dmask[None, :])


@triton.jit
def _unshuffle_bwd_kernel(go_ptr, ids_ptr, gx_ptr, part_ptr, L, K, D, chunks, rows_per_prog,
                          stride_gon, stride_gol, stride_gxn, stride_gxk,
                          BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (n * chunks + ch, block of D) handles grad_out rows [ch * rows_per_prog, +rows_per_prog) of
    sample n: visible rows go to their x row (row lo = 1 + l goes to x row 1 + ids_restore[n, l], row 0 to
    row 0), removed rows are summed in fp32 in a fixed order into part[n * chunks + ch]."""
    pid = tl.program_id(0)  # int32 index math; int64 for memory offsets
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    n32 = pid // chunks
    ch = pid % chunks
    n = n32.to(tl.int64)
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for start in range(0, rows_per_prog, BLOCK_L):
        lo = ch * rows_per_prog + start + tl.arange(0, BLOCK_L)
        valid = lo < L + 1
        is_first = lo == 0
        r = tl.load(ids_ptr + n32 * L + tl.maximum(lo - 1, 0), mask=valid & (lo > 0), other=0).to(tl.int32)
        visible = valid & (is_first | (r < K))
        removed = valid & (lo > 0) & (r >= K)
        g = tl.load(go_ptr + n * stride_gon + lo[:, None] * stride_gol + offs[None, :],
                    mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        dst_row = tl.where(is_first, 0, 1 + r)
        tl.store(gx_ptr + n * stride_gxn + dst_row[:, None] * stride_gxk + offs[None, :],
                 g.to(gx_ptr.dtype.element_ty), mask=visible[:, None] & dmask[None, :])
        acc += tl.where(removed[:, None], g, 0.0)
    tl.store(part_ptr + pid.to(tl.int64) * D + offs, tl.sum(acc, axis=0), mask=dmask)


@triton.jit
def _colsum_kernel(src_ptr, out_ptr, R, D, stride_r, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[d] = sum over r of src[r, d], accumulated in fp32 in a fixed order (deterministic)."""
    offs = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for start in range(0, R, BLOCK_R):
        rows = (start + tl.arange(0, BLOCK_R)).to(tl.int64)
        acc += tl.load(src_ptr + rows[:, None] * stride_r + offs[None, :],
                       mask=(rows < R)[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=dmask)


# ---------------------------------------------------------------------------------------------------------
# Launchers (testable without autograd)
# ---------------------------------------------------------------------------------------------------------


def _colsum(src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """src: [R, D] with a unit last stride -> out [D] (preallocated, any float dtype)."""
    R, D = src.shape
    block_d = min(next_power_of_2(D), COLSUM_MAX_BLOCK_D)
    launch(_colsum_kernel, (cdiv(D, block_d),), src, out, R, D, src.stride(0), BLOCK_R=COLSUM_BLOCK_R,
                                                BLOCK_D=block_d,
                                                num_warps=4, num_stages=NUM_STAGES, enable_fp_fusion=FP_FUSION)
    return out


@launches_on_device_of("imgs")
def gather_patches_forward(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs: [N, C, H, W] (any strides), ids_keep: [N, K] int64 -> [N, K, C*p*p] in (c, p, q) order."""
    check_device(imgs, ids_keep)
    n, c, _, gw, p = image_patches(imgs, patch_size)
    if ids_keep.dim() != 2 or ids_keep.shape[0] != n:
        raise ValueError(f"ids_keep must be [N, K] with N = {n}, got {tuple(ids_keep.shape)}")
    ids = ids_keep.contiguous()
    K = ids.shape[1]
    out = torch.empty((n, K, c * p * p), device=imgs.device, dtype=imgs.dtype)
    if out.numel() == 0:
        return out
    block_r, block_c, block_p, num_warps = _patch_settings(c, p)
    launch(_gather_patches_kernel, (cdiv(n * K, block_r),),
        imgs, ids, out, n * K, K, c, gw, p, *imgs.stride(), BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_P=block_p,
        num_warps=num_warps, num_stages=NUM_STAGES, enable_fp_fusion=FP_FUSION)
    return out


def _one_table(op: str, pos_embed: torch.Tensor, d: int, rows: int | None = None) -> None:
    """The kernels read pos_embed as one [rows, D] table for the whole batch: refuse a per-sample one (its
    first sample's rows would serve every sample)."""
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[-1] != d or \
            (rows is not None and pos_embed.shape[1] != rows):
        want = f"[1, {rows if rows is not None else 'L+1'}, {d}]"
        raise ValueError(f"{op}: pos_embed must be {want}, one table for the batch; got {tuple(pos_embed.shape)}")


@launches_on_device_of("x")
def gather_tokens_forward(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor,
                          cls_token: torch.Tensor | None, gathered: bool) -> torch.Tensor:
    """See `reference.gather_tokens`. x: [N, L, D] (or [N, K, D] if gathered) -> [N, K+1, D] / [N, K, D]."""
    check_device(x, ids_keep, pos_embed, cls_token)
    n, _, d = x.shape
    K = ids_keep.shape[1]
    has_cls = cls_token is not None
    x = _last_dim_contiguous(x)
    pos = _last_dim_contiguous(pos_embed.reshape(-1, d))
    cls = cls_token.reshape(d).contiguous() if has_cls else x
    dtypes = [x.dtype, pos_embed.dtype] + ([cls_token.dtype] if has_cls else [])
    out_dtype = dtypes[0]
    for dt in dtypes[1:]:
        out_dtype = torch.promote_types(out_dtype, dt)
    ids = ids_keep.contiguous()
    out = torch.empty((n, K + int(has_cls), d), device=x.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    block_r, block_d, num_warps = _row_settings(d)
    n_rows = n * (K + int(has_cls))
    grid = (cdiv(n_rows, block_r), cdiv(d, block_d))
    launch(_gather_tokens_fwd_kernel, grid, x, ids, pos, cls, out, n_rows, K, d, x.stride(0), x.stride(1),
           pos.stride(0), out.stride(0), out.stride(1), HAS_CLS=int(has_cls), GATHERED=bool(gathered),
           BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps, num_stages=NUM_STAGES, enable_fp_fusion=FP_FUSION)
    return out


@launches_on_device_of("grad_out")
def gather_tokens_backward(grad_out: torch.Tensor, ids_keep: torch.Tensor, L: int, x_dtype: torch.dtype,
                           has_cls: bool, cls_dtype: torch.dtype | None, gathered: bool,
                           need_x: bool = True, need_cls: bool = True):
    """Returns (grad_x or None, grad_cls_token [1, 1, D] or None). grad_out: [N, K+has_cls, D]."""
    grad_out = _last_dim_contiguous(grad_out)
    n, _, d = grad_out.shape
    K = ids_keep.shape[1]
    h = int(has_cls)
    grad_x = None
    if not need_x:
        pass
    elif gathered:
        grad_x = grad_out[:, h:, :]
        grad_x = grad_x if grad_x.dtype == x_dtype else grad_x.to(x_dtype)
    else:
        # each row of grad_x finds its source by searching ids_keep[n] in the kernel: one launch, no [N, L] map
        ids_keep = _last_dim_contiguous(ids_keep)
        grad_x = torch.empty((n, L, d), device=grad_out.device, dtype=x_dtype)
        if grad_x.numel():
            block_r, block_d, num_warps = _row_settings(d)
            launch(_gather_tokens_bwd_kernel, (n * cdiv(L, block_r), cdiv(d, block_d)),
                grad_out, ids_keep, grad_x, L, K, d, ids_keep.stride(0), grad_out.stride(0), grad_out.stride(1),
                grad_x.stride(0), grad_x.stride(1), HAS_CLS=h, BLOCK_R=block_r, BLOCK_K=GATHER_BWD_BLOCK_K,
                BLOCK_D=block_d, num_warps=num_warps, num_stages=NUM_STAGES, enable_fp_fusion=FP_FUSION)
    grad_cls = None
    if has_cls and need_cls:
        grad_cls = torch.empty((1, 1, d), device=grad_out.device, dtype=cls_dtype)
        if n == 0:
            grad_cls.zero_()
        else:
            _colsum(grad_out[:, 0, :], grad_cls.view(d))
    return grad_x, grad_cls


@launches_on_device_of("x")
def unshuffle_tokens_forward(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                             pos_embed: torch.Tensor) -> torch.Tensor:
    """See `reference.unshuffle_tokens`. x: [N, K+1, Dd], ids_restore: [N, L] -> [N, L+1, Dd]."""
    check_device(x, ids_restore, mask_token, pos_embed)
    n, k1, d = x.shape
    L = ids_restore.shape[1]
    x = _last_dim_contiguous(x)
    pos = _last_dim_contiguous(pos_embed.reshape(-1, d))
    mtok = mask_token.reshape(d).contiguous()
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype)
    ids = ids_restore.contiguous()
    out = torch.empty((n, L + 1, d), device=x.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    block_r, block_d, num_warps = _row_settings(d)
    launch(_unshuffle_fwd_kernel, (cdiv(n * (L + 1), block_r), cdiv(d, block_d)),
        x, ids, mtok, pos, out, n * (L + 1), L, k1 - 1, d, x.stride(0), x.stride(1), pos.stride(0), out.stride(0),
        out.stride(1), BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=NUM_STAGES, enable_fp_fusion=FP_FUSION)
    return out


def _unshuffle_bwd_split(n: int, L: int, d: int) -> tuple[int, int, int]:
    """(block_d, rows per program, chunks per sample): enough programs to fill a GPU, few partial rows."""
    block_d = min(next_power_of_2(d), BWD_MAX_BLOCK_D)
    d_blocks = cdiv(d, block_d)
    max_chunks = cdiv(L + 1, BWD_BLOCK_L)
    chunks = max(1, min(max_chunks, cdiv(BWD_TARGET_PROGRAMS, max(1, n * d_blocks))))
    rows_per_prog = cdiv(cdiv(L + 1, chunks), BWD_BLOCK_L) * BWD_BLOCK_L
    chunks = cdiv(L + 1, rows_per_prog)
    return block_d, rows_per_prog, chunks


@launches_on_device_of("grad_out")
def unshuffle_tokens_backward(grad_out: torch.Tensor, ids_restore: torch.Tensor, K: int, x_dtype: torch.dtype,
                              mask_dtype: torch.dtype):
    """Returns (grad_x [N, K+1, Dd], grad_mask_token [1, 1, Dd]); deterministic, no atomics."""
    grad_out = _last_dim_contiguous(grad_out)
    n, l1, d = grad_out.shape
    L = l1 - 1
    ids = ids_restore.contiguous()
    grad_x = torch.empty((n, K + 1, d), device=grad_out.device, dtype=x_dtype)
    grad_mask = torch.empty((1, 1, d), device=grad_out.device, dtype=mask_dtype)
    if n == 0 or d == 0:
        grad_mask.zero_()
        return grad_x, grad_mask
    block_d, rows_per_prog, chunks = _unshuffle_bwd_split(n, L, d)
    part = torch.empty((n * chunks, d), device=grad_out.device, dtype=torch.float32)
    num_warps = _warps(BWD_BLOCK_L * block_d)
    launch(_unshuffle_bwd_kernel, (n * chunks, cdiv(d, block_d)),
        grad_out, ids, grad_x, part, L, K, d, chunks, rows_per_prog, grad_out.stride(0), grad_out.stride(1),
        grad_x.stride(0), grad_x.stride(1), BLOCK_L=BWD_BLOCK_L, BLOCK_D=block_d, num_warps=num_warps,
        num_stages=NUM_STAGES, enable_fp_fusion=FP_FUSION)
    _colsum(part, grad_mask.view(d))
    return grad_x, grad_mask


# ---------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------


# The launchers as torch.library custom ops with fake implementations: torch.compile treats each as one opaque
# op (it never traces a Triton launch, which it cannot do under the interpreter and need not do on a GPU), so
# a model on the triton backend compiles with fullgraph=True. Custom ops must not return views of their
# inputs; every output here is a new tensor.


def _gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    return gather_patches_forward(imgs, ids_keep, patch_size)


_gather_patches_op = custom_op("fastmae::gather_patches", _gather_patches)


@_gather_patches_op.register_fake
def _gather_patches_fake(imgs, ids_keep, patch_size):
    return imgs.new_empty((imgs.shape[0], ids_keep.shape[1], imgs.shape[1] * patch_size * patch_size))


def _gather_tokens_fwd(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor,
                       cls_token: torch.Tensor | None, gathered: bool) -> torch.Tensor:
    return gather_tokens_forward(x, ids_keep, pos_embed, cls_token, gathered)


_gather_tokens_fwd_op = custom_op("fastmae::gather_tokens_fwd", _gather_tokens_fwd)


@_gather_tokens_fwd_op.register_fake
def _gather_tokens_fwd_fake(x, ids_keep, pos_embed, cls_token, gathered):
    dtype = torch.promote_types(x.dtype, pos_embed.dtype)
    if cls_token is not None:
        dtype = torch.promote_types(dtype, cls_token.dtype)
    return x.new_empty((x.shape[0], ids_keep.shape[1] + int(cls_token is not None), x.shape[2]), dtype=dtype)


def _gather_tokens_bwd_x(grad_out: torch.Tensor, ids_keep: torch.Tensor, L: int, x_dtype: torch.dtype,
                         has_cls: bool) -> torch.Tensor:
    return gather_tokens_backward(grad_out, ids_keep, L, x_dtype, has_cls, None, False, need_x=True,
                                  need_cls=False)[0]


_gather_tokens_bwd_x_op = custom_op("fastmae::gather_tokens_bwd_x", _gather_tokens_bwd_x)


@_gather_tokens_bwd_x_op.register_fake
def _gather_tokens_bwd_x_fake(grad_out, ids_keep, L, x_dtype, has_cls):
    return grad_out.new_empty((grad_out.shape[0], L, grad_out.shape[2]), dtype=x_dtype)


def _gather_tokens_bwd_cls(grad_out: torch.Tensor, ids_keep: torch.Tensor, cls_dtype: torch.dtype) -> torch.Tensor:
    return gather_tokens_backward(grad_out, ids_keep, 0, grad_out.dtype, True, cls_dtype, True, need_x=False,
                                  need_cls=True)[1]


_gather_tokens_bwd_cls_op = custom_op("fastmae::gather_tokens_bwd_cls", _gather_tokens_bwd_cls)


@_gather_tokens_bwd_cls_op.register_fake
def _gather_tokens_bwd_cls_fake(grad_out, ids_keep, cls_dtype):
    return grad_out.new_empty((1, 1, grad_out.shape[2]), dtype=cls_dtype)


def _unshuffle_fwd(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                   pos_embed: torch.Tensor) -> torch.Tensor:
    return unshuffle_tokens_forward(x, ids_restore, mask_token, pos_embed)


_unshuffle_fwd_op = custom_op("fastmae::unshuffle_tokens_fwd", _unshuffle_fwd)


@_unshuffle_fwd_op.register_fake
def _unshuffle_fwd_fake(x, ids_restore, mask_token, pos_embed):
    dtype = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype)
    return x.new_empty((x.shape[0], ids_restore.shape[1] + 1, x.shape[2]), dtype=dtype)


def _unshuffle_bwd(grad_out: torch.Tensor, ids_restore: torch.Tensor, K: int, x_dtype: torch.dtype,
                   mask_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return unshuffle_tokens_backward(grad_out, ids_restore, K, x_dtype, mask_dtype)


_unshuffle_bwd_op = custom_op("fastmae::unshuffle_tokens_bwd", _unshuffle_bwd)


@_unshuffle_bwd_op.register_fake
def _unshuffle_bwd_fake(grad_out, ids_restore, K, x_dtype, mask_dtype):
    n, _, d = grad_out.shape
    return grad_out.new_empty((n, K + 1, d), dtype=x_dtype), grad_out.new_empty((1, 1, d), dtype=mask_dtype)


class GatherTokensFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids_keep, pos_embed, cls_token, gathered):
        out = _gather_tokens_fwd_op(x, ids_keep, pos_embed, cls_token, gathered)
        ctx.save_for_backward(ids_keep)
        ctx.L = x.shape[1]
        ctx.x_dtype = x.dtype
        ctx.cls_dtype = None if cls_token is None else cls_token.dtype
        ctx.gathered = bool(gathered)
        ctx.x_leaf = x.is_leaf  # its gradient becomes x.grad: see backward
        return out

    @staticmethod
    @once_differentiable  # no graph through its kernels: a double backward raises
    def backward(ctx, grad_out):
        (ids_keep,) = ctx.saved_tensors
        has_cls = ctx.cls_dtype is not None
        grad_x = grad_cls = None
        if ctx.needs_input_grad[0]:
            if ctx.gathered:  # the kept rows of grad_out, as they are: a view (plain torch, no kernel), copied when x
                # is a leaf, whose .grad would otherwise share memory with the caller's gradient tensor
                grad_x = grad_out[:, int(has_cls):, :].to(ctx.x_dtype, copy=ctx.x_leaf)
            else:
                grad_x = _gather_tokens_bwd_x_op(grad_out, ids_keep, ctx.L, ctx.x_dtype, has_cls)
        if has_cls and ctx.needs_input_grad[3]:
            grad_cls = _gather_tokens_bwd_cls_op(grad_out, ids_keep, ctx.cls_dtype)
        return grad_x, None, None, grad_cls, None


class UnshuffleTokensFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids_restore, mask_token, pos_embed):
        out = _unshuffle_fwd_op(x, ids_restore, mask_token, pos_embed)
        ctx.save_for_backward(ids_restore)
        ctx.K = x.shape[1] - 1
        ctx.x_dtype = x.dtype
        ctx.mask_dtype = mask_token.dtype
        return out

    @staticmethod
    @once_differentiable  # no graph through its kernels: a double backward raises
    def backward(ctx, grad_out):
        (ids_restore,) = ctx.saved_tensors
        grad_x, grad_mask = _unshuffle_bwd_op(grad_out, ids_restore, ctx.K, ctx.x_dtype, ctx.mask_dtype)
        # one kernel computes both; a gradient nobody asked for is dropped
        return (grad_x if ctx.needs_input_grad[0] else None), None, \
            (grad_mask if ctx.needs_input_grad[2] else None), None


# ---------------------------------------------------------------------------------------------------------
# Public functions (the contracts `fastmae.ops.triton_ops` calls)
# ---------------------------------------------------------------------------------------------------------


def gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Patchify + gather: imgs [N, C, H, W], ids_keep [N, K] -> [N, K, C*p*p] in conv-weight (c, p, q) order."""
    _no_grad_to("imgs", imgs)
    return _gather_patches_op(imgs, ids_keep, int(patch_size))


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor,
                  cls_token: torch.Tensor | None = None, gathered: bool = False) -> torch.Tensor:
    """Encoder input: class token and kept tokens plus position embedding; see `reference.gather_tokens`."""
    _no_grad_to("pos_embed", pos_embed)
    if x.dim() != 3 or ids_keep.dim() != 2 or ids_keep.shape[0] != x.shape[0]:
        raise ValueError(f"gather_tokens: x must be [N, L, D] and ids_keep [N, K]; got {tuple(x.shape)}, "
                         f"{tuple(ids_keep.shape)}")
    if gathered and x.shape[1] != ids_keep.shape[1]:
        raise ValueError(f"gathered x has {x.shape[1]} tokens but ids_keep keeps {ids_keep.shape[1]}")
    if cls_token is not None and cls_token.numel() != x.shape[-1]:
        raise ValueError(f"cls_token must hold D = {x.shape[-1]} values, got {tuple(cls_token.shape)}")
    _one_table("gather_tokens", pos_embed, x.shape[-1], None if gathered else x.shape[1] + 1)
    return GatherTokensFunction.apply(x, ids_keep, pos_embed.detach(), cls_token, bool(gathered))


def unshuffle_tokens(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                     pos_embed: torch.Tensor) -> torch.Tensor:
    """Decoder input in patch order with mask tokens and position embedding; see `reference.unshuffle_tokens`."""
    _no_grad_to("pos_embed", pos_embed)
    if x.dim() != 3 or ids_restore.dim() != 2 or ids_restore.shape[0] != x.shape[0] \
            or not 1 <= x.shape[1] <= ids_restore.shape[1] + 1:  # the kernels read and write x's row 0 (class token)
        raise ValueError(f"unshuffle_tokens: x must be [N, K+1, Dd] (K <= L) and ids_restore [N, L]; got "
                         f"{tuple(x.shape)}, {tuple(ids_restore.shape)}")
    if mask_token.numel() != x.shape[-1]:
        raise ValueError(f"mask_token must hold Dd = {x.shape[-1]} values, got {tuple(mask_token.shape)}")
    _one_table("unshuffle_tokens", pos_embed, x.shape[-1], ids_restore.shape[1] + 1)
    return UnshuffleTokensFunction.apply(x, ids_restore, mask_token, pos_embed.detach())


# ---------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# ---------------------------------------------------------------------------------------------------------

# (x, pos_embed / cls / mask_token, out) dtype triples the launchers meet: one dtype throughout, and a half
# activation with fp32 parameters (mixed precision), whose output is fp32 by type promotion.
_TOKEN_DTYPES = [(t, t, t) for t in ("fp32", "fp16", "bf16")] + [("fp16", "fp32", "fp32"), ("bf16", "fp32", "fp32")]
WIDTHS = (32, 1280)
PATCH_SIZES = (4, 16)
CHANNELS = (1, 3)


def _sig(names: str, types: list[str]) -> dict[str, str]:
    return dict(zip(names.split(), types))


def compile_specs() -> list[CompileSpec]:
    """Every configuration the launchers above pick for widths 32..1280, patch sides 4..16 and 1..3 channels.

    Block shapes are computed from those ranges exactly as the launchers compute them. Dtypes: each kernel in
    fp32, fp16 and bf16, plus the mixed-precision triples of `_TOKEN_DTYPES` for the token kernels (other
    mixtures compile the same code with other pointer types and are not listed). Integer arguments are
    plain 'i32' (the launchers pass strides and sizes as Python ints).
    """
    specs: list[CompileSpec] = []
    widths = range(WIDTHS[0], WIDTHS[1] + 1)
    row_settings = sorted({_row_settings(d) for d in widths})
    patch_settings = sorted({_patch_settings(c, p) for c in range(CHANNELS[0], CHANNELS[1] + 1)
                             for p in range(PATCH_SIZES[0], PATCH_SIZES[1] + 1)})
    for t in ("fp32", "fp16", "bf16"):
        for block_r, block_c, block_p, nw in patch_settings:
            specs.append(CompileSpec(
                f"gather_patches[{t},R{block_r},C{block_c},P{block_p}]", _gather_patches_kernel,
                _sig("img_ptr ids_ptr out_ptr n_rows K C gw p stride_n stride_c stride_h stride_w",
                     [f"*{t}", "*i64", f"*{t}"] + ["i32"] * 9),
                {"BLOCK_R": block_r, "BLOCK_C": block_c, "BLOCK_P": block_p}, num_warps=nw))
    for tx, tp, to in _TOKEN_DTYPES:
        for block_r, block_d, nw in row_settings:
            for has_cls in (0, 1):
                for gathered in (False, True):
                    specs.append(CompileSpec(
                        f"gather_tokens_fwd[{tx},{tp},{to},R{block_r},D{block_d},cls{has_cls},g{int(gathered)}]",
                        _gather_tokens_fwd_kernel,
                        _sig("x_ptr ids_ptr pos_ptr cls_ptr out_ptr n_rows K D stride_xn stride_xl stride_pos "
                             "stride_on stride_ol", [f"*{tx}", "*i64", f"*{tp}", f"*{tp if has_cls else tx}", f"*{to}"]
                             + ["i32"] * 8),
                        {"HAS_CLS": has_cls, "GATHERED": gathered, "BLOCK_R": block_r, "BLOCK_D": block_d},
                        num_warps=nw))
            for has_cls in (0, 1):
                specs.append(CompileSpec(
                    f"gather_tokens_bwd[{to}->{tx},R{block_r},D{block_d},cls{has_cls}]", _gather_tokens_bwd_kernel,
                    _sig("go_ptr ids_ptr gx_ptr L K D stride_idn stride_gon stride_gol stride_gxn stride_gxl",
                         [f"*{to}", "*i64", f"*{tx}"] + ["i32"] * 8),
                    {"HAS_CLS": has_cls, "BLOCK_R": block_r, "BLOCK_K": GATHER_BWD_BLOCK_K, "BLOCK_D": block_d},
                    num_warps=nw))
            specs.append(CompileSpec(
                f"unshuffle_fwd[{tx},{tp},{to},R{block_r},D{block_d}]", _unshuffle_fwd_kernel,
                _sig("x_ptr ids_ptr mtok_ptr pos_ptr out_ptr n_rows L K D stride_xn stride_xk stride_pos stride_on "
                     "stride_ol", [f"*{tx}", "*i64", f"*{tp}", f"*{tp}", f"*{to}"] + ["i32"] * 9),
                {"BLOCK_R": block_r, "BLOCK_D": block_d}, num_warps=nw))
        for block_d in sorted({min(next_power_of_2(d), BWD_MAX_BLOCK_D) for d in widths}):
            specs.append(CompileSpec(
                f"unshuffle_bwd[{to}->{tx},D{block_d}]", _unshuffle_bwd_kernel,
                _sig("go_ptr ids_ptr gx_ptr part_ptr L K D chunks rows_per_prog stride_gon stride_gol stride_gxn "
                     "stride_gxk", [f"*{to}", "*i64", f"*{tx}", "*fp32"] + ["i32"] * 9),
                {"BLOCK_L": BWD_BLOCK_L, "BLOCK_D": block_d},
                num_warps=_warps(BWD_BLOCK_L * block_d)))
    # column sums: fp32 partials -> mask token grad; grad_out[:, 0] -> cls grad
    colsum_blocks = sorted({min(next_power_of_2(d), COLSUM_MAX_BLOCK_D) for d in widths})
    colsum_types = sorted({("fp32", tp) for _, tp, _ in _TOKEN_DTYPES} | {(to, tp) for _, tp, to in _TOKEN_DTYPES})
    for ts, to in colsum_types:
        for block_d in colsum_blocks:
            specs.append(CompileSpec(
                f"colsum[{ts}->{to},D{block_d}]", _colsum_kernel,
                _sig("src_ptr out_ptr R D stride_r", [f"*{ts}", f"*{to}", "i32", "i32", "i32"]),
                {"BLOCK_R": COLSUM_BLOCK_R, "BLOCK_D": block_d}, num_warps=4))
    return specs
