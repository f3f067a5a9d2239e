"""Softmax attention in Triton, forward and backward, shaped for MAE's short sequences.

    attention(q, k, v, scale=None) -> out          q, k, v, out: [B, H, N, D] (the SDPA layout)

q, k and v may be strided views (for example the three slices of one packed qkv projection,
`qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)`): every kernel takes all four strides of
every tensor, so no copy is made. The gradients are new contiguous tensors in q's dtype; the output is a
[B, H, N, D] tensor laid out as a [B, N, H, D] one (as flash-attention's), so that the model's
`out.transpose(1, 2).reshape(B, N, H * D)` before the output projection is a view, not a copy.

Two paths, chosen per call from the shape by `choose_paths` (launch settings by `launch_settings`):

* short (all keys of a head in one tile; "auto" takes it up to N = 128, where it was faster than flash on an
  H200, path="short" up to 256 keys; fp32 up to 64 keys, where its larger tiles fit): the forward computes
  S = scale * Q K^T for a block of queries against all keys and a plain softmax (one max, one sum, no
  running rescale). The backward is one program per (batch, head) that keeps K and V and the fp32 dK, dV
  accumulators on chip, walks over the query blocks once and writes dQ of each block when it is done
  (all keys are in the tile, so dQ is complete): one launch, no atomics, and the softmax backward's row term
  delta = rowsum(dO * O) is taken as rowsum(P * dP) / rowsum(P) in fp32 from the tiles it already holds (the
  same value, as O = P V and P's rows sum to one), so it never reads O and dS = P * (dP - delta) sums to zero
  over each row as the exact gradient does (with O rounded to fp16/bf16 it does not, which shows in dQ and dK
  where a row's softmax is nearly one-hot; dividing by rowsum(P) cancels the rounding that P recomputed from
  the saved log-sum-exp shares across its row). It is used (by "auto" up to 128 keys) where those tiles fit
  without register spills, which depends on the GPU (`backward_path`): on sm_90 up to 256 keys at head dim
  32/64 and 128 keys at head dim 128; on sm_80 up to 64 keys, or 128 keys at head dim 16. Elsewhere the
  backward takes the flash kernels.
* flash (any N): online softmax over key blocks in the forward (FlashAttention-2 order). The backward
  is two launches: one program per query block that computes delta = rowsum(dO * O) of its rows (and keeps
  it for the next launch) and walks over the key blocks for dQ; then one program per key block that walks
  over the query blocks for dK and dV.

Both paths save the log-sum-exp of each query row (fp32, natural log, [B, H, N]) in the forward and
recompute the probabilities from it in the backward; the attention matrix is never written to memory.
All accumulation is fp32. fp16/bf16 products take their operands as given (P and dS are rounded to the input
dtype before their products, as in flash-attention); fp32 products use 3xTF32 (`input_precision="tf32x3"`:
each operand split into two TF32 parts, three tensor-core products), whose error is close to fp32's, not
TF32's. The backward is deterministic: no atomics, each output element is written by one program in a
fixed order.

Limits and differences from flash-attention (the CUDA library and its Triton file):
* head dims 1..128 (the registry admits 16..128): the head dim is padded to the next power of two
  (at least 16) with masked loads, so 80 works without copies; 128 < D is refused.
* no causal mask, no attention bias, no dropout, no variable-length (packed) batches, no KV cache,
  no multi-query/grouped heads: q, k and v have one shape. MAE needs none of them.
* any sequence length: the key and query tails are masked; nothing assumes a multiple of a block.
* the short path has no counterpart in flash-attention, whose tiles (64 or 128 rows, online softmax, a
  separate dQ pass or atomics) are made for long sequences and waste work at MAE's 50 to 65 encoder tokens.
  The decoders' 197 and 257 tokens take the flash path: at a 256-key tile the flash kernels were already
  faster on an H200 (`AUTO_SHORT_MAX_N`).
* launch settings come from a plain heuristic (no autotuning at run time: predictable, no tuning run under
  the interpreter), overridden per GPU architecture by the settings that `fastmae bench tune` measured on
  such a GPU and recorded in `attention_tuned.json`; see `launch_settings`.
* `compile_specs()` lists every kernel configuration the launchers can pick, for an ahead-of-time compile
  check on sm_80/sm_90 (and sm_100 on request).

Under Triton's CPU interpreter (TRITON_INTERPRET=1) bf16 tensors are held as raw 16-bit integers, so for
bf16 inputs the launchers set `UPCAST` and every tile is converted to fp32 right after its load (the
products then run in fp32). On a GPU `UPCAST` is off and bf16 goes to the tensor cores as it is. The
interpreter also ignores `input_precision` (its fp32 products are plain fp32) and picks paths as for sm_90.

The autograd formula is registered on a `torch.library` custom op (`fastmae::attention_fwd`, with
`fastmae::attention_bwd` for the backward), both with fake implementations, so `torch.compile` traces
through `attention` without a graph break. `attention_packed(qkv, num_heads)` is the same on the packed
projection [B, N, 3 * H * D] (`fastmae::attention_qkv_fwd` / `_bwd`): its backward writes dq, dk and dv
into one d(qkv) through strided views, so nothing is stacked or copied after the kernels.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from .launch import launch
from .utils import (FP_FUSION, PLAIN_TENSOR_TYPES, CompileSpec, TunedSettings, cdiv, check_device, custom_op,
                    interpreter_enabled, launch_capability, launches_on_device_of, next_power_of_2, qkv_head_dim,
                    split_qkv, TRITON_DTYPES, tuned_entries, tuned_entry, tuned_table_specs)

__all__ = ["attention", "attention_forward", "attention_backward", "forward_path", "backward_path", "choose_paths",
           "kernels_for", "launch_settings", "LaunchSettings", "compile_specs", "KERNELS", "SHORT_MAX_N",
           "SHORT_BWD_MAX_TILE", "MAX_HEAD_DIM", "PATHS", "forced_settings", "tuned_key", "tuned_table",
           "TUNED_FILE", "default_settings", "settings_spec", "validate_tuned", "attention_packed", "split_qkv"]

LOG2E = 1.4426950408889634

SHORT_MAX_N = 256  # longest sequence whose keys form one tile on the short path (fp16/bf16; a power of two)
SHORT_MAX_N_FP32 = 64  # the same in fp32, whose tiles take twice the registers (see `_short_forward_fits`)
# Longest sequence that "auto" sends to the short path; longer ones take the flash kernels, which were faster
# from a 256-key tile on. Measured on an H200 (triton 3.6, bf16, batch 64, 16 heads): at 197 keys x head dim 32
# (the MAE decoders) flash took 60 us forward and 199 us forward+backward against the short path's 73 and 329;
# at 65 keys x 80 (ViT-H's encoder, a 128-key tile) the two were even (52 / 169 against 51 / 172); at 50 keys
# x 64 the short path won (13 / 48 against 19 / 67). A forced path="short" still takes up to SHORT_MAX_N.
AUTO_SHORT_MAX_N = 128
SHORT_BWD_MAX_TILE = 16384  # largest key x head-dim tile of the one-program backward (sm_90, fp16/bf16)
MAX_HEAD_DIM = 128
PATHS = ("auto", "short", "flash")


# ----------------------------------------------------------------------------------------------------
# Kernels. Naming: Q, K, V, O, DO, DQ, DK, DV point at [B, H, N, D] tensors (any strides); LSE and DELTA
# at contiguous fp32 [B, H, N]; `s*b, s*h, s*n, s*d` are the strides of each tensor. head_dim is the
# true head dim, D_PAD its tile (a power of two >= 16). qk_scale = scale * log2(e): the kernels work in
# base 2 (exp2/log2) and store the log-sum-exp in natural units.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _batch_head(pid_bh, n_heads):
    """Batch and head of the (batch, head) index pid_bh = b * n_heads + h, as 64-bit values for the offsets."""
    return (pid_bh // n_heads).to(tl.int64), (pid_bh % n_heads).to(tl.int64)


@triton.jit
def _block_program(n_ctx, n_heads, BLOCK: tl.constexpr):
    """For a grid of cdiv(n_ctx, BLOCK) programs per (batch, head): this program's block, its (batch, head)
    index and that index's batch and head."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(n_ctx, BLOCK)
    pid_bh = pid // num_blocks
    b, h = _batch_head(pid_bh, n_heads)
    return pid % num_blocks, pid_bh, b, h


