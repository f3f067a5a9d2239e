"""`fastmae visualize`: reconstructions of a checkpoint as a PNG grid, one row per image, four columns:
original, masked (removed patches shown in the mean colour), reconstruction, and the reconstruction with
the visible patches pasted back from the original.

norm_pix_loss models predict each patch normalised by its own mean and variance, so their raw prediction
has no colour or brightness. Here the prediction of each patch is mapped back with the *original image's*
statistics of that same patch:

    pixels = pred * sqrt(var + 1e-6) + mean       (mean, var (unbiased) over the patch's p*p*3 values)

This borrows each masked patch's mean and variance from the original image (information the model did
not see), so such a picture shows the predicted structure inside a patch, not its predicted colour. That is
fastmae's choice: the official notebook shows a model trained without norm_pix_loss. Models trained
without norm_pix_loss are shown as predicted.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

HELP = "draw reconstructions (original, masked, reconstruction, + visible) as a PNG grid"
# the docstring after its first paragraph, formula included, as one paragraph (argparse reflows it anyway)
DESCRIPTION = HELP + ". " + " ".join(p if p.endswith((".", ":")) else p + "."
                                     for p in (" ".join(part.split()) for part in __doc__.split("\n\n")[1:]))
COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import positive_int, seed, user_path
    p.add_argument("--checkpoint", default="", type=user_path,
                   help="checkpoint (.pth) to draw; '' draws a randomly initialised --model")
    p.add_argument("--model", default=None,
                   help="model name; None: the one recorded in the checkpoint's args")
    p.add_argument("--input_size", default=None, type=positive_int, help="image side; None: the checkpoint's")
    p.add_argument("--norm_pix_loss", default=None, action=argparse.BooleanOptionalAction,
                   help="whether the model was trained with norm_pix_loss; None: as recorded in the checkpoint's args")
    p.add_argument("--data_path", default="builtin", type=user_path,
                   help="image folder (class subfolders or flat), or 'builtin' (the built-in val split)")
    p.add_argument("--num_images", default=8, type=int, help="rows of the grid")
    p.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed")
    p.add_argument("--seed", default=0, type=seed,
                   help="seed of the masking noise, the image choice and the weights the checkpoint lacks (all "
                        "without one)")
    p.add_argument("--output", default="reconstructions.png", type=user_path, help="PNG file to write")
    p.add_argument("--tile", default=128, type=int, help="side in pixels of each drawn image")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu; cuda when available")
    p.add_argument("--backend", default=None,
                   help="op backend (auto, reference, sdpa, xformers, triton); None: automatic, or FASTMAE_BACKEND")
    p.add_argument("--allow-pickle", dest="allow_pickle", action="store_true",
                   help="allow trusted checkpoints that hold Python objects (official ones store an "
                        "argparse.Namespace)")


def unnormalize_pred(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """pred, target: [N, L, p*p*C] (target = patchified original). Per patch of the original:
    pred * sqrt(var + eps) + mean, the inverse of the norm_pix_loss target normalisation."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred * (var + eps).sqrt() + mean


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None) -> dict:
    """imgs: normalised [N, 3, H, W]. Returns normalised [N, 3, H, W] tensors `original`, `masked`
    (removed patches set to 0, the mean colour), `reconstruction` and `pasted` (visible patches from the
    original, removed ones from the reconstruction), plus `mask` [N, L] (1 = removed) and `loss`."""
    model.eval()
    pred_only = model.pred_masked_only
    model.pred_masked_only = False
    try:
        loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    finally:
        model.pred_masked_only = pred_only
    pred = pred.float()
    if model.norm_pix_loss:
        pred = unnormalize_pred(pred, model.patchify(imgs.float()))
    recon = model.unpatchify(pred)
    p, c = model.patch_size, imgs.shape[1]
    pixel_mask = model.unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, p * p * c))
    imgs = imgs.float()
    return {"original": imgs, "masked": imgs * (1 - pixel_mask), "reconstruction": recon,
            "pasted": imgs * (1 - pixel_mask) + recon * pixel_mask, "mask": mask, "loss": float(loss)}


