"""Official state-dict keys and shapes, checkpoint loading (official, encoder-only, other resolutions,
legacy pickles), the encoder export, and initialisation."""
import argparse

import pytest
import torch

import fastmae
from fastmae.model import CheckpointError, atomic_save, export_encoder, load_checkpoint, read_checkpoint

# (factory, img, patch, width, depth, heads) from the official model definitions
FACTORIES = [
    ("mae_vit_base_patch16", 224, 16, 768, 12, 12),
    ("mae_vit_large_patch16", 224, 16, 1024, 24, 16),
    ("mae_vit_huge_patch14", 224, 14, 1280, 32, 16),
    ("mae_vit_base_patch16_dec512d8b", 224, 16, 768, 12, 12),
    ("mae_vit_large_patch16_dec512d8b", 224, 16, 1024, 24, 16),
    ("mae_vit_huge_patch14_dec512d8b", 224, 14, 1280, 32, 16),
]


def official_keys(img, patch, dim, depth, dec_dim=512, dec_depth=8, chans=3, mlp=4):
    """Key -> shape of the official MAE, written out from its definition."""
    L = (img // patch) ** 2
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, L + 1, dim),
            "patch_embed.proj.weight": (dim, chans, patch, patch), "patch_embed.proj.bias": (dim,),
            "norm.weight": (dim,), "norm.bias": (dim,),
            "decoder_embed.weight": (dec_dim, dim), "decoder_embed.bias": (dec_dim,),
            "mask_token": (1, 1, dec_dim), "decoder_pos_embed": (1, L + 1, dec_dim),
            "decoder_norm.weight": (dec_dim,), "decoder_norm.bias": (dec_dim,),
            "decoder_pred.weight": (patch * patch * chans, dec_dim), "decoder_pred.bias": (patch * patch * chans,)}
    for prefix, n, d in (("blocks", depth, dim), ("decoder_blocks", dec_depth, dec_dim)):
        for i in range(n):
            b = f"{prefix}.{i}."
            keys.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "norm2.weight": (d,),
                         b + "norm2.bias": (d,), b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                         b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                         b + "mlp.fc1.weight": (mlp * d, d), b + "mlp.fc1.bias": (mlp * d,),
                         b + "mlp.fc2.weight": (d, mlp * d), b + "mlp.fc2.bias": (d,)})
    return keys


