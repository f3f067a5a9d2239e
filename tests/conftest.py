"""Test set-up shared by the whole suite.

On a machine without a GPU the Triton kernels run under Triton's interpreter: TRITON_INTERPRET must be
set before triton is imported, so it is set here, first. On a GPU machine the same tests run on CUDA
tensors (see `tests/utils.py: DEVICES`), and the interpreter stays off.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: longer CPU tests")
