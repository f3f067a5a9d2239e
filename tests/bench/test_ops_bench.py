"""`fastmae bench ops` in quick mode: record fields, backends listed with the registry's reasons, what the
benchmarked functions compute (checked against the reference backend), and the measured-order file."""
from __future__ import annotations

import json

import pytest
import torch

from fastmae import ops
from fastmae.bench import ops_bench
from fastmae.bench.limits import measure_limits

from ..utils import INTERPRETER_RUNS, assert_close

CPU = torch.device("cpu")
QUICK_TIMING = dict(warmup=1, min_reps=2, max_reps=2, max_time_s=0.0)
# fp32 on the CPU: the backends differ only in summation order
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def quick_records():
    limits = measure_limits(CPU, torch.float32, quick=True)
    recs = ops_bench.run_ops(CPU, torch.float32, 1, models=("B",),
                             ops_filter=("attention", "gather_tokens", "gather_patches"),
                             quick=True, limits=limits, timing=QUICK_TIMING, progress=False)
    return ops_bench.add_speedups(recs), limits


def test_records_carry_the_fields(quick_records):
    recs, limits = quick_records
    assert limits.matmul_tflops > 0 and limits.copy_gbps > 0
    assert {r["backend"] for r in recs} == set(ops.BACKENDS)  # every backend listed, served or not
    for r in recs:
        for field in ("kind", "op", "case", "backend", "mode", "shape", "dtype", "status"):
            assert field in r, field
        if r["status"] == "ok":
            assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["reps"] == 2
            assert r["frac_peak"] > 0
            assert ("tflops" in r) == (r["op"] == "attention") and ("gbps" in r) == (r["op"] != "attention")
            if "gbps" in r:  # memory-bound: also against a copy that moves as many bytes, timed alike
                assert r["copy_same_bytes_gbps"] > 0
                assert r["frac_copy_same_bytes"] == pytest.approx(r["gbps"] / r["copy_same_bytes_gbps"])
        else:
            assert r["reason"], r
    ok = {(r["op"], r["backend"], r["mode"]) for r in recs if r["status"] == "ok"}
    assert ("attention", "sdpa", "fwd+bwd") in ok and ("gather_tokens", "reference", "fwd") in ok
    ref = [r for r in recs if r["status"] == "ok" and r["backend"] == "reference"]
    assert ref and all(r["speedup"] == 1.0 for r in ref)


def test_skipped_backends_carry_the_registry_reason(quick_records):
    recs, _ = quick_records
    case = ops_bench.mae_cases(1, torch.float32, ("B",), ("attention",), quick=True)[0]
    xf = next(r for r in recs if r["op"] == "attention" and r["backend"] == "xformers")
    expected = ops.not_supported_reasons("attention", "xformers", case.registry_inputs(case.build(CPU, False)))
    assert xf["status"] == "skipped" and xf["reason"] == "; ".join(expected)
    assert "cuda" in xf["reason"]
    # under the test suite's interpreter the registry lets triton serve CPU tensors; the benchmark says why not
    tr = next(r for r in recs if r["op"] == "attention" and r["backend"] == "triton")
    assert tr["status"] == "skipped" and "interpreter" in tr["reason"]


def test_triton_without_interpreter_is_skipped_with_the_registry_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = ops_bench.mae_cases(1, torch.float32, ("B",), ("gather_tokens",), quick=True)[0]
    rec = ops_bench.run_case(case, "triton", "fwd", CPU, None)
    expected = ops.not_supported_reasons("gather_tokens", "triton", case.registry_inputs(case.build(CPU, False)))
    assert expected and rec["status"] == "skipped" and rec["reason"] == "; ".join(expected)


