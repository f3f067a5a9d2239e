"""Shared by the training tests: `fastmae pretrain` arguments for tiny, fast runs, and a dead process."""
from __future__ import annotations

import subprocess
import sys

from fastmae.cli import build_parser

TINY = ["--model", "mae_vit_tiny_patch4", "--input_size", "32", "--num_workers", "0", "--device", "cpu",
        "--precision", "fp32", "--no_progress", "--builtin_size", "64", "--batch_size", "16", "--epochs", "2",
        "--warmup_epochs", "1", "--blr", "5e-3", "--backend", "sdpa"]


def pretrain_argv(output_dir, *extra: str) -> list[str]:
    """`fastmae pretrain` arguments: the tiny preset on 64 built-in images, 4 iterations per epoch, writing to
    output_dir (later flags override earlier ones)."""
    return ["pretrain", *TINY, "--output_dir", str(output_dir), "--log_dir", "", *extra]


def pretrain_args(output_dir, *extra: str):
    """`pretrain_argv`, parsed."""
    return build_parser().parse_args(pretrain_argv(output_dir, *extra))


def dead_pid() -> int:
    """The pid of a process that has ended (a child, started and waited for)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