@triton.jit
def _load_tile(ptr, rows, cols, stride_r, stride_c, mask_r, mask_c, UPCAST: tl.constexpr):
    """The tile ptr[rows * stride_r + cols * stride_c] ([len(rows), len(cols)]), zeros outside the masks;
    converted to fp32 under UPCAST."""
    t = tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask_r[:, None] & mask_c[None, :],
                other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _store_tile(ptr, rows, cols, stride_r, stride_c, mask_r, mask_c, value):
    """Store `value` in ptr's dtype at ptr[rows * stride_r + cols * stride_c], inside the masks."""
    tl.store(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, value.to(ptr.dtype.element_ty),
             mask=mask_r[:, None] & mask_c[None, :])


@triton.jit
def _attn_fwd_short(Q, K, V, O, LSE,
                    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                    n_heads, n_ctx, head_dim, qk_scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr):
    """One block of BLOCK_M queries against all keys (BLOCK_N >= n_ctx): a plain softmax, no running max."""
    pid_m, pid_bh, b, h = _block_program(n_ctx, n_heads, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    mask_m = offs_m < n_ctx
    mask_n = offs_n < n_ctx
    mask_d = offs_d < head_dim

    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, mask_m, mask_d, UPCAST)
    k = _load_tile(K + b * skb + h * skh, offs_n, offs_d, skn, skd, mask_n, mask_d, UPCAST)
    v = _load_tile(V + b * svb + h * svh, offs_n, offs_d, svn, svd, mask_n, mask_d, UPCAST)

    s = tl.dot(q, tl.trans(k), input_precision="tf32x3") * qk_scale
    s = tl.where(mask_n[None, :], s, float("-inf"))
    m = tl.max(s, 1)
    p = tl.exp2(s - m[:, None])
    l = tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, input_precision="tf32x3")

    _store_tile(O + b * sob + h * soh, offs_m, offs_d, son, sod, mask_m, mask_d, acc / l[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * n_ctx + offs_m, (m + tl.log2(l)) * 0.6931471805599453, mask=mask_m)


@triton.jit
def _attn_fwd_flash(Q, K, V, O, LSE,
                    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                    n_heads, n_ctx, head_dim, qk_scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr):
    """One block of BLOCK_M queries, online softmax over key blocks of BLOCK_N."""
    pid_m, pid_bh, b, h = _block_program(n_ctx, n_heads, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    mask_m = offs_m < n_ctx
    mask_d = offs_d < head_dim

    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, mask_m, mask_d, UPCAST)
    # the key and value pointer tiles are made once and moved by a block each step: the register use of every
    # configuration in `compile_specs` depends on it (building the offsets again in the loop spills at D_PAD 128)
    k_ptrs = K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for start_n in range(0, n_ctx, BLOCK_N):
        mask_n = (start_n + offs_n) < n_ctx
        k = tl.load(k_ptrs + start_n * skn, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_ptrs + start_n * svn, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="tf32x3") * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="tf32x3")
        m_i = m_new

    _store_tile(O + b * sob + h * soh, offs_m, offs_d, son, sod, mask_m, mask_d, acc / l_i[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * n_ctx + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_m)


@triton.jit
def _attn_bwd_short(Q, K, V, DO, LSE, DQ, DK, DV,
                    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                    sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                    n_heads, n_ctx, head_dim, sm_scale, qk_scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr):
    """The whole backward of one (batch, head): K, V, dK, dV stay on chip, query blocks stream through. Each
    block's delta is rowsum(P * dP) over all keys (in the tile), fp32: O is not read."""
    pid_bh = tl.program_id(0)
    b, h = _batch_head(pid_bh, n_heads)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_mb = tl.arange(0, BLOCK_M)
    mask_n = offs_n < n_ctx
    mask_d = offs_d < head_dim

    k = _load_tile(K + b * skb + h * skh, offs_n, offs_d, skn, skd, mask_n, mask_d, UPCAST)
    v = _load_tile(V + b * svb + h * svh, offs_n, offs_d, svn, svd, mask_n, mask_d, UPCAST)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    dq_base = DQ + b * sdqb + h * sdqh
    lse_base = LSE + pid_bh.to(tl.int64) * n_ctx

    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    for start_m in range(0, n_ctx, BLOCK_M):
        offs_m = start_m + offs_mb
        mask_m = offs_m < n_ctx
        q = _load_tile(q_base, offs_m, offs_d, sqn, sqd, mask_m, mask_d, UPCAST)
        do = _load_tile(do_base, offs_m, offs_d, sdon, sdod, mask_m, mask_d, UPCAST)
        lse = tl.load(lse_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634

        s = tl.dot(q, tl.trans(k), input_precision="tf32x3")
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="tf32x3")
        dp = tl.dot(do, tl.trans(v), input_precision="tf32x3")
        # = rowsum(dO * O) with O unrounded (every key is in the tile), over rowsum(P): the P recomputed from the
        # saved log-sum-exp carries its rounding as a common factor per row, which must cancel as it does in dS
        delta = tl.sum(p * dp, 1) / tl.sum(p, 1)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        _store_tile(dq_base, offs_m, offs_d, sdqn, sdqd, mask_m, mask_d,
                    tl.dot(ds, k, input_precision="tf32x3") * sm_scale)
        dk += tl.dot(tl.trans(ds), q, input_precision="tf32x3")

    _store_tile(DK + b * sdkb + h * sdkh, offs_n, offs_d, sdkn, sdkd, mask_n, mask_d, dk * sm_scale)
    _store_tile(DV + b * sdvb + h * sdvh, offs_n, offs_d, sdvn, sdvd, mask_n, mask_d, dv)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   sdob, sdoh, sdon, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                   n_heads, n_ctx, head_dim, sm_scale, qk_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr):
    """dK and dV of one block of BLOCK_N keys, walking over all query blocks of BLOCK_M (computed transposed)."""
    pid_n, pid_bh, b, h = _block_program(n_ctx, n_heads, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_mb = tl.arange(0, BLOCK_M)
    mask_n = offs_n < n_ctx
    mask_d = offs_d < head_dim

    k = _load_tile(K + b * skb + h * skh, offs_n, offs_d, skn, skd, mask_n, mask_d, UPCAST)
    v = _load_tile(V + b * svb + h * svh, offs_n, offs_d, svn, svd, mask_n, mask_d, UPCAST)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    row_base = pid_bh.to(tl.int64) * n_ctx

    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    for start_m in range(0, n_ctx, BLOCK_M):
        offs_m = start_m + offs_mb
        mask_m = offs_m < n_ctx
        # Q and dO loaded transposed ([D_PAD, BLOCK_M]) so that S^T = K Q^T needs no register transpose.
        qT = _load_tile(q_base, offs_d, offs_m, sqd, sqn, mask_d, mask_m, UPCAST)
        doT = _load_tile(do_base, offs_d, offs_m, sdod, sdon, mask_d, mask_m, UPCAST)
        lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)

        sT = tl.dot(k, qT, input_precision="tf32x3")
        pT = tl.exp2(sT * qk_scale - lse[None, :])
        dv += tl.dot(pT.to(doT.dtype), tl.trans(doT), input_precision="tf32x3")
        dpT = tl.dot(v, doT, input_precision="tf32x3")
        dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
        dk += tl.dot(dsT, tl.trans(qT), input_precision="tf32x3")

    _store_tile(DK + b * sdkb + h * sdkh, offs_n, offs_d, sdkn, sdkd, mask_n, mask_d, dk * sm_scale)
    _store_tile(DV + b * sdvb + h * sdvh, offs_n, offs_d, sdvn, sdvd, mask_n, mask_d, dv)


