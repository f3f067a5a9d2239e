"""`fastmae bench ops|attention|encoder|train|tune|readme`: the benchmark suite.

Every command prints a table; with `--out DIR` it also writes DIR/results.json (merged with what the folder
already holds), DIR/results.csv and PNG plots. Defaults depend on the device: on CUDA, MAE's real shapes in
bfloat16; on the CPU, small shapes in float32 that finish in about a minute on two cores.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HELP = "benchmarks: ops x backends, encoder throughput vs mask ratio, training step, README results"
DESCRIPTION = __doc__

# device-dependent defaults (None in argparse means "pick for the device")
DEFAULTS = {
    "ops": {"cuda": {"batch": 64, "models": "B,L,H"}, "cpu": {"batch": 2, "models": "B,L,H"},
            "quick": {"batch": 1, "models": "B"}},
    "attention": {"cuda": {"batches": "64,128,256,512", "models": "B,L,H", "long_ns": "1024,2048,4096,8192",
                           "long_head_dims": "64,128", "long_tokens": 16384},
                  "cpu": {"batches": "2", "models": "B,L,H", "long_ns": "256,512", "long_head_dims": "64",
                          "long_tokens": 512},
                  "quick": {"batches": "1", "models": "B,L,H", "long_ns": "64", "long_head_dims": "32",
                            "long_tokens": 64}},
    "encoder": {"cuda": {"model": "mae_vit_base_patch16", "batch": 64},
                "cpu": {"model": "mae_vit_cifar_small_patch4", "batch": 64},
                "quick": {"model": "mae_vit_tiny_patch4", "batch": 4}},
    "train": {"cuda": {"model": "mae_vit_base_patch16", "batch": 64},
              "cpu": {"model": "mae_vit_cifar_small_patch4", "batch": 64},
              "quick": {"model": "mae_vit_tiny_patch4", "batch": 4}},
}
TIMING = {
    # per measurement: warm-up calls, repetitions in [min_reps, max_reps] within max_time_s
    "ops": {"cuda": dict(warmup=3, min_reps=10, max_reps=200, max_time_s=0.15),
            "cpu": dict(warmup=1, min_reps=3, max_reps=30, max_time_s=0.1),
            "quick": dict(warmup=1, min_reps=2, max_reps=2, max_time_s=0.0)},
    "attention": {"cuda": dict(warmup=3, min_reps=10, max_reps=200, max_time_s=0.1),
                  "cpu": dict(warmup=1, min_reps=3, max_reps=30, max_time_s=0.1),
                  "quick": dict(warmup=1, min_reps=2, max_reps=2, max_time_s=0.0)},
    "encoder": {"cuda": dict(warmup=2, min_reps=8, max_reps=40, max_time_s=1.5),
                "cpu": dict(warmup=1, min_reps=3, max_reps=12, max_time_s=8.0),
                "quick": dict(warmup=1, min_reps=2, max_reps=2, max_time_s=0.0)},
    "train": {"cuda": dict(warmup=3, min_reps=10, max_reps=30, max_time_s=3.0),
              "cpu": dict(warmup=1, min_reps=3, max_reps=10, max_time_s=5.0),
              "quick": dict(warmup=1, min_reps=2, max_reps=2, max_time_s=0.0)},
}
ENCODER_RATIOS = "0,0.25,0.5,0.75,0.9"  # bench encoder's default mask ratios
COMPILE_WARMUP = 3  # torch.compile compiles on the first calls


def _known(values, allowed, what: str):
    """`values` if every one is in `allowed`; else a ValueError naming the unknown ones and the choices."""
    values = [values] if isinstance(values, str) else list(values)
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {bad if len(bad) > 1 else repr(bad[0])}; choose from {', '.join(allowed)}")
    return values


def _common(p: argparse.ArgumentParser) -> None:
    from ..cli import non_negative_float, user_path
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (auto: bfloat16 on cuda, "
                   "float32 on cpu); the model-level benchmarks run it as autocast with fp32 weights")
    p.add_argument("--out", metavar="DIR", type=user_path,
                   help="also write DIR/results.json, DIR/results.csv and plots")
    p.add_argument("--quick", action="store_true", help="tiny shapes and 2 repetitions: checks the code paths, "
                   "the numbers mean little")
    p.add_argument("--max-time", type=non_negative_float, default=None, metavar="S",
                   help="time budget of one measurement in seconds (the default depends on the device; 0: the "
                        "minimum repetitions only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="with --out, write no PNG plots")
    p.add_argument("--threads", default="auto",
                   help="CPU threads for torch: a number, or auto = the cores that the 1-minute load average "
                   "leaves idle (at least 1); on a busy machine extra threads wait on each other at every op")
    p.add_argument("--allow-interpreter", action="store_true",
                   help="time triton on the CPU under its interpreter (meaningless numbers; off by default)")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show (None: chosen per device; flags)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import positive_int, user_path
    sub = parser.add_subparsers(dest="bench_command", metavar="WHAT")
    fmt = _Formatter

    p = sub.add_parser("ops", formatter_class=fmt, help="every op x every backend at MAE's shapes",
                       description="Every op x every backend at the shapes of MAE's ViT-B/L/H encoder and decoder, "
                       "forward and forward+backward: median and 20th/80th percentiles, TFLOP/s (attention, "
                       "projections) or GB/s (memory-bound ops), and the fraction of the matmul peak / copy "
                       "bandwidth measured in the same run. Backends that cannot serve a case are listed with "
                       "the registry's reason.")
    _common(p)
    p.add_argument("--batch", type=positive_int, default=None, help="batch (default: 64 on cuda, 2 on cpu)")
    p.add_argument("--models", default=None, help="ViT sizes whose shapes to use, from B,L,H (default: all)")
    p.add_argument("--ops", default=None, help="comma-separated ops (default: all, and the projections)")
    p.add_argument("--backends", default=None, help="comma-separated backends (default: all registered)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd")
    p.add_argument("--write-priority", metavar="FILE", type=user_path,
                   help="write the measured backend order per op ({device_type: {op: [fastest, ...]}, source})")
    p.add_argument("--rank-from", metavar="RESULTS", type=user_path,
                   help="with --write-priority: rank from a recorded results.json (or its folder) instead of "
                   "measuring")
    p.set_defaults(bench_run=run_ops)

    p = sub.add_parser("attention", formatter_class=fmt,
                       help="attention: triton vs every SDPA kernel and xformers, MAE's and long shapes",
                       description="Attention at MAE's shapes (encoder and decoder of ViT-B/L/H, for each batch) "
                       "and at long sequences (16 heads, batch 16384 // N on cuda), forward and forward+backward: "
                       "triton, xformers, sdpa (PyTorch's choice) and each SDPA kernel forced (flash, efficient, "
                       "cudnn, math), with TFLOP/s and every implementation's speedup over the fastest SDPA "
                       "kernel, over SDPA's flash kernel and over xformers.")
    _common(p)
    p.add_argument("--batches", default=None, help="batches of the MAE cases (default: 64,128,256,512 on cuda, "
                   "2 on cpu)")
    p.add_argument("--models", default=None, help="ViT sizes whose encoder and decoder shapes to use (default: B,L,H)")
    p.add_argument("--long", dest="long_ns", default=None, help="sequence lengths of the long cases, or none "
                   "(default: 1024,2048,4096,8192 on cuda with batch 16384 // N; 256,512 on cpu with batch "
                   "512 // N)")
    p.add_argument("--long-head-dims", default=None, help="head dims of the long cases (default: 64,128 on cuda, "
                   "64 on cpu)")
    p.add_argument("--impls", default=None,
                   help="implementations to time (default: all of triton, triton-short, triton-flash, xformers, sdpa, "
                   "sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math; triton-short / triton-flash: fastmae's kernels "
                   "on that path)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd")
    p.set_defaults(bench_run=run_attention)

    p = sub.add_parser("encoder", formatter_class=fmt, help="encoder images/s vs mask ratio, per backend",
                       description="Images per second of model.forward_encoder, forward and forward+backward, for "
                       "each mask ratio and backend path, with the speedup over ratio 0, the ideal speedup "
                       "(L+1)/(K+1) and their quotient.")
    _common(p)
    p.add_argument("--model", default=None, help="model preset (default: mae_vit_base_patch16 on cuda, "
                   "mae_vit_cifar_small_patch4 on cpu)")
    p.add_argument("--batch", type=positive_int, default=None, help="batch (default: 64)")
    p.add_argument("--ratios", default=ENCODER_RATIOS, help="mask ratios (0 is always added)")
    p.add_argument("--backends", default="triton,sdpa,xformers,reference,auto",
                   help="backend paths, timed in this order: triton, sdpa, xformers (attention only), reference, "
                   "auto (fastmae's automatic choice; timed last, and not at all when it resolves to the same "
                   "backends as a path timed before)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time fastmae's automatic path replayed from CUDA graphs (backend auto+cudagraph; "
                   "CUDA only): the eager rows' distance from it is launch overhead")
    p.set_defaults(bench_run=run_encoder)

    p = sub.add_parser("train", formatter_class=fmt, help="one pretraining step per variant: images/s, memory, MFU",
                       description="One full pretraining step (forward, loss, backward, AdamW) for: official-eager, "
                       "reference+sdpa, reference+compile, fastmae, fastmae+compile, fastmae+sdpa (SDPA attention), "
                       "fastmae+lean, fastmae+plain-casts (autocast's per-weight casts; CUDA only), "
                       "fastmae+triton-launch (Triton's own launch path for every kernel; CUDA only), "
                       "fastmae+cudagraph (the step captured in a CUDA graph; CUDA only), fastmae+compile+cudagraph "
                       "(the compiled step captured so); images/s (each step from an idle GPU, and steps issued back "
                       "to back as a training loop issues them), peak memory and model-FLOPs utilisation against the "
                       "matmul peak measured in the same run.")
    _common(p)
    p.add_argument("--model", default=None, help="model preset (default: mae_vit_base_patch16 on cuda, "
                   "mae_vit_cifar_small_patch4 on cpu)")
    p.add_argument("--batch", type=positive_int, default=None, help="batch (default: 64)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="the masking of every variant")
    p.add_argument("--variants",
                   default="official-eager,reference+sdpa,reference+compile,fastmae,fastmae+compile,fastmae+sdpa,"
                   "fastmae+lean,fastmae+plain-casts,fastmae+triton-launch,fastmae+cudagraph,fastmae+compile+cudagraph",
                   help="comma-separated training variants")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="run the torch.compile variants (default on cuda; off on cpu, where compiling takes minutes)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile variants")
    p.add_argument("--profile", action="store_true",
                   help="also run a few steps per variant under torch.profiler: the GPU kernels' own time per step "
                   "by kind of work (attention, matmul, ...) and its share of the step time, which tells a step "
                   "bound by the GPU from one bound by the host (on a CPU: operators' own CPU time)")
    p.set_defaults(bench_run=run_train)

    from . import tune

    p = sub.add_parser("tune", formatter_class=fmt,
                       help="time the launch settings of the Triton attention (or loss) on this GPU",
                       description="Measure the launch settings of the Triton attention kernels (--op loss: of the "
                       "masked-MSE loss's kernels) on this GPU and keep the fastest. Candidates are screened by the "
                       "compile check, checked against the fp32 reference, and timed; --write records the winners "
                       "per GPU architecture in the kernels' attention_tuned.json (loss_tuned.json), which the "
                       "launchers read.")
    tune.add_arguments(p)
    p.set_defaults(bench_run=tune.run)

    p = sub.add_parser("readme", formatter_class=fmt, help="write the latest recorded results into README.md",
                       description="Rewrite the block between <!-- bench-results:start --> and "
                       "<!-- bench-results:end --> in README.md with the latest recorded GPU and CPU results "
                       "(read from results.json files, stamped with device, versions and date).")
    p.add_argument("--results", default=None, metavar="DIR", type=user_path,
                   help="folder holding <device>/<date>/results.json (default: benchmarks/results of this repo)")
    p.add_argument("--readme", default=None, metavar="FILE", type=user_path,
                   help="the README to update (default: README.md of this repo)")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the block, write nothing")
    p.set_defaults(bench_run=run_readme)


def run(args: argparse.Namespace) -> int:
    fn = getattr(args, "bench_run", None)
    if fn is None:
        print("usage: fastmae bench {ops,attention,encoder,train,tune,readme} [options]; see fastmae bench WHAT "
              "--help",
              file=sys.stderr)
        return 2
    from ..cli import discarding_new_dirs
    out = getattr(args, "out", None)
    return discarding_new_dirs(out, lambda: _run(fn, args))


def _run(fn, args: argparse.Namespace) -> int:
    from ..cli import check_backend, check_device, check_output_dir, report_user_error, sigterm_as_exit

    # a time limit's SIGTERM ends the run through SystemExit, so the records not yet written are (atexit)
    with sigterm_as_exit():
        try:
            # the flags every measuring command has, checked before anything is measured
            if getattr(args, "device", "auto") not in (None, "", "auto"):
                check_device(args.device)
            check_backend(None)  # FASTMAE_BACKEND, which every op reads: a bad value would fail every measurement
            if getattr(args, "out", None):
                check_output_dir(args.out, "--out")
            return int(fn(args) or 0)
        except (ValueError, OSError) as exc:  # bad option values or paths: a clear message, not a traceback
            if not report_user_error(f"fastmae bench {args.bench_command}", exc):
                raise
            return 2


# ------------------------------------------------------------------------------------------ helpers
def _profile(args, what: str, device: torch.device) -> str:
    return "quick" if args.quick else device.type


def _defaults(args, what: str, device: torch.device) -> dict:
    return DEFAULTS[what][_profile(args, what, device)]


def _timing(args, what: str, device: torch.device) -> dict:
    t = dict(TIMING[what][_profile(args, what, device)])
    if args.max_time is not None:
        t["max_time_s"] = args.max_time
    return t


def _setup(args, write_each_record: bool = False):
    """(device, dtype, recorder, environment). `write_each_record`: the output folder's results are rewritten
    after every record, not at most every 2 s, for the benchmarks whose cases take seconds each (encoder,
    train): a case that crashes the process (a segfault, which no exit hook survives) then loses only itself."""
    from .common import parse_dtype, resolve_device
    from .records import Recorder, environment

    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    if device.type == "cpu":
        threads = cpu_threads(args.threads)
        torch.set_num_threads(threads)
        from .ops_bench import interpreter_reason
        if interpreter_reason(device) and not args.allow_interpreter:
            print("note: TRITON_INTERPRET is set; triton is reported as skipped on the CPU", file=sys.stderr)
    env = environment(device)
    if getattr(args, "quick", False):  # tiny shapes, 2 repetitions: a check of the code paths, not a result to show
        env["quick"] = True
    recorder = Recorder(args.out, env, interval_s=0.0 if write_each_record else 2.0)
    recorder.earlier()  # DIR/results.json read now: one that holds no list of records is refused before measuring
    return device, dtype, recorder, env


def cpu_threads(spec: str) -> int:
    """A thread count from --threads: a number, or "auto" (the cores the load average leaves idle, >= 1)."""
    cores = os.cpu_count() or 1
    if str(spec) != "auto":
        try:
            n = int(spec)
        except ValueError:
            raise ValueError(f"--threads must be a number or auto, got {spec!r}") from None
        if n < 1:
            raise ValueError("--threads must be at least 1")
        return n
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def _finish(args, recorder) -> None:
    recorder.flush()
    if not args.out:
        return
    from .plots import write_plots
    from .records import read_results

    print(f"\nwrote {os.path.join(args.out, 'results.json')} and results.csv")
    if args.no_plots:
        return
    paths, why = write_plots(read_results(args.out), args.out)
    if why:
        print(f"plots: {why}")
    for p in paths:
        print(f"wrote {p}")


def _header(env: dict, extra: str = "") -> str:
    return (f"{env['device']} | torch {env['torch']} | triton {env['triton']} | xformers {env['xformers']} | "
            f"commit {env['git_commit'][:12]} | {env['date']}" + (f"\n{extra}" if extra else ""))


def _table_input(records: list[dict], kind: str) -> tuple[list[dict], dict, str]:
    """The records of one kind, their reasons' footnote numbers and the footnotes."""
    from .records import reasons_footnotes

    rows_in = [r for r in records if r.get("kind") == kind]
    return (rows_in, *reasons_footnotes(rows_in))


