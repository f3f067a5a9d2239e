"""`fastmae bench ops`: every op x every backend x MAE's shapes, forward and forward+backward.

Shapes come from the encoder and decoder of ViT-B/16, ViT-L/16 and ViT-H/14 at 224 pixels and 75% masking
(`MAE_SHAPES`): L = 196 (256 for ViT-H) patches, K = 49 (64) kept; encoder attention over K+1 = 50 (65) tokens
with head dim 64 (80), decoder attention over L+1 = 197 (257) tokens with head dim 32 and 16 heads; token
widths 768 / 1024 / 1280 and decoder width 512; the loss on 224-pixel images.

Figures per case:
  attention   TFLOP/s with FLOPs = 4 * N^2 * D * B * H forward (QK^T and PV), backward 2.5x that, so
              forward+backward = 3.5x; fraction of the matmul peak measured in the same run.
  projection  the encoder/decoder linear layers (`F.linear`, backend "torch") at the same token counts, as
              context for attention: FLOPs = 2 * T * in * out forward, backward 2x that.
  token ops and the loss are memory-bound: GB/s of the bytes an ideal kernel must move (each input it
              needs read once, each output written once), counted per op by `*_bytes` below; fraction of
              the copy bandwidth measured in the same run, and of a copy reference timed with the op
              (`copy_passes`: as many bytes in as many passes). A backend that moves more than that (the
              reference path materialises index tensors and intermediates) shows a lower GB/s.
Images are fp32 in every case (they arrive from the data pipeline in fp32, and autocast does not cast
them); the `dtype` of a record is the dtype the registry sees (imgs for gather_patches, pred for the loss).
gather_patches has no backward in MAE (images take no gradient), so it is timed forward only.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.registry import OPS, Inputs
from .common import error_line
from .limits import Limits, dtype_name
from .timing import measure_interleaved

IDX_BYTES = 8  # int64 indices
MODES = ("fwd", "fwd+bwd")

# name: (width, heads, patch, decoder width, decoder heads, mlp ratio)
MAE_SHAPES = {
    "B": dict(width=768, heads=12, patch=16, dec_width=512, dec_heads=16, mlp_ratio=4),
    "L": dict(width=1024, heads=16, patch=16, dec_width=512, dec_heads=16, mlp_ratio=4),
    "H": dict(width=1280, heads=16, patch=14, dec_width=512, dec_heads=16, mlp_ratio=4),
}
IMG = 224
CHANNELS = 3
MASK_RATIO = 0.75


def interpreter_reason(device: torch.device) -> str | None:
    """Why the benchmark does not time triton here: on a CPU triton runs only in its interpreter, a
    correctness tool whose timings mean nothing."""
    from ..ops.triton_ops import interpreter_enabled

    if device.type == "cpu" and interpreter_enabled():
        return ("triton on the CPU runs only in its interpreter (TRITON_INTERPRET=1), whose timings mean "
                "nothing; pass --allow-interpreter to time it anyway")
    return None


@dataclass
class OpCase:
    """One op at one shape: how to build its inputs, call it with a backend, and count its work."""

    op: str
    name: str
    shape: dict
    dtype: torch.dtype
    build: Callable[[torch.device, bool], dict]  # (device, requires_grad) -> named inputs
    call: Callable[[dict, str], torch.Tensor]  # (inputs, backend) -> output
    registry_inputs: Callable[[dict], Inputs] | None  # None: not a registry op
    grad_leaves: tuple[str, ...] = ()  # inputs that take a gradient in MAE; empty: forward only
    flops: dict[str, float] = field(default_factory=dict)  # mode -> FLOPs
    bytes: dict[str, float] = field(default_factory=dict)  # mode -> bytes moved by an ideal kernel

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES if self.grad_leaves else ("fwd",)


# ------------------------------------------------------------------------------------------ byte counts
def attention_flops(b: int, h: int, n: int, d: int) -> dict[str, float]:
    fwd = 4.0 * n * n * d * b * h
    return {"fwd": fwd, "fwd+bwd": fwd * 3.5}


def gather_patches_bytes(b: int, k: int, p_pixels: int, img_es: int) -> dict[str, float]:
    """Read the kept patches' pixels and the indices, write [B, K, P]."""
    return {"fwd": 2.0 * b * k * p_pixels * img_es + b * k * IDX_BYTES}


