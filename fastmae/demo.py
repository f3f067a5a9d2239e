"""`fastmae demo`: one forward and backward of a preset on generated images, printing the loss and which
backend served each op. A smoke test of an installation that needs no data and no GPU."""
from __future__ import annotations

import argparse
import time

import torch

from . import ops
from .model import MODELS, create_model
from .ops.registry import OPS

HELP = "forward + backward of a preset on generated images; prints the loss and the backend of each op"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import mask_ratio, positive_int, seed
    parser.add_argument("--model", default="mae_vit_tiny_patch4", choices=sorted(MODELS), help="preset")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="generated images in the batch")
    parser.add_argument("--mask_ratio", type=mask_ratio, default=0.75, help="fraction of patches removed, in [0, 1)")
    parser.add_argument("--norm_pix_loss", action="store_true")
    parser.add_argument("--backend", default=None,
                        help="auto, reference, sdpa, xformers, triton, or op=name,op=name; None: automatic, "
                             "or FASTMAE_BACKEND")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, cuda:N or cpu; cuda when available")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the weights, the images and the masking")


def run(args: argparse.Namespace) -> int:
    from .cli import check_backend, check_device, check_mask_ratio
    device = check_device(args.device, other_devices=True)
    backend = check_backend(args.backend)
    torch.manual_seed(args.seed)
    model = create_model(args.model, norm_pix_loss=args.norm_pix_loss, backend=backend).to(device)
    check_mask_ratio(args.mask_ratio, model.num_patches)
    size = model.patch_embed.img_size[0]
    imgs = torch.randn(args.batch_size, model.in_chans, size, size, device=device)
    with ops.record_choices() as served:
        t0 = time.perf_counter()
        loss, pred, mask = model(imgs, mask_ratio=args.mask_ratio)
        loss.backward()
        elapsed = time.perf_counter() - t0
    grads = sum(p.grad.norm().item() ** 2 for p in model.parameters() if p.grad is not None) ** 0.5
    print(f"{args.model} on {device} ({args.batch_size} generated {size}x{size} images, mask ratio {args.mask_ratio})")
    print(f"  loss {loss.item():.4f}, pred {tuple(pred.shape)}, {int(mask.sum().item())} patches removed, "
          f"grad norm {grads:.4f}, forward+backward {elapsed * 1000:.1f} ms")
    for op in OPS:
        print(f"  {op:<18} served by {served.get(op, '(not called)')}")
    return 0
