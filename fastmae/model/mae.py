"""The Masked Autoencoder with a ViT backbone: a drop-in for the official `models_mae.MaskedAutoencoderViT`.

Same constructor arguments, factory names, methods, `forward(imgs, mask_ratio) -> (loss, pred, mask)` and
state-dict keys as the official model, so its checkpoints load. Every data-moving step goes through
`fastmae.ops`, and the backend is chosen per call (`backend=` on the model, `use_backend(...)`, or
`FASTMAE_BACKEND`). When the token ops resolve to `reference`, the model follows the official order of
operations (embed all patches, add position, gather); otherwise it embeds only the visible patches
(`ops.gather_patches` + the patch projection as a matrix product), a quarter of the work at 75% masking.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn as nn

from .. import ops
from ..ops.registry import Inputs, resolve
from .layers import GROUPED_CAST_DEVICES, Block, PatchEmbed, cast_block_weights
from .pos_embed import sincos_2d

MASK_STRATEGIES = ("random", "grid")


_ROWS: dict[tuple, torch.Tensor] = {}


def _cached_row(key: tuple, device: torch.device, make: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """A small constant tensor `make()` gives, made once per key and kept for the process (a CUDA graph that
    captured it reads it at every replay; made under inference mode, it is a normal tensor all the same). None
    while a CUDA graph is being captured on `device` and the row does not exist yet: made inside a capture it
    would live in the graph's memory pool, and go with the graph."""
    row = _ROWS.get(key)
    if row is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        with torch.inference_mode(False), torch.no_grad():
            row = _ROWS[key] = make()
    return row


def _positions(length: int, device: torch.device) -> torch.Tensor | None:
    """[1, length] int64: 0 .. length - 1 on `device` (see `_cached_row`)."""
    return _cached_row(("positions", length, device), device,
                       lambda: torch.arange(length, device=device).unsqueeze(0))


