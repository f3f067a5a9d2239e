"""Data-parallel training under gloo: two CPU processes with batch 8 each end with the same weights and the
same (rank-averaged) losses as one process with batch 16, because the samples, crops and masking noise of
each global batch are the same (they are a function of seed, epoch and sample index)."""
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastmae.model.checkpoint import read_checkpoint
from fastmae.train.graphed import GraphCaptureError, GraphedTrainStep
from fastmae.train.logs import read_step_log
from fastmae.train.pretrain import train

from .common import assert_same_weights, pretrain_args
from .test_graphed import FailingCapture, StepGraphs, _setup

TIMEOUT_S = 150


def _worker(rank: int, world: int, rendezvous: str, out_dir: str, graphed: bool = False) -> None:
    torch.set_num_threads(1)
    # ranks as torchrun sets them; the group meets through a file, not a TCP port another process could take
    # between choosing it and binding it
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    extra = ("--adamw", "fused", "--cuda_graph") if graphed else ()
    with pytest.MonkeyPatch.context() as monkeypatch:
        fake = StepGraphs(monkeypatch) if graphed else None  # stand-in graph calls on the CPU
        result = train(pretrain_args(out_dir, "--batch_size", "8", "--dist_url", rendezvous, *extra))
    assert result.step == 8, result.step
    if fake is not None:  # a micro-step and an update per iteration, the model unwrapped (no DDP hooks)
        assert fake.captures == 2 and fake.replays == 16, (fake.captures, fake.replays)
        assert fake.step.distributed and len(fake.step.flat_grads) == 1
    assert not dist.is_initialized(), "the process group must be torn down at the end"


def _run_two(tmp_path, out_dir, graphed: bool = False, worker=_worker) -> None:
    rendezvous = (tmp_path / f"rendezvous-{out_dir.name}").as_uri()
    ctx = mp.start_processes(worker, args=(2, rendezvous, str(out_dir), graphed), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + TIMEOUT_S
    while not ctx.join(timeout=2):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2-process run did not finish in {TIMEOUT_S} s")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo not available")
def test_two_process_gloo_matches_one_process(tmp_path):
    one = tmp_path / "one"
    ref = train(pretrain_args(one, "--batch_size", "16"))
    two = tmp_path / "two"
    _run_two(tmp_path, two)

    # only rank 0 wrote files, and the lr used the world size (effective batch 16 either way)
    a, b = read_step_log(one), read_step_log(two)
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        assert (x["epoch"], x["iter"], x["step"]) == (y["epoch"], y["iter"], y["step"])
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-12)
        assert abs(x["loss"] - y["loss"]) <= 1e-5, (x, y)  # rank mean of two half batches = full batch loss
    ck1, ck2 = read_checkpoint(one / "checkpoint-last.pth"), read_checkpoint(two / "checkpoint-last.pth")
    assert ck2["args"]["world_size"] == 2 and ck1["args"]["world_size"] == 1
    assert ck2["args"]["lr"] == pytest.approx(ck1["args"]["lr"])
    assert_same_weights(ck2["model"], ck1["model"], lr=ck1["args"]["lr"], steps=8, atol=2e-5, rtol=1e-4)
    assert len(ref.losses) == 8


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo not available")
def test_two_process_cuda_graph_matches_one_process(tmp_path):
    """`--cuda_graph` across two processes (stand-in graph calls, gloo): the step averages its gradients with one
    all-reduce between the micro-step and the update, on the model itself; the same losses and weights as one
    process with the whole batch (fused AdamW in both)."""
    one = tmp_path / "one"
    train(pretrain_args(one, "--batch_size", "16", "--adamw", "fused"))
    two = tmp_path / "two"
    _run_two(tmp_path, two, graphed=True)
    a, b = read_step_log(one), read_step_log(two)
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        assert (x["epoch"], x["iter"], x["step"]) == (y["epoch"], y["iter"], y["step"])
        assert abs(x["loss"] - y["loss"]) <= 1e-5, (x, y)
    ck1, ck2 = read_checkpoint(one / "checkpoint-last.pth"), read_checkpoint(two / "checkpoint-last.pth")
    assert ck2["args"]["world_size"] == 2 and ck2["args"]["cuda_graph"]
    assert_same_weights(ck2["model"], ck1["model"], lr=ck1["args"]["lr"], steps=8, atol=2e-5, rtol=1e-4)


def _capture_worker(rank: int, world: int, rendezvous: str, out_dir: str, _graphed: bool) -> None:
    """Captures a graphed step (stand-in graph calls) in a group of two; rank 1's capture fails. Writes what each
    rank raised."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, world_size=world, rank=rank)
    try:
        model, opt, batches = _setup("cpu")
        with pytest.MonkeyPatch.context() as monkeypatch:
            StepGraphs(monkeypatch)
            if rank == 1:
                monkeypatch.setattr(torch.cuda, "graph", FailingCapture)
            try:
                GraphedTrainStep(model, opt, *batches[0], mask_ratio=0.75)
                said = "captured"
            except GraphCaptureError as exc:
                said = str(exc)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(said)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo not available")
def test_a_capture_failed_on_one_rank_fails_on_every_rank(tmp_path):
    """A graphed step that fails to capture on one rank fails on the others too (one all-reduced flag), with the
    model restored: none goes on to wait in the gradients' all-reduce for a rank that has stopped."""
    out = tmp_path / "capture"
    out.mkdir()
    _run_two(tmp_path, out, worker=_capture_worker)
    said = [(out / f"rank{r}.txt").read_text() for r in range(2)]
    assert "operation not permitted when stream is capturing" in said[1], said
    assert "captured on this rank but not on another" in said[0] and "as they were" in said[0], said


def _failing_write_worker(rank: int, world: int, rendezvous: str, out_dir: str, _graphed: bool) -> None:
    """A 2-process run whose rank 0 fails to write its first checkpoint (a full disk): writes what each rank
    raised."""
    import errno

    from fastmae.train import checkpoint as ckpt_io

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(out_dir, "checkpoint-0.pth"))

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(ckpt_io, "save", full_disk)
        try:
            train(pretrain_args(out_dir, "--batch_size", "8", "--dist_url", rendezvous))
            said = "finished"
        except Exception as exc:  # noqa: BLE001 - what the rank raised is the result
            said = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(out_dir, f"said{rank}.txt"), "w") as f:
        f.write(said)
    assert not dist.is_initialized(), "the process group must be torn down after an error too"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo not available")
def test_a_checkpoint_rank_0_fails_to_write_stops_every_rank(tmp_path):
    """Rank 0 alone writes checkpoints: when that fails, it raises its error and the other rank stops too, at the
    same point, instead of waiting at the next collective for a rank that has gone."""
    out = tmp_path / "full"
    out.mkdir()
    _run_two(tmp_path, out, worker=_failing_write_worker)
    said = [(out / f"said{r}.txt").read_text() for r in range(2)]
    assert said[0].startswith("OSError") and "No space left on device" in said[0], said
    assert said[1].startswith("PeerFailedError") and "failed to write the checkpoint" in said[1], said


def test_a_process_group_the_caller_made_outlives_the_run(tmp_path):
    """train() called from a program that made its own process group joins it and leaves it for the program to end
    (cleanup ends only a group init_distributed made)."""
    from fastmae.train.distributed import cleanup, init_distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", world_size=1, rank=0)
    try:
        info = init_distributed("cpu")
        assert info.distributed and not info.owns_group
        cleanup(info)
        assert dist.is_initialized()
        train(pretrain_args(tmp_path / "run", "--epochs", "1", "--max_steps", "1"))
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
