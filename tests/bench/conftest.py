"""The benchmark-suite tests run the suite's own code in quick mode on the CPU. On a shared machine, extra
torch threads wait on each other at every op, so these tests use one thread (restored afterwards)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