@triton.jit
def _attn_bwd_dq(Q, K, V, O, DO, LSE, DELTA, DQ,
                 sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                 sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
                 n_heads, n_ctx, head_dim, sm_scale, qk_scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr):
    """dQ of one block of BLOCK_M queries, walking over all key blocks of BLOCK_N; first the block's delta =
    rowsum(dO * O) in fp32, the softmax backward's per-row term, which it also stores for `_attn_bwd_dkdv`
    (launched after it)."""
    pid_m, pid_bh, b, h = _block_program(n_ctx, n_heads, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_nb = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    mask_m = offs_m < n_ctx
    mask_d = offs_d < head_dim

    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, mask_m, mask_d, UPCAST)
    do = _load_tile(DO + b * sdob + h * sdoh, offs_m, offs_d, sdon, sdod, mask_m, mask_d, UPCAST)
    row_base = pid_bh.to(tl.int64) * n_ctx
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    o = _load_tile(O + b * sob + h * soh, offs_m, offs_d, son, sod, mask_m, mask_d, UPCAST)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + row_base + offs_m, delta, mask=mask_m)

    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for start_n in range(0, n_ctx, BLOCK_N):
        offs_n = start_n + offs_nb
        mask_n = offs_n < n_ctx
        # K and V loaded transposed ([D_PAD, BLOCK_N]) for S = Q K^T and dP = dO V^T.
        kT = _load_tile(k_base, offs_d, offs_n, skd, skn, mask_d, mask_n, UPCAST)
        vT = _load_tile(v_base, offs_d, offs_n, svd, svn, mask_d, mask_n, UPCAST)
        s = tl.dot(q, kT, input_precision="tf32x3")
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = tl.dot(do, vT, input_precision="tf32x3")
        ds = (p * (dp - delta[:, None])).to(kT.dtype)
        dq += tl.dot(ds, tl.trans(kT), input_precision="tf32x3")

    _store_tile(DQ + b * sdqb + h * sdqh, offs_m, offs_d, sdqn, sdqd, mask_m, mask_d, dq * sm_scale)


# ----------------------------------------------------------------------------------------------------
# Paths and launch settings
# ----------------------------------------------------------------------------------------------------

KERNELS = {
    "fwd_short": _attn_fwd_short,
    "fwd_flash": _attn_fwd_flash,
    "bwd_short": _attn_bwd_short,
    "bwd_dkdv": _attn_bwd_dkdv,
    "bwd_dq": _attn_bwd_dq,
}


@dataclass(frozen=True)
class LaunchSettings:
    """Tile sizes and launch options of one kernel launch. BLOCK_M counts query rows, BLOCK_N key rows."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=None)
def _pad(n: int) -> int:
    """Tile size for n rows or head-dim columns: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_power_of_2(n))


def _check_path(path: str) -> None:
    if path not in PATHS:
        raise ValueError(f"attention path must be one of {', '.join(PATHS)}, got {path!r}")


def _short_forward_fits(n_pad: int, d_pad: int, dtype: torch.dtype) -> bool:
    # fp32 tiles take twice the shared memory and their 3xTF32 products twice the registers: at 128 keys triton
    # 3.8's register allocation spilled at head dims 16 and 128 with every block tried, so fp32 stops at 64 keys
    return n_pad <= (SHORT_MAX_N_FP32 if dtype == torch.float32 else SHORT_MAX_N)


_LARGE_SHARED_MEMORY_MAJORS = (9, 10)  # sm_90 (Hopper), sm_100 (B200/GB200): 227 KB of shared memory per block


