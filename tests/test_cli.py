"""The command line: `fastmae info` and `fastmae demo` run and say what they should."""
import subprocess
import sys


from fastmae.cli import main


def test_info_lists_every_op_and_backend(capsys):
    assert main(["info", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "gather_tokens", "masked_mse_loss", "xformers", "triton", "sdpa", "reference"):
        assert word in out
    assert "automatic choice: sdpa" in out
    assert "Triton attention launch settings: " in out


def test_info_names_the_tuned_architectures(tmp_path, monkeypatch):
    import importlib.util
    import json

    from fastmae import info

    (tmp_path / "attention_tuned.json").write_text(json.dumps(
        {"sm_90": {"fwd_short": {"bf16,N64,D64": [32, 64, 4, 1]}, "bwd_dq": {"bf16,D64": [64, 32, 4, 3]}},
         "source": {"sm_90": {"device": "NVIDIA H100", "date": "2026-11-27"}}}))
    spec = importlib.util.spec_from_loader("fastmae.kernels", loader=None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    assert info.tuned_attention() == "sm_90: 2 settings (NVIDIA H100, 2026-11-27); other GPUs use the rule"


def test_demo_prints_loss_and_backends(capsys):
    assert main(["demo", "--batch_size", "2", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    # the reference path keeps the official order: all patches embedded, no patch gather
    assert "loss" in out and out.count("served by reference") == 4
    assert "gather_patches     served by (not called)" in out


def test_clear_error_for_unavailable_backend(capsys):
    # on the CPU: on a GPU an installed xformers may serve the demo
    assert main(["demo", "--batch_size", "1", "--backend", "xformers", "--device", "cpu"]) == 2
    assert "xformers" in capsys.readouterr().err


def test_module_entry_points():
    for args in (["-m", "fastmae", "--help"], ["-m", "fastmae.info", "--dtype", "float32"]):
        res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "fastmae" in res.stdout
