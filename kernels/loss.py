"""Fused masked-MSE pixel loss of the MAE, read straight from the image.

    masked_mse_loss(pred, imgs, mask, patch_size, norm_pix=False, pred_ids=None) -> 0-dim fp32 tensor

Exact semantics: `fastmae.ops.reference.masked_mse_loss`. What the kernels do instead of the reference:

- The target is never materialised. Each program takes a few consecutive tiles of prediction rows (n, l)
  and reads each row's patch (h, w) as a [C, p, p] tile straight from `imgs[n, c, h*p + pi, w*p + qi]` (any
  strides; the patch side is a compile-time constant, so patch rows can load as vectors),
  matches it to pred[n, l] in the official (p, q, c) order, normalises it in registers when `norm_pix` (the patch's mean
  and unbiased variance, eps 1e-6, all in fp32), and adds the row's fp32 partial `w * mean((pred - t)^2)` to
  its program's sum, with w = mask[n, l] (with `pred_ids`, row (n, j) is patch pred_ids[n, j] and w = 1).
- Software pipeline: a program issues the next tile's loads before it reduces the current one, and reads
  the weights one tile further ahead (they decide what is read), so its memory latency overlaps its
  reductions instead of adding to them (with one tile per program, a program waits for its weights, then
  for its data, then on its block-wide reductions, with nothing of its own in flight meanwhile).
- Rows whose weight is 0 (the kept patches) read nothing: their loads are masked off, so with 75% masking
  the kernel reads a quarter less. Where a tile holds one patch (the launch rule's choice for padded patches
  of 512 values or more, as ViT's 3 x 16 x 16 and 3 x 14 x 14), a kept patch's tile also skips its reductions
  and writes. (A consequence: a NaN or inf in pred at a kept row does not turn the loss into NaN as
  `0 * nan` does in the reference.)
- Each program sums its rows' partials and weights in registers and writes two numbers; a second
  one-program kernel sums those (one per program: a ViT-B batch of 64 makes about 2,100, not the 12,544 rows)
  in a fixed order and divides by `max(sum(mask), 1)` (`max(N*M, 1)` with `pred_ids`), as the reference
  does. No atomics anywhere, so the same inputs give the same bits run after run.
- When pred needs a gradient, the forward pass also writes the error `pred - t` (in pred's dtype, only at
  rows with w != 0), and the backward pass scales it by `2 * w * grad_output / (P * denominator)` in fp32
  (rows with w = 0 get zeros without a read). This spares the backward pass a second read of the image, which
  under mixed precision (fp32 images, half predictions) is the larger tensor. Called without grad, nothing is
  written.

Limits:
- Gradient to pred only: imgs gets none (the registry refuses imgs requiring grad, and this raises).
- pred, imgs: fp32, fp16 or bf16 (they may differ; arithmetic is fp32 after each load). mask is read as fp32
  (converted once if it is not). pred and pred_ids are made contiguous, imgs may have any strides.
- A tile holds whole patches, C and p padded to powers of two (a 3x14x14 patch takes 4x16x16 lanes for 588
  values); the forward is compiled for each patch side (a constant), and the compile specs list sides 4,
  8, 14 and 16 with 1 to 3 channels (others work, but are not compiled ahead of time).
- The grad buffer is kept in pred's dtype and holds the per-pixel errors themselves: the factor 2 w / P (1/384 at
  ViT's 768 values) and the loss scale of fp16 training are applied in the backward, in fp32, so an fp16 buffer
  keeps errors down to about 6e-5 as normal numbers (scaled by 2/P first, errors below 0.02 became subnormal).
"""
from __future__ import annotations

import functools
import os
import re
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

from .launch import launch
from .utils import (FP_FUSION, NUM_STAGES, TRITON_DTYPES, CompileSpec, TunedSettings, cdiv, check_device, custom_op,
                    image_patches, launch_capability, launches_on_device_of, next_power_of_2, tuned_entries,
                    tuned_entry, tuned_table_specs)

# The finalize kernel's block: the sums of a ViT-B batch of up to 128 (one per forward program) in one pass
FINALIZE_BLOCK = 4096
FINALIZE_WARPS = 8


# Launch choices: the rule (not timed on a GPU yet; the compile specs below follow it), which a GPU's entries in
# `loss_tuned.json` replace (`fastmae bench tune --op loss` measures and records them). A forward tile holds one patch
# (4 values per thread at 8 warps for a 3x16x16 patch in its [4, 16, 16] tile: pred, image, target and
# difference stay in registers), or as many small patches as make FWD_TILE elements (2 per thread: with the
# next tile in flight as well, 4 per thread made triton 3.6's ptxas spill at sm_90); the backward's about
# BWD_TILE (a plain scaling, 8 per thread).
FWD_TILE = 512
BWD_TILE = 2048
MAX_ROWS = 64


