"""`fastmae bench attention`: the cases, the forced SDPA kernels, the speedups, and the records it writes."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from fastmae import ops
from fastmae.bench import attention_bench as ab
from fastmae.cli import main

from ..utils import DEVICES, INTERPRETER_RUNS, launched_kernels

QUICK = dict(warmup=1, min_reps=1, max_reps=1, max_time_s=0.0)  # one timed call: the interpreter is slow
THIRD_PARTY = ("sdpa-cudnn", "xformers")  # kernels fastmae does not own


def test_mae_and_long_shapes():
    assert ab.mae_shapes() == [("ViT-B encoder", 12, 50, 64), ("ViT-B/L decoder", 16, 197, 32),
                               ("ViT-L encoder", 16, 50, 64), ("ViT-H encoder", 16, 65, 80),
                               ("ViT-H decoder", 16, 257, 32)]
    assert ab.long_shapes([1024, 8192], [64]) == [("long N=1024 D=64", 16, 16, 1024, 64),
                                                  ("long N=8192 D=64", 2, 16, 8192, 64)]
    with pytest.raises(ValueError, match="unknown model size"):
        ab.mae_shapes(["X"])


def test_each_implementation_runs_what_it_names(monkeypatch):
    """What `bench attention` times under each name is that implementation: the registry serves the backend
    the name stands for (sdpa for SDPA's forced kernels), and fastmae's forced paths launch that path's kernels
    (checked on one call of each timed function; triton runs under the suite's interpreter)."""
    seen = {}
    measure = ab.measure

    def spy(fn, device, **kw):
        with ops.record_choices() as served, launched_kernels() as launched:
            fn()
        seen.update(served=dict(served), kernels={launch.name for launch in launched})
        return measure(fn, device, **kw)

    monkeypatch.setattr(ab, "measure", spy)
    cpu = torch.device("cpu")
    timed = set()
    for impl in ab.IMPLS:
        seen.clear()
        rec = ab.run_case("t", 1, 2, 50, 64, torch.float32, impl, "fwd+bwd", cpu, timing=QUICK,
                          allow_interpreter=True)
        if rec["status"] != "ok":
            assert not seen, impl
            continue
        timed.add(impl)
        if impl in ab.TRITON_PATHS:  # fastmae's kernels called directly, on the named path
            path = ab.TRITON_PATHS[impl]
            assert seen["served"] == {} and f"_attn_fwd_{path}" in seen["kernels"], (impl, seen)
            assert not any(k.startswith("_attn_fwd_") and not k.endswith(path) for k in seen["kernels"]), seen
        else:
            assert seen["served"] == {"attention": ab.backend_of(impl)}, (impl, seen)
            assert bool(seen["kernels"]) == (impl == "triton"), (impl, seen)
    # on a CPU: SDPA's own choice and its math kernel; triton on its short forward, and its flash path forced
    wanted = {"sdpa", "sdpa-math"} | ({"triton", "triton-flash"} if INTERPRETER_RUNS else set())
    assert wanted <= timed, timed


def dtype_of(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def _run(device: str) -> list[dict]:
    """MAE's cases with 2 heads instead of 12 and 16 (their tokens and head sizes kept): under the interpreter
    the time goes with the number of programs, one per head."""
    device = torch.device(device)
    mae_shapes, long_shapes = ab.mae_shapes, ab.long_shapes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ab, "mae_shapes", lambda *a: [(c, 2, n, d) for c, _, n, d in mae_shapes(*a)])
        mp.setattr(ab, "long_shapes", lambda *a: [(c, b, 2, n, d) for c, b, _, n, d in long_shapes(*a)])
        return ab.run_attention(device, dtype_of(device), batches=[1], models=["B"], long_ns=[64],
                                long_head_dims=[32], long_tokens=64, impls=list(ab.IMPLS), timing=QUICK,
                                allow_interpreter=True, show_progress=False)


@pytest.fixture(scope="module")
def runs():
    """One quick run per device, shared by the tests below (triton runs under the interpreter on a CPU)."""
    return {}


@pytest.mark.parametrize("device", DEVICES)
def test_records_speedups_and_reasons(device, runs):
    if device not in runs:
        runs[device] = _run(device)
    recs = runs[device]
    device = torch.device(device)
    cases = {("ViT-B encoder", 1), ("ViT-B decoder", 1), ("long N=64 D=32", 1)}
    assert {(r["case"], r["shape"]["B"]) for r in recs} == cases
    assert len(recs) == len(cases) * len(ab.MODES) * len(ab.IMPLS)
    for r in recs:
        # fastmae's own paths and SDPA's common kernels never fail; a third-party kernel that raises on some
        # input (cuDNN's or xformers' on a GPU) is recorded as failed with its error, not fatal to the run
        assert r["kind"] == "attention" and r["status"] in ("ok", "skipped") or (
            r["status"] == "failed" and r["backend"] in THIRD_PARTY and r["reason"]), r
        if r["status"] != "ok":
            assert r["reason"]
            continue
        s = r["shape"]
        fwd = 4.0 * s["N"] ** 2 * s["D"] * s["B"] * s["H"]
        assert r["flops"] == (fwd if r["mode"] == "fwd" else 3.5 * fwd)
        assert r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
    ok = {(r["case"], r["mode"], r["backend"]): r for r in recs if r["status"] == "ok"}
    # SDPA's own choice and its math kernel run everywhere; triton too, where it serves (on a CPU only under
    # its interpreter, as in the CPU suite; elsewhere it is skipped with that reason)
    triton_serves = not ab.case_reasons(ab.attention_case("t", 1, 1, 8, 32, dtype_of(device)), "triton", device,
                                        allow_interpreter=True)
    for case in ("ViT-B encoder", "long N=64 D=32"):
        for impl in ("sdpa", "sdpa-math") + (("triton",) if triton_serves else ()):
            assert (case, "fwd+bwd", impl) in ok, impl
    if not triton_serves:
        assert all("interpreter" in r["reason"] for r in recs if r["backend"] == "triton")
    # the speedups: the fastest SDPA kernel's time over each implementation's
    for (case, mode, impl), r in ok.items():
        sdpa = {b: o["median_ms"] for (c, m, b), o in ok.items() if c == case and m == mode and b.startswith("sdpa")}
        best = min(sdpa, key=sdpa.get)
        assert r["sdpa_best"] == best and r["vs_sdpa_best"] == pytest.approx(sdpa[best] / r["median_ms"])
        if (case, mode, "sdpa-flash") in ok:
            assert r["vs_sdpa_flash"] == pytest.approx(ok[(case, mode, "sdpa-flash")]["median_ms"] / r["median_ms"])
    if device.type == "cpu":  # kernels SDPA does not have on a CPU are skipped with its own words
        cudnn = [r for r in recs if r["backend"] == "sdpa-cudnn"]
        assert cudnn and all(r["status"] == "skipped" and "backend" in r["reason"] for r in cudnn)
        xf = [r for r in recs if r["backend"] == "xformers"]
        assert all(r["status"] == "skipped" and "xformers" in r["reason"] for r in xf)


def test_case_order_puts_both_kinds_first():
    recs = ab.run_attention(torch.device("cpu"), torch.float32, batches=[1, 2], models=["B"], long_ns=[64],
                            long_head_dims=[32], long_tokens=64, impls=["sdpa"], modes=["fwd"], timing=QUICK,
                            show_progress=False)
    assert [(r["case"], r["shape"]["B"]) for r in recs] == [
        ("ViT-B encoder", 1), ("ViT-B decoder", 1), ("long N=64 D=32", 1), ("ViT-B encoder", 2),
        ("ViT-B decoder", 2)]


def test_math_is_not_timed_on_very_long_sequences():
    rec = ab.run_case("long", 1, 1, 4096, 16, torch.float32, "sdpa-math", "fwd", torch.device("cpu"), timing=QUICK)
    assert rec["status"] == "skipped" and "4096 x 4096" in rec["reason"]


def test_forced_kernel_is_the_one_that_runs():
    """Under `sdpa-math` SDPA runs its math kernel: with math disabled by the context, a math-only call fails."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 8, 16)
    with ab.sdpa_kernel_context("sdpa-math"):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # math serves
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # nothing serves a CPU tensor
    assert isinstance(ab.sdpa_kernel_context("triton"), type(ab.contextlib.nullcontext()))


def test_cli_writes_records(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["bench", "attention", "--quick", "--device", "cpu", "--no-progress",
                 "--impls", "sdpa,sdpa-math,sdpa-flash", "--models", "B", "--out", str(out)]) == 0
    recs = [r for r in json.loads((out / "results.json").read_text()) if r["kind"] == "attention"]
    assert recs and all(r["device_type"] == "cpu" and r["git_commit"] for r in recs)
    assert {r["backend"] for r in recs} == {"sdpa", "sdpa-math", "sdpa-flash"}
    assert "vs SDPA best" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib"):  # the plots --out promises: TFLOP/s per case and implementation
        assert (out / "attention.png").stat().st_size > 1000
    assert main(["bench", "attention", "--quick", "--device", "cpu", "--impls", "nope"]) == 2
    assert main(["bench", "attention", "--quick", "--device", "cpu", "--batches", "0"]) == 2
    assert "--batches must be at least 1" in capsys.readouterr().err


def test_summary_states_the_gpu_targets():
    """The suite summary's key lines for triton's attention and memory-bound ops, with the issue's targets on
    CUDA records (synthetic records: the figures are the inputs)."""
    from fastmae.bench.suite import key_results

    att = {"kind": "attention", "status": "ok", "backend": "triton", "mode": "fwd+bwd", "device_type": "cuda",
           "shape": {"B": 64, "H": 12, "N": 50, "D": 64}, "tflops": 100.0, "sdpa_best": "sdpa-flash",
           "vs_sdpa_best": 1.4, "vs_sdpa_flash": 1.4, "vs_xformers": 1.6}
    op = {"kind": "op", "op": "gather_tokens", "case": "ViT-B gathered", "mode": "fwd", "backend": "triton",
          "status": "ok", "device_type": "cuda", "gbps": 2000.0, "frac_peak": 0.5, "frac_copy_same_bytes": 0.9,
          "speedup": 3.0}
    lines = key_results([{**att, "case": "ViT-B encoder"}, {**att, "case": "long N=4096 D=64"}, op,
                         {**op, "backend": "sdpa"}, {**att, "case": "ViT-B encoder", "mode": "fwd"}])
    assert lines == [
        "- attention ViT-B encoder batch 64 fwd+bwd, triton: 100 TFLOP/s, 1.40x the fastest SDPA kernel "
        "(sdpa-flash), 1.40x sdpa-flash, 1.60x xformers (GPU target: >= 1.3x the fastest SDPA kernel)",
        "- attention long N=4096 D=64 batch 64 fwd+bwd, triton: 100 TFLOP/s, 1.40x the fastest SDPA kernel "
        "(sdpa-flash), 1.40x sdpa-flash, 1.60x xformers (GPU target: >= 0.9x SDPA's flash kernel)",
        "- gather_tokens ViT-B gathered fwd, triton: 2,000 GB/s, 50% of the copy bandwidth, 90% of a copy of the "
        "same bytes, 3.00x reference (GPU targets: >= 80% of copy bandwidth, read against the copy of the same "
        "bytes; >= 2.0x reference)"]


def test_readme_attention_table(runs):
    from fastmae.bench.readme import attention_section

    if "cpu" not in runs:
        runs["cpu"] = _run("cpu")
    recs = runs["cpu"]
    lines = attention_section(recs)
    assert lines[0].startswith("**Attention** (float32), forward+backward")
    rows = [ln for ln in lines if ln.startswith("| ViT-B") or ln.startswith("| long")]
    assert [r.split(" | ")[0] for r in rows] == ["| ViT-B encoder", "| ViT-B decoder", "| long N=64 D=32"]
    triton = {r["case"]: r for r in recs if r["backend"] == "triton" and r["mode"] == "fwd+bwd"}
    for row in rows:
        t = triton[row.split(" | ")[0][2:]]
        if t["status"] == "ok":  # TFLOP/s, the speedup over the fastest SDPA kernel, and that kernel's name
            assert f"{t['vs_sdpa_best']:.2f}x" in row and t["sdpa_best"] in row
        else:
            assert "–" in row
    assert attention_section([]) == []


@pytest.mark.parametrize("device", DEVICES)
def test_forced_triton_paths(device, runs):
    """triton-short / triton-flash are timed only where they differ from triton's own choice and can serve the
    shape, each with its speedup over that choice; elsewhere they are skipped with the reason."""
    if device not in runs:
        runs[device] = _run(device)
    recs = [r for r in runs[device] if r["backend"] in ab.TRITON_PATHS]
    assert {r["backend"] for r in recs} == set(ab.TRITON_PATHS)
    auto = {(r["case"], r["mode"]) for r in runs[device] if r["backend"] == "triton" and r["status"] == "ok"}
    if not auto:  # triton cannot run here at all (e.g. its interpreter with this NumPy): the registry said why
        pytest.skip(next(r["reason"] for r in runs[device] if r["backend"] == "triton"))
    timed = [r for r in recs if r["status"] == "ok"]
    assert timed, recs  # the ViT-B encoder's flash path at least (triton takes the short one there)
    for r in timed:
        assert (r["case"], r["mode"]) in auto and r["vs_triton"] > 0, r
    for r in recs:
        if r["status"] == "skipped":
            assert "what `triton` takes here" in r["reason"] or "does not fit" in r["reason"] \
                or "at most" in r["reason"], r
    enc = {r["mode"]: r for r in recs if r["case"] == "ViT-B encoder" and r["backend"] == "triton-short"}
    assert enc["fwd"]["status"] == "skipped" and "what `triton` takes here" in enc["fwd"]["reason"], enc


def test_summary_names_the_faster_path():
    """The suite's key results give each forced path's speedup over triton's own choice at MAE's shapes."""
    from fastmae.bench.suite import attention_key_results

    base = {"kind": "attention", "case": "ViT-B/L decoder", "shape": {"B": 64, "H": 16, "N": 197, "D": 32},
            "mode": "fwd+bwd", "status": "ok", "dtype": "bfloat16", "device_type": "cuda"}
    recs = [{**base, "backend": "triton", "median_ms": 1.0, "tflops": 50.0},
            {**base, "backend": "triton-flash", "median_ms": 0.8, "tflops": 62.5},
            {**base, "backend": "sdpa-flash", "median_ms": 1.2, "tflops": 41.7}]
    ab.add_speedups(recs)
    lines = attention_key_results(recs)
    assert "- attention ViT-B/L decoder batch 64 fwd+bwd, triton-flash: 1.25x triton's own path choice" in lines
    assert any(line.startswith("- attention ViT-B/L decoder batch 64 fwd+bwd, triton: 50 TFLOP/s") for line in lines)
    assert not any("to issue" in line for line in lines)  # no host times recorded: none quoted


def test_summary_sets_the_host_time_beside_sdpas():
    """Where both were recorded, triton's line gives its host time to issue the call beside SDPA's own choice's
    (sdpa's, not one of its forced kernels'), at the same case, batch and mode."""
    from fastmae.bench.suite import attention_key_results

    base = {"kind": "attention", "case": "ViT-B encoder", "shape": {"B": 64, "H": 12, "N": 50, "D": 64},
            "mode": "fwd+bwd", "status": "ok", "dtype": "bfloat16", "device_type": "cuda"}
    recs = [{**base, "backend": "triton", "median_ms": 0.05, "tflops": 36.0, "host_ms": 0.59},
            {**base, "backend": "sdpa", "median_ms": 0.12, "tflops": 15.0, "host_ms": 0.46},
            {**base, "backend": "sdpa-flash", "median_ms": 0.17, "tflops": 10.0, "host_ms": 0.30},
            {**base, "backend": "sdpa", "shape": {**base["shape"], "B": 256}, "median_ms": 0.4, "host_ms": 0.9}]
    ab.add_speedups(recs)
    assert recs[0]["sdpa_host_ms"] == 0.46 and recs[2]["sdpa_host_ms"] == 0.46
    assert recs[3]["sdpa_host_ms"] == 0.9  # B 256: its own
    line, = [x for x in attention_key_results(recs) if ", triton: " in x]
    assert line.endswith("; host 590 µs to issue (sdpa 460 µs)"), line
