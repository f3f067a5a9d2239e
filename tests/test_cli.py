"""The command line: `fastmae info` and `fastmae demo` run and say what they should."""
import os
import subprocess
import sys

import pytest
import torch

from fastmae.cli import main
from tests.utils import error_line


def test_info_lists_every_op_and_backend(capsys):
    assert main(["info", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "gather_tokens", "masked_mse_loss", "xformers", "triton", "sdpa", "reference"):
        assert word in out
    assert "automatic choice: sdpa" in out
    assert "Triton attention launch settings: " in out and "Triton masked-MSE loss launch settings: " in out


def test_info_names_the_tuned_architectures(tmp_path, monkeypatch, tuned_dir):
    import importlib.util
    import json

    from fastmae import info

    (tmp_path / "attention_tuned.json").write_text(json.dumps(
        {"sm_90": {"fwd_short": {"bf16,N64,D64": [32, 64, 4, 1]}, "bwd_dq": {"bf16,D64": [64, 32, 4, 3]}},
         "source": {"sm_90": {"device": "NVIDIA H100", "date": "2026-11-27"}}}))
    spec = importlib.util.spec_from_loader("fastmae.kernels", loader=None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    assert info.tuned_settings() == "sm_90: 2 settings (NVIDIA H100, 2026-11-27); other GPUs use the rule"
    assert info.tuned_settings("loss") == ("none recorded: every GPU uses the rule (fastmae bench tune --op loss "
                                            "--write records them)")
    (tmp_path / "loss_tuned.json").write_text(json.dumps(
        {"sm_90": {"fwd": {"bf16,fp32,C3,p16,norm1,ids0,grad1": [1, 4, 4, 1]}},
         "source": {"sm_90": {"device": "NVIDIA H200", "date": "2026-12-02"}}}))
    assert info.tuned_settings("loss") == "sm_90: 1 settings (NVIDIA H200, 2026-12-02); other GPUs use the rule"
    # FASTMAE_TUNED_DIR: the tables there instead of the kernels' own
    other = tmp_path / "tuned"
    other.mkdir()
    tuned_dir(other)
    assert info.tuned_settings() == ("none recorded (the table in FASTMAE_TUNED_DIR): every GPU uses the rule "
                                     "(fastmae bench tune --write records them)")
    (other / "attention_tuned.json").write_text("{not json")
    assert info.tuned_settings().endswith("cannot be read (Expecting property name enclosed in double quotes: line 1 "
                                          "column 2 (char 1)): every GPU uses the rule")


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


# ------------------------------------------------------------------------------------------ user errors
@pytest.mark.parametrize("flag, value", [("--batch_size", "0"), ("--batch_size", "-2"), ("--mask_ratio", "1.0"),
                                         ("--mask_ratio", "-0.1"), ("--seed", "-1"), ("--seed", "x")])
def test_demo_refuses_bad_numbers_when_parsing(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--device", "cpu", flag, value])
    assert exc.value.code == 2
    assert f"argument {flag}: must be" in error_line(capsys.readouterr().err, "demo")


def test_demo_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--batch_size BATCH_SIZE generated images", "--mask_ratio MASK_RATIO fraction of patches removed",
                 "--device DEVICE cuda", "--seed SEED seed of"):
        assert text in out, text


def test_demo_mask_ratio_keeping_no_patch_is_a_clear_error(capsys):
    assert main(["demo", "--device", "cpu", "--mask_ratio", "0.999"]) == 2
    assert "--mask_ratio 0.999 keeps none of the model's 64 patches" in error_line(capsys.readouterr().err,
                                                                                          "demo")


@pytest.mark.parametrize("command", ["demo", "visualize", "linprobe"])
@pytest.mark.parametrize("device, message", [
    ("bogus", "--device 'bogus' is not a device: use cpu, cuda or cuda:N"),
    ("meta", "no such device is available here"),
    pytest.param("cuda", "no CUDA device is available (use --device cpu)",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param("cuda:99", "this machine has", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs CUDA")),
])
def test_every_command_refuses_a_device_it_cannot_use(tmp_path, capsys, command, device, message):
    argv = [command, "--device", device]
    if command == "visualize":
        argv += ["--output", str(tmp_path / "v.png")]
    assert main(argv) == 2
    assert message in error_line(capsys.readouterr().err, command)
    assert list(tmp_path.iterdir()) == []


def test_backend_choice_is_checked_before_any_work(capsys, monkeypatch):
    monkeypatch.delenv("FASTMAE_BACKEND", raising=False)
    for spec, message in [("bogus", "--backend bogus: unknown backend 'bogus'"),
                          ("attention=reference,attention=sdpa", "op 'attention' is given twice"),
                          ("attn=sdpa", "unknown op 'attn'")]:
        assert main(["demo", "--device", "cpu", "--backend", spec]) == 2
        captured = capsys.readouterr()
        assert message in error_line(captured.err, "demo") and captured.out == ""
    monkeypatch.setenv("FASTMAE_BACKEND", "bogus")
    assert main(["demo", "--device", "cpu", "--backend", "sdpa"]) == 2
    assert "FASTMAE_BACKEND=bogus: unknown backend 'bogus'" in error_line(capsys.readouterr().err, "demo")


def test_info_takes_the_short_dtype_names_too(capsys):
    assert main(["info", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "[cpu, bfloat16]" in out and "[cpu, float32]" not in out


def test_path_errors_are_one_line_and_other_os_errors_keep_their_traceback(monkeypatch, capsys):
    import fastmae.demo

    def unwritable(args):
        raise PermissionError(13, "Permission denied", "somewhere/file.png")

    monkeypatch.setattr(fastmae.demo, "run", unwritable)
    assert main(["demo"]) == 2
    assert error_line(capsys.readouterr().err, "demo") == \
        "fastmae demo: error: somewhere/file.png: Permission denied"

    def broken(args):
        raise OSError("an I/O failure that names no path")

    monkeypatch.setattr(fastmae.demo, "run", broken)
    with pytest.raises(OSError, match="names no path"):
        main(["demo"])


def test_output_checks_refuse_unwritable_places_and_leave_nothing(tmp_path):
    from fastmae.cli import check_output_dir, check_output_file

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(a_file, "is a file, not a folder"), (a_file / "sub", "Not a directory")]
    # places not even root can write to, where they are mounted
    cases += [(f"{m}/fastmae-test", "") for m in ("/proc", "/sys") if os.path.ismount(m)]
    for path, reason in cases:
        with pytest.raises(ValueError, match="cannot write there") as exc:
            check_output_dir(path, "--output_dir")
        assert str(exc.value).startswith(f"--output_dir {path}: cannot write there (") and reason in str(exc.value)
    with pytest.raises(ValueError, match=r"--output .*: cannot write there \(it is a folder"):
        check_output_file(tmp_path, "--output")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_output_file(a_file / "x.png", "--output")
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert check_output_file(tmp_path / "other" / "x.png") == tmp_path / "other" / "x.png"
    # the folders were made and the probe files removed again
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == \
        ["a_file", "new", "new/deeper", "other"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    from fastmae.cli import check_output_dir

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="Permission denied"):
            check_output_dir(ro)
    finally:
        ro.chmod(0o700)


def test_a_failed_run_removes_only_the_empty_folders_it_created(tmp_path):
    from fastmae.cli import discarding_new_dirs

    def fails():
        (tmp_path / "a" / "b" / "c").mkdir(parents=True)
        return 2

    assert discarding_new_dirs(tmp_path / "a" / "b" / "c", fails) == 2
    assert list(tmp_path.iterdir()) == []  # all three levels were new and left empty

    def writes_then_fails():
        (tmp_path / "a" / "b").mkdir(parents=True)
        (tmp_path / "a" / "b" / "log.txt").write_text("x")
        raise ValueError("stopped")

    with pytest.raises(ValueError):
        discarding_new_dirs(tmp_path / "a" / "b", writes_then_fails)
    assert (tmp_path / "a" / "b" / "log.txt").exists()  # a folder with a file in it stays
    (tmp_path / "keep").mkdir()
    assert discarding_new_dirs(tmp_path / "keep", lambda: 2) == 2
    assert (tmp_path / "keep").is_dir()  # it was there before
    assert discarding_new_dirs(tmp_path / "ok", lambda: (tmp_path / "ok").mkdir() or 0) == 0
    assert (tmp_path / "ok").is_dir()  # a successful run keeps its (even empty) folder


def test_demo_visualize_and_linprobe_take_other_available_devices(monkeypatch):
    """Devices of other types (mps, xpu, ...) serve the reference and sdpa backends: the commands that only run
    the model take them when available; pretraining and the benchmarks keep to cpu and cuda."""
    from fastmae.cli import check_device

    monkeypatch.setattr(torch.mps, "is_available", lambda: True)
    assert check_device("mps", other_devices=True) == torch.device("mps")
    with pytest.raises(ValueError, match="this command runs on cpu or cuda"):
        check_device("mps")
    monkeypatch.setattr(torch.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no such device is available here"):
        check_device("mps", other_devices=True)


def test_an_error_raised_in_a_data_loading_worker_is_reported_in_one_line():
    """A DataLoader worker's error is re-raised in the main process with the worker's traceback in its message: the
    commands print the worker's own line only."""
    from torch._utils import ExceptionWrapper

    from fastmae.cli import error_message
    from fastmae.train.data import DataError

    try:
        raise DataError("none of the 20 image file(s) in /data can be read; is this an image folder?")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as caught:
        wrapped.reraise()
    assert "Original Traceback" in str(caught.value)
    assert error_message(caught.value) == "none of the 20 image file(s) in /data can be read; is this an image folder?"
    assert error_message(ValueError("two\nlines")) == "two\nlines"  # anything else as it is
