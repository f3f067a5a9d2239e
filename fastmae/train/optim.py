"""The official optimiser set-up: AdamW parameter groups, the lr scaling rule and the per-iteration schedule."""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
from torch.optim import optimizer as _torch_optimizer


def param_groups_weight_decay(model: nn.Module, weight_decay: float, skip_list: Iterable[str] = ()) -> list[dict]:
    """Two AdamW groups as the official script builds them (timm's `add_weight_decay`): no weight decay for
    parameters with at most one dimension (biases, LayerNorm weights), names ending in `.bias` and names in
    `skip_list`; `weight_decay` for the rest. Frozen parameters (the fixed position embeddings) are left out.

    The official script passes no skip list, so `cls_token` and `mask_token` ([1, 1, D]) are decayed;
    this keeps that behaviour by default. Group order (no-decay first) matches, so official optimizer state
    dicts load.
    """
    skip = set(skip_list)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def absolute_lr(lr: float | None, blr: float, batch_size: int, accum_iter: int, world_size: int) -> float:
    """The official rule: `lr` if given, else `blr * effective batch / 256`, where the effective batch is
    batch_size (per process) x accum_iter x world_size."""
    if lr is not None:
        return float(lr)
    return blr * batch_size * accum_iter * world_size / 256.0


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Learning rate at a fractional epoch: linear warmup from 0 over `warmup_epochs`, then a half-cycle
    cosine from `lr` down to `min_lr` at `epochs`."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, lr: float, min_lr: float,
                         warmup_epochs: float, epochs: float) -> float:
    """Set every group's lr for fractional epoch `data_iter_step / len(loader) + epoch` (groups with an
    `lr_scale` get it multiplied in); returns the lr."""
    value = lr_at(epoch, lr, min_lr, warmup_epochs, epochs)
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # `use_tensor_lr`: written in place, where a graph reads it
            group["lr"].fill_(value * group.get("lr_scale", 1.0))
        else:
            group["lr"] = value * group.get("lr_scale", 1.0)
    return value


def use_tensor_lr(optimizer: torch.optim.Optimizer) -> None:
    """Give every group its lr as a 0-dim fp32 tensor on its parameters' device, which `adjust_learning_rate`
    then fills in place: a step captured in a CUDA graph reads the schedule's rate from it at every replay (a
    plain number would be fixed in the graph). A group's rate that already is such a tensor is kept; one on
    another device or of another dtype is replaced. Needs an implementation that takes tensor rates (fused, or
    capturable)."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        device = group["params"][0].device if group["params"] else None
        if not (isinstance(lr, torch.Tensor) and lr.dim() == 0 and lr.dtype == torch.float32
                and (device is None or lr.device == device)):  # one of another kind is replaced by its value
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)


def plain_lr_state(state_dict: dict) -> dict:
    """An optimizer state dict as every run saves it: tensor rates (`use_tensor_lr`) turned back into numbers and
    `capturable` off, so code that loads it with plain `load_state_dict` (the official script) gets an ordinary
    AdamW. (fastmae's own resume applies the resuming run's flags anyway: `load_optimizer_state`.)"""
    groups = [{**g, "lr": float(g["lr"]) if isinstance(g.get("lr"), torch.Tensor) else g.get("lr")}
              | ({"capturable": False} if "capturable" in g else {})
              for g in state_dict.get("param_groups", [])]
    return {**state_dict, "param_groups": groups}


ADAMW_IMPLS = ("auto", "fused", "foreach", "for-loop", "default")
_IMPL_FLAGS = {"fused": {"fused": True, "foreach": False}, "foreach": {"fused": False, "foreach": True},
               "for-loop": {"fused": False, "foreach": False}, "default": {}}


def fused_adamw_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch has a fused AdamW kernel for every one of these parameters (floating point, on a device
    with fused kernels: CUDA and CPU among them), as torch itself decides it."""
    params = list(params)
    return bool(params) and _torch_optimizer._default_to_fused_or_foreach(params, False, use_fused=True)[0]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, impl: str = "auto",
                    capturable: bool = False) -> torch.optim.AdamW:
    """AdamW(betas=(0.9, 0.95)) over `param_groups_weight_decay` groups.

    `impl` picks torch's implementation; all give the same update up to rounding:
      auto      fused where torch has the fused kernel for the parameters' device (CUDA, CPU), else foreach
      fused     one kernel over all parameters (torch's `fused=True`)
      foreach   a few multi-tensor kernels per update step (torch's default on CUDA)
      for-loop  one parameter at a time (torch's default on the CPU)
      default   torch's own choice, as the official script constructs it
    The fused update reads and writes each parameter's weight, gradient and moments once; on a 2-core CPU it
    takes ViT-B's 112M parameters in 60 ms instead of foreach's 410 ms. `capturable`: the step can be captured in
    a CUDA graph (torch's flag: the step counters stay on the GPU; CUDA parameters only)."""
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"unknown AdamW implementation {impl!r}; choose from {', '.join(ADAMW_IMPLS)}")
    groups = param_groups_weight_decay(model, weight_decay)
    if impl == "auto":
        impl = "fused" if fused_adamw_supported(p for g in groups for p in g["params"]) else "foreach"
    extra = {"capturable": True} if capturable else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **_IMPL_FLAGS[impl], **extra)


def adamw_impl(optimizer: torch.optim.Optimizer) -> str:
    """The implementation an Adam(W) optimizer's step runs: "fused", "foreach" or "for-loop" (torch's own
    choice resolved as torch resolves it)."""
    group = optimizer.param_groups[0]
    if group.get("fused"):
        return "fused"
    if group.get("foreach") is None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        return "foreach" if _torch_optimizer._default_to_fused_or_foreach(params, False, False)[1] else "for-loop"
    return "foreach" if group["foreach"] else "for-loop"


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """`optimizer.load_state_dict(state_dict)` that keeps this optimizer's implementation.

    torch's `load_state_dict` replaces each group's settings with the saved ones, `fused` and `foreach` among
    them, so a run would take on the implementation of whatever wrote the checkpoint (an official checkpoint:
    torch's default). The saved groups get this optimizer's flags first. torch then puts each `step` counter of a
    fused (or capturable) group on its parameter's device, and turns plain-number counters into tensors; it
    leaves the other groups' counters where they were saved, so a counter that a fused run kept on the GPU is
    brought back to the CPU here, where foreach and for-loop keep it."""
    flags = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in optimizer.param_groups]
    saved = state_dict.get("param_groups", [])
    if len(saved) == len(flags):  # (a different count: torch's own error below)
        state_dict = {**state_dict, "param_groups": [{**ng, **f} for ng, f in zip(saved, flags)]}
    optimizer.load_state_dict(state_dict)
    for group in optimizer.param_groups:
        if group.get("fused") or group.get("capturable"):
            continue
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor) and step.device.type != "cpu":
                optimizer.state[p]["step"] = step.cpu()
