"""A whole pretraining step captured in one CUDA graph: the host issues one launch instead of thousands.

At MAE's batch sizes a training step is thousands of short kernels, and Python's time to issue them can exceed
the GPU's time to run them; then faster kernels do not make the step faster. MAE's shapes are static for a
fixed batch and mask ratio (the number of kept patches is fixed, the masking noise is an input), so the whole
step (autocast forward and loss, backward, optimizer step) can be captured once and replayed:

    step = GraphedTrainStep(model, optimizer, imgs, noise, mask_ratio=0.75, dtype=torch.bfloat16)
    loss = step(imgs, noise)    # copies the batch into the captured buffers, replays; returns the loss tensor

With gradient accumulation (`accum_iter=K`, the official recipe's `--accum_iter`) the step is two graphs: a
micro-step (forward, loss, and the backward of loss / K, added in place to gradients that live outside the
graphs) replayed on every batch, and the update (`optimizer.step()`, then the gradients zeroed in place) replayed
after the K-th:

    step = GraphedTrainStep(model, optimizer, imgs, noise, mask_ratio=0.75, accum_iter=4)
    loss = step(imgs, noise, update=(i + 1) % 4 == 0)

Across processes (`torch.distributed` initialised with more than one, e.g. under torchrun) the step takes the
same two-graph form, its gradients in one flat buffer per dtype, averaged over the ranks by one eager
all-reduce between the last micro-step and the update: DistributedDataParallel's gradient sync, without its
hooks in the graph (the model is not wrapped; its weights are broadcast from rank 0 instead, as DDP does).

What it needs (`graph_step_reason` says which is missing): a CUDA device; an optimizer whose step can be
captured (torch's Adam/AdamW with `capturable=True`, e.g. `build_optimizer(..., capturable=True)`); for float16,
torch's fused AdamW, to which the GradScaler hands its inf check and scale as tensors (any other optimizer's
scaled step reads the check on the host); the same batch shape every call. A float16 step's GradScaler (made
here when none is given) scales, checks and updates on the GPU inside the graph; its scale and growth count are
restored after the warm-up as the weights are.
Each group's learning rate becomes a tensor at capture (`use_tensor_lr`), which every replay reads: a schedule
that fills it in place (torch's LR schedulers do) or assigns a new number to the group takes effect at the next
call.

Capture follows PyTorch's whole-network recipe: `warmup` ordinary steps on a side stream (compiling kernels,
creating the optimizer's state), gradients set to None so the captured backward allocates them in the graph's
memory pool (each replay writes them afresh: no zeroing needed), then the capture. (In the two-graph form the
gradients are instead zero tensors made before the warm-up, which the captured backward adds to, as autograd does
to a gradient that exists, for the parameters an eager backward gives one: the optimizer skips the rest, as in
the eager loop. The two graphs share one memory pool.) The warm-up steps train, so the model's weights and the
optimizer's state are snapshotted before them and restored after the capture: the first replay is the model's
next step, exactly as the eager step would be (the snapshot is kept in host memory, so it adds nothing to the
GPU's peak). The autocast weight-cast cache is off inside the graph (it is not capture-safe), as the encoder
benchmark's graphs do. Capture and replay run on the batch's GPU, with a capture stream of that GPU, in
thread-local error mode: a data loader's pin-memory thread may call CUDA while this thread captures. Across
processes every rank learns whether all ranks captured (one all-reduced flag): a capture that fails on one rank
fails on all, rather than leaving the others waiting for its gradients.
"""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from .distributed import agree
from .engine import autocast
from .optim import use_tensor_lr

T = TypeVar("T")


