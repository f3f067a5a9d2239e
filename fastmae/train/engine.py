"""One pretraining epoch, as the official `engine_pretrain.train_one_epoch` runs it: per-iteration lr
schedule, gradient accumulation, mixed precision with a gradient scaler, a stop on a non-finite loss."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from .distributed import DistInfo, all_reduce_mean
from .optim import adjust_learning_rate

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
T = TypeVar("T")
U = TypeVar("U")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stops without writing a checkpoint of that state."""


@dataclass
class Schedule:
    """What the loop needs from the arguments."""

    lr: float
    min_lr: float
    warmup_epochs: float
    epochs: int
    accum_iter: int
    mask_ratio: float
    iters_per_epoch: int
    max_steps: int = 0


@dataclass
class RunState:
    """Counters carried across epochs: optimizer steps taken, losses seen by this run."""

    step: int = 0
    losses: list = field(default_factory=list)


@dataclass
class EpochSums:
    """What an epoch's log line averages, summed over its iterations so far: a checkpoint written in the middle
    of an epoch keeps them, so that the resumed run's line for that epoch covers the whole epoch."""

    loss: float = 0.0
    lr: float = 0.0
    count: int = 0
    skipped_images: int = 0

    @classmethod
    def from_checkpoint(cls, saved) -> "EpochSums | None":
        """The sums a checkpoint holds, or None where it holds none that are sound."""
        try:
            sums = cls(float(saved["loss"]), float(saved["lr"]), int(saved["count"]), int(saved["skipped_images"]))
        except (TypeError, KeyError, ValueError):
            return None
        return sums if sums.count >= 0 and sums.skipped_images >= 0 else None


