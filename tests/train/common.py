"""Shared by the training tests: `fastmae pretrain` arguments for tiny, fast runs, a comparison of trained
weights, and a dead process."""
from __future__ import annotations

import subprocess
import sys

import torch

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


def assert_same_weights(got: dict, expected: dict, *, lr: float, steps: int, atol: float, rtol: float) -> None:
    """Two runs that took the same optimizer steps by different routes (accumulation, ranks) end with the same
    weights within `atol`/`rtol`, except the attention key biases, held to `lr * steps`: their true gradient is
    zero (softmax is invariant to adding q.b_k to every score of a row), so what they receive is round-off, which
    Adam normalises into steps of up to lr, and round-off differs with the route and the machine's kernels."""
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        w = got[k]
        if k.endswith("attn.qkv.bias"):
            d = v.numel() // 3
            torch.testing.assert_close(w[d:2 * d], v[d:2 * d], atol=lr * steps, rtol=0, msg=k + " (key part)")
            w, v = torch.cat([w[:d], w[2 * d:]]), torch.cat([v[:d], v[2 * d:]])
        torch.testing.assert_close(w, v, atol=atol, rtol=rtol, msg=k)
