"""Checkpoints that cannot be used, through the commands: truncated, corrupt or empty files, folders, official
pickles, another model's checkpoint, weights-only files, and the temporary files of writes killed midway."""
import argparse
import os
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import fastmae
from fastmae.cli import main as cli_main
from fastmae.model.checkpoint import CheckpointError, temp_path
from fastmae.train import checkpoint as ckpt_io
from tests.utils import error_line

from .common import dead_pid, pretrain_argv

TINY_ARGS = {"model": "mae_vit_tiny_patch4", "input_size": 32, "batch_size": 16, "accum_iter": 1, "world_size": 1}


def _checkpoint(folder):
    """A tiny-model training checkpoint at the end of epoch 0, as `fastmae pretrain` writes it."""
    model = fastmae.create_model("mae_vit_tiny_patch4")
    ckpt = ckpt_io.make_checkpoint(model, torch.optim.AdamW(model.parameters()), None, epoch=0, step=4,
                                   args=TINY_ARGS)
    return ckpt_io.save(ckpt, folder, numbered=True)[-1]


@pytest.fixture
def argv(tmp_path):
    """`fastmae pretrain` arguments of the tiny preset, writing to tmp_path / 'run'."""
    return pretrain_argv(tmp_path / "run")


def test_truncated_and_corrupt_checkpoints_are_one_line_errors(tmp_path, argv, capsys):
    last = _checkpoint(tmp_path / "run")
    data = last.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:len(data) // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all\n" * 40)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    other_zip = tmp_path / "other.pth"  # a zip file that is no checkpoint: torch's own words, not its C++ location
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("a.txt", "hello")
    for path, reason in ((cut, "is not a readable checkpoint (truncated or corrupt): PytorchStreamReader"),
                         (garbage, "is not a readable checkpoint (truncated or corrupt)"),
                         (other_zip, "is not a readable checkpoint (truncated or corrupt): "),
                         (empty, "is an empty file, not a checkpoint")):
        assert cli_main([*argv, "--resume", str(path)]) == 2
        assert f"{path} {reason}" in error_line(capsys.readouterr().err, "pretrain", alone=True)
        for command in ("visualize", "linprobe"):
            assert cli_main([command, "--checkpoint", str(path), "--device", "cpu",
                             "--output" if command == "visualize" else "--output_dir", str(tmp_path / "out")]) == 2
            err = error_line(capsys.readouterr().err, command, alone=True)
            assert f"{path} {reason}" in err and "allow" not in err
            assert "enforce fail" not in err and len(err.split(reason)[-1].strip()) > 5, err  # a reason is given
        with pytest.raises(CheckpointError, match="not a readable checkpoint|empty file"):
            fastmae.load_checkpoint(fastmae.mae_vit_tiny_patch4(), path)
    # --resume auto finds checkpoint-last.pth cut short
    last.unlink()  # a hard link to checkpoint-0.pth: write a new file, not through the link
    last.write_bytes(data[:len(data) // 2])
    assert cli_main([*argv, "--resume", "auto"]) == 2
    err = error_line(capsys.readouterr().err, "pretrain", alone=True)
    assert f"{last} is not a readable checkpoint (truncated or corrupt)" in err
    # a folder given as the checkpoint
    assert cli_main(["visualize", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "v.png")]) == 2
    err = error_line(capsys.readouterr().err, "visualize", alone=True)
    assert f"{tmp_path / 'run'} is a folder, not a checkpoint file" in err


def test_an_official_style_checkpoint_is_one_line_naming_the_namespace(tmp_path, argv, capsys):
    model = fastmae.create_model("mae_vit_tiny_patch4")
    path = tmp_path / "official.pth"
    torch.save({"model": model.state_dict(), "epoch": 0, "args": argparse.Namespace(**TINY_ARGS)}, path)
    assert cli_main([*argv, "--resume", str(path)]) == 2
    err = error_line(capsys.readouterr().err, "pretrain", alone=True)
    assert "(argparse.Namespace)" in err and err.endswith("(command line: --allow-pickle)")
    assert "WeightsUnpickler" not in err and "add_safe_globals" not in err


def test_resuming_another_models_checkpoint_is_one_line(tmp_path, argv, capsys):
    _checkpoint(tmp_path / "run")
    last = tmp_path / "run" / "checkpoint-last.pth"
    assert cli_main([*argv, "--model", "mae_vit_cifar_small_patch4", "--resume", "auto"]) == 2
    err = error_line(capsys.readouterr().err, "pretrain", alone=True)
    assert (f"{last} holds mae_vit_tiny_patch4 at input size 32; this run builds mae_vit_cifar_small_patch4 at 32"
            in err), err
    assert cli_main([*argv, "--input_size", "64", "--resume", str(last)]) == 2
    err = error_line(capsys.readouterr().err, "pretrain", alone=True)
    assert f"{last} holds mae_vit_tiny_patch4 at input size 32; this run builds mae_vit_tiny_patch4 at 64" in err

    # a checkpoint without args: the first mismatched keys and their count
    ckpt = torch.load(last, weights_only=True)
    del ckpt["args"]
    bare = tmp_path / "bare.pth"
    torch.save(ckpt, bare)
    assert cli_main([*argv, "--model", "mae_vit_cifar_small_patch4", "--resume", str(bare)]) == 2
    err = error_line(capsys.readouterr().err, "pretrain", alone=True)
    assert "does not fit this model (check --model and --input_size)" in err and "mismatched keys: cls_token" in err
    assert err.count(" in the file, ") == 3 and "more)" in err and "Missing key" not in err

    # the model is left as it was
    model = fastmae.create_model("mae_vit_cifar_small_patch4")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match="this run builds mae_vit_cifar_small_patch4 at 32"):
        ckpt_io.load_for_resume(last, model, opt, None, iters_per_epoch=4, accum_iter=1, restore_rng=False)
    with pytest.raises(CheckpointError, match="this run builds my_model at 32"):
        ckpt_io.load_for_resume(last, model, opt, None, iters_per_epoch=4, accum_iter=1, restore_rng=False,
                                model_name="my_model")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert ckpt_io.model_name_of(fastmae.create_model("mae_vit_tiny_patch4", img_size=48)) == "mae_vit_tiny_patch4"