def autocast(device: torch.device, dtype: torch.dtype | None, cache_enabled: bool = True):
    """Mixed precision as training runs it: fp32 weights, matmuls in `dtype`; nothing for None or float32.
    `cache_enabled=False` for work captured in a CUDA graph (autocast's cast cache is not graph-safe)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_enabled)


def one_ahead(items: Iterable[T], load: Callable[[T], U], ready: Callable[[U], U]) -> Iterator[U]:
    """`ready(load(item))` for each item in order, with the next item's `load` issued before the current one is
    handed out (and after it was made ready): work that `load` starts runs while the caller uses the item."""
    it = iter(items)
    try:
        upcoming = load(next(it))
    except StopIteration:
        return
    for item in it:
        current = ready(upcoming)
        upcoming = load(item)
        yield current
    yield ready(upcoming)


def prefetch_to_device(batches: Iterable[tuple], device: torch.device) -> Iterator[tuple]:
    """Batches `(images, labels, noise, skipped)` with images and noise on `device`. On CUDA each batch is copied
    one batch ahead on a stream of its own, so the copy of batch i+1 (from the loader's pinned memory) runs while
    step i runs, instead of queueing before step i + 1 in the training stream; elsewhere the batches as they
    come."""
    if device.type != "cuda":
        yield from batches
        return
    side = torch.cuda.Stream(device)

    def load(batch: tuple) -> tuple:
        samples, labels, noise, skipped = batch
        with torch.cuda.stream(side):
            return samples.to(device, non_blocking=True), labels, noise.to(device, non_blocking=True), skipped

    def ready(batch: tuple) -> tuple:
        current = torch.cuda.current_stream(device)
        current.wait_stream(side)  # this batch's copy is done before the step reads it
        for t in (batch[0], batch[2]):
            t.record_stream(current)  # made on the side stream, used on this one: not reused before it is done
        return batch

    yield from one_ahead(batches, load, ready)


class LossReads:
    """Each iteration's loss brought to the host an iteration late, so that the host never waits for the GPU
    inside the loop: `put` queues this iteration's loss (averaged over the processes under torchrun, by an
    all-reduce queued behind the step's own work) and returns the previous iteration's, which the GPU has long
    finished (on CUDA the value travels to pinned memory behind the step, and an event says when it is there).
    Read at once instead, as the official loop does, the host would wait for the whole step to finish on the GPU
    before issuing the next one, and the GPU would then wait for the next step's first kernels. `flush` returns
    the last one. Entries are (what the caller passed with the loss, the loss as a float)."""

    def __init__(self, device: torch.device, dist_info: DistInfo):
        self.dist_info = dist_info
        # two host buffers: one is being filled by iteration i while iteration i-1's is read
        self._host = [torch.empty(1, dtype=torch.float64, pin_memory=True) for _ in range(2)] \
            if device.type == "cuda" else None
        self._turn = 0
        self._pending = None

    def put(self, loss: torch.Tensor, info) -> tuple | None:
        value = loss.detach().to(torch.float64, copy=True).reshape(1)  # a graph's output is overwritten by its replay
        if self.dist_info.distributed:
            torch.distributed.all_reduce(value)  # the mean over ranks is NaN if any rank's loss is
            value /= self.dist_info.world_size
        event = None
        if self._host is not None:
            host = self._host[self._turn]
            self._turn ^= 1
            host.copy_(value, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(value.device))  # the copy's stream, whichever the current device
            value = host
        previous, self._pending = self._pending, (info, value, event)
        return self._read(previous)

    def flush(self) -> tuple | None:
        previous, self._pending = self._pending, None
        return self._read(previous)

    @staticmethod
    def _read(entry) -> tuple | None:
        if entry is None:
            return None
        info, value, event = entry
        if event is not None:
            event.synchronize()
        return info, float(value[0])


def make_scaler(device: torch.device, precision: str):
    """A GradScaler, enabled for fp16 only (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def train_one_epoch(model, loader, optimizer, scaler, device: torch.device, epoch: int, sched: Schedule,
                    state: RunState, *, precision: str = "fp32", dist_info: DistInfo | None = None,
                    logger=None, skip_iters: int = 0, last_checkpoint: str | None = None,
                    graph=None, sums: EpochSums | None = None) -> tuple[dict, int]:
    """Train over `loader` (which already skips the first `skip_iters` iterations when resuming mid-epoch).

    Batches are `(images, labels, noise, skipped)`; `noise` [N, L] drives the masking. Returns
    (stats, next_iter): stats as the official log keys (`lr`, `loss`, averaged over iterations and ranks)
    plus `skipped_images`; next_iter == iters_per_epoch unless `max_steps` stopped the epoch early.
    `last_checkpoint`: the newest good checkpoint on disk (None: there is none), named if the loss turns
    non-finite (each loss reaches the host an iteration after its step was issued: `LossReads`). `graph`
    (`graphed.GraphOnFirstBatch`, which scales fp16 itself): each iteration replays the whole step from a CUDA graph
    instead of running it (with accumulation: the micro-step, and the update after the last of them). `sums`: the
    epoch's sums so far (from a checkpoint written in its middle), which this adds to and the stats average.
    """
    dist_info = dist_info or DistInfo()
    model.train(True)
    if graph is None:
        optimizer.zero_grad(set_to_none=True)
    else:  # a captured step's gradients are written afresh by each replay, or accumulate in place
        graph.reset_accumulation()
    accum = sched.accum_iter
    sums = EpochSums() if sums is None else sums
    count = 0  # this call's iterations
    skipped_here = 0.0
    it = skip_iters
    lr = optimizer.param_groups[0]["lr"]
    tick = time.time()
    reads = LossReads(device, dist_info)

    def account(read) -> None:
        """An earlier iteration's loss, now on the host: the stop if it is not finite, the sums, the logs."""
        nonlocal count
        if read is None:
            return
        (it_read, step_read, updated, lr_read, images, seconds), loss_mean = read
        if not math.isfinite(loss_mean):
            last = f"the last good one is {last_checkpoint}" if last_checkpoint else "this run wrote none before it"
            fed = step_read if updated else step_read + 1  # the optimizer step this iteration's gradients feed
            raise NonFiniteLossError(
                f"loss is {loss_mean} at epoch {epoch}, iteration {it_read} (optimizer step {fed}); "
                f"stopping. No checkpoint of this state was written; {last}. Try a lower --blr, more "
                f"--warmup_epochs or --precision fp32.")
        state.losses.append(loss_mean)
        sums.loss += loss_mean
        sums.lr += lr_read
        sums.count += 1
        count += 1
        if logger is not None:
            logger.iteration(epoch=epoch, it=it_read, iters_per_epoch=sched.iters_per_epoch, step=step_read,
                             loss=loss_mean, lr=lr_read, images=images, seconds=seconds)

    for k, (samples, _labels, noise, skipped) in enumerate(prefetch_to_device(loader, device)):
        it = skip_iters + k
        if it % accum == 0:
            lr = adjust_learning_rate(optimizer, it / sched.iters_per_epoch + epoch, sched.lr, sched.min_lr,
                                      sched.warmup_epochs, sched.epochs)
        if graph is None:  # (on CUDA already there) a graphed step copies the batch into its captured buffers
            samples = samples.to(device, non_blocking=True)
            noise = noise.to(device, non_blocking=True)
        update = (it + 1) % accum == 0
        sync = model.no_sync() if (dist_info.distributed and not update and hasattr(model, "no_sync")) \
            else contextlib.nullcontext()
        with sync:
            if graph is not None:
                loss = graph(samples, noise, update)  # forward, backward (and the optimizer's step where update)
            else:
                with autocast(device, PRECISIONS[precision]):
                    loss, _, _ = model(samples, mask_ratio=sched.mask_ratio, noise=noise)
                scaler.scale(loss / accum).backward()
        if update:
            if graph is None:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            state.step += 1
        skipped_here += float(skipped.sum())  # the loader's count, on the host
        now = time.time()
        # the loss reaches the host an iteration late (`LossReads`): a non-finite one stops the run an iteration
        # after its step was applied, before any checkpoint of that state
        account(reads.put(loss, (it, state.step, update, lr, samples.shape[0] * dist_info.world_size, now - tick)))
        tick = now
        if update and sched.max_steps and state.step >= sched.max_steps:
            break
    account(reads.flush())
    sums.skipped_images += int(round(all_reduce_mean([skipped_here], dist_info, device)[0] * dist_info.world_size))
    stats = {"lr": sums.lr / max(sums.count, 1), "loss": sums.loss / max(sums.count, 1),
             "skipped_images": sums.skipped_images}
    return stats, it + 1 if count else skip_iters
