"""Training tests run torch on one intra-op thread: the tiny models gain nothing from more, and on a busy
machine two OpenMP threads spin-waiting for each other made these runs ten times slower. The previous
setting is restored after each test."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
