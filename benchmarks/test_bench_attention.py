"""The cases of `fastmae bench attention` under pytest-benchmark (cases from fastmae.bench.attention_bench)."""
from __future__ import annotations

import pytest

from fastmae.bench import attention_bench as ab
from fastmae.bench.cli import DEFAULTS
from fastmae.bench.common import env_settings, parse_list
from fastmae.bench.ops_bench import attention_case, make_runner
from fastmae.bench.timing import synchronized
from fastmae.ops import record_choices

DEVICE, DTYPE, QUICK = env_settings()
_D = DEFAULTS["attention"]["quick" if QUICK else DEVICE.type]
SHAPES = [(name, b, h, n, d) for b in map(int, parse_list(_D["batches"])) for name, h, n, d in ab.mae_shapes()]
SHAPES += ab.long_shapes([int(n) for n in parse_list(_D["long_ns"])],
                         [int(d) for d in parse_list(_D["long_head_dims"])], _D["long_tokens"])
JOBS = [(s, impl, mode) for s in SHAPES for impl in ab.IMPLS for mode in ab.MODES]


@pytest.mark.parametrize("shape,impl,mode", JOBS,
                         ids=[f"{s[0].replace(' ', '_')}-B{s[1]}-{i}-{m}" for s, i, m in JOBS])
def test_attention(benchmark, shape, impl, mode):
    name, b, h, n, d = shape
    # the benchmark's own check first: the same reasons `fastmae bench attention` records as skipped
    rec = ab.run_case(name, b, h, n, d, DTYPE, impl, mode, DEVICE,
                      timing=dict(warmup=1, min_reps=1, max_reps=1, max_time_s=0.0))
    if rec["status"] != "ok":
        pytest.skip(rec["reason"])
    case = attention_case(name, b, h, n, d, DTYPE)
    if impl in ab.TRITON_PATHS:  # fastmae's kernels on a forced path
        case, _ = ab.forced_path_case(case, n, d, DTYPE, ab.TRITON_PATHS[impl], mode, DEVICE)
    with ab.sdpa_kernel_context(impl):
        fn = synchronized(make_runner(case, ab.backend_of(impl), mode, DEVICE), DEVICE)
        with record_choices() as served:  # what is timed is the backend named (forced paths call fastmae's own)
            fn()
        assert served == ({} if impl in ab.TRITON_PATHS else {"attention": ab.backend_of(impl)}), served
        benchmark.group = f"attention {name} B={b} {mode}"
        benchmark.extra_info.update({"case": name, "shape": case.shape, "impl": impl, "mode": mode,
                                     "dtype": str(DTYPE), "device": str(DEVICE)})
        benchmark(fn)
    if benchmark.stats is not None:  # None when pytest-benchmark is off: ran once, untimed
        benchmark.extra_info["tflops"] = case.flops[mode] / benchmark.stats.stats.median / 1e12