def _to_uint8(x: torch.Tensor, tile: int) -> Image.Image:
    from .data import denormalize
    arr = denormalize(x.cpu()).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(np.ascontiguousarray(arr))
    return img.resize((tile, tile), Image.NEAREST if tile >= img.width else Image.BICUBIC)


def save_grid(result: dict, path: str | Path, tile: int = 128, pad: int = 4, header: bool = True) -> Path:
    """Write the quadruplets of `reconstruct` as one PNG (PIL only); returns the path."""
    keys = ("original", "masked", "reconstruction", "pasted")
    n = result["original"].shape[0]
    top = 18 if header else 0
    width = 4 * tile + 5 * pad
    height = top + n * tile + (n + 1) * pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if header:
        for j, title in enumerate(COLUMNS):
            draw.text((pad + j * (tile + pad) + 2, 3), title, fill=(0, 0, 0))
    for i in range(n):
        for j, key in enumerate(keys):
            canvas.paste(_to_uint8(result[key][i], tile), (pad + j * (tile + pad), top + pad + i * (tile + pad)))
    from ..model.checkpoint import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))  # written whole or not at all
    return path


def load_images(data_path: str, input_size: int, num_images: int, seed: int = 0) -> torch.Tensor:
    """`num_images` images (evaluation transform) from a folder or the built-in val split, chosen by seed."""
    from .data import EvalDataset, open_dataset
    base = open_dataset(data_path, input_size=input_size, split="val", builtin_size=max(50, 5 * num_images),
                        seed=seed)
    g = np.random.default_rng(seed)
    idx = g.permutation(len(base))[:num_images] if len(base) > num_images else np.arange(len(base))
    ds = EvalDataset(base, input_size, indices=[int(i) for i in idx])
    return torch.stack([ds[i][0] for i in range(len(ds))])


def run(args) -> int:
    from ..cli import discarding_new_dirs
    return discarding_new_dirs(Path(args.output).expanduser().parent, lambda: _run(args))


def _run(args) -> int:
    """The command's body: a user error raises (cli.main prints it as one line, exit 2)."""
    from ..cli import check_backend, check_device, check_mask_ratio, check_output_file
    from .checkpoint import model_from_checkpoint

    if args.num_images < 1:
        raise ValueError(f"--num_images must be at least 1, got {args.num_images}")
    if args.tile < 8:
        raise ValueError(f"--tile must be at least 8, got {args.tile}")
    if not 0.0 <= args.mask_ratio < 1.0:
        raise ValueError(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    device = check_device(args.device, other_devices=True)
    backend = check_backend(args.backend)
    check_output_file(args.output, "--output")
    torch.manual_seed(args.seed)  # the weights a checkpoint lacks (all of them without one): the same each run
    model, info = model_from_checkpoint(args.checkpoint or None, model=args.model, input_size=args.input_size,
                                        norm_pix_loss=args.norm_pix_loss, allow_pickle=args.allow_pickle,
                                        backend=backend, default_model="mae_vit_tiny_patch4")
    check_mask_ratio(args.mask_ratio, model.num_patches)
    model.to(device)
    imgs = load_images(args.data_path, info["input_size"], args.num_images, args.seed).to(device)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.rand(imgs.shape[0], model.num_patches, generator=g).to(device)
    result = reconstruct(model, imgs, args.mask_ratio, noise)
    path = save_grid(result, args.output, tile=args.tile)
    print(f"{info['model']} ({info['checkpoint'] or 'random init'}), norm_pix_loss {info['norm_pix_loss']}, "
          f"mask ratio {args.mask_ratio}: loss {result['loss']:.4f} on {imgs.shape[0]} images -> {path}")
    return 0
