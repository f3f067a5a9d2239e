"""Shared by the training tests: build `fastmae pretrain` arguments for tiny, fast runs."""
from __future__ import annotations

from fastmae.cli import build_parser

TINY = ["--model", "mae_vit_tiny_patch4", "--input_size", "32", "--num_workers", "0", "--device", "cpu",
        "--precision", "fp32", "--no_progress", "--builtin_size", "64", "--batch_size", "16", "--epochs", "2",
        "--warmup_epochs", "1", "--blr", "5e-3", "--backend", "sdpa"]


def pretrain_args(output_dir, *extra: str):
    """Parsed `fastmae pretrain` arguments: the tiny preset on 64 built-in images, 4 iterations per epoch,
    writing to output_dir (later flags override earlier ones)."""
    argv = ["pretrain", *TINY, "--output_dir", str(output_dir), "--log_dir", "", *extra]
    return build_parser().parse_args(argv)
