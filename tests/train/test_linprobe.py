"""Linear probing: the probe machinery on a trivially separable set, and a real probe of the tiny encoder on
the built-in dataset, clearly above chance."""
import json

import pytest
import torch

import fastmae
from fastmae.cli import main as cli_main
from fastmae.train.linprobe import encode, linear_probe, make_head, probe_datasets, train_head
from tests.utils import error_line


def test_head_is_the_official_one():
    head = make_head(16, 5)
    bn, fc = head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert fc.weight.std() < 0.02 and torch.equal(fc.bias, torch.zeros(5))


def test_probe_learns_a_linearly_separable_set():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 12, generator=g) * 3
    y = torch.arange(400) % 4
    x = centres[y] + 0.5 * torch.randn(400, 12, generator=g) + 50  # offset: the BatchNorm standardises it
    out = train_head(x[:300], y[:300], x[300:], y[300:], 4, epochs=20, batch_size=64)
    assert out["acc"] >= 0.98 and out["train_acc"] >= 0.98
    # labels shuffled against the features: nothing to learn, near chance on held-out data
    perm = torch.randperm(400, generator=g)
    out = train_head(x[:300], y[perm][:300], x[300:], y[perm][300:], 4, epochs=20, batch_size=64)
    assert out["acc"] < 0.45