def gather_tokens_bytes(b: int, L: int, k: int, d: int, es: int, gathered: bool) -> dict[str, float]:
    """Forward: read the K kept rows of x, the indices, pos_embed once and the class token; write [B, K+1, D].
    Backward: read grad_out [B, K+1, D] and the indices; write grad_x [B, L, D] (zeros for removed rows) and
    the grad of the class token. Gathered (x is already [B, K, D] in kept order): grad_x is grad_out's kept
    rows, a view, so the backward reads only grad_out's class-token rows and writes the class token's grad."""
    fwd = es * (b * k * d + (L + 1) * d + d + b * (k + 1) * d) + b * k * IDX_BYTES
    if gathered:
        bwd = es * (b * d + d)
    else:
        bwd = es * (b * (k + 1) * d + b * L * d + d) + b * k * IDX_BYTES
    return {"fwd": fwd, "fwd+bwd": fwd + bwd}


def unshuffle_bytes(b: int, L: int, k: int, d: int, es: int) -> dict[str, float]:
    """Forward: read x [B, K+1, Dd], ids_restore [B, L], mask_token and pos_embed once; write [B, L+1, Dd].
    Backward: read grad_out [B, L+1, Dd] and ids_restore; write grad_x [B, K+1, Dd] and grad of mask_token."""
    fwd = es * (b * (k + 1) * d + d + (L + 1) * d + b * (L + 1) * d) + b * L * IDX_BYTES
    bwd = es * (b * (L + 1) * d + b * (k + 1) * d + d) + b * L * IDX_BYTES
    return {"fwd": fwd, "fwd+bwd": fwd + bwd}


def loss_bytes(b: int, L: int, k: int, p_pixels: int, es: int, img_es: int, mask_es: int = 4) -> dict[str, float]:
    """Only the R = L - K removed patches are scored. Forward: read the mask [B, L], and pred and the image
    pixels at the removed patches only; write a scalar. Backward: read the mask, get each removed row's
    residual either by reading pred and pixels again (R * P * (es + img_es) bytes) or by the forward writing it
    in pred's dtype for the backward to read (2 * R * P * es), whichever is less; write grad_pred in full,
    [B, L, P], zeros at kept rows."""
    r = L - k
    fwd = b * r * p_pixels * (es + img_es) + b * L * mask_es + 4
    bwd = b * r * p_pixels * min(es + img_es, 2 * es) + b * L * p_pixels * es + b * L * mask_es
    return {"fwd": fwd, "fwd+bwd": fwd + bwd}


def linear_flops(tokens: int, fan_in: int, fan_out: int) -> dict[str, float]:
    fwd = 2.0 * tokens * fan_in * fan_out
    return {"fwd": fwd, "fwd+bwd": 3.0 * fwd}


