"""`fastmae visualize`: the reconstruction maths (with and without norm_pix_loss) against exact inverses,
and the PNG grid written from a training checkpoint."""
import numpy as np
import pytest
import torch
from PIL import Image

import fastmae
from fastmae.cli import main as cli_main
from fastmae.train.visualize import load_images, reconstruct, save_grid, unnormalize_pred
from tests.utils import error_line

from .common import pretrain_args


def test_unnormalize_inverts_the_norm_pix_target():
    target = torch.randn(2, 5, 48) * 3 + 1
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    normalized = (target - mean) / (var + 1e-6).sqrt()  # the norm_pix_loss target (unbiased var)
    torch.testing.assert_close(unnormalize_pred(normalized, target), target, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reconstruction_of_a_perfect_prediction_is_the_image(norm_pix, monkeypatch):
    """If the decoder predicted its training target exactly, every column shows the original (up to fp32):
    raw pixels without norm_pix_loss, per-patch normalised pixels with it."""
    model = fastmae.create_model("mae_vit_tiny_patch4", norm_pix_loss=norm_pix)
    imgs = torch.randn(3, 3, 32, 32)
    target = model.patchify(imgs)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    monkeypatch.setattr(model, "forward_decoder", lambda latent, ids_restore: target.clone())
    noise = torch.rand(3, model.num_patches, generator=torch.Generator().manual_seed(0))
    out = reconstruct(model, imgs, 0.75, noise)
    mask = out["mask"]
    assert mask.shape == (3, 64) and int(mask.sum()) == 3 * 48
    torch.testing.assert_close(out["reconstruction"], imgs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["pasted"], imgs, atol=1e-4, rtol=1e-4)
    # masked: removed patches are 0 (the mean colour after de-normalisation), visible ones untouched
    pix = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 48))
    assert torch.equal(out["masked"][pix == 1], torch.zeros(int((pix == 1).sum())))
    assert torch.equal(out["masked"][pix == 0], imgs[pix == 0])
    assert out["loss"] == pytest.approx(0.0, abs=1e-8)


def test_pasted_keeps_visible_patches_of_any_prediction():
    model = fastmae.create_model("mae_vit_tiny_patch4", norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32)
    out = reconstruct(model, imgs, 0.75, torch.rand(2, 64))
    pix = model.unpatchify(out["mask"].unsqueeze(-1).expand(-1, -1, 48))
    assert torch.equal(out["pasted"][pix == 0], imgs[pix == 0])
    assert torch.equal(out["pasted"][pix == 1], out["reconstruction"][pix == 1])
    assert model.training is False