def test_encoder_features_see_all_patches_in_order():
    model = fastmae.create_model("mae_vit_tiny_patch4").eval()
    imgs = torch.randn(2, 3, 32, 32)
    cls, mean = encode(model, imgs, "cls"), encode(model, imgs, "mean")
    assert cls.shape == mean.shape == (2, 64)
    # same as running the encoder by hand on every patch (no masking)
    with torch.no_grad():
        x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
        x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), x], 1)
        for blk in model.blocks:
            x = blk(x, backend="reference")
        x = model.norm(x)
    torch.testing.assert_close(cls, x[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, x[:, 1:].mean(1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pool"):
        encode(model, imgs, "max")


def test_tiny_encoder_features_beat_chance_on_the_builtin_set():
    """The tiny encoder's class-token features on 1000 built-in images (10 classes), probed on 200 held-out
    ones: top-1 well above chance (10%); measured 0.26 (random init, seed 0), asserted > 0.2.

    Random initialisation on purpose: a few hundred CPU pretraining steps do not yet beat it (measured
    0.17-0.24 after 48-256 steps); the gain needs the demo's ~1500 steps (0.40 against 0.26), too long for
    this suite, and is reported from `make run` instead."""
    torch.manual_seed(0)
    model = fastmae.create_model("mae_vit_tiny_patch4")
    train_data, val_data, classes = probe_datasets("builtin", 32, builtin_size=1000, seed=1)
    out = linear_probe(model, train_data, val_data, pool="cls", epochs=30, batch_size=128)
    assert out["num_classes"] == len(classes) == 10 and out["chance"] == pytest.approx(0.1)
    assert out["num_train"] == 1000 and out["num_val"] == 200 and out["feature_dim"] == 64
    assert out["acc"] > 0.2, out
    assert out["train_acc"] > out["acc"] - 0.05


def test_linprobe_command_on_a_folder(tmp_path, capsys):
    """Class subfolders split into train/val; the command writes linprobe.json with the accuracy."""
    import numpy as np
    from PIL import Image
    for c, colour in enumerate([(250, 20, 20), (20, 250, 20), (20, 20, 250)]):
        d = tmp_path / "data" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(12):
            arr = np.clip(np.array(colour) + np.random.default_rng(i + 100 * c).integers(-30, 30, (32, 32, 3)),
                          0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
    code = cli_main(["linprobe", "--data_path", str(tmp_path / "data"), "--epochs", "20", "--batch_size", "16",
                     "--device", "cpu", "--output_dir", str(tmp_path / "out"), "--pool", "mean"])
    assert code == 0
    result = json.loads((tmp_path / "out" / "linprobe.json").read_text())
    assert result["num_classes"] == 3 and result["num_val"] == 7 and result["num_train"] == 29
    assert result["acc"] >= 0.99  # three flat colours: separable even with a random encoder
    assert result["classes"] == ["class0", "class1", "class2"]
    # a train/ subfolder without val/ beside it, as `fastmae pretrain` reads folders: train/ is split
    nested = tmp_path / "nested"
    nested.mkdir()
    (tmp_path / "data").rename(nested / "train")
    probe_train, probe_val, classes = probe_datasets(str(nested), 32, val_fraction=0.2, seed=0)
    assert classes == ["class0", "class1", "class2"] and (len(probe_train), len(probe_val)) == (29, 7)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(flat / "a.png")
    assert cli_main(["linprobe", "--data_path", str(flat), "--device", "cpu"]) == 2
    assert "holds no class subfolders" in capsys.readouterr().err
    one = tmp_path / "one"
    (one / "cls1").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(one / "cls1" / "a.png")
    assert cli_main(["linprobe", "--data_path", str(one), "--device", "cpu"]) == 2
    assert "holds one class subfolder (cls1); a linear probe needs labelled images of at least two classes" in \
        capsys.readouterr().err
    split = tmp_path / "split"
    for part, names in (("train", ("a", "b", "c")), ("val", ("a", "b", "d"))):
        for name in names:
            (split / part / name).mkdir(parents=True)
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(split / part / name / "x.png")
    assert cli_main(["linprobe", "--data_path", str(split), "--device", "cpu"]) == 2
    assert "different classes (only in train/: c; only in val/: d)" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--val_fraction", "1.0"], "--val_fraction must be in (0, 1), got 1.0"),
    (["--val_fraction", "0"], "--val_fraction must be in (0, 1), got 0.0"),
    (["--builtin_size", "0"], "--builtin_size must be at least 1, got 0"),
    (["--batch_size", "1"], "--batch_size must be at least 2, got 1"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--num_workers", "-1"], "--num_workers must not be negative, got -1"),
    (["--blr", "-1"], "--blr must be positive, got -1.0"),
    (["--weight_decay", "-0.1"], "--weight_decay must not be negative, got -0.1"),
])
def test_bad_flags_on_the_builtin_set_are_refused_before_any_work(tmp_path, capsys, monkeypatch, extra, message):
    import fastmae.train.linprobe as lp

    monkeypatch.setattr(lp, "probe_datasets", lambda *a, **k: pytest.fail("work started"))
    out = tmp_path / "new" / "out"
    assert cli_main(["linprobe", "--device", "cpu", "--output_dir", str(out), *extra]) == 2
    assert message in error_line(capsys.readouterr().err, "linprobe", alone=True)
    assert list(tmp_path.iterdir()) == []  # no empty --output_dir left behind


def test_an_output_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import fastmae.train.linprobe as lp

    monkeypatch.setattr(lp, "probe_datasets", lambda *a, **k: pytest.fail("work started"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        assert cli_main(["linprobe", "--device", "cpu", "--output_dir", str(out)]) == 2
        err = error_line(capsys.readouterr().err, "linprobe", alone=True)
        assert f"--output_dir {out}: cannot write there (" in err
    # an error after the check removes the folder it made
    assert cli_main(["linprobe", "--device", "cpu", "--output_dir", str(tmp_path / "new"), "--checkpoint",
                     str(tmp_path / "none.pth")]) == 2
    assert "checkpoint not found" in error_line(capsys.readouterr().err, "linprobe", alone=True)
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_an_encoder_only_checkpoint_probes_without_a_warning_and_shows_progress(tmp_path, capsys, recwarn):
    """The probe uses the encoder alone: decoder weights missing from the file are not warned about. Without
    --no_progress, feature extraction and classifier training show progress bars."""
    from fastmae.model.checkpoint import save_encoder
    save_encoder(fastmae.create_model("mae_vit_tiny_patch4"), tmp_path / "enc.pth")
    argv = ["linprobe", "--checkpoint", str(tmp_path / "enc.pth"), "--model", "mae_vit_tiny_patch4", "--device", "cpu",
            "--builtin_size", "40", "--epochs", "2", "--batch_size", "16"]
    assert cli_main(argv) == 0
    assert not [w for w in recwarn if "not in the checkpoint" in str(w.message)]
    err = capsys.readouterr().err
    assert "train features" in err and "val features" in err and "classifier" in err
    assert cli_main(argv + ["--no_progress"]) == 0
    assert "features" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["linprobe", "visualize"])
def test_a_checkpoint_of_another_model_is_named_in_one_short_line(command, tmp_path, capsys):
    from fastmae.train.pretrain import train

    from .common import pretrain_args
    train(pretrain_args(tmp_path, "--epochs", "1", "--max_steps", "1"))
    extra = ["--output", str(tmp_path / "v.png")] if command == "visualize" else []
    assert cli_main([command, "--checkpoint", str(tmp_path / "checkpoint-last.pth"), "--model",
                     "mae_vit_cifar_small_patch4", "--device", "cpu", *extra]) == 2
    err = error_line(capsys.readouterr().err, command, alone=True)
    assert "holds mae_vit_tiny_patch4 at input size 32; this builds mae_vit_cifar_small_patch4 at input size 32" in err
    assert len(err) < 600 and "more)" in err


@pytest.mark.parametrize("command", ["linprobe", "visualize"])
@pytest.mark.parametrize("value", ["-4", "0"])
def test_an_input_size_that_is_not_positive_is_refused_by_the_flag(command, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main([command, "--input_size", value])
    assert exit_.value.code == 2
    assert f"argument --input_size: must be a positive integer, got {value}" in capsys.readouterr().err


def test_a_random_init_probe_is_the_same_for_the_same_seed(tmp_path):
    """Without a checkpoint (or for the weights one lacks) the encoder's weights come from --seed: two runs with
    the same seed give the same result, bit for bit."""
    outs = []
    for run in ("a", "b"):
        assert cli_main(["linprobe", "--device", "cpu", "--builtin_size", "40", "--epochs", "2", "--batch_size", "8",
                         "--seed", "3", "--no_progress", "--output_dir", str(tmp_path / run)]) == 0
        outs.append((tmp_path / run / "linprobe.json").read_text())
    assert outs[0] == outs[1]


def test_too_few_training_images_are_refused_before_the_features(tmp_path, capsys, monkeypatch):
    """A head trained on fewer than two images is no probe (its BatchNorm needs a batch): one line, exit 2, before
    any feature is computed, whether the built-in set is that small or a folder's split leaves that few."""
    import numpy as np
    from PIL import Image

    import fastmae.train.linprobe as lp
    monkeypatch.setattr(lp, "encode", lambda *a, **k: pytest.fail("features computed"))
    assert cli_main(["linprobe", "--device", "cpu", "--builtin_size", "1"]) == 2
    assert error_line(capsys.readouterr().err, "linprobe", alone=True).endswith(
        "--builtin_size 1 leaves 1 image(s) to train the classifier on; a linear probe needs at least 2")
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / c / "x.png")
    for frac, left in (("0.2", 1), ("0.9", 0)):
        assert cli_main(["linprobe", "--device", "cpu", "--data_path", str(tmp_path), "--val_fraction", frac]) == 2
        err = error_line(capsys.readouterr().err, "linprobe", alone=True)
        assert f"{tmp_path} leaves {left} image(s) to train the classifier on" in err and "--val_fraction" in err
    with pytest.raises(ValueError, match="at least 2 training samples"):
        train_head(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), torch.zeros(1, 4),
                   torch.zeros(1, dtype=torch.long), 2)


def test_sigterm_ends_a_probe_as_ctrl_c_does(tmp_path):
    """SIGTERM (kill, timeout, a scheduler) ends `fastmae linprobe` through SystemExit(143), as Ctrl-C does: a
    message, no traceback, and the --output_dir folders it made (empty) removed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "a" / "b"
    proc = subprocess.Popen([sys.executable, "-m", "fastmae", "linprobe", "--device", "cpu", "--builtin_size", "20000",
                             "--output_dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not out.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert out.exists(), proc.communicate()[0] if proc.poll() is not None else "no --output_dir made"
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert output.rstrip().endswith("fastmae linprobe: terminated (SIGTERM)") and "Traceback" not in output, output
    assert list(tmp_path.iterdir()) == []
