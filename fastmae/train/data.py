"""Data for pretraining and evaluation, without torchvision: image folders, the official augmentation,
and loaders whose randomness is a function of (seed, epoch, sample index).

Why explicit randomness: the random crop, the flip and the masking noise of sample `i` in epoch `e` are
drawn from `numpy.random.default_rng([seed, e, i])`. They therefore do not depend on the number of
DataLoader workers, on the number of data-parallel ranks, or on where a run was interrupted and resumed:
a 1-process run and a 2-process run with the same global batch see identical batches, and a resumed run
continues exactly where the interrupted one stopped.

Datasets here expose `load(i) -> (PIL RGB image, label, skipped)`, where `skipped` counts the unreadable
files passed over to produce the sample (a corrupt file is replaced by the next readable one, with a
warning, and never stops an epoch).
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BUILTIN = "builtin"
MAX_CONSECUTIVE_BAD = 64


class DataError(ValueError):
    """The data cannot be used (missing or empty folder, no readable image): raised before any training."""


# ------------------------------------------------------------------------------------------ transforms
class RandomResizedCrop:
    """Crop a random area (fraction `scale` of the image, aspect ratio in `ratio`, log-uniform) and resize
    it to `size` x `size` with bicubic interpolation: the sampling rule of torchvision's transform of that
    name (10 tries, then a centre crop clamped to `ratio`), with the random numbers from `rng`."""

    def __init__(self, size: int, scale=(0.2, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
        self.size, self.scale, self.ratio = int(size), scale, ratio

    def box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(left, top, crop width, crop height)."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return left, top, w, h
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        left, top, w, h = self.box(img.width, img.height, rng)
        return img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))


def to_rgb(img: Image.Image) -> Image.Image:
    """An image as 8-bit RGB. PIL's own conversion clips 16-bit and 32-bit integer images ("I;16", "I") and float
    ones ("F") to 0..255, which turns a 16-bit photograph white; they are scaled first: integer ones from the
    16-bit range (65535 -> 255), float ones from [0, 1] when their values lie there (else taken as 0..255). An RGB
    image is returned as it is (no copy: the transforms call this on what `ImageFolder.load` converted already)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.float64) / 257.0
    elif img.mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
    else:
        return img.convert("RGB")
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")


