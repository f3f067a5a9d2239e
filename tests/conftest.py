"""Test set-up shared by the whole suite.

On a machine without a GPU the Triton kernels run under Triton's interpreter: TRITON_INTERPRET must be
set before triton is imported, so it is set here, first. On a GPU machine the same tests run on CUDA
tensors (see `tests/utils.py: DEVICES`), and the interpreter stays off.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread for every test, restored afterwards (code under test, such as the benchmarks'
    `--threads`, may change it): the suite's models are tiny, and on a busy machine two OpenMP threads that
    spin-wait for each other made tests ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _full_fp32_convolutions():
    """cuDNN convolutions in full fp32 for the whole suite. torch lets them use TF32 by default, while matrix
    products stay full fp32: on a GPU the reference path's patch embedding (a Conv2d) would then round to TF32's
    10-bit mantissa and the other paths' (a linear layer on gathered pixels) would not, a difference of about
    5e-4 that the fp32 comparisons, written for fp32 against fp32, would count as the kernels' error. No effect
    on a CPU."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def tuned_dir(monkeypatch):
    """Point FASTMAE_TUNED_DIR at a folder (or unset it, with None) for one test. The launchers read the variable
    once per process (`fastmae.kernels.utils.tuned_dir`): its cache is cleared on each change and after the test,
    so the next test reads the variable as it is then."""
    from fastmae.kernels import utils

    def point(folder):
        if folder is None:
            monkeypatch.delenv(utils.TUNED_DIR_ENV, raising=False)
        else:
            monkeypatch.setenv(utils.TUNED_DIR_ENV, str(folder))
        utils.tuned_dir.cache_clear()

    yield point
    utils.tuned_dir.cache_clear()  # monkeypatch restores the variable after this (it was set up first)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: longer CPU tests")
    config.addinivalue_line("markers", "cuda: runs on a CUDA device (set at collection: the device-parametrized "
                                       "tests' CUDA cases and the tests marked gpu); the GPU suite selects these")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark `cuda` every test that runs on a CUDA device: the CUDA case of a test parametrized by `device`, and
    every test marked `gpu`. The GPU suite runs `-m cuda`: the CPU cases are what CI runs anyway."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        device = str(callspec.params.get("device", "")) if callspec is not None else ""
        if device.split(":")[0] == "cuda" or item.get_closest_marker("gpu"):  # "cuda", "cuda:1", ...
            item.add_marker(pytest.mark.cuda)
