"""The official optimiser set-up: AdamW parameter groups, the lr scaling rule and the per-iteration schedule."""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn


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
        group["lr"] = value * group.get("lr_scale", 1.0)
    return value


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW(betas=(0.9, 0.95)) over `param_groups_weight_decay` groups."""
    kwargs = {} if fused is None else {"fused": fused}
    return torch.optim.AdamW(param_groups_weight_decay(model, weight_decay), lr=lr, betas=(0.9, 0.95), **kwargs)