@pytest.mark.parametrize("name,img,patch,dim,depth,heads", FACTORIES)
def test_factory_keys_and_shapes(name, img, patch, dim, depth, heads):
    with torch.device("meta"):
        model = fastmae.create_model(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_keys(img, patch, dim, depth)
    assert model.blocks[0].attn.num_heads == heads and model.decoder_blocks[0].attn.num_heads == 16
    assert model.norm.eps == 1e-6 and model.decoder_norm.eps == 1e-6


def test_small_presets():
    for name, dim, depth, ddim, ddepth in (("mae_vit_cifar_small_patch4", 128, 3, 64, 1),
                                           ("mae_vit_cifar_medium_patch4", 256, 4, 128, 2)):
        model = fastmae.create_model(name)
        assert model.patch_embed.img_size == (32, 32) and model.num_patches == 64
        assert got_keys(model) == official_keys(32, 4, dim, depth, ddim, ddepth, mlp=2)
    tiny = fastmae.mae_vit_tiny_patch4()
    assert sum(p.numel() for p in tiny.parameters()) < 200_000


def got_keys(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_initialisation_as_official():
    torch.manual_seed(0)
    model = fastmae.mae_vit_tiny_patch4()
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(64))
    # sine-cosine: the first quarter is sin of the column index times omega_0 = 1
    cols = torch.arange(64) % 8
    assert torch.allclose(model.pos_embed[0, 1:, 0], torch.sin(cols.float()), atol=1e-6)
    assert torch.allclose(model.pos_embed[0, 1:, 16], torch.cos(cols.float()), atol=1e-6)
    rows = torch.arange(64) // 8
    assert torch.allclose(model.pos_embed[0, 1:, 32], torch.sin(rows.float()), atol=1e-6)
    for blk in model.blocks:
        assert torch.all(blk.attn.qkv.bias == 0) and torch.all(blk.norm1.weight == 1)
        bound = (6 / sum(blk.attn.qkv.weight.shape)) ** 0.5  # xavier uniform
        assert blk.attn.qkv.weight.abs().max() <= bound
    assert 0.01 < model.cls_token.std() < 0.04 and 0.01 < model.mask_token.std() < 0.04


def test_checkpoint_round_trip(tmp_path):
    a, b = fastmae.mae_vit_tiny_patch4(), fastmae.mae_vit_tiny_patch4()
    path = tmp_path / "ckpt.pth"
    atomic_save({"model": a.state_dict(), "epoch": 3, "args": {"model": "mae_vit_tiny_patch4"}}, path)
    report = load_checkpoint(b, path, strict=True)
    assert not report.missing_keys and not report.unexpected_keys
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    assert torch.equal(a(imgs, noise=noise)[0], b(imgs, noise=noise)[0])
    assert read_checkpoint(path)["epoch"] == 3


def test_encoder_only_checkpoint_reports_decoder_keys(tmp_path):
    src = fastmae.mae_vit_tiny_patch4()
    path = tmp_path / "enc.pth"
    fastmae.save_encoder(src, path)
    dst = fastmae.mae_vit_tiny_patch4()
    with pytest.warns(UserWarning, match="not in the checkpoint"):
        report = load_checkpoint(dst, path)
    assert "mask_token" in report.missing_decoder_keys and "decoder_pred.weight" in report.missing_decoder_keys
    assert all(not k.startswith(("blocks.", "cls_token")) for k in report.missing_keys)
    assert torch.equal(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    with pytest.raises(CheckpointError, match="strict"):
        load_checkpoint(fastmae.mae_vit_tiny_patch4(), path, strict=True)


def test_export_encoder_keys_are_timm_vit():
    keys = set(export_encoder(fastmae.mae_vit_tiny_patch4()))
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "blocks.0.attn.qkv.weight",
            "blocks.1.mlp.fc2.bias"} <= keys
    assert not any(k.startswith(("decoder", "mask_token")) for k in keys)


def test_other_resolution_resizes_position_embedding():
    src = fastmae.mae_vit_tiny_patch4()  # 32x32 -> 8x8 grid
    dst = fastmae.mae_vit_tiny_patch4(img_size=48)  # 12x12 grid
    report = load_checkpoint(dst, {"model": src.state_dict()})
    assert report.resized_keys == ["pos_embed", "decoder_pos_embed"]
    assert dst.pos_embed.shape == (1, 145, 64)
    assert torch.equal(dst.pos_embed[0, 0], src.pos_embed[0, 0])
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_wrong_shapes_name_the_keys():
    src = fastmae.create_model("mae_vit_cifar_small_patch4").state_dict()
    with pytest.raises(CheckpointError, match=r"cls_token.*blocks\.0\.norm1\.weight|blocks\.0\.norm1\.weight"):
        load_checkpoint(fastmae.mae_vit_tiny_patch4(), {"model": src})


def test_legacy_pickle_needs_explicit_opt_in(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"model": fastmae.mae_vit_tiny_patch4().state_dict(), "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_checkpoint(fastmae.mae_vit_tiny_patch4(), path)
    report = load_checkpoint(fastmae.mae_vit_tiny_patch4(), path, allow_pickle=True)
    assert not report.missing_keys
    with pytest.raises(FileNotFoundError):
        load_checkpoint(fastmae.mae_vit_tiny_patch4(), tmp_path / "missing.pth")


def test_atomic_save_keeps_previous_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    atomic_save({"x": torch.ones(2)}, path)

    def broken(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        atomic_save({"x": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]
