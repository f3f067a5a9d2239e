"""Compile the Triton kernels a GPU benchmark run will launch, before it, in parallel, into Triton's cache.

Triton compiles each new kernel specialisation on its first launch, in the launching process, one at a time:
0.1 to 0.7 s each on this project's kernels. The benchmark parts of `benchmarks/gpu_suite.sh` meet some
seventy distinct ones (attention at MAE's and the long shapes on both paths, the token and loss ops at the widths
of ViT-B/L/H, the encoder at five mask ratios), so each part would spend a good share of its time limit
compiling, one kernel after another, while the GPU waits.

`python -m fastmae.bench.warm` records the launches of those workloads on the CPU without running anything
(`fastmae.kernels.compile_check.record_launches`, settings chosen for the GPU's compute capability), keeps one
launch per distinct specialisation, and compiles each one through Triton's own launch path
(`JITFunction.run(..., warmup=True)`: the specialisation and cache key of the launch itself) in worker
processes. The benchmarks then load them from Triton's on-disk cache. The GPU suite runs it beside the test
suite, which uses the GPU little and the CPU much.

Batch sizes: the workloads run at batch 16 (the long attention cases at their own shapes). Triton specialises
integers by divisibility by 16 and equality to 1, so every batch that is a multiple of 16 (the benchmarks use 64
to 512) gives the same kernels; only the grid differs.

The compile workers always use a stand-in driver that only names the target GPU (nothing is loaded or launched,
and no CUDA context is opened beside the tests); on a GPU machine the target is that GPU's, and the workers also
build each kernel's C launcher (triton 3.6 compiles one with gcc per kernel signature at the first launch).
`--arch 90` compiles for that GPU without one: the CPU tests exercise the whole path that way.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import torch

from .common import error_line

WORKLOAD_BATCH = 16
BENCH_MODELS = ("mae_vit_base_patch16", "mae_vit_large_patch16")
HIT_S = 0.075  # without Triton's compilation listener: a warm-up this fast loaded the kernel from the cache


# ------------------------------------------------------------------------------------------ workloads
def _ops_launches(models: Sequence[str], dtype: torch.dtype, batch: int) -> None:
    """Every triton case of `bench ops` (forward and forward+backward) at `batch`."""
    from .ops_bench import make_runner, mae_cases, release_inputs, undrawn_inputs

    cpu = torch.device("cpu")
    try:
        with undrawn_inputs():  # recorded, not run: no value is used
            for case in mae_cases(batch, dtype, models, None, False):
                if case.registry_inputs is not None:
                    for mode in case.modes:
                        make_runner(case, "triton", mode, cpu)()
    finally:
        release_inputs()


def _attention_launches(models: Sequence[str], dtype: torch.dtype, batch: int, long_ns: Sequence[int],
                        long_head_dims: Sequence[int], long_tokens: int) -> None:
    """`bench attention`'s triton, triton-short and triton-flash at MAE's shapes and the long ones."""
    from .attention_bench import MODES, TRITON_PATHS, forced_path_case, long_shapes, mae_shapes
    from .ops_bench import attention_case, make_runner, release_inputs, undrawn_inputs

    cpu = torch.device("cpu")
    shapes = [(name, batch, h, n, d) for name, h, n, d in mae_shapes(models)]
    shapes += long_shapes(long_ns, long_head_dims, long_tokens)
    try:
        with undrawn_inputs():  # recorded, not run: no value is used (the long cases' samples took 16 s to draw)
            for name, b, h, n, d in shapes:
                for mode in MODES:
                    for path in (None, *TRITON_PATHS.values()):
                        case = attention_case(name, b, h, n, d, dtype)
                        if path is not None:
                            case, why = forced_path_case(case, n, d, dtype, path, mode, cpu)
                            if why:
                                continue
                        make_runner(case, "triton", mode, cpu)()
    finally:
        release_inputs()


def bench_workloads(models: Sequence[str] = BENCH_MODELS, dtype: str = "bf16", ratios: Sequence[float] | None = None,
                    batch: int = WORKLOAD_BATCH) -> list[tuple[str, Callable[[], None]]]:
    """(label, function) pairs whose Triton launches the GPU suite's benchmarks make: `bench ops` and `bench
    attention` with their CUDA defaults (`fastmae.bench.cli.DEFAULTS`), `bench encoder` (forward under no_grad
    and forward+backward, every ratio: its default ones unless `ratios` is given) and `bench train` (a step at
    75%, without norm_pix_loss as the official default) for `models`, in `dtype`."""
    from ..kernels.compile_check import _DTYPES, Workload
    from .cli import DEFAULTS, ENCODER_RATIOS
    from .common import parse_list, parse_ratios

    torch_dtype = getattr(torch, _DTYPES[dtype])
    ratios = parse_ratios(ENCODER_RATIOS) if ratios is None else ratios
    op_models = parse_list(DEFAULTS["ops"]["cuda"]["models"])
    att = DEFAULTS["attention"]["cuda"]
    att_models = parse_list(att["models"])
    long_ns = [int(n) for n in parse_list(att["long_ns"])]
    long_head_dims = [int(d) for d in parse_list(att["long_head_dims"])]
    long_tokens = int(att["long_tokens"])
    out: list[tuple[str, Callable[[], None]]] = [
        (f"bench ops {','.join(op_models)} {dtype} b{batch}", lambda: _ops_launches(op_models, torch_dtype, batch)),
        (f"bench attention {','.join(att_models)} {dtype} b{batch} + long",
         lambda: _attention_launches(att_models, torch_dtype, batch, long_ns, long_head_dims, long_tokens)),
    ]
    for model in models:
        for ratio in ratios:
            for grad in (False, True):
                w = Workload(model, dtype, batch=batch, mask_ratio=ratio, grad=grad)
                out.append((w.label, w.run))
        w = Workload(model, dtype, batch=batch, mask_ratio=0.75, norm_pix_loss=False)
        out.append((w.label, w.run))
    return out


def quick_workloads() -> list[tuple[str, Callable[[], None]]]:
    """A tiny model's training step: the CPU tests' smoke run of the whole path."""
    from ..kernels.compile_check import Workload

    w = Workload("mae_vit_tiny_patch4", "fp32", batch=WORKLOAD_BATCH, mask_ratio=0.75)
    return [(w.label, w.run)]


# ------------------------------------------------------------------------------------------ recipes
def _encode(value: Any) -> Any:
    """A launch argument as JSON: tensors by dtype and 16-byte alignment (all that Triton specialises them on)."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot describe a launch argument of type {type(value).__name__}")


class _Pointer:
    """What Triton's launcher reads of a tensor argument: its dtype and its address (0: aligned, 8: not)."""

    def __init__(self, dtype: torch.dtype, aligned: bool):
        self.dtype = dtype
        self._address = 0 if aligned else 8

    def data_ptr(self) -> int:
        return self._address


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "tensor" in value:
        return _Pointer(getattr(torch, value["tensor"]), value["aligned"])
    if isinstance(value, dict) and "dtype" in value:
        return getattr(torch, value["dtype"])
    return value


def collect(workloads: Sequence[tuple[str, Callable[[], None]]], arch: int) -> tuple[list[dict], list[str]]:
    """One recipe (kernel, encoded arguments, label) per distinct specialisation the workloads launch on a GPU of
    compute capability arch/10, and the errors of workloads that could not be recorded."""
    from ..kernels import compile_check as cc

    recipes: dict[tuple, dict] = {}
    errors = []
    for label, run in workloads:
        try:  # one workload that breaks (recording, specialising or encoding) does not stop the others
            launches = cc.recorded_specs(run, arch)
            if not launches:
                raise RuntimeError("the workload launched no Triton kernel")
            found = {}
            for key, spec, call in launches:
                if key in recipes or key in found:
                    continue
                fn = cc.python_function(call.fn)
                found[key] = {"module": fn.__module__, "kernel": fn.__name__, "name": spec.name, "source": label,
                              "args": [_encode(a) for a in call.args],
                              "kwargs": {k: _encode(v) for k, v in call.kwargs.items()}}
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{label}: {error_line(exc)}")
            continue
        recipes.update(found)
    return list(recipes.values()), errors


# ------------------------------------------------------------------------------------------ compiling
def _write_json(path: str, data) -> None:
    """Whole or not at all (a worker killed mid-write leaves the previous file)."""
    from ..model.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(data))


def warm_here(recipes: Sequence[dict], arch: int, launchers: bool = False, out_path: str | None = None) -> list[dict]:
    """Compile each recipe in this process for compute capability arch/10, through Triton's launch path in
    warm-up mode (`JITFunction.run(..., warmup=True)`) with a stand-in driver that names the target: no GPU
    is touched, and the nvidia backend's options and compiler never ask the driver anything else, so the cache
    keys are a real launch's. With `launchers` (a GPU machine), also build each kernel's C launcher, which
    triton 3.6 compiles with gcc on a kernel's first launch (triton 3.9's launcher is generic).

    One result per recipe: name, seconds, whether it came from the cache, the error if any. With `out_path`,
    {"results": [...], "current": the recipe being compiled} is rewritten before and after each one, so a
    worker stopped by its time limit or a crash still reports what it did, and where it stopped."""
    import importlib

    from triton.runtime import driver
    from ..kernels.compile_check import TargetDriver
    driver.set_active(TargetDriver(arch))
    try:  # outside the timings: the first compile's fixed costs (Triton hashes its own library for the cache
        # key, and the backend asks ptxas for its version: a few tenths of a second)
        from triton.compiler.compiler import make_backend
        from triton.runtime.cache import triton_key
        triton_key()
        make_backend(driver.active.get_current_target()).hash()
    except Exception:  # noqa: BLE001 - only a warm-up of the warm-up
        pass
    launcher_cls = None
    if launchers:
        try:
            from triton.backends.nvidia.driver import CudaLauncher as launcher_cls
        except ImportError:
            launcher_cls = None
    hits: list[bool] = []  # Triton's compilation listener says whether each compile came from its cache
    from triton import knobs
    knobs.compilation.listener = lambda **kw: hits.append(bool(kw.get("cache_hit")))
    results: list[dict] = []
    for recipe in recipes:
        hits.clear()
        if out_path:
            _write_json(out_path, {"results": results, "current": recipe["name"]})
        res = {"name": recipe["name"], "source": recipe["source"]}
        try:
            kernel = getattr(importlib.import_module(recipe["module"]), recipe["kernel"])  # outside the timing
        except Exception as exc:  # noqa: BLE001 - reported per kernel
            results.append({**res, "ok": False, "error": error_line(exc, 500), "seconds": 0.0, "cached": False})
            continue
        t0 = time.perf_counter()
        try:
            args = [_decode(a) for a in recipe["args"]]
            kwargs = {k: _decode(v) for k, v in recipe["kwargs"].items()}
            compiled = kernel.run(*args, grid=(1,), warmup=True, **kwargs)
            res["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported per kernel
            compiled, res["ok"] = None, False
            res["error"] = error_line(exc, 500)
        res["seconds"] = time.perf_counter() - t0
        res["cached"] = res["ok"] and (all(hits) if hits else res["seconds"] < HIT_S)
        if launcher_cls is not None and compiled is not None:
            try:
                launcher_cls(compiled.src, compiled.metadata)
            except Exception as exc:  # noqa: BLE001 - the launch builds it again, and says why
                res["launcher_error"] = error_line(exc)
        results.append(res)
    if out_path:
        _write_json(out_path, {"results": results, "current": None})
    return results


def warm(recipes: Sequence[dict], workers: int, arch: int, launchers: bool = False,
         timeout_s: float = 600.0) -> tuple[list[dict], list[str]]:
    """`warm_here` spread over `workers` fresh processes (Triton's interpreter off in them): the kernels'
    results as far as the workers got, and what went wrong with workers (a timeout, a crash: which kernel it
    was compiling and the end of its error output)."""
    if not recipes:
        return [], []
    workers = max(1, min(workers, len(recipes)))
    from ..kernels.compile_check import worker_env

    env = worker_env()
    results: list[dict] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fastmae-warm-") as tmp:
        procs = []
        for i in range(workers):
            job, out, err = (os.path.join(tmp, f"{what}{i}.json") for what in ("job", "out", "err"))
            with open(job, "w", encoding="utf-8") as f:
                json.dump({"recipes": list(recipes[i::workers]), "arch": arch, "launchers": launchers}, f)
            with open(err, "w", encoding="utf-8") as errf:  # a file, not a pipe: a chatty worker never blocks
                proc = subprocess.Popen([sys.executable, "-m", "fastmae.bench.warm", "--worker", job, out],
                                        env=env, stdout=subprocess.DEVNULL, stderr=errf)
            procs.append((i, proc, out, err))
        deadline = time.monotonic() + timeout_s
        for i, proc, out, err in procs:
            timed_out = False
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                timed_out = True
            state = {"results": [], "current": None}
            try:
                with open(out, encoding="utf-8") as f:
                    state = json.load(f)
            except (OSError, ValueError):
                pass
            results += state["results"]
            if timed_out or proc.returncode != 0:
                with open(err, encoding="utf-8", errors="replace") as f:
                    tail = [line for line in f.read().strip().splitlines() if line.strip()][-1:]
                what = f"timed out after {timeout_s:g} s" if timed_out else f"exited with code {proc.returncode}"
                where = f" while compiling {state['current']}" if state.get("current") else ""
                problems.append(f"worker {i} {what}{where}" + (f": {tail[0][:300]}" if tail else "")
                                + f" ({len(state['results'])} of its kernels done)")
    return results, problems


def summary(recipes: Sequence[dict], results: Sequence[dict], problems: Sequence[str], seconds: float,
            workers: int) -> str:
    compiled = sum(1 for r in results if r["ok"] and not r["cached"])
    cached = sum(1 for r in results if r["cached"])
    failed = [r for r in results if not r["ok"]]
    cpu_s = sum(r["seconds"] for r in results)
    lines = [f"{len(results)} of {len(recipes)} distinct launches warmed in {seconds:.1f} s with {workers} "
             f"worker(s): {compiled} compiled ({cpu_s:.1f} s of compiling in all), {cached} already in Triton's "
             f"cache, {len(failed)} failed"]
    lines += [f"  failed: {r['name']} (from {r['source']}): {r['error']}" for r in failed]
    lines += [f"  {p}" for p in problems]
    launcher_errors = sorted({r["launcher_error"] for r in results if r.get("launcher_error")})
    lines += [f"  launcher not built ahead (the launch builds it): {e}" for e in launcher_errors[:3]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..cli import user_path

    p = argparse.ArgumentParser(
        prog="python -m fastmae.bench.warm",
        description="Compile, in parallel and into Triton's cache, the kernels the GPU suite's benchmarks will "
                    "launch (recorded on the CPU without running anything; compiled through Triton's own launch "
                    "path, so the launches find them).")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                   help="compile processes (default: half the CPUs, at most 8)")
    p.add_argument("--arch", type=int, default=None,
                   help="compile for this compute capability (90: H100) without a GPU; default: this machine's GPU")
    p.add_argument("--quick", action="store_true", help="a tiny model's training step only (the CPU tests)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds the compile workers may take")
    p.add_argument("--json", metavar="FILE", type=user_path, help="also write every kernel's result to FILE")
    p.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        with open(args.worker[0], encoding="utf-8") as f:
            job = json.load(f)
        warm_here(job["recipes"], job["arch"], job.get("launchers", False), args.worker[1])
        return 0

    from ..kernels.compile_check import interpreter_active

    if interpreter_active():
        print("warm: Triton's interpreter is on in this process (TRITON_INTERPRET); run without it",
              file=sys.stderr)
        return 2
    arch = args.arch
    on_gpu = arch is None
    if on_gpu:
        if not torch.cuda.is_available():
            print("warm: no GPU here; pass --arch (80 or 90) to compile for one without it", file=sys.stderr)
            return 2
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    torch.set_num_threads(min(2, torch.get_num_threads()))  # it runs beside the test suite: leave it the CPUs
    t0 = time.perf_counter()
    recipes, errors = collect(quick_workloads() if args.quick else bench_workloads(), arch)
    traced_s = time.perf_counter() - t0
    print(f"recorded {len(recipes)} distinct launches for sm_{arch} in {traced_s:.1f} s", flush=True)
    for e in errors:
        print(f"  could not record {e}")
    results, problems = warm(recipes, args.workers, arch, launchers=on_gpu, timeout_s=args.timeout)
    print(summary(recipes, results, problems, time.perf_counter() - t0 - traced_s,
                  max(1, min(args.workers, len(recipes)))))
    if args.json:
        from ..model.checkpoint import atomic_write_text

        atomic_write_text(args.json, json.dumps({"arch": arch, "results": results, "record_errors": errors,
                                                 "worker_problems": problems}, indent=1))
    failed = errors or problems or any(not r["ok"] for r in results) or len(results) < len(recipes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
