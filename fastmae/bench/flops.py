"""Model FLOPs of MAE, counted analytically (the convention behind MFU).

Per sample, with T tokens through a block of width D and linear weights W_qkv, W_proj, W_fc1, W_fc2:
  linear layers  2 * T * (sum of the block's weight-matrix sizes)      (= 2 * T * (4 + 2r) * D^2 for MLP ratio r)
  attention      4 * T^2 * D                                           (QK^T and PV, all heads together)
Encoder (T_e = K + 1 tokens, K = int(L * (1 - mask_ratio)) visible patches):
  patch embedding of the K visible patches  2 * K * (C * p * p) * D
  + depth blocks at T_e
Decoder (T_d = L + 1 tokens):
  decoder_embed 2 * T_e * D * D_dec + decoder_depth blocks at T_d + prediction head 2 * L * D_dec * (p * p * C)
Training: forward + backward = 3 x forward. Biases, LayerNorm, GELU, softmax and the loss are not counted
(they are a few percent and memory-bound), nor the patch embedding of removed patches, which the official
order computes and throws away: MFU counts the work the model needs, not the work a path happens to do.
"""
from __future__ import annotations

import torch.nn as nn


def _linear_params(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _blocks_flops(blocks, tokens: int) -> float:
    total = 0.0
    for blk in blocks:
        width = blk.attn.qkv.in_features
        total += 2.0 * tokens * _linear_params(blk) + 4.0 * tokens * tokens * width
    return total


def len_keep(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per image, as the model computes it."""
    return int(num_patches * (1 - mask_ratio))


def encoder_flops(model, batch: int, mask_ratio: float) -> float:
    """Forward FLOPs of `model.forward_encoder` for `batch` images."""
    L = model.num_patches
    k = len_keep(L, mask_ratio)
    w = model.patch_embed.proj.weight  # [D, C, p, p]
    embed = 2.0 * k * w[0].numel() * w.shape[0]
    return batch * (embed + _blocks_flops(model.blocks, k + 1))


def decoder_flops(model, batch: int, mask_ratio: float) -> float:
    L = model.num_patches
    k = len_keep(L, mask_ratio)
    embed = 2.0 * (k + 1) * model.decoder_embed.in_features * model.decoder_embed.out_features
    head_rows = L - k if getattr(model, "pred_masked_only", False) else L
    head = 2.0 * head_rows * model.decoder_pred.in_features * model.decoder_pred.out_features
    return batch * (embed + _blocks_flops(model.decoder_blocks, L + 1) + head)


def model_flops(model, batch: int, mask_ratio: float) -> float:
    """Forward FLOPs of the whole MAE (encoder + decoder) for `batch` images."""
    return encoder_flops(model, batch, mask_ratio) + decoder_flops(model, batch, mask_ratio)


def train_step_flops(model, batch: int, mask_ratio: float) -> float:
    """FLOPs of one training step: 3 x forward."""
    return 3.0 * model_flops(model, batch, mask_ratio)
