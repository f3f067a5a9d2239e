"""`fastmae linprobe`: linear probing of a pretrained encoder, as the official `main_linprobe.py` measures it,
in a form that runs in seconds for small sets.

The encoder is frozen and sees every patch (mask ratio 0, patches in their own order). Its features are
either the class token (`--pool cls`, the official default) or the mean of the patch tokens
(`--pool mean`, the official `--global_pool`; here the mean of the final-normed tokens). A linear
classifier with a BatchNorm without affine parameters in front of it (the official head:
`BatchNorm1d(D, affine=False, eps=1e-6)` + `Linear`, weights initialised with std 0.01) is trained with
SGD (momentum 0.9, lr = blr * batch / 256, blr 1.0, linear warmup then cosine). Top-1 accuracy is
measured on a held-out split.

Differences from the official recipe, on purpose: features are extracted once, without augmentation
(the official probe re-crops every epoch), and the optimiser is plain SGD instead of LARS (whose
layer-wise scaling matters at the official batch of 16384), hence the larger base lr (the official 0.1 is
LARS's); on the built-in set it reaches the accuracy of a fully converged L-BFGS logistic regression.

From Python:

    from fastmae.train.linprobe import linear_probe
    result = linear_probe(model, train_data, val_data, pool="cls")   # {'acc': 0.87, ...}
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

HELP = "linear probe: top-1 accuracy of a linear classifier on frozen encoder features"
DESCRIPTION = HELP + " (class subfolders, or the labelled built-in dataset)."
POOLS = ("cls", "mean")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import positive_int, seed, user_path
    p.add_argument("--checkpoint", default="", type=user_path,
                   help="pretrained checkpoint (.pth); '' probes a randomly initialised --model (a baseline)")
    p.add_argument("--model", default=None, help="model name; None: the one recorded in the checkpoint's args")
    p.add_argument("--input_size", default=None, type=positive_int, help="image side; None: the checkpoint's")
    p.add_argument("--data_path", default="builtin", type=user_path,
                   help="folder with class subfolders (with train/ and val/ subfolders if present), or 'builtin'")
    p.add_argument("--val_fraction", default=0.2, type=float,
                   help="held-out fraction, in (0, 1), when --data_path has no val/ subfolder")
    p.add_argument("--builtin_size", default=5000, type=int, help="training images of the built-in set "
                                                                  "(its val split has a fifth as many)")
    p.add_argument("--pool", default="cls", choices=POOLS, help="class token or mean of the patch tokens")
    p.add_argument("--epochs", default=90, type=int, help="epochs of classifier training (on cached features)")
    p.add_argument("--batch_size", default=256, type=int, help="classifier batch size")
    p.add_argument("--blr", default=1.0, type=float,
                   help="base lr: lr = blr * batch_size / 256 (SGD on standardised features; the official 0.1 is "
                        "for LARS)")
    p.add_argument("--weight_decay", default=0.0, type=float, help="classifier weight decay")
    p.add_argument("--warmup_epochs", default=10, type=int, help="epochs of linear lr warmup")
    p.add_argument("--seed", default=0, type=seed,
                   help="seed of the split, the classifier and the weights the checkpoint lacks (all without one)")
    p.add_argument("--num_workers", default=0, type=int, help="DataLoader workers for feature extraction")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu; cuda when available")
    p.add_argument("--backend", default=None,
                   help="op backend (auto, reference, sdpa, xformers, triton); None: automatic, or FASTMAE_BACKEND")
    p.add_argument("--output_dir", default="", type=user_path,
                   help="folder to write linprobe.json to ('' writes nothing)")
    p.add_argument("--allow-pickle", dest="allow_pickle", action="store_true",
                   help="allow trusted checkpoints that hold Python objects (official ones store an "
                        "argparse.Namespace)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------------------ features
@torch.no_grad()
def encode(model, imgs: torch.Tensor, pool: str = "cls") -> torch.Tensor:
    """imgs [N, C, H, W] -> features [N, D] of the frozen encoder (all patches, in order)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    n, L = imgs.shape[0], model.num_patches
    noise = torch.arange(L, device=imgs.device, dtype=torch.float32).expand(n, L)  # identity order
    strategy = model.mask_strategy
    model.mask_strategy = "random"
    try:
        latent, _, _ = model.forward_encoder(imgs, 0.0, noise)
    finally:
        model.mask_strategy = strategy
    return (latent[:, 0] if pool == "cls" else latent[:, 1:].mean(dim=1)).float()


def _as_loader(data, batch_size: int, num_workers: int):
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        data = torch.utils.data.TensorDataset(data[0], torch.as_tensor(data[1]))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)


@torch.no_grad()
def extract_features(model, data, *, pool: str = "cls", device="cpu", batch_size: int = 256,
                     num_workers: int = 0, progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] and labels [N] of a dataset of (image, label) or an (images, labels) pair. `progress`:
    the description of a progress bar over the batches (None: no bar)."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    batches = _bar(_as_loader(data, batch_size, num_workers), progress, "batch")
    try:
        for imgs, y in batches:
            feats.append(encode(model, imgs.to(device), pool).cpu())
            labels.append(torch.as_tensor(y).long())
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