def _short_backward_fits(n_pad: int, d_pad: int, dtype: torch.dtype, capability: tuple[int, int]) -> bool:
    """Whether the one-program-per-head backward keeps K, V and the fp32 dK, dV tiles on chip without spills
    (measured with ptxas for sm_80 and sm_90). Hopper's wgmma reads its B operands from shared memory, so
    it holds twice the tile of Ampere's mma, which needs them in registers. The larger tiles need Hopper's
    227 KB of shared memory per block: data-centre Blackwell (sm_100) has as much; the GPUs of compute
    capability 8.x and 12.x (consumer and workstation Blackwell, no wgmma) have about 99 KB and take Ampere's
    rule, as does any architecture not named here."""
    if n_pad > SHORT_MAX_N:
        return False
    if dtype == torch.float32:
        return n_pad <= 32 and d_pad <= 64
    if capability[0] in _LARGE_SHARED_MEMORY_MAJORS:
        return n_pad * d_pad <= SHORT_BWD_MAX_TILE and (n_pad <= 128 or d_pad in (32, 64))
    # 128 keys: clean at head dim 16 on triton 3.6 to 3.9; at head dim 32 clean on 3.6 and 3.9, spilling on 3.8
    return n_pad <= 64 or (n_pad == 128 and d_pad <= 16)


@functools.lru_cache(maxsize=None)  # pure; read on every launch
def forward_path(n: int, d: int, dtype: torch.dtype, path: str = "auto") -> str:
    """'short' for n <= AUTO_SHORT_MAX_N (128; 64 for fp32), else 'flash'; `path` may force one ('short' takes
    up to SHORT_MAX_N = 256 keys in fp16/bf16)."""
    _check_path(path)
    fits = _short_forward_fits(_pad(n), _pad(d), dtype)
    if path == "auto":
        return "short" if fits and n <= AUTO_SHORT_MAX_N else "flash"
    if path == "short" and not fits:
        raise ValueError(f"the short attention path takes at most {SHORT_MAX_N} tokens ({SHORT_MAX_N_FP32} in "
                         f"fp32); got {n} in {str(dtype).replace('torch.', '')}")
    return path


@functools.lru_cache(maxsize=None)  # pure; read on every launch
def backward_path(n: int, d: int, dtype: torch.dtype, path: str = "auto",
                  capability: tuple[int, int] = (9, 0)) -> str:
    """'short' (one program per head) for n <= AUTO_SHORT_MAX_N where its tiles fit on chip for this GPU
    (`_short_backward_fits`), else 'flash'; `path` may force one. `capability` is the GPU's compute capability
    ((9, 0) for the interpreter)."""
    _check_path(path)
    fits = _short_backward_fits(_pad(n), _pad(d), dtype, capability)
    if path == "auto":
        return "short" if fits and n <= AUTO_SHORT_MAX_N else "flash"
    if path == "short" and not fits:
        raise ValueError(f"the short attention backward does not fit N={n}, D={d} in "
                         f"{str(dtype).replace('torch.', '')} on compute capability {capability[0]}.{capability[1]}")
    return path


def choose_paths(n: int, d: int, dtype: torch.dtype, path: str = "auto",
                 capability: tuple[int, int] = (9, 0)) -> tuple[str, str]:
    """The (forward, backward) paths for sequence length n, head dim d and dtype."""
    return forward_path(n, d, dtype, path), backward_path(n, d, dtype, path, capability)


def kernels_for(n: int, d: int, dtype: torch.dtype, path: str = "auto",
                capability: tuple[int, int] = (9, 0)) -> list[str]:
    """The kernels one forward and backward launch, in order."""
    fwd, bwd = choose_paths(n, d, dtype, path, capability)
    return ["fwd_" + fwd] + (["bwd_short"] if bwd == "short" else ["bwd_dq", "bwd_dkdv"])


# Flash-path settings per head-dim tile, (BLOCK_M, BLOCK_N, num_warps, num_stages): for each, the largest
# tiles of a short list that compile without register spills for sm_80, sm_90 and sm_100 and within 96 KiB of
# shared memory on sm_80 (sm_86/89 parts have about 99 KiB) and 200 KiB on sm_90, with triton 3.6 to 3.9
# (3.6 spills 60 bytes at fp32 head dim 128 with 32 x 32 tiles, where 3.9 does not; triton 3.8 spills on sm_80
# with fp32 128 x 64 tiles at head dim 32, and in fp32 dQ at head dim 128 with two stages). One exception,
# chosen on a GPU: the fp32 forward at head dim 64 takes 32 x 16 tiles with 4 warps. 64 x 16 with 8 warps
# compiled clean but made illegal memory accesses on an H200 (triton 3.6); of the clean candidates checked
# there, 32 x 16 was right and the fastest (B16 H16 N1024: 8.2 ms against 9.6 for 64 x 32 / 8 warps, which
# spills with triton 3.8 on sm_80, and 11.8 to 12.1 for 128 x 16 / 8 and 64 x 16 / 4).
_FLASH = {
    # kernel: ({d_pad: settings} for fp16/bf16, {d_pad: settings} for fp32)
    "fwd_flash": ({16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (64, 64, 4, 3)},
                  {16: (128, 64, 8, 3), 32: (128, 32, 8, 3), 64: (32, 16, 4, 3), 128: (16, 32, 4, 2)}),
    "bwd_dkdv": ({16: (32, 128, 8, 3), 32: (32, 128, 8, 3), 64: (32, 128, 8, 3), 128: (32, 64, 4, 3)},
                 {16: (32, 128, 8, 3), 32: (16, 64, 4, 2), 64: (16, 32, 4, 2), 128: (16, 16, 4, 2)}),
    "bwd_dq": ({16: (128, 32, 8, 3), 32: (128, 32, 8, 3), 64: (128, 32, 8, 3), 128: (64, 32, 4, 3)},
               {16: (128, 32, 8, 3), 32: (128, 32, 8, 3), 64: (32, 32, 4, 2), 128: (16, 32, 4, 1)}),
}


# Settings measured on GPUs by `fastmae bench tune` (fastmae/bench/tune.py), per architecture:
# {"sm_90": {kernel: {tuned_key: [BLOCK_M, BLOCK_N, num_warps, num_stages]}}, "source": {...}, "measured": {...}}.
# Keys name the tiles only, so one entry serves every sequence length and head dim with those tiles.
TUNED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention_tuned.json")
_SHORT_KERNELS = ("fwd_short", "bwd_short")


def tuned_key(kernel: str, n: int, d: int, dtype: torch.dtype) -> str:
    """The key of a tuned entry: dtype and tiles ('bf16,N64,D64' for the short kernels, 'bf16,D64' else)."""
    dt = TRITON_DTYPES[dtype]
    return f"{dt},N{_pad(n)},D{_pad(d)}" if kernel in _SHORT_KERNELS else f"{dt},D{_pad(d)}"