@pytest.mark.parametrize("keys, missing", [
    (("model", "epoch"), "optimizer state"),
    (("model", "optimizer"), "epoch"),
    (("model",), "optimizer state or epoch"),
    (("model", "optimizer", "epoch"), ""),
])
def test_a_weights_only_file_says_what_it_lacks(tmp_path, keys, missing):
    model = fastmae.create_model("mae_vit_tiny_patch4")
    opt = torch.optim.AdamW(model.parameters())
    full = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}
    path = tmp_path / "w.pth"
    torch.save({k: full[k] for k in keys}, path)
    where = ckpt_io.load_for_resume(path, model, opt, None, iters_per_epoch=4, accum_iter=1, restore_rng=False)
    assert where["missing"] == missing
    assert (where["start_epoch"] is None) == bool(missing)


def test_remove_stale_temp_files_only_removes_dead_processes_files(tmp_path):
    dead, old, now = dead_pid(), time.time() - 3600, time.time()
    stale = [temp_path(tmp_path / "checkpoint-last.pth", dead), temp_path(tmp_path / "checkpoint-12.pth", dead),
             tmp_path / f".checkpoint-last.pth.link-{dead}"]
    others = [tmp_path / "checkpoint-last.pth", tmp_path / "checkpoint-3.pth",  # not temporary files
              tmp_path / f".checkpoint-last.pth.tmp-{dead}.bak", tmp_path / ".checkpoint-last.pth.tmp-0",
              tmp_path / ".checkpoint-last.pth.tmp-x1", tmp_path / f".encoder.pth.tmp-{dead}",
              tmp_path / f"checkpoint-last.pth.tmp-{dead}"]
    live = [temp_path(tmp_path / "checkpoint-last.pth"),  # this process's, being written now
            temp_path(tmp_path / "checkpoint-3.pth", os.getppid())]  # a live process's
    for p in stale + others:
        p.write_bytes(b"x")
        os.utime(p, (old, old))
    for p in live:
        p.write_bytes(b"x")
    recent = temp_path(tmp_path / "checkpoint-4.pth", dead)  # maybe another machine's, still writing
    recent.write_bytes(b"x")
    (tmp_path / f".checkpoint-5.pth.tmp-{dead}").mkdir()  # not a file

    assert sorted(ckpt_io.remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in others + live) and recent.exists() and not any(p.exists() for p in stale)
    assert ckpt_io.remove_stale_temp_files(tmp_path, min_age_s=0) == [recent]
    assert all(p.exists() for p in others + live)
    assert ckpt_io.remove_stale_temp_files(tmp_path / "missing") == []

    # a live pid that started after the file was written is not its writer (a pid reused, e.g. in a restarted
    # container where the run is pid 1 again): on Linux, where /proc tells when a process started
    reused = temp_path(tmp_path / "checkpoint-last.pth")
    os.utime(reused, (now - 10 * 86400, now - 10 * 86400))
    if os.path.exists(f"/proc/{os.getpid()}/stat"):
        assert ckpt_io.remove_stale_temp_files(tmp_path) == [reused]
    assert live[1].exists()


def test_a_save_killed_midway_leaves_a_file_that_is_then_removed(tmp_path):
    """SIGKILL while atomic_save writes: its temporary file stays, the previous checkpoint is intact, and
    `remove_stale_temp_files` removes that file once the process is gone."""
    last = tmp_path / "checkpoint-last.pth"
    torch.save({"x": torch.ones(2)}, last)
    script = ("import sys, time, torch\n"
              "from fastmae.model.checkpoint import atomic_save\n"
              "def slow(obj, f, *a, **k):\n"
              "    open(f, 'wb').write(b'part of a checkpoint'); print('writing', flush=True); time.sleep(60)\n"
              "torch.save = slow\n"
              "atomic_save({'x': torch.zeros(2)}, sys.argv[1])\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(last)], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(fastmae.__file__)))
    try:
        assert proc.stdout.readline().strip() == "writing"
        tmp = temp_path(last, proc.pid)
        assert tmp.is_file()
        assert ckpt_io.remove_stale_temp_files(tmp_path, min_age_s=0) == []  # alive: kept
    finally:
        proc.kill()
        proc.wait()
    assert tmp.is_file() and torch.equal(torch.load(last, weights_only=True)["x"], torch.ones(2))
    assert ckpt_io.remove_stale_temp_files(tmp_path, min_age_s=0) == [tmp]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-last.pth"]