# The forward's software pipeline (see `_masked_mse_fwd_kernel`): each program takes `tiles_per_program`
# consecutive tiles, so that the next tile's loads overlap this one's reductions; enough programs remain to
# fill a large GPU a few times over (an H100 holds 132 x 6 to 8 of them at once: 40 and 32 registers per
# thread in a ViT-B step's launch with triton 3.6 and 3.9; ViT-H's 14-pixel patches take 60 to 80, so 3 or
# 4 per SM). Not yet timed on a GPU: 2048 and 8 are reasoned, not measured. The forward
# pipelines by hand, so Triton's own loop pipelining is off for it (num_stages=1).
PIPELINE_MIN_PROGRAMS = 2048
PIPELINE_MAX_TILES = 8
FWD_STAGES = 1


def tiles_per_program(n_tiles: int, max_tiles: int) -> int:
    """How many consecutive tiles one forward program takes: 1 up to PIPELINE_MIN_PROGRAMS tiles, then as
    many as keep that many programs, at most `max_tiles` (the rule's: PIPELINE_MAX_TILES)."""
    return max(1, min(max_tiles, n_tiles // PIPELINE_MIN_PROGRAMS))


def _warps(elements: int, per_thread: int) -> int:
    return max(1, min(8, elements // (32 * per_thread)))


@functools.lru_cache(maxsize=None)  # pure in its arguments and the module's tile constants; read on every launch
def _patch_settings(channels: int, patch_size: int) -> tuple[int, int, int, int]:
    """(rows per program, BLOCK_C, BLOCK_P, num_warps) for the forward's [rows, C, p, p] tile."""
    block_c, block_p = next_power_of_2(channels), next_power_of_2(patch_size)
    tile = block_c * block_p * block_p
    block_r = max(1, min(MAX_ROWS, FWD_TILE // tile))
    return block_r, block_c, block_p, _warps(block_r * tile, 2)


@functools.lru_cache(maxsize=None)  # as _patch_settings
def _row_settings(P: int) -> tuple[int, int, int]:
    """(rows per program, BLOCK, num_warps) for the backward's [rows, P] tile."""
    block = next_power_of_2(P)
    block_r = max(1, min(MAX_ROWS, BWD_TILE // block))
    return block_r, block, _warps(block_r * block, 8)


# ---------------------------------------------------------------------------------------------------------
# Launch settings: the rule above, or what `fastmae bench tune --op loss` measured on this GPU architecture
# ---------------------------------------------------------------------------------------------------------


class LossSettings(NamedTuple):
    """Launch settings of the forward ('fwd') or the backward ('bwd') kernel: prediction rows per tile, warps,
    at most how many consecutive tiles one forward program takes (its software pipeline; always 1 for the
    backward), and Triton's pipelining stages. (A named tuple: made on every launch, it must be cheap.)"""

    block_r: int
    num_warps: int
    max_tiles: int = 1
    num_stages: int = 1


KERNELS = ("fwd", "bwd")
# Settings measured on GPUs by `fastmae bench tune --op loss`, per architecture (the layout of
# `attention_tuned.json`): {"sm_90": {"fwd": {fwd_key: [BLOCK_R, num_warps, max_tiles, num_stages]}, "bwd":
# {bwd_key: [BLOCK_R, num_warps, 1, num_stages]}}, "source": {...}, "measured": {...}}.
TUNED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loss_tuned.json")
MAX_TILE_ELEMENTS = {"fwd": 8192, "bwd": 16384}  # the largest tile (rows x padded row) a tuned entry may take
_DT_NAMES = "fp32|fp16|bf16"
_FWD_KEY = re.compile(rf"({_DT_NAMES}),({_DT_NAMES}),C(\d+),p(\d+),norm([01]),ids([01]),grad([01])")
_BWD_KEY = re.compile(rf"({_DT_NAMES}),B(\d+),mask([01])")


def fwd_key(pred_dtype: torch.dtype, img_dtype: torch.dtype, channels: int, patch_size: int, norm_pix: bool,
            has_ids: bool, write_grad: bool) -> str:
    """The key of a tuned forward entry: 'bf16,fp32,C3,p16,norm1,ids0,grad1' (prediction and image dtypes,
    channels, patch side, and the three switches the kernel is compiled for)."""
    return (f"{_dt(pred_dtype)},{_dt(img_dtype)},C{channels},p{patch_size},norm{int(norm_pix)},"
            f"ids{int(has_ids)},grad{int(write_grad)}")


def bwd_key(dtype: torch.dtype, P: int, has_mask: bool) -> str:
    """The key of a tuned backward entry: 'bf16,B1024,mask1' (dtype, padded row of P values, mask or ids)."""
    return f"{_dt(dtype)},B{next_power_of_2(P)},mask{int(has_mask)}"


def _dt(dtype: torch.dtype) -> str:
    """A dtype's name in keys (one the kernels do not take gets a name no key matches: the rule serves it)."""
    return TRITON_DTYPES.get(dtype, str(dtype))


def _key_tile(kernel: str, key: str) -> int | None:
    """The padded elements of one row of the tile a key describes, or None when the key is not well formed."""
    if kernel == "fwd":
        m = _FWD_KEY.fullmatch(key)
        if not m or not (1 <= int(m[3]) <= 4 and 1 <= int(m[4]) <= 64):
            return None
        return next_power_of_2(int(m[3])) * next_power_of_2(int(m[4])) ** 2
    m = _BWD_KEY.fullmatch(key)
    block = int(m[2]) if m else 0
    return block if block >= 1 and block & (block - 1) == 0 else None


def validate_tuned(table: dict) -> list[str]:
    """Problems of a tuned table (empty when it is sound): unknown architectures, kernels or keys, and settings
    that are not [BLOCK_R, num_warps, max_tiles, num_stages] with BLOCK_R and num_warps powers of two (BLOCK_R
    up to MAX_ROWS, warps up to 16), at most MAX_TILE_ELEMENTS in a tile, 1 to 64 tiles (1 for the backward)
    and 1 to 4 stages."""
    problems: list[str] = []
    for kernel, key, cfg, where in tuned_entries(table, KERNELS, "loss", problems):
        tile = _key_tile(kernel, key)
        if tile is None:
            problems.append(f"{where}: key is not like " + ("'bf16,fp32,C3,p16,norm1,ids0,grad1'" if kernel == "fwd"
                                                             else "'bf16,B1024,mask1'"))
            continue
        if not (isinstance(cfg, list) and len(cfg) == 4 and all(isinstance(x, int) and x >= 1 for x in cfg)
                and cfg[0] <= MAX_ROWS and cfg[0] & (cfg[0] - 1) == 0 and cfg[1] <= 16 and cfg[1] & (cfg[1] - 1) == 0
                and cfg[2] <= (64 if kernel == "fwd" else 1) and cfg[3] <= 4):
            problems.append(f"{where}: settings must be [BLOCK_R, num_warps, max_tiles, num_stages] (see "
                            f"validate_tuned); got {cfg}")
        elif cfg[0] * tile > MAX_TILE_ELEMENTS[kernel]:
            problems.append(f"{where}: {cfg[0]} rows of {tile} make a tile of more than "
                            f"{MAX_TILE_ELEMENTS[kernel]} elements")
    return problems


# tuned_table(path=None): the recorded settings ({} when there are none); forced_settings(fwd=..., bwd=...): a
# `with` block in which those settings launch (`fastmae bench tune --op loss`); see `utils.TunedSettings`
_TUNED = TunedSettings(TUNED_FILE, KERNELS, "loss", validate_tuned)
_FORCED = _TUNED.forced
tuned_table = _TUNED.table
forced_settings = _TUNED.force


def default_settings(kernel: str, channels: int, patch_size: int) -> LossSettings:
    """The rule: `_patch_settings` for the forward (with up to PIPELINE_MAX_TILES tiles per program and
    FWD_STAGES), `_row_settings` for the backward's rows of channels x patch_size^2 values."""
    if kernel == "fwd":
        return _default_fwd(channels, patch_size, PIPELINE_MAX_TILES, FWD_STAGES)
    if kernel == "bwd":
        return _default_bwd(channels * patch_size * patch_size)
    raise ValueError(f"unknown loss kernel {kernel!r}; kernels are {', '.join(KERNELS)}")


@functools.lru_cache(maxsize=None)  # read on every launch; the module constants it reads are arguments
def _default_fwd(channels: int, patch_size: int, max_tiles: int, stages: int) -> LossSettings:
    block_r, _, _, num_warps = _patch_settings(channels, patch_size)
    return LossSettings(block_r, num_warps, max_tiles, stages)


@functools.lru_cache(maxsize=None)
def _default_bwd(P: int) -> LossSettings:
    block_r, _, num_warps = _row_settings(P)
    return LossSettings(block_r, num_warps, 1, NUM_STAGES)


def launch_settings(kernel: str, capability: tuple[int, int] | None, key: Callable[[], str],
                    default: Callable[[], LossSettings]) -> LossSettings:
    """Settings forced by `forced_settings`, else the entry measured for this GPU architecture in
    `loss_tuned.json` under `key()` (built only when the table has entries for the kernel), else `default()`."""
    if kernel in _FORCED:
        return _FORCED[kernel]
    table = tuned_table() if capability is not None else None
    entry = tuned_entry(table, capability, kernel, key) if table else None
    return LossSettings(*entry) if entry else default()


def _settings_for(kernel: str, device: torch.device, key: Callable[[], str],
                  default: Callable[[], LossSettings]) -> LossSettings:
    """`launch_settings` for a launch on `device`: its architecture is looked up only when something is forced
    or tuned (with neither, a launch pays for the rule alone)."""
    if not _FORCED and not tuned_table():
        return default()
    return launch_settings(kernel, launch_capability(device), key, default)


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _mse_tile_rows(t, limit, rows_per_n, mask_ptr, ids_ptr, HAS_IDS: tl.constexpr, BLOCK_R: tl.constexpr):
    """The rows of tile t: (rows, in range, image index, patch index, weight). Rows from `limit` on (past the
    last row, or in another program's tiles) get weight 0: a prefetch past the program's last tile reads
    nothing (a bandwidth guard only: such tiles are never finished)."""
    rows = t * BLOCK_R + tl.arange(0, BLOCK_R)  # int32 index math; int64 for memory offsets
    rvalid = rows < limit
    n = (rows // rows_per_n).to(tl.int64)
    if HAS_IDS:
        patch = tl.load(ids_ptr + rows, mask=rvalid, other=0).to(tl.int32)
        w = tl.where(rvalid, 1.0, 0.0)
    else:
        patch = rows % rows_per_n
        w = tl.load(mask_ptr + rows, mask=rvalid, other=0.0).to(tl.float32)
    return rows, rvalid, n, patch, w


@triton.jit
def _mse_tile_offsets(rows, w, C, PATCH: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The prediction offsets of a [BLOCK_R, C, p, p] tile in the official (p, q, c) order, and which lanes
    hold a value to read (rows of weight 0, the kept patches, hold none)."""
    c = tl.arange(0, BLOCK_C)[None, :, None, None]
    pi = tl.arange(0, BLOCK_P)[None, None, :, None]
    qi = tl.arange(0, BLOCK_P)[None, None, None, :]
    inb = (w != 0.0)[:, None, None, None] & (c < C) & (pi < PATCH) & (qi < PATCH)
    pred_offs = rows.to(tl.int64)[:, None, None, None] * (C * PATCH * PATCH) + (pi * PATCH + qi) * C + c
    return pred_offs, inb


@triton.jit
def _mse_load_tile(pred_ptr, img_ptr, rows, n, patch, w, C, gw, stride_n, stride_c, stride_h, stride_w,
                   PATCH: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """A tile's image patches and predictions, as fp32 [BLOCK_R, C, p, p] (0 outside the patch and on rows
    of weight 0)."""
    pred_offs, inb = _mse_tile_offsets(rows, w, C, PATCH, BLOCK_C, BLOCK_P)
    ph = (patch // gw)[:, None, None, None]
    pw = (patch % gw)[:, None, None, None]
    c = tl.arange(0, BLOCK_C)[None, :, None, None]
    pi = tl.arange(0, BLOCK_P)[None, None, :, None]
    qi = tl.arange(0, BLOCK_P)[None, None, None, :]
    img_offs = (n[:, None, None, None] * stride_n + c * stride_c + (ph * PATCH + pi) * stride_h
                + (pw * PATCH + qi) * stride_w)
    x = tl.load(img_ptr + img_offs, mask=inb, other=0.0).to(tl.float32)
    y = tl.load(pred_ptr + pred_offs, mask=inb, other=0.0).to(tl.float32)
    return x, y


@triton.jit
def _mse_finish_tile(x, y, rows, rvalid, w, g_ptr, C,
                     NORM_PIX: tl.constexpr, WRITE_GRAD: tl.constexpr, PATCH: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Each row's w * mean over the patch of (pred - target)^2 ([BLOCK_R], 0 on rows out of range), and the
    gradient when asked."""
    pred_offs, inb = _mse_tile_offsets(rows, w, C, PATCH, BLOCK_C, BLOCK_P)
    P = C * PATCH * PATCH
    if NORM_PIX:
        mean = tl.sum(tl.reshape(x, [BLOCK_R, BLOCK_C * BLOCK_P * BLOCK_P]), axis=1) / P
        xc = tl.where(inb, x - mean[:, None, None, None], 0.0)
        var = tl.sum(tl.reshape(xc * xc, [BLOCK_R, BLOCK_C * BLOCK_P * BLOCK_P]), axis=1) / (P - 1)
        t = xc / tl.sqrt_rn(var + 1.0e-6)[:, None, None, None]
    else:
        t = x
    diff = y - t  # 0 outside the patch and on rows of weight 0: both loads gave 0 there
    sq = tl.sum(tl.reshape(diff * diff, [BLOCK_R, BLOCK_C * BLOCK_P * BLOCK_P]), axis=1)
    if WRITE_GRAD:  # the error itself: the backward applies 2 w / P with the upstream gradient, in fp32
        tl.store(g_ptr + pred_offs, diff.to(g_ptr.dtype.element_ty), mask=inb)
    return tl.where(rvalid, w * sq / P, 0.0)


@triton.jit
def _masked_mse_fwd_kernel(pred_ptr, img_ptr, mask_ptr, ids_ptr, part_ptr, wsum_ptr, g_ptr,
                           n_rows, rows_per_n, C, gw, tiles,
                           stride_n, stride_c, stride_h, stride_w,
                           PATCH: tl.constexpr, NORM_PIX: tl.constexpr, HAS_IDS: tl.constexpr,
                           WRITE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_P: tl.constexpr):
    """One program per `tiles` consecutive tiles of BLOCK_R prediction rows ([BLOCK_R, C, p, p] each), in a
    software pipeline: while one tile's statistics, loss and gradient are computed, the next tile's image
    and prediction loads are in flight, and the weights of the one after that (reading a tile waits on its
    weights, which decide what is read). The program's rows' partials, summed, go to part[program], and their
    weights, summed, to wsum[program] (not written with ids: the finalize kernel does not read them then)."""
    pid = tl.program_id(0)
    first = pid * tiles
    limit = tl.minimum((first + tiles) * BLOCK_R, n_rows)
    rows, rvalid, n, patch, w = _mse_tile_rows(first, limit, rows_per_n, mask_ptr, ids_ptr, HAS_IDS, BLOCK_R)
    x, y = _mse_load_tile(pred_ptr, img_ptr, rows, n, patch, w, C, gw, stride_n, stride_c, stride_h, stride_w,
                          PATCH, BLOCK_C, BLOCK_P)
    rows1, rvalid1, n1, patch1, w1 = _mse_tile_rows(first + 1, limit, rows_per_n, mask_ptr, ids_ptr,
                                                    HAS_IDS, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    wacc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for i in range(0, tiles):
        x1, y1 = _mse_load_tile(pred_ptr, img_ptr, rows1, n1, patch1, w1, C, gw, stride_n, stride_c, stride_h,
                                stride_w, PATCH, BLOCK_C, BLOCK_P)
        rows2, rvalid2, n2, patch2, w2 = _mse_tile_rows(first + i + 2, limit, rows_per_n, mask_ptr, ids_ptr,
                                                        HAS_IDS, BLOCK_R)
        # One patch per tile (ViT's 16- and 14-pixel patches): a kept patch's tile adds nothing and is skipped.
        # Tiles of several rows are seldom all kept and always finish (a compile-time True: no branch, which
        # made triton 3.6's ptxas spill at sm_90).
        work = True
        if BLOCK_R == 1:
            work = tl.max((w != 0.0).to(tl.int32), axis=0) != 0
        if work:
            acc += _mse_finish_tile(x, y, rows, rvalid, w, g_ptr, C, NORM_PIX, WRITE_GRAD, PATCH,
                                    BLOCK_R, BLOCK_C, BLOCK_P)
        wacc += w  # 0 on rows out of range (their weights load as 0)
        rows, rvalid, w, x, y = rows1, rvalid1, w1, x1, y1
        rows1, rvalid1, n1, patch1, w1 = rows2, rvalid2, n2, patch2, w2
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))
    if not HAS_IDS:
        tl.store(wsum_ptr + pid, tl.sum(wacc, axis=0))


@triton.jit
def _masked_mse_finalize_kernel(part_ptr, wsum_ptr, loss_ptr, denom_ptr, n_parts, fixed_denom,
                                HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """One program: loss = sum(part) / max(sum(wsum), 1) (or / fixed_denom) over the forward's n_parts
    programs, summed in a fixed order."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    macc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_parts, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n_parts
        acc += tl.load(part_ptr + offs, mask=m, other=0.0)
        if HAS_MASK:
            macc += tl.load(wsum_ptr + offs, mask=m, other=0.0)
    total = tl.sum(acc, axis=0)
    if HAS_MASK:
        denom = tl.maximum(tl.sum(macc, axis=0), 1.0)
    else:
        denom = fixed_denom
    tl.store(loss_ptr, total / denom)
    tl.store(denom_ptr, denom)


@triton.jit
def _masked_mse_bwd_kernel(g_ptr, mask_ptr, go_ptr, denom_ptr, out_ptr, n_rows, P,
                           HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """One program per BLOCK_R rows: grad_pred[row] = g[row] * 2 w[row] grad_output / (P denom), g being the row's
    error; zeros where the weight is 0 (g is not read there)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rvalid = rows < n_rows
    offs = tl.arange(0, BLOCK)
    scale = tl.load(go_ptr).to(tl.float32) / tl.load(denom_ptr) * (2.0 / P)
    if HAS_MASK:
        w = tl.load(mask_ptr + rows, mask=rvalid, other=0.0)
        read = rvalid & (w != 0.0)
    else:
        w = tl.full([BLOCK_R], 1.0, dtype=tl.float32)
        read = rvalid
    ptr_offs = rows.to(tl.int64)[:, None] * P + offs[None, :]
    g = tl.load(g_ptr + ptr_offs, mask=read[:, None] & (offs < P)[None, :], other=0.0).to(tl.float32)
    out = g * (w * scale)[:, None]
    tl.store(out_ptr + ptr_offs, out.to(out_ptr.dtype.element_ty), mask=rvalid[:, None] & (offs < P)[None, :])


# ---------------------------------------------------------------------------------------------------------
# Launchers (testable without autograd)
# ---------------------------------------------------------------------------------------------------------


def _check(pred, imgs, mask, patch_size, pred_ids):
    check_device(pred, imgs, mask, pred_ids)
    n, c, gh, gw, p = image_patches(imgs, patch_size)
    L, P = gh * gw, c * p * p
    rows = L if pred_ids is None else pred_ids.shape[1]
    if pred.dim() != 3 or tuple(pred.shape) != (n, rows, P):
        raise ValueError(f"pred must be [N, {rows}, {P}] for these images, got {tuple(pred.shape)}")
    if pred_ids is None and tuple(mask.shape) != (n, L):
        raise ValueError(f"mask must be [N, L] = [{n}, {L}], got {tuple(mask.shape)}")
    if pred_ids is not None and (pred_ids.dtype != torch.int64 or pred_ids.dim() != 2 or pred_ids.shape[0] != n):
        raise ValueError(f"pred_ids must be [N, M] int64, got {tuple(pred_ids.shape)} {pred_ids.dtype}")
    return n, c, gw, p, rows, P


def weights32(mask: torch.Tensor, n: int) -> torch.Tensor:
    """The mask as the kernels read it: [N, L] fp32 and contiguous (the mask itself when it already is one)."""
    return (mask.flatten(1) if mask.dim() >= 2 else mask.reshape(n, -1)).to(torch.float32).contiguous()


@launches_on_device_of("pred")
def masked_mse_loss_forward(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                            norm_pix: bool = False, pred_ids: torch.Tensor | None = None, write_grad: bool = False):
    """Returns (loss: 0-dim fp32, g: [N, rows, P] in pred's dtype or None, denom: [1] fp32, mask32: [N, L] fp32).

    g (only when `write_grad`) holds the error pred - target at rows with w != 0 and is left unwritten
    elsewhere; `masked_mse_loss_backward` turns it into grad_pred. `pred_ids` are not bounds-checked on the
    device (as the token kernels' indices): each must be a patch index in [0, L).
    """
    n, c, gw, p, rows, P = _check(pred, imgs, mask, patch_size, pred_ids)
    pred = pred.contiguous()
    has_ids = pred_ids is not None
    mask32 = weights32(mask, n)
    ids = pred_ids.contiguous() if has_ids else mask32  # a placeholder pointer when there are no ids
    n_rows = n * rows
    g = torch.empty_like(pred) if write_grad else None
    loss = torch.empty((), device=pred.device, dtype=torch.float32)
    denom = torch.empty(1, device=pred.device, dtype=torch.float32)
    if n_rows == 0:  # nothing to count: 0 / 1 as the reference
        loss.zero_()
        denom.fill_(1.0)
        return loss, g, denom, mask32
    cfg = _settings_for("fwd", pred.device,
                        lambda: fwd_key(pred.dtype, imgs.dtype, c, p, norm_pix, has_ids, write_grad),
                        lambda: default_settings("fwd", c, p))
    n_tiles = cdiv(n_rows, cfg.block_r)
    tiles = tiles_per_program(n_tiles, cfg.max_tiles)
    programs = cdiv(n_tiles, tiles)
    # one buffer: the programs' partial sums, then (from a 16-byte aligned offset) their weight sums
    half = cdiv(programs, 4) * 4
    part = torch.empty(2 * half, device=pred.device, dtype=torch.float32)
    wsum = part[half:]
    launch(_masked_mse_fwd_kernel, (programs,),
        pred, imgs, mask32, ids, part, wsum, g if write_grad else part, n_rows, rows, c, gw, tiles, *imgs.stride(),
        PATCH=p, NORM_PIX=bool(norm_pix), HAS_IDS=has_ids, WRITE_GRAD=bool(write_grad),
        BLOCK_R=cfg.block_r, BLOCK_C=next_power_of_2(c), BLOCK_P=next_power_of_2(p),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION)
    launch(_masked_mse_finalize_kernel, (1,), part, wsum, loss, denom, programs, float(max(n_rows, 1)),
           HAS_MASK=not has_ids, BLOCK=FINALIZE_BLOCK, num_warps=FINALIZE_WARPS, num_stages=NUM_STAGES,
           enable_fp_fusion=FP_FUSION)
    return loss, g, denom, mask32


@launches_on_device_of("g")
def masked_mse_loss_backward(grad_output: torch.Tensor, g: torch.Tensor, denom: torch.Tensor,
                             mask32: torch.Tensor, has_ids: bool) -> torch.Tensor:
    """grad_pred = g * 2 w grad_output / (P denom) (g: the forward's errors), zeros at rows of weight 0 (g is not
    read there)."""
    out = torch.empty_like(g)
    n_rows = g.shape[0] * g.shape[1]
    P = g.shape[2]
    if out.numel() == 0:
        return out
    go = grad_output.detach().reshape(1).to(torch.float32)
    cfg = _settings_for("bwd", g.device, lambda: bwd_key(g.dtype, P, not has_ids), lambda: _default_bwd(P))
    launch(_masked_mse_bwd_kernel, (cdiv(n_rows, cfg.block_r),),
        g, mask32, go, denom, out, n_rows, P, HAS_MASK=not has_ids, BLOCK_R=cfg.block_r, BLOCK=next_power_of_2(P),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION)
    return out


# ---------------------------------------------------------------------------------------------------------
# Autograd and the public function
# ---------------------------------------------------------------------------------------------------------


# The launchers as torch.library custom ops with fake implementations, so torch.compile treats each as one
# opaque op (see the note in tokens.py). Outputs never alias inputs: without `write_grad` g is an empty
# placeholder, and the fp32 mask the backward reads is not an output (that would take a copy of the mask
# whenever the mask already is a contiguous fp32 [N, L] tensor, as the model's is): the autograd function saves
# the mask itself and converts it again in the backward (a no-op for such a mask).


def _masked_mse_fwd(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool,
                    pred_ids: torch.Tensor | None,
                    write_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, g, denom, _ = masked_mse_loss_forward(pred, imgs, mask, patch_size, norm_pix, pred_ids, write_grad)
    return loss, (g if g is not None else pred.new_empty(0)), denom


_masked_mse_fwd_op = custom_op("fastmae::masked_mse_fwd", _masked_mse_fwd)


@_masked_mse_fwd_op.register_fake
def _masked_mse_fwd_fake(pred, imgs, mask, patch_size, norm_pix, pred_ids, write_grad):
    f32 = torch.float32
    g = pred.new_empty(pred.shape) if write_grad else pred.new_empty(0)
    return pred.new_empty((), dtype=f32), g, pred.new_empty(1, dtype=f32)


def _masked_mse_bwd(grad_output: torch.Tensor, g: torch.Tensor, denom: torch.Tensor, mask32: torch.Tensor,
                    has_ids: bool) -> torch.Tensor:
    return masked_mse_loss_backward(grad_output, g, denom, mask32, has_ids)


_masked_mse_bwd_op = custom_op("fastmae::masked_mse_bwd", _masked_mse_bwd)


@_masked_mse_bwd_op.register_fake
def _masked_mse_bwd_fake(grad_output, g, denom, mask32, has_ids):
    return torch.empty_like(g)


class MaskedMSELossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, imgs, mask, patch_size, norm_pix, pred_ids):
        loss, g, denom = _masked_mse_fwd_op(pred, imgs, mask, patch_size, norm_pix, pred_ids, True)
        ctx.save_for_backward(g, denom, mask, pred)  # pred: for a double backward only (held by the caller anyway)
        ctx.has_ids = pred_ids is not None
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        g, denom, mask, pred = ctx.saved_tensors
        mask32 = weights32(mask, pred.shape[0])
        if torch.is_grad_enabled():  # create_graph=True: the same gradient, built from torch ops that autograd sees
            return _differentiable_grad(grad_output, g, denom, mask32, pred, ctx.has_ids), None, None, None, None, None
        grad_pred = _masked_mse_bwd_op(grad_output, g, denom, mask32, ctx.has_ids)
        return grad_pred, None, None, None, None, None


def _differentiable_grad(grad_output, g, denom, mask32, pred, has_ids):
    """grad_pred = grad_output * 2 w (pred - target) / (P * denom) as a function of grad_output and pred that autograd
    can differentiate again (a gradient penalty, `create_graph=True`): g holds pred - target at rows with w != 0
    (the target depends on the image alone), and pred - pred.detach() (zero) carries the derivative with respect
    to pred. Values as the kernel's backward gives them."""
    w = torch.ones(pred.shape[:2], device=pred.device) if has_ids else mask32.reshape(pred.shape[:2])
    w = w[..., None]
    scale = grad_output.to(torch.float32) / denom * (2.0 / pred.shape[-1])
    err = torch.where(w != 0, g.float(), 0.0)
    delta = (pred - pred.detach()).float()
    return ((err + delta) * (w * scale)).to(pred.dtype)


def masked_mse_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                    norm_pix: bool = False, pred_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-patch MSE over removed patches, target read from imgs on the fly; see `reference.masked_mse_loss`."""
    for name, t in (("imgs", imgs), ("mask", mask)):
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"fastmae.kernels.loss gives no gradient to {name}, which requires one; detach it or "
                             "use backend='reference'")
    if pred.requires_grad and torch.is_grad_enabled():
        return MaskedMSELossFunction.apply(pred, imgs, mask, int(patch_size), bool(norm_pix), pred_ids)
    return _masked_mse_fwd_op(pred, imgs, mask, int(patch_size), bool(norm_pix), pred_ids, False)[0]


# ---------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# ---------------------------------------------------------------------------------------------------------

# (pred, imgs) dtype pairs: one dtype throughout, and half predictions against fp32 images (mixed precision).
_LOSS_DTYPES = [("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("fp16", "fp32"), ("bf16", "fp32")]
# The patch sides of MAE's models (16: ViT-B/L, 14: ViT-H, 8 and 4: small images) and the channel counts.
PATCH_SIZES = (4, 8, 14, 16)
CHANNELS = (1, 2, 3)
BWD_PATCH_SIDES = range(4, 17)  # the backward is not specialised on the patch side: every side 4 to 16


_FWD_NAMES = ("pred_ptr img_ptr mask_ptr ids_ptr part_ptr wsum_ptr g_ptr n_rows rows_per_n C gw tiles "
              "stride_n stride_c stride_h stride_w").split()


def _fwd_spec(tp: str, ti: str, channels: int, p: int, norm_pix: bool, has_ids: bool, write_grad: bool,
              cfg: LossSettings, note: str = "") -> CompileSpec:
    """The compile spec of a forward launch: (pred, image) Triton dtypes, channels, patch side, the switches
    and settings (tiles per program are a run-time argument: every value compiles the same code)."""
    block_c, block_p = next_power_of_2(channels), next_power_of_2(p)
    types = [f"*{tp}", f"*{ti}", "*fp32", "*i64" if has_ids else "*fp32", "*fp32", "*fp32",
             f"*{tp}" if write_grad else "*fp32"] + ["i32"] * 9
    return CompileSpec(
        f"masked_mse_fwd[{tp},{ti},p{p},R{cfg.block_r},C{block_c},P{block_p},"
        f"norm{int(norm_pix)},ids{int(has_ids)},grad{int(write_grad)}]{note}",
        _masked_mse_fwd_kernel, dict(zip(_FWD_NAMES, types)),
        {"PATCH": p, "NORM_PIX": norm_pix, "HAS_IDS": has_ids, "WRITE_GRAD": write_grad,
         "BLOCK_R": cfg.block_r, "BLOCK_C": block_c, "BLOCK_P": block_p},
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _bwd_spec(tp: str, block: int, has_mask: bool, cfg: LossSettings, note: str = "") -> CompileSpec:
    """The compile spec of a backward launch for rows padded to `block` values."""
    return CompileSpec(
        f"masked_mse_bwd[{tp},R{cfg.block_r},B{block},mask{int(has_mask)}]{note}", _masked_mse_bwd_kernel,
        dict(zip("g_ptr mask_ptr go_ptr denom_ptr out_ptr n_rows P".split(),
                 [f"*{tp}", "*fp32", "*fp32", "*fp32", f"*{tp}", "i32", "i32"])),
        {"HAS_MASK": has_mask, "BLOCK_R": cfg.block_r, "BLOCK": block}, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)


def settings_spec(kernel: str, key: str, cfg: LossSettings, note: str = "") -> CompileSpec:
    """The compile spec of one kernel ('fwd' or 'bwd') launched for a tuned key (`fwd_key`, `bwd_key`) with
    settings `cfg`."""
    if kernel == "fwd":
        m = _FWD_KEY.fullmatch(key)
        return _fwd_spec(m[1], m[2], int(m[3]), int(m[4]), m[5] == "1", m[6] == "1", m[7] == "1", cfg, note)
    m = _BWD_KEY.fullmatch(key)
    return _bwd_spec(m[1], int(m[2]), m[3] == "1", cfg, note)


def tuned_specs(table: dict) -> list[CompileSpec]:
    """The configurations of a tuned table, each compiled for its own architecture only."""
    return tuned_table_specs(table, lambda kernel, key, cfg, arch: settings_spec(
        kernel, key, LossSettings(*cfg), f" (tuned {arch}: {key})"))


def compile_specs() -> list[CompileSpec]:
    """Every configuration the launchers pick for the patch sides in `PATCH_SIZES` and 1..3 channels, and
    every entry of the tuned table.

    The forward is specialised on the patch side (a constexpr, so that whole image rows load as vectors);
    other sides compile the same code and are not listed. Block shapes are computed exactly as the launchers
    compute them; each forward block shape is listed with every (NORM_PIX, HAS_IDS, WRITE_GRAD) combination
    and every (pred, imgs) dtype pair of `_LOSS_DTYPES` (other mixtures compile the same code with other
    pointer types and are not listed), and the backward's for every patch side 4 to 16.
    """
    fwd = [(p, c) for p in PATCH_SIZES for c in CHANNELS]  # 1, 2 and 3 channels: three channel tiles
    bwd = sorted({(next_power_of_2(c * p * p), _default_bwd(c * p * p)) for c in CHANNELS for p in BWD_PATCH_SIDES},
                 key=lambda item: (item[0], item[1].block_r, item[1].num_warps))
    specs: list[CompileSpec] = []
    for tp, ti in _LOSS_DTYPES:
        for p, c in fwd:
            for norm_pix in (False, True):
                for has_ids in (False, True):
                    for write_grad in (False, True):
                        specs.append(_fwd_spec(tp, ti, c, p, norm_pix, has_ids, write_grad,
                                               default_settings("fwd", c, p)))
    for tp in ("fp32", "fp16", "bf16"):
        for block, cfg in bwd:
            for has_mask in (False, True):
                specs.append(_bwd_spec(tp, block, has_mask, cfg))
    for has_mask in (False, True):
        specs.append(CompileSpec(
            f"masked_mse_finalize[mask{int(has_mask)}]", _masked_mse_finalize_kernel,
            dict(zip("part_ptr wsum_ptr loss_ptr denom_ptr n_parts fixed_denom".split(),
                     ["*fp32", "*fp32", "*fp32", "*fp32", "i32", "fp32"])),
            {"HAS_MASK": has_mask, "BLOCK": FINALIZE_BLOCK}, num_warps=FINALIZE_WARPS))
    return specs + tuned_specs(tuned_table())
