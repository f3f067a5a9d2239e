"""`fastmae bench tune`: measure the Triton attention kernels' launch settings on this GPU and keep the fastest
(`--op loss` does the same for the masked-MSE loss's kernels: `fastmae.bench.tune_loss`, which this module drives
through the same steps and records in `loss_tuned.json`).

The kernels launch with settings from a fixed rule (`fastmae.kernels.attention.default_settings`), chosen by
compiling, not by timing. This command times the alternatives on the GPU at hand. For each attention shape of
MAE (encoder and decoder of ViT-B/L/H at 224 pixels and 75% masking, and two long sequences) and each dtype,
every kernel that the automatic path launches there is tried with each candidate setting:

1. screen: each candidate is compiled ahead of time for this GPU's architecture by the compile check
   (`fastmae.kernels.compile_check`: no register spills, registers and shared memory within the target's
   limits); the others are dropped, so nothing the CI compile check would reject is ever recorded. Worker
   processes (`--jobs`) screen in parallel and launch each survivor once, so Triton's on-disk cache holds
   every kernel before the timing starts (a cold compile takes about a second each).
2. check: the candidate's results (forward: out; backward: dq, dk, dv) against the fp32 reference, under the
   tests' rule: error at most twice the plain same-dtype path's error, plus a floor per dtype.
3. time: the median of repeated launches (CUDA events, the host's launch time hidden: see `timing`), the
   rule's own setting measured the same way.

A candidate replaces the rule's setting when it is at least `MIN_GAIN` faster. With `--write` the winners go
to `attention_tuned.json` (`loss_tuned.json`) beside the kernels, or in the folder FASTMAE_TUNED_DIR names, under
this GPU's architecture (sm_90 for an H100), which `launch_settings` then reads; settings the rule already picks
best are removed from it. `--out DIR` writes every measurement to DIR/tune.json (DIR/tune_loss.json).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import re
import sys
from dataclasses import asdict, dataclass, field

import torch

from ..kernels.utils import launch_capability, tuned_path  # torch only, never triton
from ..model.checkpoint import atomic_write_text
from ..kernels.utils import TRITON_DTYPES
from .common import DTYPES, error_line, parse_list, progress, resolve_device
from .records import environment, table
from .timing import measure
from .tolerance import error_bound, max_error

MIN_GAIN = 0.03  # a candidate must be this much faster than the rule's setting to be recorded

# name: (heads, tokens, head dim, batch or None for --batch)
SHAPES = {
    "enc-B": (12, 50, 64, None),    # ViT-B/16 encoder: 49 kept patches + class token
    "enc-L": (16, 50, 64, None),    # ViT-L/16 encoder (same tiles as enc-B: tuned once)
    "enc-H": (16, 65, 80, None),    # ViT-H/14 encoder
    "dec-16": (16, 197, 32, None),  # decoder, 224/16 (the flash path: more than AUTO_SHORT_MAX_N keys)
    "dec-14": (16, 257, 32, None),  # decoder, 224/14 (the flash path, tuned by head dim: as dec-16)
    "long-64": (16, 4096, 64, 4),   # long sequences: the flash path at head dims 64 and 128
    "long-128": (16, 4096, 128, 4),
}
QUICK_SHAPES = {"quick-short": (1, 20, 16, 1), "quick-flash": (1, 130, 16, 1)}  # fp32: 130 keys take flash


@dataclass
class Candidate:
    shape: str
    dtype: str
    kernel: str
    key: str
    settings: tuple[int, int, int, int]
    default: bool = False
    problems: list[str] = field(default_factory=list)
    median_ms: float | None = None
    error: float | None = None


def candidates(kernel: str, n_pad: int, quick: bool = False) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) to try for one kernel; short kernels keep all keys in one tile."""
    if kernel == "fwd_short":
        out = [(m, n_pad, w, 1) for m in (16, 32, 64, 128) if m <= max(16, n_pad) for w in (2, 4, 8)]
    elif kernel == "bwd_short":
        out = [(m, n_pad, w, s) for m in (16, 32, 64) if m <= max(16, n_pad) for w in (4, 8) for s in (1, 2)]
    elif kernel == "fwd_flash":
        out = [(m, n, w, s) for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
    elif kernel == "bwd_dkdv":
        out = [(m, n, w, s) for m in (16, 32, 64) for n in (64, 128) for w in (4, 8) for s in (2, 3)]
    elif kernel == "bwd_dq":
        out = [(m, n, w, s) for m in (64, 128) for n in (32, 64) for w in (4, 8) for s in (2, 3)]
    else:
        raise ValueError(f"attention kernel {kernel!r} is not tuned")
    return out[:2] if quick else out


def _qkv(B, H, N, D, dtype, device, seed=0):
    from ..kernels.utils import split_qkv

    g = torch.Generator().manual_seed(seed)
    return split_qkv(torch.randn(B, N, 3 * H * D, generator=g).to(device=device, dtype=dtype), H)  # packed


def _run(attn, kernel: str, q, k, v, dout=None, out=None, lse=None):
    if kernel.startswith("fwd"):
        return attn.attention_forward(q, k, v)
    return attn.attention_backward(dout, q, k, v, out, lse)


def _screen_chunk(items: list[dict]) -> list[list[str]]:
    """Worker: the compile check of each item (a kernel, shape, dtype and settings) for its `arch`, then one
    launch of each that passes (on CUDA), which leaves the compiled kernel in Triton's cache. Returns the
    problems per item (all items of one call are of one op)."""
    if items and items[0]["op"] == "loss":
        from . import tune_loss
        return tune_loss.screen_items(items)
    from fastmae.kernels import attention as attn
    from fastmae.kernels.compile_check import check_specs

    problems: list[list[str]] = [[] for _ in items]
    specs, where = [], []
    for i, it in enumerate(items):
        if it["arch"]:
            B, H, N, D = it["shape"]
            specs.append(attn.settings_spec(it["kernel"], N, D, DTYPES[it["dtype"]],
                                            attn.LaunchSettings(*it["settings"])))
            where.append(i)
    for i, report in zip(where, check_specs(specs, [items[where[0]]["arch"]]) if specs else []):
        problems[i] = list(report.problems)
    for it, probs in zip(items, problems):
        if probs or it["device"] != "cuda":
            continue
        B, H, N, D = it["shape"]
        q, k, v = _qkv(1, H, N, D, DTYPES[it["dtype"]], "cuda")
        try:
            out, lse = attn.attention_forward(q, k, v)
            with attn.forced_settings(**{it["kernel"]: attn.LaunchSettings(*it["settings"])}):
                _run(attn, it["kernel"], q, k, v, torch.randn_like(out), out, lse)
            torch.cuda.synchronize()
        except Exception as exc:  # a launch the compile check missed: drop the candidate, say why
            probs.append("launch failed: " + error_line(exc, 200))
    return problems


def screen(cands: list[Candidate], shapes: dict[str, tuple], arch: int | None, device: str,
           pool: cf.Executor | None, jobs: int, op: str = "attention") -> None:
    """Fill `problems` of every candidate, in `jobs` parallel chunks (all at once in this process for 0)."""
    items = [{"op": op, "kernel": c.kernel, "key": c.key, "dtype": c.dtype, "shape": shapes[c.shape], "arch": arch,
              "device": device, "settings": c.settings} for c in cands]
    n = max(1, jobs)
    chunks = [list(range(len(cands)))[j::n] for j in range(n)]
    chunks = [c for c in chunks if c]
    work = [[items[i] for i in chunk] for chunk in chunks]
    results = pool.map(_screen_chunk, work) if pool else map(_screen_chunk, work)
    for chunk, problems in zip(chunks, results):
        for i, p in zip(chunk, problems):
            cands[i].problems = p


def plan(attn, shapes: dict[str, tuple], dtypes: list[torch.dtype], device: torch.device,
         quick: bool) -> list[Candidate]:
    """Every candidate of every kernel the automatic path launches for each shape and dtype; a (kernel, key)
    that an earlier shape already covers is not tried again."""
    cap = launch_capability(device)
    seen, out = set(), []
    for dtype in dtypes:
        dt = TRITON_DTYPES[dtype]
        for name, (B, H, N, D) in shapes.items():
            fwd, bwd = attn.choose_paths(N, D, dtype, capability=cap)
            for kernel in ["fwd_" + fwd] + (["bwd_short"] if bwd == "short" else ["bwd_dkdv", "bwd_dq"]):
                key = attn.tuned_key(kernel, N, D, dtype)
                if (kernel, key) in seen:
                    continue
                seen.add((kernel, key))
                default = tuple(asdict(attn.default_settings(kernel, N, D, dtype)).values())
                out.append(Candidate(name, dt, kernel, key, default, default=True))
                out += [Candidate(name, dt, kernel, key, cfg) for cfg in candidates(kernel, attn._pad(N), quick)
                        if cfg != default]
    return out


def check_and_time(attn, cands: list[Candidate], shape: tuple, device: torch.device, max_time: float,
                   quick: bool = False) -> None:
    """Check each screened candidate of one shape and dtype against the tolerance rule, and time it."""
    from ..ops import reference

    B, H, N, D = shape
    dtype = DTYPES[cands[0].dtype]
    q, k, v = _qkv(B, H, N, D, dtype, device)
    dout = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    out, lse = attn.attention_forward(q, k, v)
    # the tolerance rule's two references: fp32 (truth) and the plain path in the same dtype
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref32 = reference.attention(q32, k32, v32)
    truth = [ref32.detach(), *torch.autograd.grad(ref32, (q32, k32, v32), dout.float())]
    qp, kp, vp = (t.detach().clone().requires_grad_() for t in (q, k, v))
    plain = reference.attention(qp, kp, vp)
    plain_all = [plain.detach(), *torch.autograd.grad(plain, (qp, kp, vp), dout)]
    bounds = [error_bound(p, t, dtype) for p, t in zip(plain_all, truth)]

    for c in cands:
        if c.problems and not c.default:
            continue
        fwd = c.kernel.startswith("fwd")
        ref, bnd = (truth[:1], bounds[:1]) if fwd else (truth[1:], bounds[1:])
        try:
            with attn.forced_settings(**{c.kernel: attn.LaunchSettings(*c.settings)}):
                got = _run(attn, c.kernel, q, k, v, dout, out, lse)
                errs = [max_error(g, t) for g, t in zip([got[0]] if fwd else got, ref)]
                c.error = max(errs)
                if any(not e <= b for e, b in zip(errs, bnd)):  # NaN fails too
                    c.problems.append(f"error {c.error:.3e} beyond the tolerance rule's bound {max(bnd):.3e}")
                    continue
                # the host's launch time hidden: at MAE's shapes a kernel takes the GPU less time than the
                # launch takes the host, and timing the host would rank every candidate alike
                c.median_ms = measure(lambda: _run(attn, c.kernel, q, k, v, dout, out, lse), device,
                                      max_time_s=max_time, warmup=1 if quick else 2,
                                      min_reps=1 if quick else 3, hide_launch=True).median_ms
        except Exception as exc:
            c.problems.append("failed: " + error_line(exc, 200))


def winners(results: list[Candidate]) -> dict[tuple[str, str], tuple[Candidate, Candidate]]:
    """(kernel, key) -> (the rule's candidate, the fastest that passed) for every tuned kernel."""
    out = {}
    for kernel, key in dict.fromkeys((c.kernel, c.key) for c in results):
        group = [c for c in results if (c.kernel, c.key) == (kernel, key)]
        default = next(c for c in group if c.default)
        timed = [c for c in group if c.median_ms is not None and not c.problems]
        if timed:
            out[(kernel, key)] = (default, min(timed, key=lambda c: c.median_ms))
    return out


def update_table(table_: dict, arch: str, best: dict, env: dict) -> dict:
    """The tuned table with this architecture's entries replaced by what was measured: a winner where it beats
    the rule by MIN_GAIN, no entry (the rule) elsewhere."""
    per_arch = table_.setdefault(arch, {})
    measured = table_.setdefault("measured", {}).setdefault(arch, {})
    for (kernel, key), (default, fastest) in best.items():
        entries = per_arch.setdefault(kernel, {})
        gain = default.median_ms is not None and fastest.median_ms <= (1 - MIN_GAIN) * default.median_ms
        if gain and not fastest.default:
            entries[key] = list(fastest.settings)
        else:
            entries.pop(key, None)
        measured.setdefault(kernel, {})[key] = {
            "rule": list(default.settings), "rule_ms": default.median_ms, "best": list(fastest.settings),
            "best_ms": fastest.median_ms, "shape": fastest.shape}
        if not entries:
            per_arch.pop(kernel)
    if not per_arch:
        table_.pop(arch)
    table_.setdefault("source", {})[arch] = {k: env.get(k) for k in ("device", "torch", "triton", "git_commit",
                                                                      "date")}
    return table_


def dump_table(table_: dict) -> str:
    """JSON text of a tuned table, one line per entry (lists of numbers kept on one line)."""
    text = json.dumps(table_, indent=1, sort_keys=True)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def label(settings) -> str:
    return "m{}/n{}/w{}/s{}".format(*settings)


def resolve_shapes(shapes: dict[str, tuple], batch: int) -> dict[str, tuple]:
    """(batch, heads, tokens, head dim) per shape, --batch where the shape names no batch."""
    return {n: (B or batch, H, N, D) for n, (H, N, D, B) in shapes.items()}


def kernel_module():
    from ..kernels import attention
    return attention


OPS = ("attention", "loss")


def op_tuner(op: str):
    """The module that plans, checks and times one op's candidates: this one for attention, `tune_loss` for the
    masked-MSE loss. Each has SHAPES, QUICK_SHAPES, kernel_module, resolve_shapes, plan, check_and_time, label."""
    if op == "loss":
        from . import tune_loss
        return tune_loss
    return sys.modules[__name__]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import non_negative_float, non_negative_int, positive_int, user_path

    from . import tune_loss

    p.add_argument("--op", choices=OPS, default="attention",
                   help="the kernels to tune: attention (default) or loss (the masked-MSE forward and backward)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--dtypes", default=None, help="comma-separated: bf16, fp16, fp32; each dtype is tuned on its "
                   "own (default: bf16, MAE's training dtype, on cuda; fp32 on cpu); for the loss, the "
                   "predictions' dtype (images are fp32, as under autocast)")
    p.add_argument("--shapes", default=None, help=f"comma-separated, from {', '.join(SHAPES)} (attention) or "
                   f"{', '.join(tune_loss.SHAPES)} (loss) (default: all of the op's)")
    p.add_argument("--batch", type=positive_int, default=64, help="batch of the MAE shapes (the long ones use 4)")
    p.add_argument("--jobs", type=non_negative_int, default=None,
                   help="worker processes that compile-check and pre-compile candidates (default: up to 8 on "
                   "cuda, 0 = none on cpu)")
    # argparse converts FILE only: without it --write is const '' (the kernels' own file), absent it is None
    p.add_argument("--write", nargs="?", const="", default=None, metavar="FILE", type=user_path,
                   help="merge the winners into FILE (without FILE: the kernels' own table, attention_tuned.json "
                   "or loss_tuned.json, in the folder FASTMAE_TUNED_DIR names where it is set)")
    p.add_argument("--out", metavar="DIR", type=user_path,
                   help="write every measurement to DIR/tune.json (attention) or DIR/tune_loss.json")
    p.add_argument("--max-time", type=non_negative_float, default=None, metavar="S",
                   help="time budget of one candidate's measurement (default 0.05 s on cuda; 0: the minimum "
                        "repetitions only)")
    p.add_argument("--quick", action="store_true", help="two tiny fp32 shapes and two candidates per kernel: "
                   "checks the code paths (with --allow-interpreter on a CPU), the numbers mean nothing")
    p.add_argument("--allow-interpreter", action="store_true",
                   help="run on the CPU under Triton's interpreter (TRITON_INTERPRET=1): code paths only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..kernels.utils import interpreter_enabled, interpreter_problem

    device = resolve_device(args.device)
    if device.type != "cuda" and not (args.allow_interpreter and interpreter_enabled()):
        raise ValueError("tuning times Triton kernels on a GPU; on a CPU only --allow-interpreter with "
                         "TRITON_INTERPRET=1 runs it (to check the code paths)")
    tuner = op_tuner(args.op)
    module = tuner.kernel_module()  # the op's kernels: fastmae.kernels.attention or .loss

    if args.write == "" and device.type != "cuda":
        raise ValueError("interpreter timings mean nothing: --write needs a FILE other than the kernels' own on a CPU")
    if device.type != "cuda" and (problem := interpreter_problem()):
        raise ValueError(problem)
    from ..cli import check_output_dir, check_output_file
    if args.out:  # where the results go, checked before the first candidate is timed
        check_output_dir(args.out, "--out")
    if args.write:
        check_output_file(args.write, "--write")
    shapes = dict(tuner.QUICK_SHAPES) if args.quick else dict(tuner.SHAPES)
    if args.shapes and not args.quick:
        names = parse_list(args.shapes)
        unknown = [n for n in names if n not in tuner.SHAPES]
        if unknown:
            raise ValueError(f"unknown {args.op} shapes {unknown}; choose from {', '.join(tuner.SHAPES)}")
        shapes = {n: tuner.SHAPES[n] for n in names}
    default_dtypes = "fp32" if (args.quick or device.type != "cuda") else "bf16"
    try:
        dtypes = [DTYPES[d.lower()] for d in parse_list(args.dtypes or default_dtypes)]
    except KeyError as exc:
        raise ValueError(f"unknown dtype {exc.args[0]!r}; choose bf16, fp16 or fp32") from None
    if args.batch < 1:
        raise ValueError("--batch must be at least 1")
    jobs = args.jobs if args.jobs is not None else (min(8, max(1, (os.cpu_count() or 2) - 1))
                                                    if device.type == "cuda" else 0)
    from ..kernels.compile_check import LIMITS  # the architectures the compile check knows

    cap = launch_capability(device)
    arch = f"sm_{cap[0]}{cap[1]}"
    check_arch = cap[0] * 10 + cap[1] if cap[0] * 10 + cap[1] in LIMITS else None
    max_time = args.max_time if args.max_time is not None else (0.05 if device.type == "cuda" else 0.01)
    env = environment(device)
    known = ", ".join(f"sm_{a}" for a in sorted(LIMITS))
    print(f"tuning {args.op} on {env['device']} ({arch}) | torch {env['torch']} | triton {env['triton']} | "
          f"{len(shapes)} shapes x {len(dtypes)} dtypes | {jobs} workers"
          + ("" if check_arch else f" | no compile check for {arch} (it knows {known})"), flush=True)

    shapes = tuner.resolve_shapes(shapes, args.batch)
    results = tuner.plan(module, shapes, dtypes, device, args.quick)
    print(f"{len(results)} candidates: compile check{' and pre-compile' if device.type == 'cuda' else ''} ...",
          flush=True)
    pool = cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) if jobs > 0 else None
    try:
        screen(results, shapes, check_arch, device.type, pool, jobs, args.op)
    finally:
        if pool:
            pool.shutdown()
    groups: dict[tuple, list[Candidate]] = {}
    for c in results:
        groups.setdefault((c.shape, c.dtype), []).append(c)
    for (name, _), cands in progress(list(groups.items()), "tune", enabled=not args.no_progress):
        tuner.check_and_time(module, cands, shapes[name], device, max_time, args.quick)
        # what is measured so far is saved after every shape: a run cut short keeps it
        if not save(args, module, results, env, arch, quiet=True):
            return 1

    best = winners(results)
    rows = []
    for (kernel, key), (default, fastest) in best.items():
        n_bad = sum(1 for c in results if (c.kernel, c.key) == (kernel, key) and c.problems)
        n_all = sum(1 for c in results if (c.kernel, c.key) == (kernel, key))
        speed = default.median_ms / fastest.median_ms if default.median_ms else None
        rule_ms = f"{default.median_ms:.4f}" if default.median_ms else "-"
        rows.append((fastest.shape, kernel, key, tuner.label(default.settings), rule_ms, tuner.label(fastest.settings),
                     f"{fastest.median_ms:.4f}", f"{speed:.2f}x" if speed else "-", f"{n_all - n_bad}/{n_all}"))
    print(table(("shape", "kernel", "key", "rule", "rule ms", "best", "best ms", "gain", "passed"), rows))
    for c in results:
        if c.problems and c.default:
            print(f"note: the rule's own setting for {c.kernel} [{c.key}] has problems: {'; '.join(c.problems)}")
    return 0 if save(args, module, results, env, arch, quiet=False) else 1


def save(args: argparse.Namespace, module, results: list[Candidate], env: dict, arch: str, quiet: bool) -> bool:
    """Write every measurement (--out) and merge the winners so far into the table (--write), each file whole
    or not at all; False when the table would be unsound (then it is not written)."""
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "tune.json" if args.op == "attention" else f"tune_{args.op}.json")
        atomic_write_text(path, json.dumps({"env": env, "arch": arch, "candidates": [asdict(c) for c in results]},
                                           indent=1))
        if not quiet:
            print(f"wrote {path}")
    if args.write is not None:
        path = args.write or tuned_path(module.TUNED_FILE)
        old = {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        new = update_table(old, arch, winners(results), env)
        problems = module.validate_tuned(new)
        if problems:  # never write what launch_settings would refuse
            print("not written, the table would be unsound: " + "; ".join(problems), file=sys.stderr)
            return False
        atomic_write_text(path, dump_table(new))
        if not quiet:
            n = sum(len(v) for v in new.get(arch, {}).values())
            print(f"wrote {path}: {n} tuned settings for {arch}")
    return True

