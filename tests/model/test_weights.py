"""Official state-dict keys and shapes, checkpoint loading (official, encoder-only, other resolutions,
legacy pickles), the encoder export, and initialisation."""
import argparse
import os
from pathlib import Path

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


def test_wrapped_models_and_prefixed_checkpoints_load():
    """A model under torch.compile (or DataParallel) loads and exports through its wrapper, and a state dict saved
    from such a wrapper (keys under `_orig_mod.` / `module.`) loads into a plain model; a checkpoint with no key
    of the model's is an error, not a warning about every key."""
    src = fastmae.mae_vit_tiny_patch4()
    compiled = torch.compile(fastmae.mae_vit_tiny_patch4(), backend="eager")
    report = load_checkpoint(compiled, {"model": src.state_dict()}, strict=True)
    assert not report.missing_keys and torch.equal(compiled._orig_mod.cls_token, src.cls_token)
    assert set(export_encoder(compiled)) == set(export_encoder(src))
    wrapped = torch.nn.DataParallel(torch.compile(fastmae.mae_vit_tiny_patch4(), backend="eager"))
    load_checkpoint(wrapped, {"model": src.state_dict()}, strict=True)
    assert torch.equal(wrapped.module._orig_mod.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    for prefix in ("_orig_mod.", "module._orig_mod."):
        dst = fastmae.mae_vit_tiny_patch4()
        load_checkpoint(dst, {"model": {prefix + k: v for k, v in src.state_dict().items()}}, strict=True)
        assert torch.equal(dst.mask_token, src.mask_token), prefix
    with pytest.raises(CheckpointError, match="no key of the checkpoint is one of the model's"):
        load_checkpoint(fastmae.mae_vit_tiny_patch4(), {"model": {"head.weight": torch.zeros(2, 2)}})


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
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        atomic_save({"x": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def _unreadable_files(folder):
    """name -> a path that is no checkpoint: cut short, empty, a folder, garbage, a pickle that ends early."""
    good = folder / "good.pth"
    torch.save({"model": fastmae.mae_vit_tiny_patch4().state_dict(), "epoch": 3}, good)
    data = good.read_bytes()
    files = {"truncated": data[:len(data) // 2], "empty": b"", "garbage": b"this is not a checkpoint\n" * 20,
             "eof": b"\x80\x02"}  # a pickle protocol header, then nothing: EOFError
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.pth"
        paths[name].write_bytes(content)
    paths["folder"] = folder / "a_folder.pth"
    paths["folder"].mkdir()
    return paths


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_unreadable_files_raise_one_line_checkpoint_errors(tmp_path, allow_pickle):
    """A truncated or corrupt file is a one-line CheckpointError naming the file, with torch's reason in brief,
    never torch's raw RuntimeError / EOFError nor advice to allow pickles."""
    expected = {"truncated": "is not a readable checkpoint (truncated or corrupt): PytorchStreamReader failed",
                "garbage": "is not a readable checkpoint (truncated or corrupt)",
                "eof": "is not a readable checkpoint (truncated or corrupt): EOFError",
                "empty": "is an empty file, not a checkpoint", "folder": "is a folder, not a checkpoint file"}
    for name, path in _unreadable_files(tmp_path).items():
        for load in (lambda: read_checkpoint(path, allow_pickle=allow_pickle),
                     lambda: load_checkpoint(fastmae.mae_vit_tiny_patch4(), path, allow_pickle=allow_pickle)):
            with pytest.raises(CheckpointError) as info:
                load()
            msg = str(info.value)
            assert msg.startswith(str(path)) and expected[name] in msg, (name, msg)
            assert "\n" not in msg and "\x1b" not in msg and "allow_pickle" not in msg, (name, msg)
            assert len(msg) < 300 and "This is an internal miniz error" not in msg, (name, msg)


def test_an_eof_error_from_torch_is_a_checkpoint_error(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    path.write_bytes(b"x" * 100)

    def eof(*args, **kwargs):
        raise EOFError("Ran out of input")

    monkeypatch.setattr(torch, "load", eof)
    with pytest.raises(CheckpointError, match=r"c\.pth is not a readable checkpoint \(truncated or corrupt\): "
                                              r"EOFError: Ran out of input$"):
        read_checkpoint(path)


@pytest.mark.parametrize("content, advice", [
    (b"\x80\x02cargparse\nNamespace\n", "argparse.Namespace"),  # a class the official script pickles
    (b"\x80\x02ctorch._utils\n_rebuild_tens\n", None),  # a name cut short by a truncated file: no such name
    (b"\x80\x02cos\nsystem\n", None),  # torch blocks the module: never worth allowing
    (b"\x80\x02ccollecti\nOrderedDict\n", None),  # a legacy (non-zip) file cut inside a module name
])
def test_only_a_disallowed_class_gets_the_allow_pickle_advice(tmp_path, content, advice):
    path = tmp_path / "c.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and "\x1b" not in msg and "add_safe_globals" not in msg, msg
    if advice:
        assert f"({advice})" in msg and "allow_pickle=True" in msg, msg
    else:
        assert "allow_pickle" not in msg, msg


def test_a_whole_file_with_a_class_missing_here_is_not_called_corrupt(tmp_path, monkeypatch):
    """A checkpoint that pickles a class of the script that wrote it (absent here) is whole: the error says the
    class is not available, not that the file is truncated, and gives no allow-pickle advice."""
    import __main__

    class Config:
        pass

    Config.__module__, Config.__qualname__ = "__main__", "FastmaeTestConfig"
    monkeypatch.setattr(__main__, "FastmaeTestConfig", Config, raising=False)
    path = tmp_path / "script.pth"
    torch.save({"model": {}, "config": Config()}, path)
    monkeypatch.delattr(__main__, "FastmaeTestConfig")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    msg = str(info.value)
    assert "refers to __main__.FastmaeTestConfig, which is not available here" in msg, msg
    assert "corrupt" not in msg and "allow_pickle" not in msg


def test_running_out_of_memory_is_not_blamed_on_the_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    torch.save({"model": {}}, path)

    def oom(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(torch, "load", oom)
    with pytest.raises(MemoryError):
        read_checkpoint(path)


def test_an_official_style_checkpoint_error_is_one_line_naming_the_class(tmp_path):
    path = tmp_path / "official.pth"
    torch.save({"model": fastmae.mae_vit_tiny_patch4().state_dict(), "epoch": 0,
                "args": argparse.Namespace(model="mae_vit_tiny_patch4")}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(fastmae.mae_vit_tiny_patch4(), path)
    msg = str(info.value)
    assert msg.startswith(f"{path} holds Python objects beyond tensors and plain values (argparse.Namespace)")
    assert msg.endswith("pass allow_pickle=True (command line: --allow-pickle)")
    assert "\n" not in msg and "\x1b" not in msg and "WeightsUnpickler" not in msg and "PyTorch 2.6" not in msg
    assert info.value.__suppress_context__ and info.value.__context__ is not None  # torch's error kept


class _CtrlC:
    """Pickled by torch.save after its zip writer has opened the file: a Ctrl-C in the middle of a real save."""

    def __reduce__(self):
        raise KeyboardInterrupt


@pytest.mark.parametrize("how", ["torch", "simulated", "exit"])
def test_atomic_save_interrupted_reraises_the_interrupt(tmp_path, monkeypatch, how):
    """Ctrl-C inside torch.save: the interrupt is re-raised as itself, and the temporary file goes in every case.
    The real torch.save stopped while it pickles raises the plain KeyboardInterrupt; the stubs add what a zip
    writer on a Python file raised when it failed to close ("unexpected pos"), a RuntimeError that must not
    replace the KeyboardInterrupt (nor a SystemExit)."""
    path = tmp_path / "c.pth"
    atomic_save({"x": torch.ones(2)}, path)
    if how == "torch":  # the real torch.save, stopped while it pickles
        with pytest.raises(KeyboardInterrupt):
            atomic_save({"x": torch.zeros(100000), "y": _CtrlC()}, path)
    else:
        def interrupted(obj, f, *a, **k):
            Path(f).write_bytes(b"part of a checkpoint")
            try:
                raise KeyboardInterrupt if how == "simulated" else SystemExit(3)
            finally:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 292 vs 0")

        monkeypatch.setattr(torch, "save", interrupted)
        with pytest.raises(KeyboardInterrupt if how != "exit" else SystemExit):
            atomic_save({"x": torch.zeros(100000)}, path)
        monkeypatch.undo()
    assert torch.equal(read_checkpoint(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def test_atomic_save_failures_are_os_errors_naming_the_file(tmp_path, monkeypatch):
    """torch's C++ writer reports a failed write (a full disk) as a RuntimeError without the file: atomic_save
    raises it as an OSError naming the file, as a Python file's failure would be, so the commands report it in
    one line; the previous checkpoint stays and the temporary file goes. Other RuntimeErrors pass unchanged."""
    path = tmp_path / "c.pth"
    atomic_save({"x": torch.ones(2)}, path)

    def full_disk(obj, f, *a, **k):
        Path(f).write_bytes(b"part of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed\nException raised from ...")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as info:
        atomic_save({"x": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert info.value.filename == str(path)
    assert "file write failed" in str(info.value) and "Exception raised from" not in str(info.value)
    assert torch.equal(read_checkpoint(path)["x"], torch.ones(2)) and [p.name for p in tmp_path.iterdir()] == ["c.pth"]

    def not_the_writer(obj, f, *a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch, "save", not_the_writer)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        atomic_save({"x": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def test_a_save_stopped_before_the_zip_is_finished_exits_cleanly(tmp_path):
    """SIGTERM's handler can raise SystemExit in the few bytecodes of torch's zip-writer `__exit__` before it
    finishes the file (here forced). The process must still exit with that status and leave no temporary file;
    with a Python file object under the writer, the unfinished writer finished itself at interpreter exit into the
    closed file and the process aborted ("terminate called ... write to closed file", status 134)."""
    import subprocess
    import sys
    script = ("import sys, torch, torch.serialization as ser\n"
              "from fastmae.model.checkpoint import atomic_save\n"
              "def stopped(self, *args):\n"
              "    raise SystemExit(143)\n"
              "ser._open_zipfile_writer_buffer.__exit__ = ser._open_zipfile_writer_file.__exit__ = stopped\n"
              "atomic_save({'x': torch.zeros(100000)}, sys.argv[1])\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "c.pth")], capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(fastmae.__file__)))
    assert proc.returncode == 143 and "terminate called" not in proc.stderr, (proc.returncode, proc.stderr[-2000:])
    assert list(tmp_path.iterdir()) == []


def test_atomic_save_gives_torch_save_a_path(tmp_path, monkeypatch):
    """torch.save gets the temporary file's path, so no Python file object sits under its zip writer. Given a
    Python file, a stopped save could leave the writer unfinished in the exception's traceback, finishing itself
    at interpreter exit into the closed file: an abort ("terminate called ... write to closed file") instead of
    the exit."""
    real_save, given = torch.save, []

    def recording(obj, f, *a, **k):
        given.append(f)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", recording)
    atomic_save({"x": torch.ones(2)}, tmp_path / "c.pth")
    assert len(given) == 1 and isinstance(given[0], str), given
    assert os.path.dirname(given[0]) == str(tmp_path) and given[0] != str(tmp_path / "c.pth")
    assert torch.equal(read_checkpoint(tmp_path / "c.pth")["x"], torch.ones(2))
