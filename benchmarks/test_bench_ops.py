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
    median = benchmark.stats.stats.median
    if mode in case.flops:
        benchmark.extra_info["tflops"] = case.flops[mode] / median / 1e12
    if mode in case.bytes:
        benchmark.extra_info["gbps"] = case.bytes[mode] / median / 1e9