def _removed_row(length: int, len_keep: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """[1, length] of `dtype`: the mask in shuffled order, 0 for the first len_keep positions and 1 after (see
    `_cached_row`)."""
    def make():
        row = torch.ones(1, length, dtype=dtype, device=device)
        row[:, :len_keep] = 0
        return row

    return _cached_row(("removed", length, len_keep, dtype, device), device, make)


def inverse_permutation(ids: torch.Tensor) -> torch.Tensor:
    """The inverse of each row's permutation of 0 .. L-1 ([N, L] int64): out[n, ids[n, j]] = j, what
    `torch.argsort(ids, dim=1)` gives, with one scatter instead of a sort (four kernels on a GPU for a row of up
    to 4096: an index range, its copy, a copy of the keys and the sort). The sort under torch.compile, and inside
    a CUDA graph's capture that finds no cached row of positions."""
    n, length = ids.shape
    positions = None if torch.compiler.is_compiling() else _positions(length, ids.device)
    if positions is None:
        return torch.argsort(ids, dim=1)
    return torch.empty_like(ids).scatter_(1, ids, positions.expand(n, length))


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a VisionTransformer backbone.

    Extra arguments beyond the official ones:
      backend: None, a backend name, a mapping op -> name or its text form "attention=triton,gather_tokens=reference",
        checked when set and read at every call (`model.backend = ...` works).
      mask_strategy: "random" (the paper's) or "grid" (keep one patch of every 2x2 cell, a fixed pattern;
        the mask ratio is then 0.75).
      pred_masked_only: the decoder head predicts only the removed patches; `pred` is then
        [N, L - len_keep, p*p*C] in shuffled order (`ids_shuffle[:, len_keep:]`). Off by default.
      lean_blocks: every block keeps only its LayerNorms' inputs and statistics and the fc1 output for the
        backward, and recomputes both LayerNorms and the GELU there (`fastmae.model.lean`): about a third less
        activation memory for a few extra elementwise passes. Same numbers; off by default;
        `model.lean_blocks = ...` works.
      group_weight_casts: under autocast, the blocks' linear weights are cast to the autocast dtype by one
        multi-tensor kernel per four blocks, and their gradients back by one, instead of autocast's kernel per
        weight and per gradient (`layers.cast_block_weights`): 16 of a block's ~50 kernels, the same numbers.
        None (the default): on CUDA on fastmae's path (token ops not on `reference`), where an eager step's
        time is mostly the host's time to launch its kernels; off on the official path, which keeps the
        official code's kernels, and on a CPU. True or False forces it (`model.group_weight_casts = ...` works).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.,
                 norm_layer=nn.LayerNorm, norm_pix_loss=False, *, backend=None, mask_strategy="random",
                 pred_masked_only=False, lean_blocks=False, group_weight_casts=None):
        super().__init__()
        if mask_strategy not in MASK_STRATEGIES:
            raise ValueError(f"mask_strategy must be one of {MASK_STRATEGIES}, got {mask_strategy!r}")
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        patch_size = self.patch_embed.patch_size[0]  # an int, also when given as timm's (p, p) pair
        num_patches = self.patch_embed.num_patches
        if mask_strategy == "grid" and self.patch_embed.grid_size[0] % 2:
            raise ValueError("grid masking needs an even number of patches per side, got "
                             f"{self.patch_embed.grid_size[0]}")
        self.in_chans = in_chans
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                     for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.backend = backend
        self.mask_strategy = mask_strategy
        self.pred_masked_only = pred_masked_only
        self.lean_blocks = lean_blocks
        self.group_weight_casts = group_weight_casts
        self.initialize_weights()

    @property
    def lean_blocks(self) -> bool:
        return all(blk.lean_blocks for blk in [*self.blocks, *self.decoder_blocks])

    @lean_blocks.setter
    def lean_blocks(self, value: bool) -> None:
        for blk in [*self.blocks, *self.decoder_blocks]:
            blk.lean_blocks = bool(value)

    # ----------------------------------------------------------------------------------------- set-up
    def initialize_weights(self):
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid, cls_token=True).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            sincos_2d(self.decoder_pos_embed.shape[-1], grid, cls_token=True).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        torch.nn.init.normal_(self.cls_token, std=.02)
        torch.nn.init.normal_(self.mask_token, std=.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def __setstate__(self, state: dict) -> None:
        # a model pickled whole before `backend` became a property holds it under its own name: set it through
        # the property, which checks it as it checks a new one
        legacy = "_backend" not in state
        value = state.pop("backend", None) if legacy else None
        super().__setstate__(state)
        if legacy:
            self.backend = value

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, value) -> None:
        spec = ops.parse_backend(value)  # a misspelt name fails here, not at the first forward
        self._backend = spec if spec is None or isinstance(spec, str) else dict(spec)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    # ------------------------------------------------------------------------------------- pixels
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W] -> x: [N, L, p*p*C] in the official (p, q, c) order. As officially, any square
        image whose side the patch divides, of any dtype (not only the size the model was built for)."""
        self.check_images(imgs, any_size=True, any_dtype=True)
        return ops.reference.patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, L, p*p*C] -> imgs: [N, C, H, W]."""
        return ops.reference.unpatchify(x, self.patch_size, self.in_chans)

    def check_images(self, imgs: torch.Tensor, *, any_size: bool = False, any_dtype: bool = False) -> None:
        """Raise a clear error unless `imgs` is what the model takes: [N, C, H, W] floats of its weights' dtype (any
        float dtype under autocast), C = in_chans, square, of the size it was built for (`any_size`: any side the
        patch divides; `any_dtype`: any dtype, integers too)."""
        if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4:
            raise ValueError(f"images must be a [N, C, H, W] tensor, got "
                             f"{tuple(imgs.shape) if isinstance(imgs, torch.Tensor) else type(imgs).__name__}")
        if not any_dtype and not imgs.is_floating_point():
            raise TypeError(f"images must be float32, float16 or bfloat16, got {imgs.dtype}")
        weight = self.patch_embed.proj.weight
        if not any_dtype and imgs.dtype != weight.dtype and not torch.is_autocast_enabled(imgs.device.type):
            raise TypeError(f"images are {imgs.dtype} and the model's weights {weight.dtype}: convert the images "
                            f"(imgs.to({weight.dtype})) or run the model under torch.autocast")
        n, c, h, w = imgs.shape
        if c != self.in_chans:
            raise ValueError(f"this model takes {self.in_chans}-channel images, got {c} channels")
        if h != w:
            raise ValueError(f"images must be square, got {h}x{w}")
        if h % self.patch_size:
            raise ValueError(f"image side {h} is not divisible by the patch size {self.patch_size}")
        expected = self.patch_embed.img_size[0]
        if h != expected and not any_size:
            raise ValueError(f"this model was built for {expected}x{expected} images, got {h}x{w} "
                             f"(build it with img_size={h}, or load weights with fastmae.load_checkpoint, "
                             f"which resizes position embeddings)")

    # ------------------------------------------------------------------------------------ masking
    def masking_ids(self, n: int, mask_ratio: float, noise: torch.Tensor | None = None, device=None,
                    length: int | None = None, official: bool = True):
        """Indices of one masking draw: (ids_shuffle [N, L], ids_restore [N, L], len_keep, mask [N, L]).

        Small noise is kept; mask is 0 for kept and 1 for removed patches, in patch order. L is `length`, or the
        model's patch count. Grid masking is a fixed pattern: it checks `noise`'s shape and does not use it.
        `official`: the official code's steps (a second argsort for ids_restore, the mask built whole and
        gathered); otherwise the same tensors with less work (outside torch.compile, which fuses these itself, and
        a CUDA graph's capture that finds the rows not cached yet): ids_restore by one scatter
        (`inverse_permutation`) and the mask by one gather from a cached row, six kernels on a GPU where the
        official steps launch eleven.
        """
        L = self.num_patches if length is None else int(length)
        if noise is not None and tuple(noise.shape) != (n, L):
            raise ValueError(f"noise must be [N, L] = [{n}, {L}], got {tuple(noise.shape)}")
        if self.mask_strategy == "grid":
            if L != self.num_patches:
                raise ValueError(f"grid masking works on this model's {self.num_patches} patches, got {L} tokens")
            if abs(mask_ratio - 0.75) > 1e-9:
                raise ValueError(f"grid masking keeps one patch of every 2x2 cell (mask_ratio 0.75), got {mask_ratio}")
            g = self.patch_embed.grid_size[0]
            rows = torch.arange(g, device=device)
            keep = ((rows[:, None] % 2 == 0) & (rows[None, :] % 2 == 0)).reshape(1, L)
            noise = (~keep).float().expand(n, L)
        else:
            if not 0.0 <= float(mask_ratio) < 1.0:
                raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
            if noise is None:
                noise = torch.rand(n, L, device=device)
        len_keep = int(L * (1 - mask_ratio))
        if torch.compiler.is_compiling():
            # Under torch.compile a second masking ratio makes the ratio a symbolic float, and every token count
            # then an expression in it, which the triton path's autograd functions cannot take as a size. The
            # length of a range is always made a constant (guarded on its value): each number of kept patches
            # gets a graph of its own, with every size in it static.
            len_keep = len(range(len_keep))
        if len_keep < 1:
            raise ValueError(f"mask_ratio {mask_ratio} keeps no patch of {L}")
        noise = noise.to(device)
        ids_shuffle = torch.argsort(noise, dim=1, stable=True)
        removed = None if official or torch.compiler.is_compiling() else \
            _removed_row(L, len_keep, torch.get_default_dtype(), ids_shuffle.device)
        if removed is not None:
            ids_restore = inverse_permutation(ids_shuffle)
            return ids_shuffle, ids_restore, len_keep, torch.gather(removed.expand(n, L), 1, ids_restore)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(n, L, device=device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return ids_shuffle, ids_restore, len_keep, mask

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Per-sample random masking by argsort of noise (the official method).

        x: [N, L, D] -> (x_masked [N, len_keep, D], mask [N, L] with 0 keep / 1 remove, ids_restore [N, L]).
        """
        n, L, d = x.shape
        ids_shuffle, ids_restore, len_keep, mask = self.masking_ids(n, mask_ratio, noise, x.device, length=L)
        x_masked = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).expand(-1, -1, d))
        return x_masked, mask, ids_restore

    # ------------------------------------------------------------------------------------ forward
    def _official_order(self, imgs: torch.Tensor) -> bool:
        """True when the token ops resolve to the reference path, which keeps the official order."""
        inputs = Inputs(imgs.device, imgs.dtype, tensors={"pos_embed": self.pos_embed}, options={"op": "gather_tokens"})
        return resolve("gather_tokens", inputs, self.backend).backend == "reference"

    def _group_casts(self, x: torch.Tensor, official: bool | None = None) -> bool:
        """Whether the blocks cast their weights in one go (`group_weight_casts`; None: CUDA, fastmae's path)."""
        flag = getattr(self, "group_weight_casts", None)  # a model pickled whole before the option has none
        if flag is not None:
            return bool(flag)
        if x.device.type not in GROUPED_CAST_DEVICES:
            return False
        return not (self._official_order(x) if official is None else official)

    def _attention_plan(self):
        """What a stack's blocks get as their backend: an `ops.AttentionPlan`, so that the registry chooses the
        attention backend once per stack and forward rather than once per block (under torch.compile, where the
        choice is a constant of the graph, the backend itself)."""
        if torch.compiler.is_compiling():
            return self.backend
        return ops.AttentionPlan(self.backend)

    def forward_encoder(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """imgs [N, C, H, W] -> (latent [N, len_keep+1, D], mask [N, L], ids_restore [N, L])."""
        self.check_images(x)
        if x.shape[0] == 0:
            raise ValueError("images must hold at least one image, got an empty batch")
        imgs = x
        official = self._official_order(imgs)
        ids_shuffle, ids_restore, len_keep, mask = self.masking_ids(imgs.shape[0], mask_ratio, noise, imgs.device,
                                                                    official=official)
        ids_keep = ids_shuffle[:, :len_keep]
        if official:
            tokens = self.patch_embed(imgs)
            x = ops.gather_tokens(tokens, ids_keep, self.pos_embed, self.cls_token, backend=self.backend)
        else:
            pixels = ops.gather_patches(imgs, ids_keep, self.patch_size, backend=self.backend)
            tokens = self.patch_embed.embed_pixels(pixels)
            x = ops.gather_tokens(tokens, ids_keep, self.pos_embed, self.cls_token, gathered=True,
                                  backend=self.backend)
        weights = cast_block_weights(self.blocks, x) if self._group_casts(x, official) else None
        attn = self._attention_plan()
        for i, blk in enumerate(self.blocks):
            x = blk(x, backend=attn, weights=None if weights is None else weights[i])
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor, *, pred_ids: torch.Tensor | None = None):
        """latent [N, len_keep+1, D] -> pred [N, L, p*p*C] (or [N, L-len_keep, p*p*C] with pred_masked_only, for
        the patches `pred_ids`: `removed_ids(ids_restore, len_keep)` when not given)."""
        len_keep = x.shape[1] - 1
        x = self.decoder_embed(x)
        x = ops.unshuffle_tokens(x, ids_restore, self.mask_token, self.decoder_pos_embed, backend=self.backend)
        weights = cast_block_weights(self.decoder_blocks, x) if self._group_casts(x) else None
        attn = self._attention_plan()
        for i, blk in enumerate(self.decoder_blocks):
            x = blk(x, backend=attn, weights=None if weights is None else weights[i])
        x = self.decoder_norm(x)[:, 1:, :]
        if self.pred_masked_only:
            ids = self.removed_ids(ids_restore, len_keep) if pred_ids is None else pred_ids
            x = torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self.decoder_pred(x)

    @staticmethod
    def removed_ids(ids_restore: torch.Tensor, len_keep: int) -> torch.Tensor:
        """Patch indices of the removed patches in shuffled order: [N, L - len_keep] (pred_masked_only rows),
        contiguous (as the loss kernel reads them)."""
        return inverse_permutation(ids_restore)[:, len_keep:].contiguous()

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, pred_ids=None):
        """imgs [N, C, H, W], pred [N, L, p*p*C], mask [N, L] (0 keep, 1 remove) -> scalar loss."""
        return ops.masked_mse_loss(pred, imgs, mask, self.patch_size, self.norm_pix_loss, pred_ids=pred_ids,
                                   backend=self.backend)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        # the removed patches' indices, found once for the decoder's head and the loss
        pred_ids = self.removed_ids(ids_restore, latent.shape[1] - 1) if self.pred_masked_only else None
        # (the official call when there are none: a subclass's forward_decoder may have the official signature)
        pred = self.forward_decoder(latent, ids_restore) if pred_ids is None else \
            self.forward_decoder(latent, ids_restore, pred_ids=pred_ids)
        loss = self.forward_loss(imgs, pred, mask, pred_ids=pred_ids)
        return loss, pred, mask


_LN = partial(nn.LayerNorm, eps=1e-6)


def mae_vit_base_patch16_dec512d8b(**kwargs):
    return MaskedAutoencoderViT(patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
                                decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, norm_layer=_LN, **kwargs)


def mae_vit_large_patch16_dec512d8b(**kwargs):
    return MaskedAutoencoderViT(patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512,
                                decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, norm_layer=_LN, **kwargs)


def mae_vit_huge_patch14_dec512d8b(**kwargs):
    return MaskedAutoencoderViT(patch_size=14, embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=512,
                                decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, norm_layer=_LN, **kwargs)


def mae_vit_cifar_small_patch4(**kwargs):
    """CIFAR-10 'small' (32x32, patch 4): encoder 128/3/4, decoder 64/1/4, MLP ratio 2."""
    kwargs.setdefault("img_size", 32)
    return MaskedAutoencoderViT(patch_size=4, embed_dim=128, depth=3, num_heads=4, decoder_embed_dim=64,
                                decoder_depth=1, decoder_num_heads=4, mlp_ratio=2, norm_layer=_LN, **kwargs)


def mae_vit_cifar_medium_patch4(**kwargs):
    """CIFAR-10 'medium' (32x32, patch 4): encoder 256/4/4, decoder 128/2/4, MLP ratio 2."""
    kwargs.setdefault("img_size", 32)
    return MaskedAutoencoderViT(patch_size=4, embed_dim=256, depth=4, num_heads=4, decoder_embed_dim=128,
                                decoder_depth=2, decoder_num_heads=4, mlp_ratio=2, norm_layer=_LN, **kwargs)


def mae_vit_tiny_patch4(**kwargs):
    """A tiny preset (32x32, patch 4, encoder 64/2/2, decoder 32/1/2) that trains in seconds on a CPU."""
    kwargs.setdefault("img_size", 32)
    return MaskedAutoencoderViT(patch_size=4, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32,
                                decoder_depth=1, decoder_num_heads=2, mlp_ratio=2, norm_layer=_LN, **kwargs)


# the official short names
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b

MODELS = {
    "mae_vit_base_patch16": mae_vit_base_patch16,
    "mae_vit_large_patch16": mae_vit_large_patch16,
    "mae_vit_huge_patch14": mae_vit_huge_patch14,
    "mae_vit_base_patch16_dec512d8b": mae_vit_base_patch16_dec512d8b,
    "mae_vit_large_patch16_dec512d8b": mae_vit_large_patch16_dec512d8b,
    "mae_vit_huge_patch14_dec512d8b": mae_vit_huge_patch14_dec512d8b,
    "mae_vit_cifar_small_patch4": mae_vit_cifar_small_patch4,
    "mae_vit_cifar_medium_patch4": mae_vit_cifar_medium_patch4,
    "mae_vit_tiny_patch4": mae_vit_tiny_patch4,
}


def create_model(name: str, **kwargs) -> MaskedAutoencoderViT:
    """Build a model by factory name (see `MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