def _parse_key(key: str) -> tuple[torch.dtype, int | None, int]:
    parts = key.split(",")
    dtype = {v: k for k, v in TRITON_DTYPES.items()}[parts[0]]
    n_pad = int(parts[1][1:]) if len(parts) == 3 else None
    return dtype, n_pad, int(parts[-1][1:])


def validate_tuned(table: dict) -> list[str]:
    """Problems of a tuned table (empty when it is sound): unknown architectures, kernels or keys, settings
    that are not four powers of two, short-kernel key tiles that are not the whole key set."""
    problems: list[str] = []
    for kernel, key, cfg, where in tuned_entries(table, KERNELS, "attention", problems):
        try:
            dtype, n_pad, d_pad = _parse_key(key)
        except (KeyError, ValueError, IndexError):
            problems.append(f"{where}: key is not like 'bf16,N64,D64' or 'bf16,D64'")
            continue
        if (n_pad is None) != (kernel not in _SHORT_KERNELS) or tuned_key(kernel, n_pad or 1, d_pad, dtype) != key:
            problems.append(f"{where}: key does not fit the kernel (or its tiles are not powers of two)")
            continue
        if not (isinstance(cfg, list) and len(cfg) == 4 and all(isinstance(x, int) and x >= 1 for x in cfg)
                and all(x & (x - 1) == 0 for x in cfg[:3])):
            problems.append(f"{where}: settings must be [BLOCK_M, BLOCK_N, num_warps, num_stages], "
                            f"powers of two but the stages; got {cfg}")
        elif kernel in _SHORT_KERNELS and cfg[1] != n_pad:
            problems.append(f"{where}: a short kernel's BLOCK_N must be the key tile {n_pad}")
    return problems


# tuned_table(path=None): the recorded settings ({} when there are none); forced_settings(kernel=settings): a
# `with` block in which those settings launch (`fastmae bench tune`); see `utils.TunedSettings`
_TUNED = TunedSettings(TUNED_FILE, KERNELS, "attention", validate_tuned)
_FORCED = _TUNED.forced
tuned_table = _TUNED.table
forced_settings = _TUNED.force


def launch_settings(kernel: str, n: int, d: int, dtype: torch.dtype,
                    capability: tuple[int, int] | None = None) -> LaunchSettings:
    """Launch settings of one kernel ('fwd_short', 'fwd_flash', 'bwd_short', 'bwd_dkdv',
    'bwd_dq') for sequence length n, head dim d and input dtype: settings forced by `forced_settings`, else
    the entry measured for this GPU architecture (`capability`) in `attention_tuned.json`, else the rule below.

    Only the tiles matter: next_power_of_2(n) (the short kernels' key tile) and next_power_of_2(d) (the
    head-dim tile), both at least 16. Every choice below compiles without register spills for sm_80, sm_90
    and sm_100 with triton 3.6 to 3.9 (ptxas -v, for the specializations Triton's launcher makes for 16-aligned
    pointers and strides); they were picked by compiling, not by timing (but for the fp32 forward at head dim 64,
    see `_FLASH`), and are the first thing to tune on a GPU.
    * fwd_short: all keys in one tile, no loop. fp16/bf16: 64 query rows per program (32 at 256 keys with
      head dim 64 or more), 4 warps (8 at 256 keys x head dim 128). fp32: 64 rows up to 1024 key x head-dim
      elements, 16 rows beyond, 8 warps from 8192 elements.
    * bwd_short: all keys in one tile; query blocks of up to 32 rows and 4 warps up to 1024 key x head-dim
      elements, 16 rows and 8 warps beyond, no pipelining at 16384 (fp32: 16 rows, 8 warps from 512 elements:
      at 4 warps the 32-key x head-dim-16 tile spilled on sm_90 once delta was normalised by rowsum(P)).
    * fwd_flash, bwd_dkdv, bwd_dq: the per-head-dim table `_FLASH`.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; kernels are {', '.join(KERNELS)}")
    if kernel in _FORCED:
        return _FORCED[kernel]
    table = tuned_table() if capability is not None else None
    if table:  # nothing to look up, and no key to build on every launch, when nothing is tuned
        entry = tuned_entry(table, capability, kernel, lambda: tuned_key(kernel, n, d, dtype))
        if entry:
            return LaunchSettings(*entry)
    return default_settings(kernel, n, d, dtype)


@functools.lru_cache(maxsize=None)  # pure (LaunchSettings is frozen); read on every launch
def default_settings(kernel: str, n: int, d: int, dtype: torch.dtype) -> LaunchSettings:
    """The rule of `launch_settings`, without forced or tuned settings."""
    n_pad, d_pad = _pad(n), _pad(d)
    wide = dtype == torch.float32
    tile = n_pad * d_pad
    if kernel == "fwd_short":
        if wide:
            return LaunchSettings(min(n_pad, 64) if tile <= 1024 else 16, n_pad, 8 if tile >= 8192 else 4, 1)
        if n_pad >= 256 and d_pad >= 64:
            return LaunchSettings(32, n_pad, 8 if d_pad >= 128 else 4, 1)
        return LaunchSettings(min(n_pad, 64), n_pad, 4, 1)
    if kernel == "bwd_short":
        if wide:
            return LaunchSettings(16, n_pad, 8 if tile >= 512 else 4, 2)
        if tile <= 1024:
            return LaunchSettings(min(n_pad, 32), n_pad, 4, 2)
        return LaunchSettings(16, n_pad, 8, 1 if tile >= 16384 else 2)
    return LaunchSettings(*_FLASH[kernel][1 if wide else 0][d_pad])


# ----------------------------------------------------------------------------------------------------
# Launchers (plain functions: check, allocate, pick settings, launch; testable without autograd)
# ----------------------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention takes q, k, v of one shape [B, H, N, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    _check_dtype_head_dim(q.dtype, q.shape[-1])


def _check_dtype_head_dim(dtype: torch.dtype, head_dim: int) -> None:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton attention takes float32, float16 or bfloat16, got {dtype}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"the Triton attention takes head dims 1 to {MAX_HEAD_DIM}, got {head_dim}")


_I32_LIMIT = 2 ** 31


def _span(n: int, d: int, stride_n: int, stride_d: int) -> int:
    """The largest element offset inside one [N, D] slice of a [B, H, N, D] tensor with those strides. The
    kernels compute the batch and head offsets in 64 bits and the offsets inside a head in 32."""
    return (n - 1) * abs(stride_n) + (d - 1) * abs(stride_d)


def _head_span(t: torch.Tensor) -> int:
    return _span(t.shape[2], t.shape[3], t.stride(2), t.stride(3))


def _i32_addressable(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a contiguous copy when its rows lie too far apart for 32-bit offsets inside a head (views of a
    sequence-first [N, B, H * D] tensor at a large batch and length); no layout the model makes needs it."""
    return t if _head_span(t) < _I32_LIMIT else t.contiguous()


