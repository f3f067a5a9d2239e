"""Test set-up shared by the whole suite.

On a machine without a GPU the Triton kernels run under Triton's interpreter: TRITON_INTERPRET must be
set before triton is imported, so it is set here, first. On a GPU machine the same tests run on CUDA
tensors (see `tests/utils.py: DEVICES`), and the interpreter stays off.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the suite's models are tiny: one thread is faster than two that wait for each other
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: longer CPU tests")
