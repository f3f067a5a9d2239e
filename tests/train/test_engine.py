"""`fastmae.train.engine`'s batch prefetching (each batch's copy to the GPU is issued one batch ahead) and loss
reads (each loss reaches the host an iteration late)."""
from __future__ import annotations

import pytest
import torch

from fastmae.train.distributed import DistInfo
from fastmae.train.engine import LossReads, one_ahead, prefetch_to_device
from tests.utils import DEVICES


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_one_ahead_loads_the_next_item_before_it_hands_out_the_current_one(n):
    """Every item is loaded once and made ready once, in order; item i + 1's load comes after item i was made
    ready and before item i is handed out (so a copy it starts overlaps the caller's use of item i)."""
    events = []

    def load(x):
        events.append(("load", x))
        return x

    def ready(x):
        events.append(("ready", x))
        return x

    got = []
    for x in one_ahead(range(n), load, ready):
        events.append(("use", x))
        got.append(x)
    assert got == list(range(n))
    expected = [("load", 0)] if n else []
    for i in range(n):
        expected += [("ready", i)] + ([("load", i + 1)] if i + 1 < n else []) + [("use", i)]
    assert events == expected


def test_prefetch_passes_cpu_batches_through():
    batches = [(torch.randn(2, 3), torch.tensor([0, 1]), torch.rand(2, 4), torch.zeros(2)) for _ in range(3)]
    got = list(prefetch_to_device(batches, torch.device("cpu")))
    assert len(got) == 3 and all(a is b for g, e in zip(got, batches) for a, b in zip(g, e))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU suite runs it)")
def test_prefetch_to_cuda_hands_out_each_batch_complete_and_in_order():
    """Pinned batches copied on the side stream, one ahead, while the training stream is busy with work that
    reads each handed-out batch: every batch arrives whole, in order, on the device (labels and the skipped
    count stay where they were)."""
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 64, 64, generator=gen).pin_memory(), torch.arange(8),
                torch.rand(8, 256, generator=gen).pin_memory(), torch.zeros(8)) for _ in range(6)]
    seen = []
    busy = torch.randn(2048, 2048, device=device)
    for samples, labels, noise, skipped in prefetch_to_device(batches, device):
        assert samples.device.type == noise.device.type == "cuda" and labels.device.type == "cpu"
        for _ in range(4):
            busy = busy @ busy / 2048 ** 0.5  # the training stream has work queued when the batch is read
        seen.append((samples.clone(), noise.clone()))  # read on the training stream, as a step reads them
    torch.cuda.synchronize()
    assert len(seen) == len(batches)
    for i, ((s, _, n, _), (gs, gn)) in enumerate(zip(batches, seen)):
        assert torch.equal(gs.cpu(), s) and torch.equal(gn.cpu(), n), f"batch {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_loss_reads_come_an_iteration_late_with_each_iterations_value(device, dtype):
    """`LossReads.put` returns the previous iteration's loss with what was passed with it, `flush` the last one; each
    value is the one the loss held when it was put, although the tensor is overwritten afterwards (as a CUDA graph's
    output is by its next replay). On CUDA the GPU is kept busy before each write, so a copy not made in stream order
    would read a later value."""
    reads = LossReads(torch.device(device), DistInfo())
    out = torch.zeros((), device=device, dtype=dtype)
    got = []
    for i in range(4):
        if device == "cuda":
            torch.cuda._sleep(2_000_000)
        out.fill_(float(i))
        got.append(reads.put(out, f"iteration {i}"))
        out.fill_(-1.0)
    got.append(reads.flush())
    assert got == [None] + [(f"iteration {i}", float(i)) for i in range(4)]
    assert reads.flush() is None