# ------------------------------------------------------------------------------------------ cases
def _gen(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _ids(b: int, L: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    noise = torch.rand(b, L, generator=_gen(seed))
    shuffle = torch.argsort(noise, dim=1)
    return shuffle[:, :k].contiguous(), torch.argsort(shuffle, dim=1)


_undrawn = False  # set by `undrawn_inputs()`


def _randn(shape, dtype, device, seed, requires_grad=False):
    """Normal samples made on `device` itself: drawing a long case's hundreds of millions on the host and
    copying them over would take a GPU run's benchmark parts most of their time. Uninitialised memory under
    `undrawn_inputs()`."""
    if _undrawn:
        return torch.empty(shape, dtype=dtype, device=device).requires_grad_(requires_grad)
    t = torch.randn(*shape, generator=_gen(seed, device), device=device).to(dtype)
    return t.requires_grad_(requires_grad)


@contextlib.contextmanager
def undrawn_inputs():
    """Cases built inside get uninitialised tensors (same shapes, dtypes and devices) instead of normal samples:
    for recording a case's launches, where no value is used (the GPU suite's warm-up records the long attention
    cases on the host, whose samples took 16 s to draw on a 2-core CPU)."""
    global _undrawn
    before, _undrawn = _undrawn, True
    try:
        yield
    finally:
        _undrawn = before


_BUILT: dict = {}  # the inputs of the latest case, per `grad`: shared by its backends, modes and checks


def built_inputs(case: OpCase, device: torch.device, grad: bool) -> dict:
    """`case.build(device, grad)`, built once for all the backends and modes timed on this case (the benchmark
    loops go case by case); the previous case's inputs are released when the case changes."""
    key = (case.op, case.name, repr(case.shape), case.dtype, str(device))
    if _BUILT.get("key") != key:
        _BUILT.clear()
        _BUILT["key"] = key
    if grad not in _BUILT:
        _BUILT[grad] = case.build(device, grad)
    return _BUILT[grad]


def release_inputs() -> None:
    _BUILT.clear()


def attention_case(name: str, b: int, h: int, n: int, d: int, dtype: torch.dtype) -> OpCase:
    """Attention as the model calls it: `ops.attention_qkv` on one packed qkv projection. Backends with a packed
    form (triton) write the projection's gradient in one piece; the others take q, k, v as strided views of it,
    and autograd gathers their three gradients into the projection's layout, as in the model."""
    def build(device, grad):  # the packed projection [B, N, 3 * H * D], as the model hands it over
        return {"qkv": _randn((b, n, 3 * h * d), dtype, device, 1, grad)}

    def call(inp, backend):
        return ops.attention_qkv(inp["qkv"], h, backend=backend)

    def reg(inp):
        qkv = inp["qkv"]
        return Inputs(qkv.device, qkv.dtype, head_dim=d, tensors={"qkv": qkv}, options={"op": "attention"})

    return OpCase("attention", name, {"B": b, "H": h, "N": n, "D": d}, dtype, build, call, reg, ("qkv",),
                  flops=attention_flops(b, h, n, d))


def gather_patches_case(name: str, b: int, patch: int) -> OpCase:
    """The images stay fp32 in every run (the model embeds them under autocast): no dtype."""
    L = (IMG // patch) ** 2
    k = int(L * (1 - MASK_RATIO))
    P = CHANNELS * patch * patch

    def build(device, grad):
        ids_keep, _ = _ids(b, L, k)
        return {"imgs": _randn((b, CHANNELS, IMG, IMG), torch.float32, device, 2), "ids_keep": ids_keep.to(device)}

    def call(inp, backend):
        return ops.gather_patches(inp["imgs"], inp["ids_keep"], patch, backend=backend)

    def reg(inp):
        return Inputs(inp["imgs"].device, inp["imgs"].dtype, tensors={"imgs": inp["imgs"]},
                      options={"op": "gather_patches", "L": L})

    return OpCase("gather_patches", name, {"B": b, "img": IMG, "p": patch, "L": L, "K": k}, torch.float32, build,
                  call, reg, (), bytes=gather_patches_bytes(b, k, P, 4))


def gather_tokens_case(name: str, b: int, L: int, d: int, dtype: torch.dtype, gathered: bool) -> OpCase:
    k = int(L * (1 - MASK_RATIO))
    es = torch.finfo(dtype).bits // 8

    def build(device, grad):
        ids_keep, _ = _ids(b, L, k)
        rows = k if gathered else L
        return {"x": _randn((b, rows, d), dtype, device, 3, grad), "ids_keep": ids_keep.to(device),
                "pos_embed": _randn((1, L + 1, d), dtype, device, 4),
                "cls_token": _randn((1, 1, d), dtype, device, 5, grad)}

    def call(inp, backend):
        return ops.gather_tokens(inp["x"], inp["ids_keep"], inp["pos_embed"], inp["cls_token"], gathered=gathered,
                                 backend=backend)

    def reg(inp):
        return Inputs(inp["x"].device, inp["x"].dtype,
                      tensors={"x": inp["x"], "pos_embed": inp["pos_embed"], "cls_token": inp["cls_token"]},
                      options={"op": "gather_tokens"})

    return OpCase("gather_tokens", name, {"B": b, "L": L, "K": k, "D": d, "gathered": gathered}, dtype, build, call,
                  reg, ("x", "cls_token"), bytes=gather_tokens_bytes(b, L, k, d, es, gathered))


def unshuffle_case(name: str, b: int, L: int, d: int, dtype: torch.dtype) -> OpCase:
    k = int(L * (1 - MASK_RATIO))
    es = torch.finfo(dtype).bits // 8

    def build(device, grad):
        _, ids_restore = _ids(b, L, k)
        return {"x": _randn((b, k + 1, d), dtype, device, 6, grad), "ids_restore": ids_restore.to(device),
                "mask_token": _randn((1, 1, d), dtype, device, 7, grad),
                "pos_embed": _randn((1, L + 1, d), dtype, device, 8)}

    def call(inp, backend):
        return ops.unshuffle_tokens(inp["x"], inp["ids_restore"], inp["mask_token"], inp["pos_embed"],
                                    backend=backend)

    def reg(inp):
        return Inputs(inp["x"].device, inp["x"].dtype,
                      tensors={"x": inp["x"], "mask_token": inp["mask_token"], "pos_embed": inp["pos_embed"]},
                      options={"op": "unshuffle_tokens"})

    return OpCase("unshuffle_tokens", name, {"B": b, "L": L, "K": k, "D": d}, dtype, build, call, reg,
                  ("x", "mask_token"), bytes=unshuffle_bytes(b, L, k, d, es))


def loss_case(name: str, b: int, patch: int, dtype: torch.dtype, norm_pix: bool) -> OpCase:
    L = (IMG // patch) ** 2
    k = int(L * (1 - MASK_RATIO))
    P = CHANNELS * patch * patch
    es = torch.finfo(dtype).bits // 8

    def build(device, grad):
        _, ids_restore = _ids(b, L, k)
        mask = torch.ones(b, L)
        mask[:, :k] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return {"pred": _randn((b, L, P), dtype, device, 9, grad),
                "imgs": _randn((b, CHANNELS, IMG, IMG), torch.float32, device, 10), "mask": mask.to(device)}

    def call(inp, backend):
        return ops.masked_mse_loss(inp["pred"], inp["imgs"], inp["mask"], patch, norm_pix, backend=backend)

    def reg(inp):
        return Inputs(inp["pred"].device, inp["pred"].dtype,
                      tensors={"pred": inp["pred"], "imgs": inp["imgs"], "mask": inp["mask"]},
                      options={"op": "masked_mse_loss"})

    return OpCase("masked_mse_loss", name, {"B": b, "img": IMG, "p": patch, "L": L, "P": P, "norm_pix": norm_pix},
                  dtype, build, call, reg, ("pred",), bytes=loss_bytes(b, L, k, P, es, 4))


def projection_case(name: str, tokens: int, fan_in: int, fan_out: int, dtype: torch.dtype) -> OpCase:
    def build(device, grad):
        return {"x": _randn((tokens, fan_in), dtype, device, 11, grad),
                "w": (_randn((fan_out, fan_in), dtype, device, 12) * fan_in ** -0.5).requires_grad_(grad),
                "bias": _randn((fan_out,), dtype, device, 13, grad)}

    def call(inp, backend):
        return F.linear(inp["x"], inp["w"], inp["bias"])

    return OpCase("projection", name, {"T": tokens, "in": fan_in, "out": fan_out}, dtype, build, call, None,
                  ("x", "w", "bias"), flops=linear_flops(tokens, fan_in, fan_out))


def _dedupe(cases: list[OpCase]) -> list[OpCase]:
    """One case per (op, shape); the names of the models that share it are joined ("ViT-B/L decoder")."""
    out: dict[tuple, OpCase] = {}
    for c in cases:
        key = (c.op, tuple(sorted(c.shape.items())), c.dtype)
        if key in out:
            first = out[key]
            a, rest = first.name.split(" ", 1)
            b_model = c.name.split(" ", 1)[0]
            first.name = f"{a}/{b_model.replace('ViT-', '')} {rest}"
        else:
            out[key] = c
    return list(out.values())


def mae_dims(model: str) -> tuple[dict, int, int]:
    """(shape dict, patches L, kept K) of a ViT size at 224 pixels and 75% masking."""
    if model not in MAE_SHAPES:
        raise ValueError(f"unknown model size {model!r}; choose from {', '.join(MAE_SHAPES)}")
    s = MAE_SHAPES[model]
    L = (IMG // s["patch"]) ** 2
    return s, L, int(L * (1 - MASK_RATIO))


def mae_cases(batch: int, dtype: torch.dtype, models: Sequence[str] = ("B", "L", "H"),
              ops_filter: Sequence[str] | None = None, quick: bool = False) -> list[OpCase]:
    """The benchmark cases at MAE's shapes for the given ViT sizes; `quick` keeps one case per op."""
    cases: list[OpCase] = []
    for m in models:
        s, L, k = mae_dims(m)
        vit = f"ViT-{m}"
        cases.append(attention_case(f"{vit} encoder", batch, s["heads"], k + 1, s["width"] // s["heads"], dtype))
        cases.append(attention_case(f"{vit} decoder", batch, s["dec_heads"], L + 1, s["dec_width"] // s["dec_heads"],
                                    dtype))
        cases.append(gather_patches_case(f"{vit} encoder", batch, s["patch"]))
        cases.append(gather_tokens_case(f"{vit} official order", batch, L, s["width"], dtype, gathered=False))
        cases.append(gather_tokens_case(f"{vit} gathered", batch, L, s["width"], dtype, gathered=True))
        cases.append(unshuffle_case(f"{vit} decoder", batch, L, s["dec_width"], dtype))
        cases.append(loss_case(f"{vit} norm_pix", batch, s["patch"], dtype, norm_pix=True))
        if not quick:
            cases.append(loss_case(f"{vit} plain", batch, s["patch"], dtype, norm_pix=False))
        hidden = s["width"] * s["mlp_ratio"]
        cases.append(projection_case(f"{vit} encoder qkv", batch * (k + 1), s["width"], 3 * s["width"], dtype))
        if not quick:
            cases.append(projection_case(f"{vit} encoder fc1", batch * (k + 1), s["width"], hidden, dtype))
            dec_hidden = s["dec_width"] * s["mlp_ratio"]
            cases.append(projection_case(f"{vit} decoder fc1", batch * (L + 1), s["dec_width"], dec_hidden, dtype))
    cases = _dedupe(cases)
    if ops_filter:
        unknown = [o for o in ops_filter if o not in OPS and o != "projection"]
        if unknown:
            raise ValueError(f"unknown op(s) {unknown}; ops are {', '.join(OPS)}, projection")
        cases = [c for c in cases if c.op in ops_filter]
    if quick:  # one case per op
        seen, kept = set(), []
        for c in cases:
            if (c.op, c.shape.get("gathered")) not in seen:
                seen.add((c.op, c.shape.get("gathered")))
                kept.append(c)
        cases = kept
    return cases


# ------------------------------------------------------------------------------------------ running
def case_reasons(case: OpCase, backend: str, device: torch.device, allow_interpreter: bool = False) -> list[str]:
    """Why `backend` cannot serve this case: the registry's reasons, or the benchmark's own."""
    if case.registry_inputs is None:
        return [] if backend == "torch" else [f"{case.op} is plain torch (cuBLAS / the CPU BLAS); no backends"]
    inputs = case.registry_inputs(built_inputs(case, device, False))
    reasons = ops.not_supported_reasons(case.op, backend, inputs)
    if not reasons and backend == "triton" and not allow_interpreter:
        why = interpreter_reason(device)
        if why:
            reasons = [why]
    return reasons


def make_runner(case: OpCase, backend: str, mode: str, device: torch.device) -> Callable[[], object]:
    """A function that runs one repetition of the case (inputs built once, outside the timing)."""
    if mode == "fwd":
        inp = built_inputs(case, device, False)

        def fwd():
            with torch.no_grad():
                return case.call(inp, backend)

        return fwd
    if mode != "fwd+bwd":
        raise ValueError(f"unknown mode {mode!r}")
    inp = built_inputs(case, device, True)
    leaves = [inp[n] for n in case.grad_leaves]
    out = case.call(inp, backend)
    grad_out = None if out.dim() == 0 else _randn(out.shape, out.dtype, out.device, 99)

    def fwd_bwd():
        y = case.call(inp, backend)
        return torch.autograd.grad(y, leaves, grad_out)

    return fwd_bwd


def backends_for(case: OpCase, backends: Sequence[str]) -> list[str]:
    return ["torch"] if case.registry_inputs is None else list(backends)


def figures(case: OpCase, mode: str, median_ms: float, limits: Limits | None,
            copy_ms: float | None = None) -> dict:
    """TFLOP/s or GB/s, their share of the run's limits, and with `copy_ms` (the median time of the copy reference
    timed beside the op, `copy_reference`) the share of that copy's speed."""
    out = {}
    sec = median_ms * 1e-3
    if mode in case.flops:
        out["tflops"] = case.flops[mode] / sec / 1e12
        if limits:
            out["frac_peak"] = out["tflops"] / limits.matmul_tflops
    if mode in case.bytes:
        out["gbps"] = case.bytes[mode] / sec / 1e9
        if limits:
            out["frac_peak"] = out["gbps"] / limits.copy_gbps
        if copy_ms:
            out["copy_same_bytes_gbps"] = case.bytes[mode] / (copy_ms * 1e-3) / 1e9
            out["frac_copy_same_bytes"] = out["gbps"] / out["copy_same_bytes_gbps"]
    return out


def copy_passes(case: OpCase, mode: str) -> list[int]:
    """The byte counts of the copy reference: one copy per pass the op makes over memory, so that it pays the
    launches the op pays. Forward: one copy of the forward's bytes; forward+backward: that copy, then one of
    the backward's bytes (the forward+backward bytes less the forward's)."""
    total = int(case.bytes[mode])
    if mode == "fwd+bwd" and "fwd" in case.bytes and 0 < case.bytes["fwd"] < total:
        return [int(case.bytes["fwd"]), total - int(case.bytes["fwd"])]
    return [total]


def copy_reference(device: torch.device, passes: Sequence[int]) -> Callable[[], None]:
    """Device-to-device copies that move each of `passes` bytes in all (half read, half written), one after
    the other: what memory-bound work of that size and launch count can reach on this device, launch and
    ramp-up included."""
    bufs = []
    for nbytes in passes:
        src = torch.ones(max(1, int(nbytes) // 2), dtype=torch.uint8, device=device)
        bufs.append((src, torch.empty_like(src)))

    def run():
        for src, dst in bufs:
            dst.copy_(src)

    run.buffers = bufs
    return run


def run_case(case: OpCase, backend: str, mode: str, device: torch.device, limits: Limits | None, *,
             allow_interpreter: bool = False, timing: dict | None = None, flush_cache: bool = True,
             copy_reference_too: bool = False) -> dict:
    """One record: the timing and figures, or status "skipped"/"failed" with the reason. With
    `copy_reference_too`, a memory-bound case is timed interleaved with its copy reference (`copy_passes`), in
    the same rounds, so the two see the same clocks and the same state of the device."""
    rec = {"kind": "op", "op": case.op, "case": case.name, "backend": backend, "mode": mode,
           "shape": dict(case.shape), "dtype": dtype_name(case.dtype), "mask_ratio": MASK_RATIO}
    if case.flops:
        rec["flops"] = case.flops.get(mode)
    if case.bytes:
        rec["bytes"] = case.bytes.get(mode)
    copy_ms = None
    fns = None
    try:  # building the inputs can fail too (a batch too large for the memory): a failed record, not the run's end
        reasons = case_reasons(case, backend, device, allow_interpreter)
        if reasons:
            return {**rec, "status": "skipped", "reason": "; ".join(reasons)}
        fns = {"op": make_runner(case, backend, mode, device)}
        if copy_reference_too and mode in case.bytes:
            passes = copy_passes(case, mode)
            rec["copy_passes"] = passes
            fns["copy"] = copy_reference(device, passes)
        ts = measure_interleaved(fns, device, flush_cache=flush_cache and device.type == "cuda", hide_launch=True,
                                 **(timing or {}))
        t = ts["op"]
        if "copy" in ts:
            copy_ms = ts["copy"].median_ms
    except Exception as exc:  # a backend that breaks is reported, not fatal to the run
        return {**rec, "status": "failed", "reason": error_line(exc)}
    finally:
        fns = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {**rec, "status": "ok", **t.as_dict(), **figures(case, mode, t.median_ms, limits, copy_ms)}


def add_speedups(records: list[dict], baseline: str = "reference", one_run: bool = False) -> list[dict]:
    """`speedup` = baseline median / median, per (op, case, mode) on the same device. `one_run`: the records are
    one run's, on one device, the newest perhaps not stamped with it yet (the device is then no part of the key)."""
    def key(r):
        return (r.get("op"), r.get("case"), r.get("mode"), None if one_run else r.get("device"))

    base = {}
    for r in records:
        if r.get("kind") == "op" and r.get("backend") == baseline and r.get("status") == "ok":
            base[key(r)] = r["median_ms"]
    for r in records:
        b = base.get(key(r))
        if r.get("kind") == "op" and r.get("status") == "ok" and b:
            r["speedup"] = b / r["median_ms"]
    return records


def run_ops(device: torch.device, dtype: torch.dtype, batch: int, *, models=("B", "L", "H"), ops_filter=None,
            backends: Sequence[str] = ops.BACKENDS, modes: Sequence[str] = MODES, quick: bool = False,
            limits: Limits | None = None, timing: dict | None = None, allow_interpreter: bool = False,
            on_record: Callable[[dict], None] | None = None, progress: bool = True) -> list[dict]:
    cases = mae_cases(batch, dtype, models, ops_filter, quick)
    jobs = [(c, b, m) for c in cases for b in backends_for(c, backends) for m in c.modes if m in modes]
    it = jobs
    if progress:
        try:
            from tqdm import tqdm

            it = tqdm(jobs, desc="bench ops", unit="case", leave=False)
        except ImportError:
            pass
    records = []
    try:
        for case, backend, mode in it:
            rec = run_case(case, backend, mode, device, limits, allow_interpreter=allow_interpreter, timing=timing,
                           copy_reference_too=True)
            records.append(rec)
            add_speedups(records, one_run=True)  # before the record is written: a run cut short keeps them
            if on_record:
                on_record(rec)
    finally:
        release_inputs()
    return records


# ------------------------------------------------------------------------------------------ ranking
def rank_backends(records: Sequence[dict], device_type: str) -> dict[str, list[str]]:
    """Backends per op, fastest first, from measured records on one device type.

    Uses forward+backward medians where an op has them (forward for gather_patches). Per case, each
    backend's median is divided by the best median of that case; a backend's score is the geometric mean
    of these ratios over the cases it served. Backends that served more cases rank first, then by score.
    """
    ranking: dict[str, list[str]] = {}
    rows = [r for r in records if r.get("kind") == "op" and r.get("status") == "ok" and r.get("op") in OPS
            and r.get("device_type", device_type) == device_type]
    for op in OPS:
        op_rows = [r for r in rows if r["op"] == op]
        if not op_rows:
            continue
        mode = "fwd+bwd" if any(r["mode"] == "fwd+bwd" for r in op_rows) else "fwd"
        op_rows = [r for r in op_rows if r["mode"] == mode]
        best: dict[str, float] = {}
        for r in op_rows:
            best[r["case"]] = min(best.get(r["case"], math.inf), r["median_ms"])
        logs: dict[str, list[float]] = {}
        for r in op_rows:
            logs.setdefault(r["backend"], []).append(math.log(r["median_ms"] / best[r["case"]]))
        score = {b: (-len(v), sum(v) / len(v)) for b, v in logs.items()}
        ranking[op] = sorted(score, key=lambda b: score[b])
    return ranking


def write_priority(path: str, records: Sequence[dict], device_type: str, source: dict) -> dict:
    """Write (or update) the measured-order file `{"<device_type>": {op: [backends]}, "source": {...}}`.

    Other device types already in the file are kept."""
    import json
    import os

    data = read_priority(path)
    ranking = rank_backends(records, device_type)
    if not ranking:
        raise ValueError(f"no successful op measurements on {device_type} to rank")
    data[device_type] = ranking
    data.setdefault("source", {})[device_type] = source
    from ..model.checkpoint import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False) + "\n")  # whole or not at all
    return data


def read_priority(path: str) -> dict:
    """The measured-order file at `path` ({} when there is none yet); one that is not a JSON object raises
    ValueError naming --write-priority and the file."""
    import json
    import os

    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as exc:  # not JSON, cut short, not UTF-8
        raise ValueError(f"--write-priority {path}: not a JSON order file ({exc}); remove it or name another") \
            from None
    if not isinstance(data, dict):
        raise ValueError(f"--write-priority {path}: not an order file ({{device_type: {{op: [...]}}}}); remove it "
                         "or name another")
    return data