def graph_step_reason(device: torch.device, optimizer: torch.optim.Optimizer | None = None,
                      dtype: torch.dtype = torch.float32) -> str | None:
    """Why a training step cannot be captured here, or None."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type}"
    if optimizer is not None and not all(g.get("capturable") for g in optimizer.param_groups):
        return (f"the optimizer ({type(optimizer).__name__}) must be built with capturable=True for its step to be "
                "captured")
    if dtype == torch.float16 and optimizer is not None and not getattr(optimizer, "_step_supports_amp_scaling",
                                                                        False):
        return ("a float16 step goes through a GradScaler, whose step reads its inf check on the host unless the "
                "optimizer takes the check and the scale itself: use torch's fused AdamW (--adamw fused or auto)")
    return None


class GraphCaptureError(RuntimeError):
    """Work failed to capture in a CUDA graph (`capture`); from `GraphedTrainStep`, with the model and optimizer
    restored to their state before it."""


def capture(work: Callable[[], T], device: torch.device, warmup: int = 3,
            before_capture: Callable[[], None] | None = None) -> tuple[torch.cuda.CUDAGraph, T]:
    """`work` captured in a CUDA graph on `device` (PyTorch's whole-network recipe): `warmup` eager calls on a
    side stream (they compile kernels and create lazily made state), then `before_capture` (for example
    gradients set to None, so the captured backward allocates them in the graph's memory pool), and one call
    captured (torch's graph context synchronises and empties the allocator's cache first). Returns the graph and
    what the captured call returned, which each replay overwrites. A failed warm-up call raises its own error; a
    failed capture raises `GraphCaptureError`. Either way the current stream is the caller's again, and every
    warm-up call's work is ordered before whatever the caller issues next.

    The capture runs on a capture stream of `device` (torch's default one is made once, on whichever device came
    first) in thread-local error mode: a data loader's pin-memory thread keeps calling CUDA meanwhile."""
    graphs, out = capture_in_turn([work], device, warmup, before_capture)
    return graphs[0], out


def capture_in_turn(works: Sequence[Callable[[], object]], device: torch.device, warmup: int = 3,
                    before_capture: Callable[[], None] | None = None) -> tuple[list[torch.cuda.CUDAGraph], object]:
    """`capture` for work done in turns that are replayed separately (a training step's micro-step and its
    update): each warm-up call runs every one of `works` in order, then each is captured in a graph of its own, in
    the same order, all sharing the first graph's memory pool (replay them one at a time; any one may be replayed
    several times in a row). Returns the graphs and what the first captured call returned."""
    with torch.cuda.device(device):
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    for work in works:
                        work()
        finally:
            current.wait_stream(side)
        if before_capture is not None:
            before_capture()
        graphs, outs = [], []
        for work in works:
            graph = torch.cuda.CUDAGraph()
            # one memory pool for all: a later graph's temporaries reuse what the earlier ones freed (safe as they
            # are replayed in turn, never at once), so an optimizer's step does not keep memory of its own
            pool = graphs[0].pool() if graphs else None
            try:
                with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream(device),
                                      capture_error_mode="thread_local"):
                    outs.append(work())
            except Exception as exc:
                text = str(exc).strip()
                raise GraphCaptureError(f"could not be captured in a CUDA graph ({type(exc).__name__}: "
                                        f"{text.splitlines()[0] if text else ''})") from exc
            finally:  # a failed capture leaves torch's graph context before it restores the stream
                torch.cuda.set_stream(current)
            graphs.append(graph)
    return graphs, outs[0]


def _flat_gradients(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zero gradients for `params` as views of one contiguous buffer per (device, dtype), which are returned: one
    all-reduce each averages them all, one fill zeroes them."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    flats = []
    with torch.no_grad():
        for (device, dtype), ps in groups.items():
            flat = torch.zeros(sum(p.numel() for p in ps), device=device, dtype=dtype)
            offset = 0
            for p in ps:
                p.grad = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
            flats.append(flat)
    return flats


def _restore(params: list[torch.Tensor], weights: list[torch.Tensor], optimizer: torch.optim.Optimizer,
             state: dict) -> None:
    """Undo the warm-up steps in place: the weights and optimizer state copied to the host before them, and zeros
    (a fresh state: moments, step count) for what the warm-up created."""
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)  # host to device, on the current stream: before any replay
        for p in params:
            for k, v in optimizer.state.get(p, {}).items():
                if not isinstance(v, torch.Tensor):
                    continue
                old = state.get(p, {}).get(k)
                if isinstance(old, torch.Tensor):
                    v.copy_(old)
                else:
                    v.zero_()


class GraphedTrainStep:
    """Forward (`model(imgs, mask_ratio, noise=noise)`), loss, backward and `optimizer.step()`, captured once in a
    CUDA graph at construction and replayed by each call; with `accum_iter` K > 1, the backward of loss / K added
    to the gradients on every call, and the optimizer's step (then the gradients zeroed) on calls with
    `update=True`; with `distributed` (None: whether a process group of more than one process is initialised),
    the gradients averaged over the ranks before that step. See the module docstring."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, imgs: torch.Tensor,
                 noise: torch.Tensor, mask_ratio: float, dtype: torch.dtype = torch.float32, warmup: int = 3,
                 accum_iter: int = 1, distributed: bool | None = None,
                 scaler: torch.amp.GradScaler | None = None):
        device = imgs.device
        why = graph_step_reason(device, optimizer, dtype)
        if why:
            raise RuntimeError(f"cannot capture the training step: {why}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the optimizer's state is created by a real step), got {warmup}")
        if int(accum_iter) != accum_iter or accum_iter < 1:
            raise ValueError(f"accum_iter must be a positive integer, got {accum_iter}")
        self.model, self.optimizer = model, optimizer
        self.mask_ratio, self.dtype, self.device = float(mask_ratio), dtype, device
        self.accum_iter = int(accum_iter)
        if dtype == torch.float16 and (scaler is None or not scaler.is_enabled()):
            scaler = torch.amp.GradScaler(device.type)
        # float16's scaler; a disabled one otherwise, which passes the loss and the step through
        self.scaler = scaler if dtype == torch.float16 else torch.amp.GradScaler(device.type, enabled=False)
        if distributed is None:  # a process group of more than one process: gradients averaged over it
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs an initialised torch.distributed process group")
        self.distributed = bool(distributed)
        self.update_graph: torch.cuda.CUDAGraph | None = None
        self.flat_grads: list[torch.Tensor] = []
        before = [g["lr"] for g in optimizer.param_groups]
        use_tensor_lr(optimizer)  # the graph reads each group's rate from a tensor: see `_sync_lr`
        self.lrs = [g["lr"] for g in optimizer.param_groups]
        # what the graph updates: parameters added to the optimizer after the capture would never be. Each group's
        # list of parameters and its length, checked at every call in O(groups), not per parameter
        self.captured_params = [(g["params"], len(g["params"])) for g in optimizer.param_groups]
        try:
            self._capture(imgs, noise, warmup)
        except Exception:
            for group, lr in zip(optimizer.param_groups, before):
                group["lr"] = lr
            raise

    def _capture(self, imgs: torch.Tensor, noise: torch.Tensor, warmup: int) -> None:
        """Capture on the model's GPU, whichever is current (replays run there too); see the module docstring."""
        optimizer, device = self.optimizer, self.device
        self.imgs, self.noise = imgs.detach().clone(), noise.detach().clone()
        # the state the warm-up changes, kept in host memory (a copy on the GPU would add to the peak)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        weights = [p.detach().to("cpu", copy=True) for p in params]
        state = {p: {k: v.to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
                     for k, v in optimizer.state[p].items()} for p in params if p in optimizer.state}
        scaler_state = self.scaler.state_dict()  # {} for a disabled scaler, whose load is a no-op

        def step() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)  # a host-side reset: nothing of it is captured
            return self._work()

        error: Exception | None = None
        try:
            if self.accum_iter == 1 and not self.distributed:
                # gradients None before the capture: the captured backward allocates them in the graph's pool
                self.graph, self.loss = capture(step, device, warmup, lambda: optimizer.zero_grad(set_to_none=True))
            else:
                self._capture_in_turn(params, warmup)
        except Exception as exc:  # noqa: BLE001 - the warm-up's or the capture's; raised below
            error = exc
        if self.distributed:  # every rank learns whether all captured: none waits for a rank that gave up
            error = agree(error, device, lambda: GraphCaptureError(
                "was captured on this rank but not on another (see that rank's error)"))
        if error is not None:  # the model is left as it came, either way
            try:
                optimizer.zero_grad(set_to_none=True)
                _restore(params, weights, optimizer, state)
                self.scaler.load_state_dict(scaler_state)
                left = "the model and optimizer are as they were"
            except Exception:  # noqa: BLE001 - a failed capture can leave the device unusable
                left = "restoring the model's weights failed too"
            if isinstance(error, GraphCaptureError):
                raise GraphCaptureError(f"the training step {error}; {left}") from error.__cause__
            raise error
        _restore(params, weights, optimizer, state)  # in place: the graph holds these tensors' addresses
        self.scaler.load_state_dict(scaler_state)  # fills its scale and growth count in place
        self.reset_accumulation()

    def _capture_in_turn(self, params: list[torch.Tensor], warmup: int) -> None:
        """The two-graph form's capture. The gradients outlive every replay: zero tensors made here (not in a
        graph's pool), views of one flat buffer per dtype, to which the captured backward adds in place and which
        the captured update reads and zeroes. Only parameters that get a gradient have one (an eager backward finds
        them), so the optimizer skips the others as it does in the eager loop rather than decaying them."""
        optimizer = self.optimizer
        with torch.cuda.device(self.device):
            optimizer.zero_grad(set_to_none=True)
            self._micro_step()
        trained = [p for p in params if p.grad is not None]
        optimizer.zero_grad(set_to_none=True)
        self.flat_grads = _flat_gradients(trained)
        views = [(p, p.grad.data_ptr()) for p in trained]
        (self.graph, self.update_graph), self.loss = capture_in_turn([self._micro_step, self._update], self.device,
                                                                     warmup)
        moved = [p for p, ptr in views if p.grad is None or p.grad.data_ptr() != ptr]
        if moved:  # the update graph would read gradients the micro-step's graph no longer writes
            raise GraphCaptureError(f"could not be captured in a CUDA graph: the backward replaced {len(moved)} "
                                    "gradient(s) instead of adding to them in place")

    def _forward(self) -> torch.Tensor:
        """The loss of the batch in the captured buffers (autocast without its cast cache, which is not
        capture-safe)."""
        with autocast(self.device, self.dtype, cache_enabled=False):
            return self.model(self.imgs, self.mask_ratio, noise=self.noise)[0]

    def _work(self) -> torch.Tensor:
        loss = self._forward()
        self.scaler.scale(loss).backward()
        self._step()
        return loss.detach()

    def _step(self) -> None:
        # float16: the fused step takes the scale and the inf check as tensors, nothing read on the host
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _micro_step(self) -> torch.Tensor:
        """The two-graph form's micro-step: forward, loss, and the backward of loss / K into the gradients (in
        place: they exist); returns the loss itself, as the eager loop logs it."""
        loss = self._forward()
        self.scaler.scale(loss / self.accum_iter).backward()
        return loss.detach()

    def _average_gradients(self) -> None:
        """The gradients' mean over the ranks (eager, between the last micro-step and the update): one all-reduce
        per flat buffer, as DistributedDataParallel's sync computes it."""
        world = dist.get_world_size()
        average = dist.get_backend() == "nccl"  # NCCL divides as it reduces; gloo has no average
        for flat in self.flat_grads:
            if average:
                dist.all_reduce(flat, op=dist.ReduceOp.AVG)
            else:
                dist.all_reduce(flat)
                flat.div_(world)

    def _update(self) -> None:
        self._step()
        for flat in self.flat_grads:  # in place (the micro-step's graph holds their addresses), one fill per buffer
            flat.zero_()

    def reset_accumulation(self) -> None:
        """Drop what the micro-steps since the last update added to the gradients (the eager loop's `zero_grad` at
        an epoch's start, whose last accumulation was cut short); nothing to do with the single graph."""
        with torch.no_grad():
            for flat in self.flat_grads:
                flat.zero_()

    def _sync_lr(self) -> None:
        """The rates the graph reads are the tensors each group held at capture. A schedule that fills them in place
        (`adjust_learning_rate`, torch's LR schedulers) needs nothing; one that assigns numbers (user code) has its
        number copied into the captured tensor, which goes back into the group."""
        groups = self.optimizer.param_groups
        if len(groups) != len(self.captured_params) or any(
                g["params"] is not ps or len(ps) != n for g, (ps, n) in zip(groups, self.captured_params)):
            raise ValueError("the optimizer's parameter groups changed after the capture (the graph updates the "
                             "parameters it captured, no others): capture a new GraphedTrainStep")
        for group, lr in zip(groups, self.lrs):
            if group["lr"] is not lr:
                with torch.no_grad():
                    lr.fill_(float(group["lr"]))
                group["lr"] = lr

    def __call__(self, imgs: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 update: bool = True) -> torch.Tensor:
        """One training step on this batch (None: the batch already in the captured buffers); in the two-graph
        form, one micro-step, followed by the optimizer's step where `update`. Returns the loss, a tensor the next
        call overwrites. New images come with their masking noise (the captured noise would mask the same patches
        step after step), both floating point, in the captured shapes."""
        if not update and self.accum_iter == 1:
            raise ValueError("a step captured with accum_iter=1 updates the weights on every call (update=True)")
        if imgs is not None and noise is None:
            raise ValueError("new imgs need their noise too (the noise in the captured buffer would mask the same "
                             "patches again); draw it, e.g. torch.rand(N, num_patches)")
        for buf, new, name in ((self.imgs, imgs, "imgs"), (self.noise, noise, "noise")):
            if new is None:
                continue
            if new.shape != buf.shape:
                raise ValueError(f"{name} must keep the captured shape {tuple(buf.shape)}, got {tuple(new.shape)}")
            if not new.is_floating_point():
                raise TypeError(f"{name} must be floating point (copied into the captured {buf.dtype} buffer), "
                                f"got {new.dtype}")
            buf.copy_(new, non_blocking=True)
        self._sync_lr()
        with torch.cuda.device(self.device):
            self.graph.replay()
            if update and self.update_graph is not None:
                if self.distributed:
                    self._average_gradients()
                self.update_graph.replay()
        return self.loss