def to_tensor_normalized(img: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """PIL RGB image -> float32 [3, H, W], scaled to [0, 1] then normalised per channel."""
    x = np.asarray(to_rgb(img), dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def denormalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Inverse of the normalisation: [..., 3, H, W] -> pixel values in [0, 1] (not clamped)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * s + m


class PretrainTransform:
    """The official pretraining augmentation: RandomResizedCrop(input_size, scale=(0.2, 1.0), bicubic),
    horizontal flip with probability 1/2, ImageNet mean/std normalisation."""

    def __init__(self, input_size: int, scale=(0.2, 1.0)):
        self.crop = RandomResizedCrop(input_size, scale=scale)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        img = self.crop(to_rgb(img), rng)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor_normalized(img)


class EvalTransform:
    """The official evaluation transform: resize the shorter side to input_size / 0.875 (bicubic), centre
    crop input_size, normalise. Deterministic."""

    def __init__(self, input_size: int, crop_pct: float = 0.875):
        self.size = int(input_size)
        self.resize = int(round(input_size / crop_pct))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        w, h = img.size
        scale = self.resize / min(w, h)
        nw, nh = max(self.size, int(round(w * scale))), max(self.size, int(round(h * scale)))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        return to_tensor_normalized(img.crop((left, top, left + self.size, top + self.size)))


# ------------------------------------------------------------------------------------------ datasets
def _image_files(folder: Path, recursive: bool = True) -> list[str]:
    """Image files under `folder` by extension, sorted (os.walk: no stat call per file, which matters for
    the 1.28M files of ImageNet)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in filenames
                     if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMG_EXTENSIONS)
        if not recursive:
            break
    return sorted(found)


class ImageFolder:
    """Images under `root`: class subfolders (`root/<class>/**/<image>`, labels by sorted class name, as
    ImageFolder does) or, with no subfolder holding images, a flat folder of images (one class, label 0).

    A missing folder, or one with no image files, raises `DataError` at construction. A file that cannot be
    decoded later is skipped: a warning names it once, `bad_paths` records it (in this process), and the
    next readable file is used in its place, so an epoch never stops on a corrupt file.
    `verify=True` also opens every file's header at construction and drops those that fail (slower).
    """

    def __init__(self, root: str | os.PathLike, verify: bool = False):
        root = Path(root).expanduser()
        if not root.exists():
            raise DataError(f"data folder not found: {root}")
        if not root.is_dir():
            raise DataError(f"data path is not a folder: {root}")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        samples: list[tuple[str, int]] = []
        kept_classes = []
        for name in classes:
            files = _image_files(root / name)
            if files:
                samples.extend((f, len(kept_classes)) for f in files)
                kept_classes.append(name)
        if not samples:
            files = _image_files(root, recursive=False)
            samples = [(f, 0) for f in files]
            kept_classes = [root.name] if files else []
        if not samples:
            raise DataError(f"no image files ({', '.join(IMG_EXTENSIONS)}) in {root} or its class subfolders")
        self.root = str(root)
        self.classes = kept_classes
        self.bad_paths: set[str] = set()
        if verify:
            good = []
            for path, label in samples:
                try:
                    with Image.open(path) as im:
                        im.verify()
                    good.append((path, label))
                except Exception as exc:  # noqa: BLE001 - any decoder error means "unreadable"
                    self._mark_bad(path, exc)
            if not good:
                raise DataError(f"none of the {len(samples)} image files in {root} can be read")
            samples = good
        self.samples = samples
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _mark_bad(self, path: str, exc: Exception) -> None:
        if path not in self.bad_paths:
            self.bad_paths.add(path)
            warnings.warn(f"skipping unreadable image {path}: {type(exc).__name__}: {exc}", stacklevel=3)

    def load(self, index: int, replace: bool = True):
        """(RGB image, label, skipped): a corrupt file is replaced by the next readable one (pretraining), or
        with `replace=False` (an evaluation, where another image in its place would change the score) raises
        DataError naming it."""
        n = len(self.samples)
        tries = min(n, MAX_CONSECUTIVE_BAD)
        for skipped in range(tries):
            path, label = self.samples[(index + skipped) % n]
            try:
                with Image.open(path) as im:
                    im.load()  # decoded before the file closes (to_rgb returns an RGB image itself)
                    return to_rgb(im), label, skipped
            except Exception as exc:  # noqa: BLE001 - any decoder error means "unreadable"
                if not replace:
                    raise DataError(f"cannot read {path} ({type(exc).__name__}: {exc}); an evaluation scores "
                                    f"every image it lists and does not replace one: remove or mend it") from None
                self._mark_bad(path, exc)
        if tries == n:
            raise DataError(f"none of the {n} image file(s) in {self.root} can be read; is this an image folder?")
        raise DataError(f"{tries} consecutive unreadable images from index {index} in {self.root}; "
                        f"is this an image folder?")

    def __repr__(self) -> str:
        return f"ImageFolder(root={self.root!r}, images={len(self)}, classes={len(self.classes)})"


def open_dataset(data_path: str | None, *, input_size: int, split: str = "train", builtin_size: int = 5000,
                 seed: int = 0, verify: bool = False, progress: bool = False):
    """The dataset named by `data_path`: "builtin" / None / "" for the built-in set, else a folder.
    `progress`: a progress bar while the built-in set is drawn, when that takes long (large images).

    Like the official scripts, a folder holding a `train` (or `val`) split subfolder is read from that
    subfolder (`split_folder`).
    """
    if data_path in (None, "", BUILTIN):
        from .synthetic import SyntheticShapes
        n = builtin_size if split == "train" else max(1, builtin_size // 5)
        return SyntheticShapes(n, image_size=input_size, seed=seed, split=split, progress=progress)
    return ImageFolder(split_folder(Path(data_path).expanduser(), split), verify=verify)


SPLIT_NAMES = ("train", "val", "test")


def split_folder(root: Path, split: str) -> Path:
    """`root/split` when it is a split folder, else `root`. It is one when it holds class subfolders itself, or
    when every subfolder of `root` is a split name (train/, val/, test/). A class that happens to be called
    `train` beside other class folders (CIFAR-100 has one) is a class, not a split."""
    sub = root / split
    if not sub.is_dir():
        return root
    if any(d.is_dir() and not d.name.startswith(".") for d in sub.iterdir()):
        return sub
    others = [d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return sub if all(name in SPLIT_NAMES for name in others) else root


class PretrainDataset(torch.utils.data.Dataset):
    """Pretraining samples `(image [3, S, S], label, noise [L], skipped)` from a dataset with `load(i)`.

    Index with `(epoch, i)` (what `EpochSampler` yields) or with `i` (epoch 0). The crop, flip and masking
    noise come from `numpy.random.default_rng([seed, epoch, i])`.
    """

    def __init__(self, base, input_size: int, num_patches: int, seed: int = 0, transform=None):
        self.base, self.num_patches, self.seed = base, num_patches, seed
        self.transform = transform or PretrainTransform(input_size)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, index])
        img, label, skipped = self.base.load(index)
        x = self.transform(img, rng)
        noise = torch.from_numpy(rng.random(self.num_patches, dtype=np.float32))
        return x, label, noise, skipped


class EvalDataset(torch.utils.data.Dataset):
    """`(image, label)` with the deterministic evaluation transform. An unreadable image raises DataError naming
    it: an evaluation scores every image it lists, none replaced by another."""

    def __init__(self, base, input_size: int, indices: Sequence[int] | None = None):
        self.base, self.transform = base, EvalTransform(input_size)
        self.indices = list(range(len(base))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        img, label, _ = self.base.load(self.indices[i], replace=False)
        return self.transform(img), label


class EpochSampler(torch.utils.data.Sampler):
    """Wraps a sampler of indices (a `DistributedSampler`) to yield `(epoch, index)`, so that per-sample
    randomness knows the epoch even in persistent workers; `skip` drops the first items once (resuming in
    the middle of an epoch)."""

    def __init__(self, sampler):
        self.sampler, self.epoch, self.skip = sampler, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for k, index in enumerate(self.sampler):
            if k >= self.skip:
                yield self.epoch, int(index)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def pretrain_loader(dataset: PretrainDataset, batch_size: int, *, world_size: int = 1, rank: int = 0,
                    seed: int = 0, num_workers: int = 0, pin_memory: bool = False):
    """(DataLoader, EpochSampler): a DistributedSampler (shuffled by seed + epoch, as the official script
    uses even on one process), batches of `batch_size` per rank, incomplete last batch dropped."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=seed)
    if len(sampler) < batch_size:
        raise DataError(f"{len(dataset)} images give {len(sampler)} per process, fewer than one batch of "
                        f"{batch_size}; lower --batch_size or add images")
    epoch_sampler = EpochSampler(sampler)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=epoch_sampler,
                                         num_workers=num_workers, pin_memory=pin_memory, drop_last=True,
                                         persistent_workers=num_workers > 0)
    return loader, epoch_sampler