def _exit_status(records: list[dict], kind: str, command: str) -> int:
    """The command's exit status from its cases: 1 when none was measured and at least one failed (a run whose
    every case that could run raised is a failed run, for a script or the GPU suite's summary to see), else 0.
    Cases that failed beside measured ones (a third-party kernel refusing an input) are counted on the terminal."""
    cases = [r for r in records if r.get("kind") == kind]
    failed = sum(r.get("status") == "failed" for r in cases)
    if not failed:
        return 0
    if any(r.get("status") == "ok" for r in cases):
        print(f"{failed} of {len(cases)} cases failed: their errors are in the status column")
        return 0
    print(f"fastmae bench {command}: every case that ran failed ({failed} of {len(cases)}; the others were skipped)"
          if failed < len(cases) else f"fastmae bench {command}: every case failed ({failed})", file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------------------ ops
def ops_table(records: list[dict]) -> str:
    from .records import fmt, shape_str, status_cell, table

    rows_in, numbers, notes = _table_input(records, "op")
    rows = []
    for r in rows_in:
        ok = r.get("status") == "ok"
        pct = f"{100 * r['frac_peak']:.1f}%" if ok and r.get("frac_peak") is not None else "-"
        same = f"{100 * r['frac_copy_same_bytes']:.0f}%" if ok and r.get("frac_copy_same_bytes") else "-"
        rows.append([r["op"], r["case"], shape_str(r["shape"]), r["backend"], r["mode"],
                     r.get("median_ms") if ok else None,
                     f"{fmt(r['p20_ms'])}-{fmt(r['p80_ms'])}" if ok else "-",
                     r.get("tflops") if ok else None, r.get("gbps") if ok else None, pct, same,
                     f"{r['speedup']:.2f}x" if ok and r.get("speedup") else "-", status_cell(r, numbers)])
    out = table(["op", "case", "shape", "backend", "mode", "median ms", "p20-p80 ms", "TFLOP/s", "GB/s", "of peak",
                 "of same-size copy", "vs ref", "status"], rows, align="lllllrrrrrrrl")
    out += ("\nof peak: of the large matmul or copy measured first; of same-size copy: of device-to-device "
            "copies moving the op's bytes in as many passes (forward, then backward), timed with the op")
    return out + ("\n" + notes if notes else "")


def run_ops(args) -> int:
    from . import ops_bench
    from .common import parse_list
    from .limits import launch_line, measure_launch_costs, measure_limits
    from .records import read_results

    if args.write_priority:  # checked before anything is measured, as --out is
        _check_priority_file(args.write_priority)
    if args.rank_from:
        if not args.write_priority:
            raise ValueError("--rank-from needs --write-priority FILE")
        records = read_results(args.rank_from)
        types = sorted({r.get("device_type") for r in records if r.get("kind") == "op" and r.get("status") == "ok"})
        if not types:
            raise ValueError(f"{args.rank_from} holds no successful op measurements")
        for t in types:
            first = next(r for r in records if r.get("device_type") == t and r.get("kind") == "op")
            ops_bench.write_priority(args.write_priority, records, t, _priority_source(first))
            print(f"wrote the {t} order to {args.write_priority}")
        _print_priority(args.write_priority)
        return 0

    from ..ops.registry import BACKENDS, OPS
    ops_filter = _known(parse_list(args.ops), (*OPS, "projection"), "op") if args.ops else None
    if args.models:
        _known(parse_list(args.models), ops_bench.MAE_SHAPES, "model size")
    backends = parse_list(args.backends) if args.backends else list(BACKENDS)
    _known(backends, BACKENDS, "backend")
    modes = parse_list(args.modes)
    _known(modes, ops_bench.MODES, "mode")
    device, dtype, recorder, env = _setup(args)
    d = _defaults(args, "ops", device)
    batch = args.batch or d["batch"]
    models = parse_list(args.models or d["models"])

    print(_header(env, f"bench ops: batch {batch}, dtype {dtype}, shapes of ViT-{'/'.join(models)}"))
    limits = measure_limits(device, dtype, quick=args.quick)
    recorder.add(*limits.records())
    print(f"limits measured now: matmul {limits.matmul_tflops:.3g} TFLOP/s ({limits.dtype}, n={limits.matmul_n}), "
          f"copy {limits.copy_gbps:.3g} GB/s")
    launches = measure_launch_costs(device, quick=args.quick, allow_interpreter=args.allow_interpreter)
    recorder.add(*launches)
    print(launch_line(launches) or "launch costs: none measured")
    for r in launches:
        if r["status"] != "ok":
            print(f"  {r['backend']} {r['what']}: {r['status']}: {r['reason']}")
    records = ops_bench.run_ops(device, dtype, batch, models=models, ops_filter=ops_filter, backends=backends,
                                modes=modes, quick=args.quick, limits=limits, timing=_timing(args, "ops", device),
                                allow_interpreter=args.allow_interpreter, on_record=recorder.add,
                                progress=not args.no_progress)
    ops_bench.add_speedups(records)
    print(ops_table(records))
    _finish(args, recorder)
    if args.write_priority:
        ops_bench.write_priority(args.write_priority, recorder.records, device.type,
                                 {**_priority_source(env), "dtype": str(dtype).replace("torch.", ""), "batch": batch})
        print(f"wrote the {device.type} order to {args.write_priority}")
        _print_priority(args.write_priority)
    return _exit_status(records, "op", "ops")


def _check_priority_file(path: str) -> None:
    """Refuse a --write-priority FILE that cannot be written, or that exists and holds no order file (a JSON object,
    which the new order is merged into)."""
    from ..cli import check_output_file
    from .ops_bench import read_priority

    check_output_file(path, "--write-priority")
    read_priority(path)


def _priority_source(stamp: dict) -> dict:
    keep = ("device", "torch", "triton", "xformers", "cuda", "git_commit", "date", "dtype")
    src = {k: stamp[k] for k in keep if k in stamp}
    if "shape" in stamp and isinstance(stamp["shape"], dict) and "B" in stamp["shape"]:
        src["batch"] = stamp["shape"]["B"]
    src["metric"] = ("median forward+backward time at MAE's shapes (forward for gather_patches); per op, the "
                     "geometric mean over cases of each backend's time over the fastest backend's time"
                     + ("; on CUDA the GPU's time, without the host's time to issue the call (host_ms in the "
                        "results, which can be the larger: where a step is bound by the host, the backend with the "
                        "cheaper call can be the faster one there)"
                        if stamp.get("device_type") == "cuda" else ""))
    return src


def _print_priority(path: str) -> None:
    import json

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for dev, per_op in data.items():
        if dev == "source":
            continue
        for op, order in per_op.items():
            print(f"  {dev} {op}: {' > '.join(order)}")


# ------------------------------------------------------------------------------------------ attention
def attention_table(records: list[dict]) -> str:
    from .records import shape_str, status_cell, table

    rows_in, numbers, notes = _table_input(records, "attention")
    rows = []
    for r in rows_in:
        ok = r.get("status") == "ok"

        def x(k):
            return f"{r[k]:.2f}x" if ok and r.get(k) else "-"

        rows.append([r["case"], shape_str(r["shape"]), r["mode"], r["backend"], r.get("median_ms") if ok else None,
                     r.get("tflops") if ok else None, x("vs_sdpa_best"), r.get("sdpa_best", "-") if ok else "-",
                     x("vs_sdpa_flash"), x("vs_xformers"), status_cell(r, numbers)])
    out = table(["case", "shape", "mode", "impl", "median ms", "TFLOP/s", "vs SDPA best", "SDPA best",
                 "vs sdpa-flash", "vs xformers", "status"], rows, align="llllrrrlrrl")
    return out + ("\n" + notes if notes else "")


def run_attention(args) -> int:
    from .attention_bench import IMPLS, MODES, run_attention as bench
    from .common import parse_list

    device, dtype, recorder, env = _setup(args)
    d = _defaults(args, "attention", device)

    def ints(text, what):
        if text in ("", "none"):
            return []
        try:
            values = [int(v) for v in parse_list(text)]
        except ValueError:
            raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
        if any(v < 1 for v in values):
            raise ValueError(f"{what} must be at least 1, got {text!r}")
        return values

    batches = ints(args.batches or d["batches"], "--batches")
    long_ns = ints(args.long_ns if args.long_ns is not None else d["long_ns"], "--long")
    head_dims = ints(args.long_head_dims or d["long_head_dims"], "--long-head-dims")
    impls = _known(parse_list(args.impls), IMPLS, "implementation") if args.impls else list(IMPLS)
    modes = _known(parse_list(args.modes), MODES, "mode")
    models = parse_list(args.models or d["models"])
    from .ops_bench import MAE_SHAPES
    _known(models, MAE_SHAPES, "model size")
    print(_header(env, f"bench attention: {dtype}, MAE batches {batches}, long N {long_ns} at D {head_dims}"))
    records = bench(device, dtype, batches=batches, models=models, long_ns=long_ns, long_head_dims=head_dims,
                    long_tokens=d["long_tokens"], impls=impls, modes=modes, timing=_timing(args, "attention", device),
                    allow_interpreter=args.allow_interpreter, on_record=recorder.add,
                    show_progress=not args.no_progress)
    print(attention_table(records))
    _finish(args, recorder)
    return _exit_status(records, "attention", "attention")


# ------------------------------------------------------------------------------------------ encoder
def encoder_table(records: list[dict]) -> str:
    from .records import fmt, status_cell, table

    rows_in, numbers, notes = _table_input(records, "encoder")
    rows = []
    for r in rows_in:
        ok = r.get("status") == "ok"
        rows.append([r["backend"], r["mode"], r["mask_ratio"], r["shape"]["tokens"],
                     r.get("images_per_s") if ok else None,
                     f"{fmt(r['images_per_s_p20'])}-{fmt(r['images_per_s_p80'])}" if ok else "-",
                     f"{r['speedup']:.2f}x" if ok and r.get("speedup") else "-", f"{r['ideal_speedup']:.2f}x",
                     f"{100 * r['of_ideal']:.0f}%" if ok and r.get("of_ideal") is not None else "-",
                     r.get("dispatch", "") if ok else "", status_cell(r, numbers)])
    out = table(["backend", "mode", "ratio", "tokens", "images/s", "p20-p80", "speedup", "ideal", "of ideal",
                 "served by", "status"], rows, align="llrrrrrrrll")
    return out + ("\n" + notes if notes else "")


def run_encoder(args) -> int:
    from ..cli import check_mask_ratio
    from .common import MODEL_PATHS, num_patches, parse_list, parse_ratios
    from .encoder_bench import ENCODER_MODES, run_encoder as bench

    device, dtype, recorder, env = _setup(args, write_each_record=True)
    d = _defaults(args, "encoder", device)
    model = args.model or d["model"]
    from ..model.mae import MODELS
    _known(model, MODELS, "model")
    batch = args.batch or d["batch"]
    ratios = parse_ratios(args.ratios)
    n = num_patches(model)
    for ratio in ratios:  # else every row of that ratio fails, and the command still succeeds
        check_mask_ratio(ratio, n, "--ratios")
    backends = parse_list(args.backends)
    _known(backends, MODEL_PATHS, "backend")
    modes = parse_list(args.modes)
    _known(modes, ENCODER_MODES, "mode")
    print(_header(env, f"bench encoder: {model}, batch {batch}, {dtype}{' autocast' if dtype != torch.float32 else ''}"
                       f", ratios {ratios}"))
    records = bench(device, model, batch, dtype, ratios, backends, modes, timing=_timing(args, "encoder", device),
                    allow_interpreter=args.allow_interpreter, on_record=recorder.add,
                    show_progress=not args.no_progress, cuda_graphs=args.cuda_graphs)
    print(encoder_table(records))
    _finish(args, recorder)
    return _exit_status(records, "encoder", "encoder")


# ------------------------------------------------------------------------------------------ train
def train_table(records: list[dict]) -> str:
    from .records import fmt, optimizer_cell, own_peak_mem_mb, peak_mem_kind, status_cell, table

    rows_in, numbers, notes = _table_input(records, "train")
    rows = []
    for r in rows_in:
        ok = r.get("status") == "ok"
        mem = own_peak_mem_mb(r) if ok else None
        rows.append([r["backend"], r.get("images_per_s") if ok else None,
                     f"{fmt(r['images_per_s_p20'])}-{fmt(r['images_per_s_p80'])}" if ok else "-",
                     r.get("back_to_back_images_per_s") if ok else None,
                     f"{r['vs_official_eager']:.2f}x" if ok and r.get("vs_official_eager") else "-",
                     f"{r['vs_reference_compile']:.2f}x" if ok and r.get("vs_reference_compile") else "-",
                     mem, r.get("saved_mb_per_image") if ok else None, r.get("tflops") if ok else None,
                     f"{100 * r['mfu']:.1f}%" if ok and r.get("mfu") is not None else "-",
                     optimizer_cell(r) if ok else "-", r.get("dispatch", "") if ok else "", status_cell(r, numbers)])
    out = table(["variant", "images/s", "p20-p80", "back to back", "vs official-eager", "vs reference+compile",
                 "peak MiB", "saved MiB/img", "TFLOP/s", "MFU", "AdamW step", "served by", "status"], rows,
                align="lrrrrrrrrrlll")
    kinds = sorted({peak_mem_kind(r) for r in rows_in if r.get("peak_mem_kind")})
    if kinds:
        out += "\n  peak MiB: " + "; ".join(kinds)
    return out + ("\n" + notes if notes else "")


def profile_table(records: list[dict]) -> str:
    """Per variant: the profiled time per step by kind of work, its sum, and that sum's share of the step (capped at
    100%, with a note: see `records.busy_cell`)."""
    from .records import BUSY_CAPPED_NOTE, busy_cell, fmt, table

    rows_in = [r for r in records if r.get("kind") == "train" and r.get("status") == "ok"]
    kinds: list[str] = []
    for r in rows_in:
        for k in r.get("profile", {}).get("by_kind", {}):
            if k not in kinds:
                kinds.append(k)
    rows = []
    for r in rows_in:
        prof = r.get("profile")
        if prof is None:
            rows.append([r["backend"], "-", "-", "-"] + ["-"] * len(kinds) + [r.get("profile_error", "not profiled")])
            continue
        calls = prof.get("calls")  # absent from records written before it was counted
        rows.append([r["backend"], fmt(prof["busy_ms"]), busy_cell(r.get("busy_share")),
                     f"{calls:,.0f}" if calls is not None else "-"]
                    + [fmt(prof["by_kind"][k]) if k in prof["by_kind"] else "-" for k in kinds] + [""])
    kind = next((r["profile"]["kind"] for r in rows_in if r.get("profile")), "profiled time")
    out = table(["variant", "busy ms", "of the step", "calls"] + [f"{k} ms" for k in kinds] + ["note"], rows,
                align="lrrr" + "r" * len(kinds) + "l")
    if any(row[2].endswith("*") for row in rows):
        out += "\n  " + BUSY_CAPPED_NOTE
    return (f"where the step's time goes ({kind} per step, from a few profiled steps; kinds read from the names; "
            f"calls: kernels launched per step on CUDA, operator calls on a CPU):\n" + out)


def run_train(args) -> int:
    from ..cli import check_mask_ratio
    from .common import num_patches, parse_list
    from .limits import measure_matmul_tflops, sizes
    from .train_bench import VARIANTS, run_train as bench

    device, dtype, recorder, env = _setup(args, write_each_record=True)
    d = _defaults(args, "train", device)
    model = args.model or d["model"]
    from ..model.mae import MODELS
    _known(model, MODELS, "model")
    batch = args.batch or d["batch"]
    if not 0.0 <= args.mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    check_mask_ratio(args.mask_ratio, num_patches(model), "--mask-ratio")  # else every variant fails
    variants = parse_list(args.variants)
    _known(variants, VARIANTS, "variant")
    compile_on = args.compile if args.compile is not None else device.type == "cuda"
    compile_reason = None
    if not compile_on:
        compile_reason = ("torch.compile variants are off by default on the CPU (compiling takes minutes on a "
                          "small CPU); pass --compile to run them") if args.compile is None else \
            "skipped by --no-compile"
    print(_header(env, f"bench train: {model}, batch {batch}, {dtype}{' autocast' if dtype != torch.float32 else ''}"
                       f", mask ratio {args.mask_ratio}"))
    n, _ = sizes(device.type, args.quick)
    peak = measure_matmul_tflops(device, dtype, n, 0.1 if args.quick else 0.5)
    recorder.add({"kind": "limit", "op": "matmul", "case": "bench train", "backend": "torch",
                  "dtype": str(dtype).replace("torch.", ""),
                  "shape": {"M": n, "N": n, "K": n}, "status": "ok", "tflops": peak})
    print(f"matmul peak measured now: {peak:.3g} TFLOP/s ({dtype}, n={n})")
    timing = _timing(args, "train", device)
    compile_timing = {**timing, "warmup": max(timing["warmup"], COMPILE_WARMUP)}
    records = bench(device, model, batch, dtype, mask_ratio=args.mask_ratio, variants=variants,
                    compile_reason=compile_reason, peak_tflops=peak, timing=timing, compile_timing=compile_timing,
                    allow_interpreter=args.allow_interpreter, on_record=recorder.add,
                    show_progress=not args.no_progress, profile=args.profile)
    if args.out:
        _restate_train_ratios(recorder, records, env)
    print(train_table(records))
    if args.profile:
        print(profile_table(records))
    _finish(args, recorder)
    return _exit_status(records, "train", "train")


def _restate_train_ratios(recorder, records: list[dict], env: dict) -> None:
    """The GPU suite times a model's training variants in two runs into one folder (eager, then torch.compile
    with the eager pair again). The other run's records of this model, shape, dtype and mask ratio, from the
    same commit, versions and device, get their ratios (`vs_official_eager`, ...) restated against the records
    the folder keeps now, and this run's get the ratios only the other run can give; both are written back."""
    from .records import STAMP_FIELDS, record_key
    from .train_bench import add_train_speedups

    ok = [r for r in records if r.get("kind") == "train"]
    if not ok:
        return
    group = ("model", "shape", "dtype", "mask_ratio")
    same_run = [k for k in STAMP_FIELDS if k != "date"]
    mine = {record_key(r) for r in ok}
    other = [r for r in recorder.earlier()
             if r.get("kind") == "train" and record_key(r) not in mine
             and all(r.get(k) == ok[0].get(k) for k in group) and all(r.get(k) == env.get(k) for k in same_run)]
    if other:
        add_train_speedups(ok + other)
        recorder.add(*other)


# ------------------------------------------------------------------------------------------ readme
def run_readme(args) -> int:
    from .readme import update_readme
    from .records import REPO_ROOT

    results = args.results or os.path.join(REPO_ROOT, "benchmarks", "results")
    readme = args.readme or os.path.join(REPO_ROOT, "README.md")
    block = update_readme(readme, results, write=not args.print_only)
    if args.print_only:
        print(block)
    else:
        print(f"updated the results block of {readme} from {results}")
    return 0
