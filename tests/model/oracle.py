"""An independent MAE forward written from the paper's definitions (MISSION.md), loop by loop.

It shares nothing with fastmae's code but the parameters it reads, so agreement with the model checks
patchify order, masking, token order, the blocks and the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_vectors(img: torch.Tensor, p: int) -> torch.Tensor:
    """One image [C, H, W] -> [L, p*p*C], patches row-major, each vector in (p, q, c) order."""
    c, h, w = img.shape
    out = []
    for i in range(h // p):
        for j in range(w // p):
            patch = img[:, i * p:(i + 1) * p, j * p:(j + 1) * p]  # [C, p, q]
            out.append(patch.permute(1, 2, 0).reshape(-1))  # (p, q, c)
    return torch.stack(out)


def block(x: torch.Tensor, blk, num_heads: int) -> torch.Tensor:
    def ln(t, norm):
        return F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    n_tok, d = x.shape
    hd = d // num_heads
    h = ln(x, blk.norm1)
    qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
    heads = []
    for head in range(num_heads):
        s = slice(head * hd, (head + 1) * hd)
        scores = (q[:, s] @ k[:, s].T) / hd ** 0.5
        heads.append(torch.softmax(scores, dim=-1) @ v[:, s])
    x = x + torch.cat(heads, dim=1) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    h = ln(x, blk.norm2)
    h = F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    return x + h


def mae_forward(model, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor, norm_pix: bool):
    """Returns (loss, pred [N, L, P], mask [N, L]) computed sample by sample."""
    p = model.patch_embed.patch_size[0]
    n = imgs.shape[0]
    L = noise.shape[1]
    len_keep = int(L * (1 - mask_ratio))
    w = model.patch_embed.proj.weight  # [D, C, p, q]
    d = w.shape[0]
    losses, preds, masks = [], [], []
    for i in range(n):
        # embedding of every patch: the conv as a dot product over (c, p, q)
        tokens = torch.stack([
            (w * imgs[i, :, a * p:(a + 1) * p, b * p:(b + 1) * p]).sum(dim=(1, 2, 3)) + model.patch_embed.proj.bias
            for a in range(imgs.shape[2] // p) for b in range(imgs.shape[3] // p)])
        tokens = tokens + model.pos_embed[0, 1:]
        order = sorted(range(L), key=lambda j: (float(noise[i, j]), j))  # small noise is kept
        kept = order[:len_keep]
        x = torch.cat([model.cls_token[0] + model.pos_embed[0, :1], tokens[kept]], dim=0)
        for blk in model.blocks:
            x = block(x, blk, blk.attn.num_heads)
        x = F.layer_norm(x, (d,), model.norm.weight, model.norm.bias, model.norm.eps)
        # decoder
        y = x @ model.decoder_embed.weight.T + model.decoder_embed.bias
        full = []
        for j in range(L):
            full.append(y[1 + kept.index(j)] if j in kept else model.mask_token[0, 0])
        y = torch.cat([y[:1], torch.stack(full)], dim=0) + model.decoder_pos_embed[0]
        for blk in model.decoder_blocks:
            y = block(y, blk, blk.attn.num_heads)
        dn = model.decoder_norm
        y = F.layer_norm(y, dn.normalized_shape, dn.weight, dn.bias, dn.eps)
        pred = (y @ model.decoder_pred.weight.T + model.decoder_pred.bias)[1:]
        target = patch_vectors(imgs[i], p)
        if norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = ((target - mean) ** 2).sum(dim=-1, keepdim=True) / (target.shape[-1] - 1)
            target = (target - mean) / (var + 1e-6) ** 0.5
        mask = torch.tensor([0.0 if j in kept else 1.0 for j in range(L)])
        losses.append((((pred - target) ** 2).mean(dim=-1) * mask).sum())
        preds.append(pred)
        masks.append(mask)
    mask = torch.stack(masks)
    return torch.stack(losses).sum() / mask.sum(), torch.stack(preds), mask