class GraphOnFirstBatch:
    """A `GraphedTrainStep` captured from the first batch it is called with and replayed for every batch after
    (`fastmae pretrain --cuda_graph`: the batch shape is fixed, the loader dropping the last partial batch).
    Batches may come on the host (pinned, from the loader): each after the first is copied once, straight into
    the graph's buffers on `device`."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, mask_ratio: float,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None, accum_iter: int = 1,
                 distributed: bool | None = None, scaler: torch.amp.GradScaler | None = None):
        self.model, self.optimizer, self.mask_ratio, self.dtype = model, optimizer, mask_ratio, dtype
        self.device = None if device is None else torch.device(device)
        self.accum_iter, self.distributed, self.scaler = accum_iter, distributed, scaler
        self.step: GraphedTrainStep | None = None

    def __call__(self, imgs: torch.Tensor, noise: torch.Tensor, update: bool = True) -> torch.Tensor:
        if self.step is None:
            device = self.device or imgs.device
            self.step = GraphedTrainStep(self.model, self.optimizer, imgs.to(device, non_blocking=True),
                                         noise.to(device, non_blocking=True), self.mask_ratio, self.dtype,
                                         accum_iter=self.accum_iter, distributed=self.distributed,
                                         scaler=self.scaler)
            return self.step(update=update)  # its buffers hold this batch already
        return self.step(imgs, noise, update)

    def reset_accumulation(self) -> None:
        """`GraphedTrainStep.reset_accumulation`, once the step is captured."""
        if self.step is not None:
            self.step.reset_accumulation()
