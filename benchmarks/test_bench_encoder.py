"""`fastmae bench encoder` under pytest-benchmark: one encoder forward (or forward+backward) per backend and
mask ratio, with the preset and batch `fastmae bench encoder` uses on this device."""
from __future__ import annotations

import pytest
import torch

from fastmae import create_model
from fastmae.bench.cli import DEFAULTS
from fastmae.bench.common import MODEL_PATHS, autocast, env_settings, path_interpreter_reason
from fastmae.bench.encoder_bench import ENCODER_MODES, _inputs, ideal_speedup, make_encoder_runner
from fastmae.bench.timing import synchronized
from fastmae.ops import BackendUnavailable, record_choices


DEVICE, DTYPE, QUICK = env_settings()
_D = DEFAULTS["encoder"]["quick" if QUICK else DEVICE.type]
RATIOS = (0.0, 0.25, 0.5, 0.75, 0.9)


@pytest.fixture(scope="module")
def encoder_setup():
    torch.manual_seed(0)
    model = create_model(_D["model"]).to(DEVICE)
    imgs, noise = _inputs(model, _D["batch"], DEVICE)
    return model, imgs, noise


@pytest.mark.parametrize("mode", ENCODER_MODES)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("backend", [b for b in MODEL_PATHS if b != "auto"] + ["auto"])
def test_encoder(benchmark, encoder_setup, backend, ratio, mode):
    model, imgs, noise = encoder_setup
    spec = MODEL_PATHS[backend]
    why = path_interpreter_reason(spec, DEVICE, allow_interpreter=False)
    if why:
        pytest.skip(why)
    model.backend = spec
    try:
        with torch.no_grad(), autocast(DEVICE, DTYPE):
            model.forward_encoder(imgs[:1], ratio, noise[:1])
    except BackendUnavailable as exc:  # the registry's reasons
        pytest.skip(str(exc))
    fn = synchronized(make_encoder_runner(model, imgs, noise, ratio, mode, DEVICE, DTYPE), DEVICE)
    with record_choices() as served:  # what is timed is the path named: the registry's record of one call
        fn()
    if isinstance(spec, str):
        assert set(served.values()) == {spec}, served
    elif spec:
        assert all(served[op] == b for op, b in spec.items()), served
    benchmark.group = f"encoder {_D['model']} {mode} {backend}"
    benchmark.extra_info.update({"model": _D["model"], "batch": _D["batch"], "backend": backend, "mode": mode,
                                 "mask_ratio": ratio, "ideal_speedup": ideal_speedup(model.num_patches, ratio)})
    benchmark(fn)
    if benchmark.stats is not None:  # None when pytest-benchmark is off: ran once, untimed
        benchmark.extra_info["images_per_s"] = _D["batch"] / benchmark.stats.stats.median
    model.zero_grad(set_to_none=True)
    model.backend = None
