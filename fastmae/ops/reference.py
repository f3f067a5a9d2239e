"""The reference path: every op in plain PyTorch, in the official MAE's order of operations.

These functions are the ground truth that every other backend is tested against. They run on any
device and dtype PyTorch supports, autograd gives their gradients, and they favour clarity over
speed: the official code's `[N, L, D]` int64 index tensors, `torch.cat` copies and materialised
targets are kept on purpose, so that benchmarks can show what the fused paths save.

Shapes (the official MAE's letters): N batch, L patches per image, K = len_keep visible patches,
D token width, C channels, p patch side, P = p*p*C pixels per patch.
"""
from __future__ import annotations

import math

import torch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Softmax attention written out as the official (timm) eager path computes it.

    q, k, v: [B, H, N, D] (the SDPA layout); returns [B, H, N, D] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q @ k.transpose(-2, -1)) * scale  # timm 0.3.2's order: the scale after the product
    attn = attn.softmax(dim=-1)
    return attn @ v


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs: [N, C, H, W] -> [N, L, p*p*C], each patch vector in the official (p, q, c) order."""
    n, c, h, w = imgs.shape
    p = patch_size
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """x: [N, L, p*p*C] -> imgs [N, C, H, W]; the exact inverse of `patchify` (square grid unless given)."""
    n, L, _ = x.shape
    p, c = patch_size, channels
    if grid is None:
        g = int(math.isqrt(L))
        if g * g != L:
            raise ValueError(f"unpatchify: {L} patches do not form a square grid; pass grid=(h, w)")
        grid = (g, g)
    gh, gw = grid
    x = x.reshape(n, gh, gw, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, gh * p, gw * p)


def gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Pixels of the kept patches, ready for the patch projection.

    imgs: [N, C, H, W]; ids_keep: [N, K] int64 patch indices (row-major over the patch grid).
    Returns [N, K, C*p*p] with each vector in the (c, p, q) order of `Conv2d(C, D, p, stride=p)`'s
    weight viewed as [D, C*p*p], so `F.linear(out, w.view(D, -1), b)` equals the convolution at
    those patches.
    """
    n, c, h, w = imgs.shape
    p = patch_size
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * p * p)
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor,
                  cls_token: torch.Tensor | None = None, gathered: bool = False) -> torch.Tensor:
    """The masking gather: visible tokens in shuffled order plus their position embedding.

    x: [N, L, D] all patch tokens, or [N, K, D] tokens already in kept order when `gathered`;
    ids_keep: [N, K] int64; pos_embed: [1, L+1, D] (index 0 belongs to the class token);
    cls_token: [1, 1, D] or None.
    Returns [N, K+1, D] with `cls_token + pos_embed[:, 0]` at index 0, or [N, K, D] without a class token:
    out[n, j] = x[n, ids_keep[n, j]] + pos_embed[0, 1 + ids_keep[n, j]].
    """
    n, K = ids_keep.shape
    d = x.shape[-1]
    index = ids_keep.unsqueeze(-1).expand(-1, -1, d)
    if not gathered:
        x = x + pos_embed[:, 1:, :]
        x = torch.gather(x, 1, index)
    else:
        x = x + torch.gather(pos_embed[:, 1:, :].expand(n, -1, -1), 1, index)
    if cls_token is None:
        return x
    cls = (cls_token + pos_embed[:, :1, :]).expand(n, -1, -1)
    return torch.cat([cls, x], dim=1)


def unshuffle_tokens(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                     pos_embed: torch.Tensor) -> torch.Tensor:
    """The decoder input: visible tokens and mask tokens back in patch order, plus position embedding.

    x: [N, K+1, Dd] decoder-embedded tokens, class token first; ids_restore: [N, L] int64
    (`argsort(ids_shuffle)`); mask_token: [1, 1, Dd]; pos_embed: [1, L+1, Dd].
    Returns [N, L+1, Dd]: out[n, 0] = x[n, 0] + pos[0]; out[n, 1+l] = (x[n, 1+r] if r < K else
    mask_token) + pos[1+l], with r = ids_restore[n, l].
    """
    n, L = ids_restore.shape
    K = x.shape[1] - 1
    mask_tokens = mask_token.repeat(n, L - K, 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    return x + pos_embed


def masked_mse_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                    norm_pix: bool = False, pred_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-patch MSE averaged over removed patches, as the official `forward_loss`.

    pred: [N, L, P] (P = p*p*C in (p, q, c) order), or [N, M, P] predictions for the patches
    `pred_ids: [N, M]` only (a decoder that predicts removed patches alone: each row counts);
    imgs: [N, C, H, W]; mask: [N, L], 1 = removed, 0 = kept.
    With `norm_pix`, each target patch is normalised by its own mean and unbiased variance,
    `(t - mean) / sqrt(var + 1e-6)`. Returns a 0-dim fp32 tensor (fp64 when the error is computed in fp64:
    summed in at least fp32); 0 when no patch is removed (the official code divides 0 by 0 there).
    """
    if pred_ids is not None and pred_ids.shape[1] == 0:  # no removed patch to score (mask_ratio 0); in pred's graph
        return pred.to(torch.promote_types(pred.dtype, torch.float32)).sum() * 0.0
    target = patchify(imgs, patch_size)
    if pred_ids is not None:
        target = torch.gather(target, 1, pred_ids.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    acc = torch.promote_types(loss.dtype, torch.float32)
    if pred_ids is not None:
        return loss.to(acc).sum() / max(loss.numel(), 1)
    mask = mask.to(loss.dtype)
    return (loss * mask).to(acc).sum() / mask.to(acc).sum().clamp(min=1.0)
