"""`fastmae bench attention`: the attention kernels side by side, at MAE's shapes over a range of batches and
at long sequences, against every SDPA kernel and xformers.

Cases (attention as the model calls it, `ops.attention_qkv` on one packed qkv projection: triton writes the
projection's gradient in one piece, the others take q, k, v as strided views of it and autograd gathers their
gradients into that layout, a copy the model makes too):
  MAE   the encoder and decoder of ViT-B/L/H at 75% masking (N = 50 and 197 for B and L, 65 and 257 for H;
        D = 64, 80, 32), for each batch in `batches`
  long  N in `long_ns` at head dims 64 and 128, 16 heads, batch `long_tokens` // N (16384 // N on a GPU)

Implementations: `triton` (fastmae's kernels, the path chosen by shape), `triton-short` and `triton-flash`
(the same kernels with the path forced, forward and backward alike: where one differs from `triton`'s choice,
which of the two paths is faster at that shape on this GPU; skipped where it is `triton`'s own choice or cannot
serve the shape), `xformers`, `sdpa` (PyTorch's own choice), and each SDPA kernel forced with
`torch.nn.attention.sdpa_kernel`: `sdpa-flash`, `sdpa-efficient`, `sdpa-cudnn`, `sdpa-math` (math only up to
N = 2048: it materialises the N x N scores). One that cannot serve a case is recorded as skipped with the reason
(the registry's, or SDPA's own).

Figures: median time (20th/80th percentiles), TFLOP/s with FLOPs = 4 N^2 D B H forward and 3.5x that forward
+ backward, and per case and mode, for every implementation: `vs_sdpa_best` (the fastest SDPA kernel's time
over its time; `sdpa_best` names that kernel), `vs_sdpa_flash`, `vs_xformers` and, for the forced paths,
`vs_triton` (the automatic path's time over theirs).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from ..kernels.utils import launch_capability  # torch only, never triton
from .common import error_line
from .limits import dtype_name
from .ops_bench import attention_case, case_reasons, mae_dims, make_runner, release_inputs
from .timing import measure

SDPA_KERNELS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
TRITON_PATHS = {"triton-short": "short", "triton-flash": "flash"}
IMPLS = ("triton", *TRITON_PATHS, "xformers", "sdpa", *SDPA_KERNELS)
MODES = ("fwd", "fwd+bwd")
MATH_MAX_N = 2048
LONG_HEADS = 16
LONG_TOKENS = 16384  # batch x N of the long cases


def mae_shapes(models: Sequence[str] = ("B", "L", "H")) -> list[tuple[str, int, int, int]]:
    """(name, heads, tokens, head dim) of the encoder and decoder attention of each ViT size, shared shapes
    named once ("ViT-B/L decoder")."""
    out: dict[tuple[int, int, int], str] = {}
    for m in models:
        s, L, k = mae_dims(m)
        for part, h, n, d in (("encoder", s["heads"], k + 1, s["width"] // s["heads"]),
                              ("decoder", s["dec_heads"], L + 1, s["dec_width"] // s["dec_heads"])):
            key = (h, n, d)
            if key in out:
                first, rest = out[key].split(" ", 1)
                out[key] = f"{first}/{m} {rest}"
            else:
                out[key] = f"ViT-{m} {part}"
    return [(name, h, n, d) for (h, n, d), name in out.items()]


def long_shapes(ns: Sequence[int], head_dims: Sequence[int] = (64, 128),
                tokens: int = LONG_TOKENS) -> list[tuple[str, int, int, int, int]]:
    """(name, batch, heads, tokens, head dim) of the long cases: batch = tokens // N, at least 1."""
    return [(f"long N={n} D={d}", max(1, tokens // n), LONG_HEADS, n, d) for d in head_dims for n in ns]


def sdpa_kernel_context(impl: str):
    """The context that forces SDPA's kernel for `impl` (nothing for the other implementations)."""
    if impl not in SDPA_KERNELS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_KERNELS[impl], None)
    if backend is None:
        raise RuntimeError(f"this torch has no SDPBackend.{SDPA_KERNELS[impl]}")
    return sdpa_kernel([backend])


def backend_of(impl: str) -> str:
    if impl in TRITON_PATHS:
        return "triton"
    return "sdpa" if impl in SDPA_KERNELS else impl


def forced_path_case(case, n: int, d: int, dtype: torch.dtype, path: str, mode: str, device: torch.device):
    """The case with fastmae's kernels on `path` (forward and backward alike), or the reason it is not timed:
    that path is the automatic one there (already timed as `triton`), or it cannot serve the shape."""
    from dataclasses import replace

    from ..kernels import attention as ka

    capability = launch_capability(device)
    try:  # the paths the mode runs: the forward's, and the backward's with fwd+bwd
        forced = (ka.choose_paths(n, d, dtype, path, capability) if mode == "fwd+bwd"
                  else (ka.forward_path(n, d, dtype, path),))
    except ValueError as exc:
        return None, str(exc)
    if forced == ka.choose_paths(n, d, dtype, capability=capability)[:len(forced)]:
        return None, f"the {path} path is what `triton` takes here (timed as triton)"

    def call(inp, backend):
        return ka.attention_packed(inp["qkv"], case.shape["H"], path=path)

    return replace(case, call=call), None


def _unavailable(exc: Exception) -> bool:
    """SDPA's refusal of a forced kernel (a reason to skip, not a failure)."""
    text = str(exc)
    return any(m in text for m in ("No available kernel", "No viable backend", "no SDPBackend"))


def run_case(name: str, b: int, h: int, n: int, d: int, dtype: torch.dtype, impl: str, mode: str,
             device: torch.device, *, timing: dict | None = None, allow_interpreter: bool = False) -> dict:
    case = attention_case(name, b, h, n, d, dtype)
    rec = {"kind": "attention", "op": "attention", "case": name, "backend": impl, "mode": mode,
           "shape": {"B": b, "H": h, "N": n, "D": d}, "dtype": dtype_name(dtype), "flops": case.flops[mode]}
    try:  # the inputs built for the checks can fail (a batch too large for the memory): a failed record
        reasons = case_reasons(case, backend_of(impl), device, allow_interpreter)
        if impl == "sdpa-math" and n > MATH_MAX_N:
            reasons.append(f"sdpa-math materialises the {n} x {n} scores; timed up to N = {MATH_MAX_N}")
        if not reasons and impl in TRITON_PATHS:
            case, why = forced_path_case(case, n, d, dtype, TRITON_PATHS[impl], mode, device)
            reasons += [why] if why else []
    except Exception as exc:
        return {**rec, "status": "failed", "reason": error_line(exc)}
    if reasons:
        return {**rec, "status": "skipped", "reason": "; ".join(reasons)}
    try:
        with sdpa_kernel_context(impl):
            fn = make_runner(case, backend_of(impl), mode, device)
            t = measure(fn, device, flush_cache=device.type == "cuda", hide_launch=True, **(timing or {}))
    except Exception as exc:
        status = "skipped" if _unavailable(exc) else "failed"
        return {**rec, "status": status, "reason": error_line(exc)}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {**rec, "status": "ok", **t.as_dict(), "tflops": case.flops[mode] / (t.median_ms * 1e-3) / 1e12}


def add_speedups(records: list[dict]) -> list[dict]:
    """`vs_sdpa_best` / `sdpa_best`, `vs_sdpa_flash` and `vs_xformers` on every timed record of one run, per
    case, shape, mode and dtype; and `sdpa_host_ms`, the host's time to issue SDPA's own choice there, where it
    was measured (on CUDA)."""
    def key(r):  # not the device stamps: the newest record is stamped only after this runs
        return (r["case"], tuple(sorted(r["shape"].items())), r["mode"], r.get("dtype"))

    groups: dict[tuple, dict[str, float]] = {}
    sdpa_host: dict[tuple, float] = {}
    for r in records:
        if r.get("kind") == "attention" and r.get("status") == "ok":
            groups.setdefault(key(r), {})[r["backend"]] = r["median_ms"]
            if r["backend"] == "sdpa" and r.get("host_ms") is not None:
                sdpa_host[key(r)] = r["host_ms"]
    for r in records:
        if r.get("kind") != "attention" or r.get("status") != "ok":
            continue
        times = groups[key(r)]
        sdpa = {b: ms for b, ms in times.items() if b == "sdpa" or b in SDPA_KERNELS}
        if sdpa:
            best = min(sdpa, key=sdpa.get)
            r["sdpa_best"], r["vs_sdpa_best"] = best, sdpa[best] / r["median_ms"]
        if "sdpa-flash" in times:
            r["vs_sdpa_flash"] = times["sdpa-flash"] / r["median_ms"]
        if "xformers" in times:
            r["vs_xformers"] = times["xformers"] / r["median_ms"]
        if r["backend"] in TRITON_PATHS and "triton" in times:
            r["vs_triton"] = times["triton"] / r["median_ms"]
        if key(r) in sdpa_host:
            r["sdpa_host_ms"] = sdpa_host[key(r)]
    return records


def run_attention(device: torch.device, dtype: torch.dtype, *, batches: Sequence[int] = (64, 128, 256, 512),
                  models: Sequence[str] = ("B", "L", "H"), long_ns: Sequence[int] = (1024, 2048, 4096, 8192),
                  long_head_dims: Sequence[int] = (64, 128), long_tokens: int = LONG_TOKENS,
                  impls: Sequence[str] = IMPLS,
                  modes: Sequence[str] = MODES, timing: dict | None = None, allow_interpreter: bool = False,
                  on_record: Callable[[dict], None] | None = None, show_progress: bool = True) -> list[dict]:
    from .common import progress

    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; choose from {', '.join(IMPLS)}")
    # the first batch's MAE cases, then the long ones, then the other batches: a run cut short by a time limit
    # still holds both kinds of case the targets are stated for
    mae = [[(name, b, h, n, d) for name, h, n, d in mae_shapes(models)] for b in batches]
    shapes = (mae[0] if mae else []) + long_shapes(long_ns, long_head_dims, long_tokens)
    shapes += [s for per_batch in mae[1:] for s in per_batch]
    jobs = [(s, m, i) for s in shapes for m in modes for i in impls]
    records: list[dict] = []
    try:
        for (name, b, h, n, d), mode, impl in progress(jobs, "bench attention", show_progress):
            rec = run_case(name, b, h, n, d, dtype, impl, mode, device, timing=timing,
                           allow_interpreter=allow_interpreter)
            records.append(rec)
            add_speedups(records)  # as the records arrive: a run cut short keeps its speedups
            if on_record:
                on_record(rec)
    finally:
        release_inputs()  # the inputs are built once per shape and shared by its implementations and modes
    return add_speedups(records)