# Whether the kernels above run in Triton's interpreter: `triton.jit` decided that when it decorated them, at this
# module's import (reading the environment at each launch cost about 2 µs, and a bf16 training step asks per launch)
_INTERPRETED = interpreter_enabled()


def _upcast(dtype: torch.dtype) -> bool:
    """bf16 tiles go through fp32 under the interpreter, which holds bf16 as raw integers."""
    return dtype is torch.bfloat16 and _INTERPRETED


def _new_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's (out, lse), as the kernels and the fake implementations allocate them: out [B, H, N, D]
    laid out as a [B, N, H, D] tensor (merging the heads afterwards is free), lse [B, H, N] fp32. Where the rows
    of that layout lie too far apart for 32-bit offsets inside a head (about a million tokens at 16 x 128),
    out is a plain contiguous [B, H, N, D] tensor instead."""
    B, H, N, D = q.shape
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    if _span(N, D, H * D, 1) < _I32_LIMIT:  # the rows of the [B, N, H, D] buffer; made in that layout at once
        return torch.empty_strided((B, H, N, D), (N * H * D, D, H * D, 1), dtype=q.dtype, device=q.device), lse
    return torch.empty((B, H, N, D), dtype=q.dtype, device=q.device), lse


@launches_on_device_of("q")
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                      path: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: [B, H, N, D] (any strides) -> (out [B, H, N, D] in q's dtype, laid out as [B, N, H, D],
    lse [B, H, N] fp32: the natural log-sum-exp of each row of scale * q k^T).

    `path` forces 'short' or 'flash' (tests); 'auto' picks by `forward_path`.
    """
    _check_inputs(q, k, v)
    check_device(q, k, v)
    return _forward(q, k, v, q.shape[-1] ** -0.5 if scale is None else float(scale), path)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, path: str,
             one_layout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_forward` on checked inputs, on the current device: the launch alone (a training step makes one
    per block, and its host time is part of the step's at MAE's shapes). `one_layout`: q, k and v have one shape
    and strides (views of one packed projection), so q's layout is checked for all three."""
    if not one_layout or _head_span(q) >= _I32_LIMIT:
        q, k, v = (_i32_addressable(t) for t in (q, k, v))
    B, H, N, D = q.shape
    out, lse = _new_outputs(q)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    kernel = "fwd_" + forward_path(N, D, q.dtype, path)
    cfg = launch_settings(kernel, N, D, q.dtype, launch_capability(q.device))
    launch(KERNELS[kernel], (cdiv(N, cfg.block_m) * B * H,),
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), H, N, D, scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D_PAD=_pad(D), UPCAST=_upcast(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION)
    return out, lse


@launches_on_device_of("q")
def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, scale: float | None = None, path: str = "auto",
                       grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) in q's dtype from dout = dL/d(out) and the forward's out and lse: new contiguous
    tensors, or written into `grads` (three [B, H, N, D] tensors of q's dtype, any strides) and returned.

    Recomputes the probabilities from lse. `path` forces 'short' or 'flash'; 'auto' picks by `backward_path`.
    """
    _check_inputs(q, k, v)
    check_device(q, k, v, dout, out, lse)
    B, H, N, D = q.shape
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != (B, H, N):
        raise ValueError(f"attention_backward: dout and out must be {tuple(q.shape)} and lse {(B, H, N)}; got "
                         f"{tuple(dout.shape)}, {tuple(out.shape)}, {tuple(lse.shape)}")
    if lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError("attention_backward: lse must be the forward's contiguous fp32 [B, H, N] tensor")
    scale = D ** -0.5 if scale is None else float(scale)
    if grads is not None and any(g.shape != q.shape or g.dtype != q.dtype or g.device != q.device for g in grads):
        raise ValueError(f"attention_backward: grads must be three {tuple(q.shape)} tensors of {q.dtype} on "
                         f"{q.device}")
    return _backward(dout, q, k, v, out, lse, scale, path, grads)


def _backward(dout, q, k, v, out, lse, scale: float, path: str, grads=None, one_layout: bool = False):
    """`attention_backward` on checked inputs, on the current device. `one_layout`: q, k and v share one layout,
    and so do the three `grads` (views of one packed projection and of its gradient): each checked once."""
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    if one_layout and _head_span(q) < _I32_LIMIT:
        dout, out = _i32_addressable(dout), _i32_addressable(out)
    else:
        dout, q, k, v, out = (_i32_addressable(t) for t in (dout, q, k, v, out))
    if grads is None:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty_like(dq)
        dv = torch.empty_like(dq)
    else:
        dq, dk, dv = grads
        if any(_head_span(g) >= _I32_LIMIT for g in (grads[:1] if one_layout else grads)):  # an addressable layout
            for g, fresh in zip(grads, _backward(dout, q, k, v, out, lse, scale, path)):
                g.copy_(fresh)
            return dq, dk, dv
    if dq.numel() == 0:
        return dq, dk, dv
    _launch_backward(dout, q, k, v, out, lse, dq, dk, dv, scale, path)
    return dq, dk, dv


def _launch_backward(dout, q, k, v, out, lse, dq, dk, dv, scale: float, path: str) -> None:
    B, H, N, D = q.shape
    meta = dict(D_PAD=_pad(D), UPCAST=_upcast(q.dtype))
    strides_qkv = (*q.stride(), *k.stride(), *v.stride())
    cap = launch_capability(q.device)
    if backward_path(N, D, q.dtype, path, cap) == "short":
        cfg = launch_settings("bwd_short", N, D, q.dtype, cap)
        launch(_attn_bwd_short, (B * H,),
            q, k, v, dout, lse, dq, dk, dv, *strides_qkv, *dout.stride(), *dq.stride(),
            *dk.stride(), *dv.stride(), H, N, D, scale, scale * LOG2E,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION, **meta)
        return

    # dQ first: its programs also write delta = rowsum(dO * O), which dK, dV read (launched after, on the same
    # stream): two launches, no separate pass for delta
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    cfg = launch_settings("bwd_dq", N, D, q.dtype, cap)
    launch(_attn_bwd_dq, (cdiv(N, cfg.block_m) * B * H,),
        q, k, v, out, dout, lse, delta, dq, *strides_qkv, *out.stride(), *dout.stride(), *dq.stride(),
        H, N, D, scale, scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION, **meta)
    cfg = launch_settings("bwd_dkdv", N, D, q.dtype, cap)
    launch(_attn_bwd_dkdv, (cdiv(N, cfg.block_n) * B * H,),
        q, k, v, dout, lse, delta, dk, dv, *strides_qkv, *dout.stride(), *dk.stride(), *dv.stride(),
        H, N, D, scale, scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION, **meta)


# ----------------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile, with fake implementations and an autograd formula (eager
# calls skip the custom-op dispatch: see `utils.custom_op`)
# ----------------------------------------------------------------------------------------------------


def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   path: str) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, scale, path)


def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, scale: float, path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(dout, q, k, v, out, lse, scale, path)


_attention_bwd_op = custom_op("fastmae::attention_bwd", _attention_bwd)


@_attention_bwd_op.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, scale, path):
    shape = tuple(q.shape)
    return q.new_empty(shape), q.new_empty(shape), q.new_empty(shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale, path = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.path = path
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse gets no gradient: no zeros made for it (a kernel per call)


def _attention_backward_formula(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None
    dq, dk, dv = _attention_bwd_op(dout, q, k, v, out, lse, ctx.scale, ctx.path)
    return dq, dk, dv, None, None


_attention_fwd_op = custom_op("fastmae::attention_fwd", _attention_fwd, _attention_setup_context,
                              _attention_backward_formula)


@_attention_fwd_op.register_fake
def _attention_fwd_fake(q, k, v, scale, path):
    return _new_outputs(q)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
              path: str = "auto") -> torch.Tensor:
    """Softmax attention: q, k, v [B, H, N, D] (strided views allowed) -> [B, H, N, D] in q's dtype.

    softmax(scale * q k^T) v with scale = D ** -0.5 by default; differentiable in q, k and v.
    `path` ('auto', 'short', 'flash') forces a kernel path, for tests and benchmarks.
    """
    _check_inputs(q, k, v)
    _check_path(path)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = _attention_fwd_op(q, k, v, scale, path)
    return out


# The packed launchers skip `attention_forward`'s and `attention_backward`'s checks: `attention_packed` checked
# qkv, and the backward's other tensors are the forward's outputs and autograd's gradient of out.

def _packed_views(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`split_qkv`'s q, k, v [B, H, N, D] views of qkv [B, N, 3 * H * D] (any strides), made by `as_strided`: the
    same elements and strides for about half the host time of reshape, permute and unbind. For the launchers
    alone: their callers (an autograd.Function, the custom ops) keep autograd away from these views."""
    B, N, width = qkv.shape
    d = width // (3 * num_heads)
    sb, sn, sc = qkv.stride()
    size, stride = (B, num_heads, N, d), (sb, d * sc, sn, sc)
    offset, step = qkv.storage_offset(), num_heads * d * sc
    return (qkv.as_strided(size, stride, offset), qkv.as_strided(size, stride, offset + step),
            qkv.as_strided(size, stride, offset + 2 * step))


@launches_on_device_of("qkv")
def _attention_qkv_fwd(qkv: torch.Tensor, num_heads: int, scale: float,
                       path: str) -> tuple[torch.Tensor, torch.Tensor]:
    check_device(qkv)
    return _forward(*_packed_views(qkv, num_heads), scale, path, one_layout=True)


@launches_on_device_of("qkv")
def _attention_qkv_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                       num_heads: int, scale: float, path: str) -> torch.Tensor:
    check_device(dout)
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    _backward(dout, *_packed_views(qkv, num_heads), out, lse, scale, path, _packed_views(dqkv, num_heads),
              one_layout=True)
    return dqkv


_attention_qkv_bwd_op = custom_op("fastmae::attention_qkv_bwd", _attention_qkv_bwd)


@_attention_qkv_bwd_op.register_fake
def _attention_qkv_bwd_fake(dout, qkv, out, lse, num_heads, scale, path):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _attention_qkv_setup_context(ctx, inputs, output):
    qkv, num_heads, scale, path = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads, ctx.scale, ctx.path = num_heads, scale, path
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse gets no gradient: no zeros made for it (a kernel per block)


def _attention_qkv_backward_formula(ctx, dout, dlse):
    qkv, out, lse = ctx.saved_tensors
    if dout is None:
        return None, None, None, None
    return _attention_qkv_bwd_op(dout, qkv, out, lse, ctx.num_heads, ctx.scale, ctx.path), None, None, None


_attention_qkv_fwd_op = custom_op("fastmae::attention_qkv_fwd", _attention_qkv_fwd, _attention_qkv_setup_context,
                                  _attention_qkv_backward_formula)


@_attention_qkv_fwd_op.register_fake
def _attention_qkv_fwd_fake(qkv, num_heads, scale, path):
    return _new_outputs(split_qkv(qkv, num_heads)[0])


class _PackedAttention(torch.autograd.Function):
    """The eager autograd of `attention_packed`: the custom op's launchers and formula (above) without its
    generic wrapping (`custom_op`'s Function, with the custom op's two outputs). The model calls it once per block
    and step, and at MAE's shapes the host's time per call is part of the step's: on a CPU, a ViT-B-depth step
    with its launches recorded instead of run took 0.4 to 0.5 ms less with it, and 1 to 3 ms (2 to 6%) less with
    it and the blocks' shared backend choice (`fastmae.ops.AttentionPlan`) together."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, num_heads: int, scale: float, path: str) -> torch.Tensor:
        out, lse = _attention_qkv_fwd(qkv, num_heads, scale, path)
        ctx.save_for_backward(qkv, out, lse)  # lse: not an output, so autograd makes no gradient for it
        ctx.num_heads, ctx.scale, ctx.path = num_heads, scale, path
        return out

    @staticmethod
    @once_differentiable  # no graph through its kernels: a double backward raises
    def backward(ctx, dout: torch.Tensor):
        qkv, out, lse = ctx.saved_tensors
        return _attention_qkv_bwd(dout, qkv, out, lse, ctx.num_heads, ctx.scale, ctx.path), None, None, None


def attention_packed(qkv: torch.Tensor, num_heads: int, scale: float | None = None, *,
                     path: str = "auto") -> torch.Tensor:
    """`attention` on the packed projection qkv [B, N, 3 * H * D] -> [B, H, N, D]; the same kernels and numbers.

    The difference is the gradient: the kernels write dq, dk and dv straight into one [B, N, 3 * H * D] tensor,
    where autograd through `split_qkv` views would stack the three gradients and copy them into that layout.
    """
    d = qkv_head_dim(qkv, num_heads)  # q, k and v are views of qkv: one shape, dtype and device
    _check_dtype_head_dim(qkv.dtype, d)
    _check_path(path)
    scale = d ** -0.5 if scale is None else float(scale)
    num_heads = int(num_heads)
    if torch.compiler.is_compiling() or type(qkv) not in PLAIN_TENSOR_TYPES:  # the custom op, with its fake
        return _attention_qkv_fwd_op(qkv, num_heads, scale, path)[0]
    if qkv.requires_grad and torch.is_grad_enabled():
        return _PackedAttention.apply(qkv, num_heads, scale, path)
    return _attention_qkv_fwd(qkv, num_heads, scale, path)[0]


# ----------------------------------------------------------------------------------------------------
# Every configuration the launchers can pick, for the ahead-of-time compile check
# ----------------------------------------------------------------------------------------------------

_FP32_POINTERS = {"LSE", "DELTA"}
_FLOAT_SCALARS = {"qk_scale", "sm_scale"}
_SHORT_TILES = tuple(1 << i for i in range(4, SHORT_MAX_N.bit_length()))  # 16 .. SHORT_MAX_N
_HEAD_DIM_TILES = (16, 32, 64, 128)


def _spec(kernel: str, dtype: torch.dtype, d_pad: int, cfg: LaunchSettings, n_pad: int | None = None,
          note: str = "", aligned: bool = True) -> CompileSpec:
    fn = KERNELS[kernel]
    constexprs = {"BLOCK_M": cfg.block_m, "D_PAD": d_pad}
    if "BLOCK_N" in fn.arg_names:
        constexprs["BLOCK_N"] = cfg.block_n
    if "UPCAST" in fn.arg_names:
        constexprs["UPCAST"] = False
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name[0].isupper():
            signature[name] = "*fp32" if name in _FP32_POINTERS else "*" + TRITON_DTYPES[dtype]
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        elif name.startswith("s") and name.endswith("d") and len(name) <= 5:
            # the head-dim stride: 1 for any tensor whose last dim is contiguous (packed qkv views too),
            # which Triton's launcher specializes to the constant 1, as here.
            constexprs[name] = 1
        else:
            signature[name] = "i32"
    dt = TRITON_DTYPES[dtype]
    tiles = f"N_PAD={n_pad},D_PAD={d_pad}" if n_pad else f"D_PAD={d_pad}"
    spec = CompileSpec(name=f"attention.{kernel}[{dt},{tiles}]{note}", fn=fn, signature=signature,
                       constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # With a head dim that is a multiple of 16 (every MAE model) all strides and head_dim are multiples of
    # 16 as well (packed qkv views included), which Triton's launcher specializes (vector loads): `aligned`
    # specs describe that case. Other head dims launch a less specialized variant (`aligned=False`).
    if aligned:
        spec.divisible_by_16 = tuple(name for name in signature if name.startswith("s") and signature[name] == "i32")
        spec.divisible_by_16 += ("head_dim",)
    return spec


def compile_specs() -> list[CompileSpec]:
    """Every kernel x constexpr combination the launchers can pick: per dtype and head-dim tile, the short
    kernels for every key tile 16..SHORT_MAX_N that a forced path="short" takes (beyond AUTO_SHORT_MAX_N only
    the forced path launches them: tests, `bench attention`'s triton-short rows, the tuner), and the flash
    kernels (settings independent of N). Two optional attributes beyond `CompileSpec`'s fields:
    `divisible_by_16` (the integer arguments a launch specializes as multiples of 16) and, on the short
    backward configurations only GPUs with Hopper's shared memory pick (sm_90, sm_100; not 12.x),
    `archs = (90, 100)`."""
    specs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for d_pad in _HEAD_DIM_TILES:
            for n_pad in _SHORT_TILES:
                if _short_forward_fits(n_pad, d_pad, dtype):
                    specs.append(_spec("fwd_short", dtype, d_pad, launch_settings("fwd_short", n_pad, d_pad, dtype),
                                       n_pad))
                archs = [cap for cap in ((8, 0), (9, 0), (10, 0)) if _short_backward_fits(n_pad, d_pad, dtype, cap)]
                if archs:
                    note = "" if (8, 0) in archs else " (sm_90, sm_100)"
                    spec = _spec("bwd_short", dtype, d_pad, launch_settings("bwd_short", n_pad, d_pad, dtype),
                                 n_pad, note)
                    if (8, 0) not in archs:  # sm_80 never launches it (it would spill there): sm_90 and sm_100
                        spec.archs = tuple(major * 10 + minor for major, minor in archs)
                    specs.append(spec)
            for kernel in ("fwd_flash", "bwd_dq", "bwd_dkdv"):
                specs.append(_spec(kernel, dtype, d_pad, launch_settings(kernel, SHORT_MAX_N + 1, d_pad, dtype)))
    # A head dim that is not a multiple of 16 (the registry takes 16 to 128), here 24, compiled with no integer
    # taken as a multiple of 16: the least specialised case, which bounds the variants such head dims launch
    # (some of their strides may still be multiples of 16). Every kernel once, in fp16, in `make test`'s sample.
    for kernel in KERNELS:
        n = 64 if kernel in _SHORT_KERNELS else SHORT_MAX_N + 1
        spec = _spec(kernel, torch.float16, _pad(24), launch_settings(kernel, n, 24, torch.float16),
                     _pad(n) if kernel in _SHORT_KERNELS else None, " (head dim 24, unaligned)", aligned=False)
        spec.always_check = True
        specs.append(spec)
    return specs + tuned_specs(tuned_table())


def settings_spec(kernel: str, n: int, d: int, dtype: torch.dtype, cfg: LaunchSettings,
                  note: str = "") -> CompileSpec:
    """The compile spec of one kernel launched at sequence length n and head dim d with settings `cfg`."""
    return _spec(kernel, dtype, _pad(d), cfg, _pad(n) if kernel in _SHORT_KERNELS else None, note)


def tuned_specs(table: dict) -> list[CompileSpec]:
    """The configurations of a tuned table, each compiled for its own architecture only."""
    def make(kernel, key, cfg, arch):
        dtype, n_pad, d_pad = _parse_key(key)
        return _spec(kernel, dtype, d_pad, LaunchSettings(*cfg), n_pad, f" (tuned {arch})")

    return tuned_table_specs(table, make)