# ------------------------------------------------------------------------------------------ classifier
def make_head(dim: int, num_classes: int) -> nn.Sequential:
    """The official linear-probe head: BatchNorm1d without affine (eps 1e-6), then Linear (std 0.01 init)."""
    linear = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def _accuracy(head, x: torch.Tensor, y: torch.Tensor) -> float:
    head.eval()
    with torch.no_grad():
        return float((head(x).argmax(dim=1) == y).float().mean()) if len(y) else float("nan")


def _bar(iterable, desc: str | None, unit: str):
    if desc is None:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)


MIN_TRAIN = 2  # the head's BatchNorm normalises a batch in training mode: one sample has no variance


def train_head(train_x, train_y, val_x, val_y, num_classes: int, *, epochs: int = 90, batch_size: int = 256,
               blr: float = 1.0, weight_decay: float = 0.0, warmup_epochs: int = 10, seed: int = 0,
               progress: bool = False) -> dict:
    """Train the head on cached features; returns {'acc', 'train_acc', 'head'}. `progress`: a bar over the
    epochs."""
    if len(train_y) < MIN_TRAIN:
        raise ValueError(f"a linear probe needs at least {MIN_TRAIN} training samples (its BatchNorm normalises "
                         f"a batch), got {len(train_y)}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = make_head(train_x.shape[1], num_classes)
    batch_size = min(batch_size, len(train_y))
    lr = blr * batch_size / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    iters = max(1, len(train_y) // batch_size)
    warmup = min(warmup_epochs, max(epochs - 1, 0))
    loss_fn = nn.CrossEntropyLoss()
    for epoch in _bar(range(epochs), "classifier" if progress else None, "epoch"):
        head.train()
        perm = torch.randperm(len(train_y), generator=g)
        for i in range(iters):
            t = epoch + i / iters
            cur = lr * t / warmup if t < warmup else \
                lr * 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(epochs - warmup, 1e-12)))
            for group in opt.param_groups:
                group["lr"] = cur
            idx = perm[i * batch_size:(i + 1) * batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples in training mode
                continue
            loss = loss_fn(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {"acc": _accuracy(head, val_x, val_y), "train_acc": _accuracy(head, train_x, train_y), "head": head}


def linear_probe(model, train_data, val_data, *, pool: str = "cls", num_classes: int | None = None,
                 epochs: int = 90, batch_size: int = 256, blr: float = 1.0, weight_decay: float = 0.0,
                 warmup_epochs: int = 10, device="cpu", seed: int = 0, num_workers: int = 0,
                 progress: bool = False) -> dict:
    """Linear probe of `model`'s frozen encoder.

    train_data, val_data: datasets of (normalised image [C, H, W], label) (e.g. `data.EvalDataset`) or
    (images [N, C, H, W], labels [N]) pairs. Returns a dict: `acc` (top-1 on val_data, in [0, 1]),
    `train_acc`, `chance` (1 / classes), `num_classes`, `num_train`, `num_val`, `feature_dim`, `pool`,
    and `head` (the trained classifier, an nn.Module).
    """
    model.to(device)
    train_x, train_y = extract_features(model, train_data, pool=pool, device=device, num_workers=num_workers,
                                        progress="train features" if progress else None)
    val_x, val_y = extract_features(model, val_data, pool=pool, device=device, num_workers=num_workers,
                                    progress="val features" if progress else None)
    if num_classes is None:
        num_classes = int(max(train_y.max(), val_y.max())) + 1
    if num_classes < 2:
        raise ValueError("a linear probe needs at least two classes (class subfolders)")
    out = train_head(train_x, train_y, val_x, val_y, num_classes, epochs=epochs, batch_size=batch_size, blr=blr,
                     weight_decay=weight_decay, warmup_epochs=warmup_epochs, seed=seed, progress=progress)
    out.update(chance=1.0 / num_classes, num_classes=num_classes, num_train=len(train_y), num_val=len(val_y),
               feature_dim=int(train_x.shape[1]), pool=pool)
    return out


def probe_datasets(data_path: str, input_size: int, *, val_fraction: float = 0.2, builtin_size: int = 5000,
                   seed: int = 0, progress: bool = False):
    """(train, val, class names) as EvalDatasets: the built-in set's train/val splits; a folder's train/ and
    val/ subfolders; or one folder (the `train/` subfolder where there is no `val/`, as `fastmae pretrain`
    reads it) split at random (by seed) into 1 - val_fraction / val_fraction. DataError when fewer than two
    images are left to train the head on."""
    from .data import BUILTIN, DataError
    train, val, classes = _probe_datasets(data_path, input_size, val_fraction, builtin_size, seed, progress)
    if len(train) < MIN_TRAIN:
        builtin = data_path in (None, "", BUILTIN)
        raise DataError(f"{'--builtin_size ' + str(builtin_size) if builtin else data_path} leaves {len(train)} "
                        f"image(s) to train the classifier on; a linear probe needs at least {MIN_TRAIN}"
                        + ("" if builtin else " (where one folder is split in two, --val_fraction is the share "
                                              "held out)"))
    return train, val, classes


def _probe_datasets(data_path, input_size, val_fraction, builtin_size, seed, progress):
    from .data import BUILTIN, DataError, EvalDataset, ImageFolder, open_dataset, split_folder
    if data_path in (None, "", BUILTIN):
        train = open_dataset(None, input_size=input_size, split="train", builtin_size=builtin_size, seed=seed,
                             progress=progress)
        val = open_dataset(None, input_size=input_size, split="val", builtin_size=builtin_size, seed=seed,
                           progress=progress)
        return EvalDataset(train, input_size), EvalDataset(val, input_size), train.classes
    root = Path(data_path).expanduser()
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = ImageFolder(root / "train"), ImageFolder(root / "val")
        if train.classes != val.classes:
            only_train = sorted(set(train.classes) - set(val.classes))
            only_val = sorted(set(val.classes) - set(train.classes))
            what = "; ".join(f"only in {name}/: {', '.join(c[:5])}{' ...' if len(c) > 5 else ''}"
                             for name, c in (("train", only_train), ("val", only_val)) if c)
            raise DataError(f"train/ and val/ of {root} have different classes ({what or 'in another order'})")
        return EvalDataset(train, input_size), EvalDataset(val, input_size), train.classes
    root = split_folder(root, "train")  # a train/ split without val/ beside it: split train/ itself
    base = ImageFolder(root)
    if len(base.classes) < 2:
        held = (f"one class subfolder ({base.classes[0]})" if base.classes and base.classes[0] != root.name
                else "no class subfolders")
        raise DataError(f"{root} holds {held}; a linear probe needs labelled images of at least two classes "
                        f"(one subfolder per class)")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(len(base))
    n_val = max(1, int(round(len(base) * val_fraction)))
    return (EvalDataset(base, input_size, perm[n_val:].tolist()), EvalDataset(base, input_size, perm[:n_val].tolist()),
            base.classes)


def run(args) -> int:
    from ..cli import discarding_new_dirs
    return discarding_new_dirs(args.output_dir, lambda: _run(args))


def _run(args) -> int:
    """The command's body: a user error raises (cli.main prints it as one line, exit 2)."""
    from ..cli import check_backend, check_device, check_output_dir
    from .checkpoint import model_from_checkpoint

    if args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}")
    if args.batch_size < 2:
        raise ValueError(f"--batch_size must be at least 2, got {args.batch_size}")
    if args.builtin_size < 1:
        raise ValueError(f"--builtin_size must be at least 1, got {args.builtin_size}")
    if not 0.0 < args.val_fraction < 1.0:  # checked whether or not a split uses it
        raise ValueError(f"--val_fraction must be in (0, 1), got {args.val_fraction}")
    for name in ("warmup_epochs", "num_workers"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must not be negative, got {getattr(args, name)}")
    if not args.blr > 0:
        raise ValueError(f"--blr must be positive, got {args.blr}")
    if not args.weight_decay >= 0:
        raise ValueError(f"--weight_decay must not be negative, got {args.weight_decay}")
    device = check_device(args.device, other_devices=True)
    backend = check_backend(args.backend)
    if args.output_dir:
        check_output_dir(args.output_dir, "--output_dir")
    torch.manual_seed(args.seed)  # the weights a checkpoint lacks (all of them without one): the same each run
    model, info = model_from_checkpoint(args.checkpoint or None, model=args.model, input_size=args.input_size,
                                        allow_pickle=args.allow_pickle, backend=backend,
                                        default_model="mae_vit_tiny_patch4", encoder_only=True)
    train, val, classes = probe_datasets(args.data_path, info["input_size"], val_fraction=args.val_fraction,
                                         builtin_size=args.builtin_size, seed=args.seed,
                                         progress=not args.no_progress)
    result = linear_probe(model, train, val, pool=args.pool, num_classes=len(classes), epochs=args.epochs,
                          batch_size=args.batch_size, blr=args.blr, weight_decay=args.weight_decay,
                          warmup_epochs=args.warmup_epochs, device=device, seed=args.seed,
                          num_workers=args.num_workers, progress=not args.no_progress)
    result.pop("head")
    summary = {**result, "model": info["model"], "checkpoint": info["checkpoint"], "data_path": args.data_path,
               "classes": list(classes)}
    print(f"{info['model']} ({info['checkpoint'] or 'random init'}), {args.pool} features "
          f"({result['feature_dim']}-d), {result['num_train']} train / {result['num_val']} val images, "
          f"{result['num_classes']} classes: top-1 {100 * result['acc']:.2f}% (train {100 * result['train_acc']:.2f}%, "
          f"chance {100 * result['chance']:.2f}%)")
    if args.output_dir:
        from ..model.checkpoint import atomic_write_text

        path = Path(args.output_dir).expanduser() / "linprobe.json"
        atomic_write_text(path, json.dumps(summary, indent=2) + "\n")  # written whole or not at all
        print(f"wrote {path}")
    return 0
