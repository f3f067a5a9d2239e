"""`fastmae bench train` under pytest-benchmark: one full pretraining step per variant (torch.compile variants
on CUDA only), with the preset and batch `fastmae bench train` uses on this device."""
from __future__ import annotations

import pytest
import torch

from fastmae.bench.cli import DEFAULTS
from fastmae.bench.common import env_settings, free
from fastmae.bench.train_bench import VARIANTS, prepare_variant, variant_reason
from fastmae.bench.timing import synchronized
from fastmae.ops import BackendUnavailable


DEVICE, DTYPE, QUICK = env_settings()
_D = DEFAULTS["train"]["quick" if QUICK else DEVICE.type]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_step(benchmark, variant):
    cfg = VARIANTS[variant]
    if cfg["compile"] and DEVICE.type != "cuda":
        pytest.skip("torch.compile variants run on CUDA only here (compiling takes minutes on a small CPU)")
    why = variant_reason(variant, DEVICE, DTYPE)
    if why:
        pytest.skip(why)
    try:
        built = prepare_variant(DEVICE, _D["model"], _D["batch"], DTYPE, variant)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    step = synchronized(built["step"], DEVICE)
    for _ in range(3 if cfg["compile"] else 1):  # compile / warm up outside the timing
        step()
    benchmark.group = f"train {_D['model']}"
    benchmark.extra_info.update({"model": _D["model"], "batch": _D["batch"], "variant": variant,
                                 "dispatch": built["dispatch"], "dtype": str(DTYPE)})
    loss = benchmark(step)
    if benchmark.stats is not None:  # None when pytest-benchmark is off (--benchmark-disable, xdist): ran once
        median = benchmark.stats.stats.median
        benchmark.extra_info["images_per_s"] = _D["batch"] / median
        benchmark.extra_info["tflops"] = built["flops"] / median / 1e12
    assert torch.isfinite(loss)
    built.clear()
    if cfg["compile"]:
        torch._dynamo.reset()
    free(DEVICE)