def test_grid_png_layout(tmp_path):
    imgs = load_images("builtin", 32, 3, seed=0)
    assert imgs.shape == (3, 3, 32, 32)
    model = fastmae.create_model("mae_vit_tiny_patch4")
    path = save_grid(reconstruct(model, imgs, 0.75, torch.rand(3, 64)), tmp_path / "g.png", tile=40, pad=4)
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (4 * 40 + 5 * 4, 18 + 3 * 40 + 4 * 4)
    arr = np.asarray(img)
    # the first tile is the de-normalised original, nearest-upscaled from 32 to 40 pixels
    from fastmae.train.data import denormalize
    orig = (denormalize(imgs[0]).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    tile = arr[18 + 4: 18 + 4 + 40, 4: 44]
    assert np.array_equal(tile, np.asarray(Image.fromarray(orig).resize((40, 40), Image.NEAREST)))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_visualize_command_on_a_training_checkpoint(tmp_path, capsys, norm_pix):
    extra = ["--norm_pix_loss"] if norm_pix else []
    from fastmae.train.pretrain import train
    train(pretrain_args(tmp_path, "--epochs", "1", "--max_steps", "2", *extra))
    out = tmp_path / "vis.png"
    code = cli_main(["visualize", "--checkpoint", str(tmp_path / "checkpoint-last.pth"), "--num_images", "2",
                     "--output", str(out), "--tile", "32", "--device", "cpu"])
    assert code == 0
    text = capsys.readouterr().out
    assert f"norm_pix_loss {norm_pix}" in text  # read from the checkpoint's args
    assert Image.open(out).size == (4 * 32 + 20, 18 + 2 * 32 + 12)
    assert cli_main(["visualize", "--checkpoint", str(tmp_path / "none.pth"), "--output", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_released_style_checkpoint_needs_the_model_name(tmp_path, capsys):
    """A released checkpoint is {'model': state_dict} with no args: --model names it; the input size comes
    from the position embedding's shape."""
    model = fastmae.create_model("mae_vit_tiny_patch4")
    torch.save({"model": model.state_dict()}, tmp_path / "released.pth")
    out = tmp_path / "v.png"
    argv = ["visualize", "--checkpoint", str(tmp_path / "released.pth"), "--num_images", "1", "--output", str(out),
            "--device", "cpu"]
    assert cli_main(argv) == 2
    assert "pass --model" in capsys.readouterr().err
    assert cli_main(argv + ["--model", "mae_vit_tiny_patch4"]) == 0
    assert Image.open(out).size[1] == 18 + 128 + 8


def test_help_keeps_the_whole_description_with_its_formula(capsys):
    with pytest.raises(SystemExit):
        cli_main(["visualize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "statistics of that same patch: pixels = pred * sqrt(var + 1e-6) + mean" in text
    assert "Models trained without norm_pix_loss are shown as predicted." in text


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import fastmae.train.visualize as vis

    monkeypatch.setattr(vis, "load_images", lambda *a, **k: pytest.fail("work started"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for output, reason in [(a_file / "v.png", "is a file, not a folder"), (tmp_path, "it is a folder")]:
        assert cli_main(["visualize", "--output", str(output), "--device", "cpu"]) == 2
        line = error_line(capsys.readouterr().err, "visualize", alone=True)
        assert f"--output {output}: cannot write there (" in line and reason in line
    # a later error removes the folder made for the output, and leaves no partial PNG
    out = tmp_path / "new" / "v.png"
    assert cli_main(["visualize", "--output", str(out), "--device", "cpu", "--checkpoint",
                     str(tmp_path / "none.pth")]) == 2
    assert "checkpoint not found" in error_line(capsys.readouterr().err, "visualize", alone=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_mask_ratio_keeping_no_patch_is_refused_before_drawing(tmp_path, capsys, monkeypatch):
    import fastmae.train.visualize as vis

    monkeypatch.setattr(vis, "load_images", lambda *a, **k: pytest.fail("work started"))
    assert cli_main(["visualize", "--output", str(tmp_path / "v.png"), "--device", "cpu",
                     "--mask_ratio", "0.999"]) == 2
    err = error_line(capsys.readouterr().err, "visualize", alone=True)
    assert "--mask_ratio 0.999 keeps none of the model's 64 patches" in err


def test_grid_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from pathlib import Path

    imgs = torch.randn(1, 3, 32, 32)
    result = {"original": imgs, "masked": imgs, "reconstruction": imgs, "pasted": imgs}
    path = save_grid(result, tmp_path / "g.png", tile=16)
    before = path.read_bytes()

    def dies_midway(self, fp, format=None, **params):  # fp: the path of the file being written
        Path(fp).write_bytes(b"half a png")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Image.Image, "save", dies_midway)
    with pytest.raises(OSError, match="simulated"):
        save_grid(result, path, tile=16)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["g.png"]


def test_the_same_seed_draws_the_same_picture_without_a_checkpoint(tmp_path, capsys):
    """The weights a checkpoint lacks (all of them without one) come from --seed: the same seed, the same loss and
    the same picture, byte for byte."""
    outs = []
    for name in ("a.png", "b.png"):
        assert cli_main(["visualize", "--num_images", "2", "--seed", "5", "--device", "cpu", "--tile", "16",
                         "--output", str(tmp_path / name)]) == 0
        outs.append((tmp_path / name).read_bytes())
    lines = [line.split(" -> ")[0] for line in capsys.readouterr().out.splitlines()]
    assert outs[0] == outs[1] and lines[0] == lines[1]