@pytest.mark.parametrize("op", ["attention", "gather_tokens", "unshuffle_tokens", "masked_mse_loss"])
def test_benchmarked_functions_match_the_reference(op, monkeypatch):
    """What is timed is the real op: each runner dispatches to the backend it names (recorded by the registry),
    and each serving backend's output (fwd) and gradients (fwd+bwd) equal the reference backend's within fp32
    tolerance (atol 1e-5, rtol 1e-4). triton runs under the suite's interpreter here, which the benchmark
    itself refuses to time: the cases are ViT-B's at 64 pixels (16 patches) instead of 224, to keep it short."""
    monkeypatch.setattr(ops_bench, "IMG", 64)
    def run(backend, mode):
        runner = ops_bench.make_runner(case, backend, mode, CPU)
        with ops.record_choices() as served:
            result = runner()
        assert served.get(case.op) == backend, f"{case.op} {case.name} {backend} {mode}: served by {served}"
        return result

    for case in ops_bench.mae_cases(1, torch.float32, ("B",), (op,), quick=True):
        ref_fwd, ref_bwd = run("reference", "fwd"), run("reference", "fwd+bwd")
        compared = []
        for backend in ops.BACKENDS:
            if backend == "reference" or ops_bench.case_reasons(case, backend, CPU, allow_interpreter=True):
                continue
            compared.append(backend)
            assert_close(run(backend, "fwd"), ref_fwd, ATOL, RTOL, f"{case.op} {case.name} {backend} fwd")
            for g, g_ref, name in zip(run(backend, "fwd+bwd"), ref_bwd, case.grad_leaves):
                assert_close(g, g_ref, ATOL, RTOL, f"{case.op} {case.name} {backend} grad {name}")
        wanted = {"sdpa", "triton"} if INTERPRETER_RUNS else {"sdpa"}
        assert wanted <= set(compared), f"{case.op} {case.name}: compared only {compared}"


def test_gather_patches_is_forward_only_and_matches():
    case = ops_bench.mae_cases(1, torch.float32, ("B",), ("gather_patches",), quick=True)[0]
    assert case.modes == ("fwd",)
    out = ops_bench.make_runner(case, "sdpa", "fwd", CPU)()
    assert_close(out, ops_bench.make_runner(case, "reference", "fwd", CPU)(), 0.0, 0.0, "gather_patches")


def test_cases_cover_mae_shapes():
    cases = ops_bench.mae_cases(64, torch.bfloat16)
    att = {(c.shape["N"], c.shape["D"]) for c in cases if c.op == "attention"}
    assert att == {(50, 64), (65, 80), (197, 32), (257, 32)}
    widths = {c.shape["D"] for c in cases if c.op == "gather_tokens"}
    assert widths == {768, 1024, 1280}
    assert {c.shape["L"] for c in cases if c.op == "unshuffle_tokens"} == {196, 256}
    assert any(c.name == "ViT-B/L decoder" for c in cases if c.op == "attention")


def _rec(op, case, backend, ms, mode="fwd+bwd"):
    return {"kind": "op", "op": op, "case": case, "backend": backend, "mode": mode, "status": "ok",
            "median_ms": ms, "device_type": "cuda"}


def test_ranking_and_priority_file(tmp_path):
    recs = [_rec("attention", "a", "triton", 1.0), _rec("attention", "a", "sdpa", 2.0),
            _rec("attention", "a", "reference", 8.0), _rec("attention", "b", "triton", 3.0),
            _rec("attention", "b", "sdpa", 2.0), _rec("attention", "b", "reference", 8.0),
            _rec("attention", "b", "xformers", 1.0),  # fastest where it ran, but served one case of two
            _rec("gather_patches", "a", "sdpa", 1.0, "fwd"), _rec("gather_patches", "a", "reference", 3.0, "fwd"),
            {**_rec("gather_tokens", "a", "triton", 1.0), "status": "skipped"}]
    ranking = ops_bench.rank_backends(recs, "cuda")
    # triton: ratios 1 and 1.5 -> geomean 1.22; sdpa: 2 and 1 -> 1.41; reference: 8 and 4
    assert ranking["attention"] == ["triton", "sdpa", "reference", "xformers"]
    assert ranking["gather_patches"] == ["sdpa", "reference"]
    assert "gather_tokens" not in ranking
    path = tmp_path / "priority.json"
    path.write_text(json.dumps({"cpu": {"attention": ["sdpa", "reference"]}, "source": {"cpu": {"device": "c"}}}))
    data = ops_bench.write_priority(str(path), recs, "cuda", {"device": "g"})
    on_disk = json.loads(path.read_text())
    assert on_disk == data
    assert on_disk["cuda"]["attention"][0] == "triton" and on_disk["cpu"] == {"attention": ["sdpa", "reference"]}
    assert on_disk["source"] == {"cpu": {"device": "c"}, "cuda": {"device": "g"}}
    # a write that fails part way (here: a value JSON cannot hold) leaves the file as it was, not cut short
    before = path.read_text()
    with pytest.raises(TypeError):
        ops_bench.write_priority(str(path), recs, "cuda", {"device": object()})
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["priority.json"]


