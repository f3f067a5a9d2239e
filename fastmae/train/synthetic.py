"""The built-in dataset: labelled images drawn procedurally, so pretraining and the linear probe run with
no download.

Ten classes of simple patterns (stripes in three orientations, checkerboards, discs, squares, triangles,
rings, linear gradients, polka dots), each with random colours, positions, sizes and frequencies, plus a
little pixel noise. Image `i` of a split is a pure function of `(seed, split, i)`: the same arguments give
the same pixels on every machine and in every process, so data-parallel ranks and resumed runs see the
same images. The images are rendered once, in memory (uint8), when the dataset is built.
"""
from __future__ import annotations

import sys

import numpy as np
from PIL import Image

CLASSES = ("horizontal_stripes", "vertical_stripes", "diagonal_stripes", "checkerboard", "disc", "square",
           "triangle", "ring", "gradient", "dots")
SPLITS = {"train": 0, "val": 1}
PROGRESS_PIXELS = 25_000_000  # about 2 s of drawing: a progress bar from there on (when asked)


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A background and a foreground colour (RGB in [0, 1]) that differ clearly."""
    while True:
        bg, fg = rng.random(3), rng.random(3)
        if np.abs(bg - fg).sum() > 0.6:
            return bg, fg


def _pattern(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """The foreground weight in [0, 1] of one image, [size, size]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    s = float(size)
    name = CLASSES[label]
    if name in ("horizontal_stripes", "vertical_stripes", "diagonal_stripes"):
        period = rng.uniform(0.12, 0.35) * s
        phase = rng.uniform(0, period)
        if name == "horizontal_stripes":
            coord = yy
        elif name == "vertical_stripes":
            coord = xx
        else:
            coord = (xx + yy if rng.random() < 0.5 else xx - yy) / np.sqrt(2.0)
        return (((coord + phase) % period) < period / 2).astype(np.float64)
    if name == "checkerboard":
        cell = rng.uniform(0.1, 0.3) * s
        ox, oy = rng.uniform(0, cell, size=2)
        return ((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2).astype(np.float64)
    cx, cy = rng.uniform(0.3, 0.7, size=2) * s
    if name == "disc":
        r = rng.uniform(0.15, 0.3) * s
        return (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).astype(np.float64)
    if name == "ring":
        r = rng.uniform(0.2, 0.32) * s
        w = rng.uniform(0.06, 0.1) * s
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        return (np.abs(d - r) <= w / 2).astype(np.float64)
    if name == "square":
        h = rng.uniform(0.15, 0.3) * s
        return ((np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)).astype(np.float64)
    if name == "triangle":
        h = rng.uniform(0.2, 0.35) * s
        top = cy - h
        inside = (yy >= top) & (yy <= cy + h) & (np.abs(xx - cx) <= (yy - top) / 2.0)
        return inside.astype(np.float64)
    if name == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = ((xx - s / 2) * np.cos(angle) + (yy - s / 2) * np.sin(angle)) / (s / np.sqrt(2.0))
        return np.clip(t + 0.5, 0.0, 1.0)
    if name == "dots":
        spacing = rng.uniform(0.2, 0.33) * s
        r = rng.uniform(0.22, 0.32) * spacing
        ox, oy = rng.uniform(0, spacing, size=2)
        dx = (xx + ox) % spacing - spacing / 2
        dy = (yy + oy) % spacing - spacing / 2
        return (dx * dx + dy * dy <= r * r).astype(np.float64)
    raise ValueError(f"unknown class index {label}")


def render(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """One image of class `label` as uint8 [size, size, 3]."""
    bg, fg = _colours(rng)
    m = _pattern(label, rng, size)[..., None]
    img = bg * (1.0 - m) + fg * m
    img = img + rng.normal(0.0, 0.03, size=img.shape)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


class SyntheticShapes:
    """The built-in labelled dataset (see the module docstring).

    num_images: images in this split, classes balanced (label = index % 10).
    image_size: side in pixels of the rendered images.
    seed, split: "train" and "val" draw from different streams of the same seed.
    `load(i) -> (PIL RGB image, label, 0)`, the interface of `fastmae.train.data.ImageFolder` (the last item
    counts unreadable files skipped, never any here).
    progress: a progress bar (stderr) while the images are drawn, when there are enough pixels for it to take a
    few seconds (5000 images of 224 pixels take about 20 s).
    """

    def __init__(self, num_images: int = 5000, image_size: int = 32, seed: int = 0, split: str = "train",
                 progress: bool = False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if num_images < 1:
            raise ValueError(f"num_images must be positive, got {num_images}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        self.num_images, self.image_size, self.seed, self.split = num_images, image_size, seed, split
        self.classes = list(CLASSES)
        self.targets = [i % len(CLASSES) for i in range(num_images)]
        indices = range(num_images)
        if progress and num_images * image_size ** 2 >= PROGRESS_PIXELS:
            from tqdm.auto import tqdm
            indices = tqdm(indices, desc=f"drawing the built-in {split} images", unit="img", leave=False,
                           dynamic_ncols=True, file=sys.stderr)
        self.images = np.stack([render(self.targets[i], np.random.default_rng([seed, SPLITS[split], i]), image_size)
                                for i in indices])
        self.root = f"builtin:{split}"

    def __len__(self) -> int:
        return self.num_images

    def load(self, index: int, replace: bool = True):  # noqa: ARG002 - every drawn image can be read
        return Image.fromarray(self.images[index]), self.targets[index], 0

    def __repr__(self) -> str:
        return (f"SyntheticShapes(split={self.split!r}, num_images={self.num_images}, "
                f"image_size={self.image_size}, seed={self.seed}, classes={len(self.classes)})")
