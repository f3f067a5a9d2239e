"""The command line: `fastmae info` and `fastmae demo` run and say what they should."""
import subprocess
import sys

import torch

from fastmae.cli import main


def test_info_lists_every_op_and_backend(capsys):
    assert main(["info", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "gather_tokens", "masked_mse_loss", "xformers", "triton", "sdpa", "reference"):
        assert word in out
    assert "automatic choice: sdpa" in out


def test_demo_prints_loss_and_backends(capsys):
    assert main(["demo", "--batch_size", "2", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    # the reference path keeps the official order: all patches embedded, no patch gather
    assert "loss" in out and out.count("served by reference") == 4
    assert "gather_patches     served by (not called)" in out


def test_clear_error_for_unavailable_backend(capsys):
    assert main(["demo", "--batch_size", "1", "--backend", "xformers"]) == 2
    assert "xformers" in capsys.readouterr().err


def test_module_entry_points():
    for args in (["-m", "fastmae", "--help"], ["-m", "fastmae.info", "--dtype", "float32"]):
        res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "fastmae" in res.stdout