def test_copy_reference_pays_the_passes_the_op_makes():
    """The copy reference of a forward+backward case is a copy of the forward's bytes, then one of the backward's
    (two launches, as the op needs at least two); it moves what it says; records carry the passes."""
    case = next(c for c in ops_bench.mae_cases(1, torch.float32, ("B",), ("gather_tokens",), quick=True)
                if "fwd+bwd" in c.bytes)
    fwd, total = case.bytes["fwd"], case.bytes["fwd+bwd"]
    assert ops_bench.copy_passes(case, "fwd") == [fwd]
    assert ops_bench.copy_passes(case, "fwd+bwd") == [fwd, total - fwd] and total > fwd
    run = ops_bench.copy_reference(CPU, [10, 6])
    run()
    assert [src.numel() for src, _ in run.buffers] == [5, 3] and all(bool((d == s).all()) for s, d in run.buffers)
    rec = ops_bench.run_case(case, "reference", "fwd+bwd", CPU, None, timing=QUICK_TIMING, copy_reference_too=True)
    assert rec["status"] == "ok" and rec["copy_passes"] == [fwd, total - fwd]
    assert rec["frac_copy_same_bytes"] == pytest.approx(rec["gbps"] / rec["copy_same_bytes_gbps"])
    assert "copy_passes" not in ops_bench.run_case(case, "reference", "fwd+bwd", CPU, None, timing=QUICK_TIMING)


def test_speedups_arrive_with_stamped_records():
    """Each record gets its speedup as it arrives, also when a recorder stamps it (device, versions): the last
    record of a run cut short by a time limit keeps it."""
    from fastmae.bench.records import Recorder

    recorder = Recorder(None, {"device": "a CPU", "device_type": "cpu"})
    seen = []

    def on_record(rec):
        recorder.add(rec)
        seen.append(rec)

    recs = ops_bench.run_ops(CPU, torch.float32, 1, models=("B",), ops_filter=("gather_tokens",),
                             backends=("reference", "sdpa"), modes=("fwd",), quick=True, timing=QUICK_TIMING,
                             on_record=on_record, progress=False)
    ok = [r for r in recs if r["status"] == "ok"]
    assert ok and seen == recs and all(r["device"] == "a CPU" for r in recs)
    assert all(r.get("speedup") for r in ok), [(r["backend"], r.get("speedup")) for r in ok]


def test_launch_costs_on_a_cpu():
    """The host's time per launch: PyTorch's one-element op is timed on a CPU; Triton's probes are skipped with the
    reason (they run only in the interpreter there) unless asked for, then marked as run in the interpreter."""
    from fastmae.bench.limits import launch_line, measure_launch_costs

    recs = measure_launch_costs(CPU, quick=True)
    torch_row, *triton_rows = recs
    assert torch_row["backend"] == "torch" and torch_row["op"] == "launch" and torch_row["status"] == "ok"
    assert 0 < torch_row["host_us"] < 1e5
    assert [(r["shape"]["arguments"], r["path"]) for r in triton_rows] == [
        (1, "fastmae"), (1, "triton"), (25, "fastmae"), (25, "triton")]
    assert all(r["status"] == "skipped" and "interpreter" in r["reason"] for r in triton_rows)
    assert launch_line(recs) == f"host time to issue one kernel, back to back: PyTorch x.add_(1) " \
                                f"{torch_row['host_us']:.3g} µs"
    if INTERPRETER_RUNS:
        recs = measure_launch_costs(CPU, quick=True, allow_interpreter=True)
        assert all(r["status"] == "ok" and r["host_us"] > 0 for r in recs), recs
        assert [r.get("interpreter") for r in recs] == [None, True, True, True, True]
        line = launch_line(recs)
        assert "Triton, 25 arguments" in line and "Triton (Triton's own launch path), 25 arguments" in line
        assert "code-path check" in line


