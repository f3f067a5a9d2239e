"""Every op x backend x mode of `fastmae bench ops`, under pytest-benchmark (cases from fastmae.bench.ops_bench)."""
from __future__ import annotations

import pytest

from fastmae.bench.cli import DEFAULTS
from fastmae.bench.common import env_settings, parse_list
from fastmae.bench.ops_bench import backends_for, case_reasons, mae_cases, make_runner
from fastmae.bench.timing import synchronized
from fastmae.ops import BACKENDS, record_choices


DEVICE, DTYPE, QUICK = env_settings()
_D = DEFAULTS["ops"]["quick" if QUICK else DEVICE.type]
CASES = mae_cases(_D["batch"], DTYPE, parse_list(_D["models"]), quick=QUICK)
JOBS = [(c, b, m) for c in CASES for b in backends_for(c, BACKENDS) for m in c.modes]


@pytest.mark.parametrize("case,backend,mode", JOBS,
                         ids=[f"{c.op}-{c.name.replace(' ', '_')}-{b}-{m}" for c, b, m in JOBS])
def test_op(benchmark, case, backend, mode):
    reasons = case_reasons(case, backend, DEVICE)
    if reasons:
        pytest.skip("; ".join(reasons))
    fn = synchronized(make_runner(case, backend, mode, DEVICE), DEVICE)
    if case.registry_inputs is not None:  # what is timed is the backend named: the registry's record of one call
        with record_choices() as served:
            fn()
        assert served.get(case.op) == backend, served
    benchmark.group = f"{case.op} {case.name} {mode}"
    benchmark.extra_info.update({"op": case.op, "case": case.name, "shape": case.shape, "backend": backend,
                                 "mode": mode, "dtype": str(case.dtype), "device": str(DEVICE)})
    benchmark(fn)
    if benchmark.stats is None:  # None when pytest-benchmark is off: ran once, untimed
        return
    median = benchmark.stats.stats.median
    if mode in case.flops:
        benchmark.extra_info["tflops"] = case.flops[mode] / median / 1e12
    if mode in case.bytes:
        benchmark.extra_info["gbps"] = case.bytes[mode] / median / 1e9


# The masked-MSE forward's software pipeline (`fastmae.kernels.loss`): each program takes exactly `tiles`
# consecutive tiles (1: one tile per program, no overlap; the launch rule picks up to 8, keeping at least
# PIPELINE_MIN_PROGRAMS programs), timed at `bench ops`'s loss cases so that one run on a GPU says which depth
# is fastest there. Triton only.
PIPELINE_DEPTHS = (1, 2, 4, 8)
PIPELINE_JOBS = [(c, t, m) for c in CASES if c.op == "masked_mse_loss" for t in PIPELINE_DEPTHS for m in c.modes]


@pytest.mark.parametrize("case,tiles,mode", PIPELINE_JOBS,
                         ids=[f"{c.name.replace(' ', '_')}-tiles{t}-{m}" for c, t, m in PIPELINE_JOBS])
def test_masked_mse_pipeline_depth(benchmark, monkeypatch, case, tiles, mode):
    reasons = case_reasons(case, "triton", DEVICE)
    if reasons:
        pytest.skip("; ".join(reasons))
    loss = pytest.importorskip("fastmae.kernels.loss", reason="the Triton kernels need triton")
    monkeypatch.setattr(loss, "PIPELINE_MAX_TILES", tiles)
    monkeypatch.setattr(loss, "PIPELINE_MIN_PROGRAMS", 1)
    fn = synchronized(make_runner(case, "triton", mode, DEVICE), DEVICE)
    with record_choices() as served:  # what is timed is the Triton kernel: the registry's record of one call
        fn()
    assert served.get(case.op) == "triton", served
    benchmark.group = f"masked_mse_loss pipeline depth {case.name} {mode}"
    benchmark.extra_info.update({"case": case.name, "shape": case.shape, "tiles": tiles, "mode": mode,
                                 "dtype": str(case.dtype), "device": str(DEVICE)})
    benchmark(fn)
    if mode in case.bytes and benchmark.stats is not None:  # None when pytest-benchmark is off
        benchmark.extra_info["gbps"] = case.bytes[mode] / benchmark.stats.stats.median / 1e9