@pytest.mark.skipif(not INTERPRETER_RUNS, reason="Triton's interpreter cannot run with these packages")
def test_launch_probes_add_one():
    """Each probe launch adds 1 to x[0] and leaves the rest alone; the wide one takes its other tensors as given."""
    from fastmae.kernels import probe

    x = torch.zeros(3)
    for kept in (True, False):
        probe.launch_small(x, kept=kept)
        probe.launch_wide(x, kept=kept)
        probe.launch_wide(x, (torch.ones(2),) * 4, kept=kept)
    assert x.tolist() == [6.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="float32"):
        probe.launch_small(torch.zeros(2, dtype=torch.float16))


def test_launch_line_reads_only_bench_ops_launch_rows():
    from fastmae.bench.limits import launch_line

    rows = [{"kind": "limit", "op": "copy", "case": "bench ops", "status": "ok", "gbps": 1.0},
            {"kind": "limit", "op": "launch", "case": "bench ops", "backend": "torch", "what": "x.add_(1)",
             "shape": {"arguments": 2, "elements": 1}, "status": "ok", "host_us": 12.34},
            {"kind": "limit", "op": "launch", "case": "bench ops", "backend": "triton", "what": "probe small",
             "shape": {"arguments": 1, "elements": 1}, "status": "ok", "host_us": 31.0, "path": "fastmae"},
            {"kind": "limit", "op": "launch", "case": "bench ops", "backend": "triton", "what": "probe small",
             "shape": {"arguments": 1, "elements": 1}, "status": "ok", "host_us": 35.0},
            {"kind": "limit", "op": "launch", "case": "bench ops", "backend": "triton", "what": "probe wide",
             "shape": {"arguments": 25, "elements": 1}, "status": "failed", "reason": "boom"}]
    # a row without a path predates fastmae's own launch: Triton's path
    assert launch_line(rows) == ("host time to issue one kernel, back to back: PyTorch x.add_(1) 12.3 µs; "
                                 "Triton, 1 argument, 31 µs; Triton (Triton's own launch path), 1 argument, 35 µs")
    assert launch_line(rows[:1]) is None


def test_a_case_whose_inputs_cannot_be_built_fails_alone(monkeypatch):
    """Building a case's inputs can fail (a batch too large for the memory): that case's record says so, and the
    next cases run (ops and attention alike), instead of the run ending with a traceback."""
    from fastmae.bench import attention_bench

    case = ops_bench.mae_cases(1, torch.float32, ("B",), ("gather_tokens",), quick=True)[0]
    real = ops_bench.built_inputs

    def built(c, device, grad):
        if c is case:
            raise RuntimeError("DefaultCPUAllocator: not enough memory")
        return real(c, device, grad)

    monkeypatch.setattr(ops_bench, "built_inputs", built)
    rec = ops_bench.run_case(case, "reference", "fwd", CPU, None, timing=QUICK_TIMING)
    assert rec["status"] == "failed" and "not enough memory" in rec["reason"]
    monkeypatch.setattr(attention_bench, "case_reasons", lambda *a, **k: (_ for _ in ()).throw(MemoryError("big")))
    rec = attention_bench.run_case("c", 1, 2, 8, 16, torch.float32, "sdpa", "fwd", CPU, timing=QUICK_TIMING)
    assert rec["status"] == "failed" and "big" in rec["reason"]
