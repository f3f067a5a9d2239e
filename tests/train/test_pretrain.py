"""`fastmae pretrain` end to end on the tiny preset: files and checkpoint contents, exact resume, gradient
accumulation, atomic saves, and the stop on a non-finite loss."""
import json
import math
import os
import sys

import pytest
import torch

import fastmae
from fastmae.cli import main as cli_main
from fastmae.model.checkpoint import read_checkpoint
from fastmae.train import checkpoint as ckpt_io
from fastmae.train.engine import NonFiniteLossError
from fastmae.train.logs import read_step_log
from fastmae.train.optim import lr_at
from fastmae.train.pretrain import run, train
from tests.utils import error_line

from .common import assert_same_weights, dead_pid, pretrain_args, pretrain_argv


def _params(path):
    return read_checkpoint(path)["model"]


def test_pretrain_writes_official_files_and_loadable_checkpoints(tmp_path, capsys):
    args = pretrain_args(tmp_path, "--save_every", "1")
    args.no_progress = False  # exercise the progress bar once
    result = train(args)
    assert result.step == 8 and len(result.losses) == 8 and not result.stopped_early
    assert all(math.isfinite(x) for x in result.losses)
    bar = capsys.readouterr().err
    assert "epoch 1" in bar and "loss=" in bar and "lr=" in bar and "img_s=" in bar and "left=" in bar
    names = {p.name for p in tmp_path.iterdir()}
    assert {"checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth", "log.txt", "train_steps.jsonl",
            "loss_curve.png"} <= names
    assert not [n for n in names if n.startswith(".")], "temporary files left behind"

    epochs = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert {"train_lr", "train_loss", "epoch"} <= set(epochs[0])
    steps = read_step_log(tmp_path)
    assert [(s["epoch"], s["iter"]) for s in steps] == [(e, i) for e in range(2) for i in range(4)]
    assert epochs[1]["train_loss"] == pytest.approx(sum(s["loss"] for s in steps[4:]) / 4)
    lr = 5e-3 * 16 / 256
    for s in steps:  # the per-iteration schedule on the fractional epoch
        assert s["lr"] == pytest.approx(lr_at(s["epoch"] + s["iter"] / 4, lr, 0.0, 1, 2))

    # weights_only=True loading, plain args, official key names
    ck = torch.load(tmp_path / "checkpoint-1.pth", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "step", "args", "rng", "next_iter"} <= set(ck)
    assert ck["epoch"] == 1 and ck["step"] == 8 and ck["next_iter"] == 0
    assert isinstance(ck["args"], dict) and ck["args"]["model"] == "mae_vit_tiny_patch4"
    assert ck["args"]["lr"] == pytest.approx(lr) and "_run" not in ck["args"]
    assert {"torch", "numpy", "python"} <= set(ck["rng"])
    fresh = fastmae.create_model("mae_vit_tiny_patch4")
    fresh.load_state_dict(ck["model"], strict=True)
    assert "blocks.0.attn.qkv.weight" in ck["model"] and "decoder_pred.weight" in ck["model"]
    last = _params(tmp_path / "checkpoint-last.pth")
    assert all(torch.equal(last[k], ck["model"][k]) for k in ck["model"])
    init = fastmae.create_model("mae_vit_tiny_patch4")  # same seed 0 as the run
    first = _params(tmp_path / "checkpoint-0.pth")
    assert not torch.equal(first["blocks.0.mlp.fc1.weight"], ck["model"]["blocks.0.mlp.fc1.weight"])
    assert not torch.equal(init.state_dict()["decoder_pred.weight"], ck["model"]["decoder_pred.weight"])


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    """3 epochs of 4 iterations straight, vs stopped mid-epoch (step 6), resumed and stopped at an epoch
    boundary (step 8), resumed to the end: the same 12 losses and the same final weights (fp32, CPU)."""
    straight = tmp_path / "straight"
    train(pretrain_args(straight, "--epochs", "3"))
    parts = tmp_path / "parts"
    r1 = train(pretrain_args(parts, "--epochs", "3", "--max_steps", "6"))
    assert r1.stopped_early and r1.step == 6
    ck = read_checkpoint(parts / "checkpoint-last.pth")
    assert (ck["epoch"], ck["next_iter"], ck["step"]) == (1, 2, 6)
    r2 = train(pretrain_args(parts, "--epochs", "3", "--max_steps", "8", "--resume", "auto"))
    assert r2.step == 8 and len(r2.losses) == 2
    ck = read_checkpoint(parts / "checkpoint-last.pth")
    assert (ck["epoch"], ck["next_iter"], ck["step"]) == (1, 0, 8)
    r3 = train(pretrain_args(parts, "--epochs", "3", "--resume", str(parts / "checkpoint-last.pth")))
    assert r3.step == 12 and len(r3.losses) == 4

    a, b = read_step_log(straight), read_step_log(parts)
    assert [(s["epoch"], s["iter"], s["step"]) for s in a] == [(s["epoch"], s["iter"], s["step"]) for s in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-6, (x, y)
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-12, abs=0)
    wa, wb = _params(straight / "checkpoint-last.pth"), _params(parts / "checkpoint-last.pth")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0, msg=k)
    # the epoch log: the stop inside epoch 1 wrote a partial line; the resumed run's line for epoch 1 averages the
    # whole epoch (the checkpoint carried the sums of its first two iterations), as the uninterrupted run's does
    epochs_a = [json.loads(x) for x in (straight / "log.txt").read_text().splitlines()]
    epochs_b = [json.loads(x) for x in (parts / "log.txt").read_text().splitlines()]
    assert [(e["epoch"], e.get("partial", False)) for e in epochs_b] == [(0, False), (1, True), (1, False),
                                                                         (2, False)]
    for x, y in zip(epochs_a, [e for e in epochs_b if not e.get("partial")]):
        assert abs(x["train_loss"] - y["train_loss"]) <= 1e-6 and x["train_lr"] == pytest.approx(y["train_lr"])
        assert "from_iter" not in y
    # a finished run resumed again has nothing left to do
    r4 = train(pretrain_args(parts, "--epochs", "3", "--resume", "auto"))
    assert r4.losses == [] and r4.step == 12


def test_a_mid_epoch_checkpoint_without_log_sums_marks_the_resumed_line(tmp_path):
    """A checkpoint written inside an epoch by a version that kept no log sums: the resumed run's line for that
    epoch says from which iteration its averages are (`from_iter`)."""
    train(pretrain_args(tmp_path, "--max_steps", "2"))
    path = tmp_path / "checkpoint-last.pth"
    ck = read_checkpoint(path)
    assert ck["next_iter"] == 2 and ck["epoch_sums"]["count"] == 2
    del ck["epoch_sums"]
    torch.save(ck, path)
    train(pretrain_args(tmp_path, "--resume", "auto", "--max_steps", "4"))
    last = json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])
    assert last["epoch"] == 0 and last["from_iter"] == 2 and "partial" not in last
    steps = [r["loss"] for r in read_step_log(tmp_path) if r["iter"] >= 2]
    assert last["train_loss"] == pytest.approx(sum(steps) / len(steps))


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """batch 16 x accum_iter 2 takes the same optimizer steps as batch 32: same lr (blr * 32 / 256), same
    samples, masks and schedule, so the same weights within fp32 rounding."""
    accum = train(pretrain_args(tmp_path / "accum", "--batch_size", "16", "--accum_iter", "2", "--epochs", "1",
                                "--warmup_epochs", "0"))
    big = train(pretrain_args(tmp_path / "big", "--batch_size", "32", "--epochs", "1", "--warmup_epochs", "0"))
    assert accum.step == big.step == 2
    # the mean of the two micro-batch losses is the large batch's loss (equal masked-patch counts)
    assert (accum.losses[0] + accum.losses[1]) / 2 == pytest.approx(big.losses[0], abs=1e-6)
    ca = read_checkpoint(tmp_path / "accum" / "checkpoint-last.pth")
    cb = read_checkpoint(tmp_path / "big" / "checkpoint-last.pth")
    assert ca["args"]["lr"] == cb["args"]["lr"]
    assert_same_weights(ca["model"], cb["model"], lr=cb["args"]["lr"], steps=2, atol=1e-5, rtol=1e-4)


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = fastmae.create_model("mae_vit_tiny_patch4")
    opt = torch.optim.AdamW(model.parameters())
    good = ckpt_io.make_checkpoint(model, opt, None, epoch=0, step=1, args={"model": "mae_vit_tiny_patch4"})
    ckpt_io.save(good, tmp_path, numbered=True)
    good_weight = good["model"]["decoder_pred.weight"].clone()  # state_dict() aliases the live weights
    before = (tmp_path / "checkpoint-last.pth").read_bytes()

    with torch.no_grad():
        model.decoder_pred.weight.add_(1.0)
    newer = ckpt_io.make_checkpoint(model, opt, None, epoch=0, step=2, args={})
    real_save = torch.save

    def dies_midway(obj, f, *a, **k):  # torch.save is given the temporary file's path
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", dies_midway)
    for numbered in (False, True):
        with pytest.raises(OSError, match="simulated"):
            ckpt_io.save(newer, tmp_path, numbered=numbered)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == before
    loaded = read_checkpoint(tmp_path / "checkpoint-0.pth")
    assert loaded["step"] == 1
    assert torch.equal(loaded["model"]["decoder_pred.weight"], good_weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0.pth", "checkpoint-last.pth"]


def test_non_finite_loss_stops_the_run_and_saves_nothing_bad(tmp_path, monkeypatch):
    train(pretrain_args(tmp_path, "--epochs", "3"))  # 3 good epochs
    good = _params(tmp_path / "checkpoint-last.pth")
    calls = {"n": 0}
    real_forward = fastmae.MaskedAutoencoderViT.forward

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        loss, pred, mask = real_forward(self, imgs, mask_ratio, noise)
        calls["n"] += 1
        # the first forward is the run's check that its backends serve (`_check_backends_serve`), the 7th the 6th step's
        return (loss * float("nan") if calls["n"] == 7 else loss), pred, mask

    monkeypatch.setattr(fastmae.MaskedAutoencoderViT, "forward", forward)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, iteration 1 \(optimizer step 6\)"):
        train(pretrain_args(tmp_path / "fresh", "--epochs", "3"))
    assert {p.name for p in (tmp_path / "fresh").glob("checkpoint-*.pth")} == {"checkpoint-0.pth",
                                                                              "checkpoint-last.pth"}
    ck = read_checkpoint(tmp_path / "fresh" / "checkpoint-last.pth")
    assert ck["epoch"] == 0 and all(torch.isfinite(v).all() for v in ck["model"].values())
    # through the command: exit status 1 and the message; the finished run's files untouched
    calls["n"] = 0
    assert run(pretrain_args(tmp_path / "again", "--epochs", "3")) == 1
    assert all(torch.equal(good[k], v) for k, v in _params(tmp_path / "checkpoint-last.pth").items())
    # a model holding NaN is never written
    model = fastmae.create_model("mae_vit_tiny_patch4")
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    with pytest.raises(ckpt_io.NonFiniteStateError, match="norm.weight"):
        ckpt_io.make_checkpoint(model, torch.optim.AdamW(model.parameters()), None, epoch=0, step=0, args={})


def test_each_loss_is_read_an_iteration_after_its_step_is_issued(tmp_path, monkeypatch):
    """The loop never reads a loss on the host before the next iteration's step is issued (the last one after the
    loop): read between the forward and the backward, or at the end of its own step, it would make the host wait
    for the GPU there. With --accum_iter 2 and 2 optimizer steps: iterations 0 to 3, read one iteration late."""
    from fastmae.train import engine

    events = []
    real_backward, real_item = torch.Tensor.backward, torch.Tensor.item
    real_step, real_read = torch.optim.AdamW.step, engine.LossReads._read

    def backward(self, *args, **kwargs):
        events.append("backward")
        return real_backward(self, *args, **kwargs)

    def item(self):
        assert not self.requires_grad, "a loss read on the host by .item()"
        return real_item(self)

    def step(self, *args, **kwargs):
        events.append("step")
        return real_step(self, *args, **kwargs)

    def read(entry):
        got = real_read(entry)
        if got is not None:
            events.append(f"read {got[0][0]}")
        return got

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(engine.LossReads, "_read", staticmethod(read))
    r = train(pretrain_args(tmp_path, "--epochs", "1", "--max_steps", "2", "--accum_iter", "2"))
    assert r.step == 2 and len(r.losses) == 4 and all(math.isfinite(x) for x in r.losses)
    assert events == ["backward", "backward", "step", "read 0", "backward", "read 1", "backward", "step", "read 2",
                      "read 3"], events
    # the step log: each iteration with the optimizer steps taken after it, as when the loss was read at once
    logged = read_step_log(tmp_path)
    assert [(e["iter"], e["step"]) for e in logged] == [(0, 0), (1, 1), (2, 1), (3, 2)], logged
    assert [e["loss"] for e in logged] == pytest.approx(r.losses)


def test_bf16_autocast_on_cpu_trains(tmp_path):
    r = train(pretrain_args(tmp_path, "--precision", "bf16", "--epochs", "1", "--max_steps", "2"))
    assert r.step == 2 and all(math.isfinite(x) for x in r.losses)
    ck = read_checkpoint(tmp_path / "checkpoint-last.pth")
    assert all(v.dtype == torch.float32 for v in ck["model"].values())  # weights stay fp32 under autocast


def test_command_line_help_and_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["pretrain", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--batch_size", "--accum_iter", "--blr", "--norm_pix_loss", "--warmup_epochs", "--resume",
                 "--dist_url", "--backend", "--precision", "--max_steps", "--save_every", "(default: 64)",
                 "mae_vit_large_patch16"):
        assert flag in out, flag
    assert run(pretrain_args(tmp_path, "--data_path", str(tmp_path / "missing"))) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert run(pretrain_args(tmp_path, "--model", "mae_vit_nope")) == 2
    assert "unknown --model" in capsys.readouterr().err
    assert run(pretrain_args(tmp_path, "--resume", str(tmp_path / "nope.pth"))) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert run(pretrain_args(tmp_path, "--batch_size", "128")) == 2
    assert "fewer than one batch" in capsys.readouterr().err


def test_resume_from_an_official_style_checkpoint(tmp_path, capsys):
    """Official checkpoints hold {'model', 'optimizer', 'scaler', 'epoch', 'args': argparse.Namespace}: they
    need --allow-pickle (weights_only loading refuses the Namespace), then resume at epoch + 1. The official
    script's optimizer state (torch's default AdamW) resumes into fastmae's fused AdamW, which stays fused."""
    import argparse
    src = tmp_path / "src"
    train(pretrain_args(src, "--epochs", "1", "--adamw", "default"))
    ours = read_checkpoint(src / "checkpoint-0.pth")
    official = {"model": ours["model"], "optimizer": ours["optimizer"], "epoch": 0, "scaler": {},
                "args": argparse.Namespace(model="mae_vit_tiny_patch4", epochs=2)}
    path = tmp_path / "official.pth"
    torch.save(official, path)
    dst = tmp_path / "dst"
    assert run(pretrain_args(dst, "--resume", str(path))) == 2
    assert "allow_pickle" in capsys.readouterr().err
    result = train(pretrain_args(dst, "--resume", str(path), "--allow-pickle"))
    assert result.step == 8 and len(result.losses) == 4  # epoch 1 only; the step count derived from epoch
    assert "optimizer: AdamW, fused implementation" in capsys.readouterr().out
    assert read_checkpoint(dst / "checkpoint-last.pth")["optimizer"]["param_groups"][0]["fused"] is True
    assert [s["epoch"] for s in read_step_log(dst)] == [1] * 4


def test_a_mid_epoch_checkpoint_resumes_only_with_its_batch_layout(tmp_path, capsys):
    """A run stopped by --max_steps inside epoch 0 (batch 16, iteration 2 of 4) counts its position in batch-16
    iterations: resuming it with batch 8 would repeat or skip samples, so it is refused with the reason."""
    train(pretrain_args(tmp_path, "--max_steps", "2"))
    assert run(pretrain_args(tmp_path, "--resume", "auto", "--batch_size", "8")) == 2
    err = capsys.readouterr().err
    assert "middle of epoch 0 (iteration 2)" in err and "--batch_size 16 then, 8 now" in err
    assert run(pretrain_args(tmp_path, "--resume", "auto", "--accum_iter", "2")) == 2
    assert "--accum_iter 1 then, 2 now" in capsys.readouterr().err
    # a larger batch has 2 iterations an epoch: iteration 2 is past its end, and still refused, not taken as
    # the end of the epoch (which would skip the rest of epoch 0)
    assert run(pretrain_args(tmp_path, "--resume", "auto", "--batch_size", "32")) == 2
    assert "--batch_size 16 then, 32 now" in capsys.readouterr().err
    # the same layout on fewer images: the position is past the end of this run's epoch
    assert run(pretrain_args(tmp_path, "--resume", "auto", "--builtin_size", "32")) == 2
    assert "the dataset is not the one it was written with" in capsys.readouterr().err
    # at an epoch boundary the layout may change, as officially
    train(pretrain_args(tmp_path, "--resume", "auto", "--max_steps", "4"))
    r = train(pretrain_args(tmp_path, "--resume", "auto", "--batch_size", "8", "--epochs", "2"))
    assert [s["epoch"] for s in read_step_log(tmp_path)][-8:] == [1] * 8 and len(r.losses) == 8


def test_a_weights_only_file_keeps_start_epoch_and_official_steps_count_whole_groups(tmp_path, capsys):
    """--resume with a file of weights alone loads them and trains from --start_epoch with a fresh optimizer
    (the official rule); an official checkpoint's step count is whole accumulation groups per epoch."""
    src = tmp_path / "src"
    train(pretrain_args(src, "--epochs", "1"))
    weights = tmp_path / "weights.pth"
    torch.save({"model": read_checkpoint(src / "checkpoint-0.pth")["model"]}, weights)
    dst = tmp_path / "dst"
    r = train(pretrain_args(dst, "--resume", str(weights), "--start_epoch", "1"))
    assert f"loaded the weights of {weights} (no optimizer state or epoch in it)" in capsys.readouterr().out
    assert [s["epoch"] for s in read_step_log(dst)] == [1] * 4 and r.step == 4
    # it trained from those weights: its first loss is the source run's model's loss on that batch, which a
    # freshly initialised model does not give
    fresh = train(pretrain_args(tmp_path / "fresh", "--start_epoch", "1", "--max_steps", "1"))
    first = read_step_log(dst)[0]["loss"]
    resumed = train(pretrain_args(tmp_path / "again", "--resume", str(weights), "--start_epoch", "1",
                                  "--max_steps", "1"))
    assert resumed.losses[0] == pytest.approx(first, abs=1e-6) and abs(fresh.losses[0] - first) > 1e-3

    model = fastmae.create_model("mae_vit_tiny_patch4")
    opt = torch.optim.AdamW(model.parameters())
    official = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 2, "scaler": {}}
    torch.save(official, tmp_path / "official.pth")
    where = ckpt_io.load_for_resume(tmp_path / "official.pth", model, opt, None, iters_per_epoch=4, accum_iter=3,
                                    restore_rng=False)
    assert (where["start_epoch"], where["skip_iters"], where["step"]) == (3, 0, 3)  # 3 epochs of one step


def test_accumulation_longer_than_an_epoch_is_refused_and_a_remainder_warned(tmp_path, capsys):
    assert run(pretrain_args(tmp_path, "--accum_iter", "8")) == 2
    assert "more than the 4 iterations of an epoch" in capsys.readouterr().err
    r = train(pretrain_args(tmp_path, "--accum_iter", "3", "--epochs", "1"))
    assert r.step == 1 and len(r.losses) == 4
    assert "the last 1 of each epoch are computed and their gradients dropped" in capsys.readouterr().out


def test_resume_auto_takes_a_numbered_file_written_after_the_last_one(tmp_path):
    """Killed between writing checkpoint-N.pth and linking checkpoint-last.pth to it: the file holding the later
    point of training wins, whatever the files' times (a copied folder's are the copy's)."""
    import argparse
    import os
    model = fastmae.create_model("mae_vit_tiny_patch4")
    opt = torch.optim.AdamW(model.parameters())
    ckpt_io.save(ckpt_io.make_checkpoint(model, opt, None, epoch=0, step=4, args={}), tmp_path, numbered=True)
    assert ckpt_io.find_latest(tmp_path).name == "checkpoint-last.pth"  # a link to checkpoint-0.pth
    ckpt_io.save(ckpt_io.make_checkpoint(model, opt, None, epoch=1, step=6, args={}, next_iter=2), tmp_path,
                 numbered=False)
    assert ckpt_io.find_latest(tmp_path).name == "checkpoint-last.pth"  # mid-epoch 1, newer than epoch 0
    newer = tmp_path / "checkpoint-1.pth"
    torch.save(ckpt_io.make_checkpoint(model, opt, None, epoch=1, step=8, args={}), newer)
    last_ns = (tmp_path / "checkpoint-last.pth").stat().st_mtime_ns
    os.utime(newer, ns=(last_ns - 10 ** 9, last_ns - 10 ** 9))  # older on disk (a copied folder): the point decides
    assert ckpt_io.find_latest(tmp_path) == newer
    # a folder copied without its file times: checkpoint-0.pth copied after checkpoint-last.pth (mid-epoch 1)
    newer.unlink()
    os.utime(tmp_path / "checkpoint-0.pth", ns=(last_ns + 10 ** 9, last_ns + 10 ** 9))
    assert ckpt_io.find_latest(tmp_path).name == "checkpoint-last.pth"
    # files whose point cannot be read (official pickles): the one written later
    torch.save({"model": {}, "epoch": 0, "args": argparse.Namespace()}, tmp_path / "checkpoint-0.pth")
    os.utime(tmp_path / "checkpoint-0.pth", ns=(last_ns + 10 ** 9, last_ns + 10 ** 9))
    assert ckpt_io.find_latest(tmp_path).name == "checkpoint-0.pth"


@pytest.mark.parametrize("major, expected", [(7, "fp16"), (8, "bf16"), (9, "bf16")])
def test_auto_precision_asks_the_chosen_gpu_for_hardware_bf16(monkeypatch, major, expected):
    """`torch.cuda.is_bf16_supported()` also counts emulated bf16 (slow on pre-Ampere GPUs) and asks the
    current device: the choice is made on the compute capability of the device the run uses."""
    from fastmae.train.pretrain import resolve_precision
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or (major, 0))
    assert resolve_precision("auto", torch.device("cuda", 1)) == expected
    assert asked == [torch.device("cuda", 1)]
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"


@pytest.mark.parametrize("device, message", [("gpu", "is not a device"), ("meta", "runs on cpu or cuda")])
def test_a_bad_device_is_a_clear_error(tmp_path, capsys, device, message):
    assert run(pretrain_args(tmp_path, "--device", device)) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ user errors
def _refused(capsys, args) -> str:
    """Run the command; it must stop with exit status 2 before any work, with a one-line message."""
    assert run(args) == 2
    captured = capsys.readouterr()
    assert "start training" not in captured.out and "data:" not in captured.out
    return error_line(captured.err, "pretrain", alone=True)


def test_an_output_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    # and places not even root can write to, where they are mounted
    places = [a_file, a_file / "sub"] + [f"{m}/fastmae-test" for m in ("/proc", "/sys") if os.path.ismount(m)]
    for place in places:
        assert f"--output_dir {place}: cannot write there (" in _refused(capsys, pretrain_args(place))
    assert a_file.read_text() == "x"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_is_refused_before_training(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "Permission denied" in _refused(capsys, pretrain_args(ro))
    finally:
        ro.chmod(0o700)


def test_early_errors_leave_no_empty_output_dir(tmp_path, capsys):
    out = tmp_path / "runs" / "one"
    for extra, message in [(["--data_path", str(tmp_path / "missing")], "data folder not found"),
                           (["--resume", str(tmp_path / "nope.pth")], "checkpoint not found"),
                           (["--backend", "bogus"], "unknown backend"),
                           (["--mask_ratio", "0.999"], "keeps none"),
                           (["--batch_size", "128"], "fewer than one batch")]:
        assert message in _refused(capsys, pretrain_args(out, *extra))
        assert list(tmp_path.iterdir()) == [], extra
    out.mkdir(parents=True)  # a folder that was there before stays
    _refused(capsys, pretrain_args(out, "--backend", "bogus"))
    assert out.is_dir()


@pytest.mark.parametrize("spec, message", [
    ("bogus", "--backend bogus: unknown backend 'bogus'"), ("attn=sdpa", "--backend attn=sdpa: unknown op 'attn'"),
    ("attention=", "--backend attention=: unknown backend ''"),
    ("attention=reference,attention=sdpa", "op 'attention' is given twice")])
def test_a_bad_backend_is_refused_before_any_work(tmp_path, capsys, monkeypatch, spec, message):
    monkeypatch.delenv("FASTMAE_BACKEND", raising=False)
    assert message in _refused(capsys, pretrain_args(tmp_path / "out", "--backend", spec))


def test_a_bad_backend_variable_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTMAE_BACKEND", "bogus")
    assert "FASTMAE_BACKEND=bogus: unknown backend 'bogus'" in _refused(capsys, pretrain_args(tmp_path / "out"))


@pytest.mark.parametrize("extra, message", [
    (["--max_steps", "-1"], "--max_steps must not be negative, got -1"),
    (["--num_workers", "-1"], "--num_workers must not be negative, got -1"),
    (["--warmup_epochs", "-1"], "--warmup_epochs must not be negative, got -1"),
    (["--builtin_size", "0"], "--builtin_size must be at least 1, got 0"),
    (["--start_epoch", "5", "--epochs", "1"], "--start_epoch 5 is not before --epochs 1"),
    (["--start_epoch", "2"], "--start_epoch 2 is not before --epochs 2"),
    (["--mask_ratio", "0.999"], "--mask_ratio 0.999 keeps none of the model's 64 patches"),
])
def test_each_bad_flag_is_named_alone(tmp_path, capsys, extra, message):
    line = _refused(capsys, pretrain_args(tmp_path / "out", *extra))
    assert message in line
    others = {"--max_steps", "--num_workers", "--warmup_epochs"} - {extra[0]}
    assert not any(flag in line for flag in others), line


def test_resume_from_a_folder_takes_its_latest_checkpoint(tmp_path, capsys):
    src = tmp_path / "src"
    train(pretrain_args(src, "--epochs", "1"))
    r = train(pretrain_args(tmp_path / "dst", "--resume", str(src)))
    assert r.step == 8 and len(r.losses) == 4  # epoch 1 only
    assert f"resumed from {src / 'checkpoint-last.pth'}" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"--resume {empty}: that folder holds no checkpoint" in _refused(
        capsys, pretrain_args(tmp_path / "dst2", "--resume", str(empty)))


def test_the_non_finite_loss_message_names_a_checkpoint_only_if_there_is_one(tmp_path, capsys, monkeypatch):
    real_forward = fastmae.MaskedAutoencoderViT.forward
    calls = {"n": 0, "nan_at": 2}  # the first forward is the run's backend check (`_check_backends_serve`)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        loss, pred, mask = real_forward(self, imgs, mask_ratio, noise)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == calls["nan_at"] else loss), pred, mask

    monkeypatch.setattr(fastmae.MaskedAutoencoderViT, "forward", forward)
    assert run(pretrain_args(tmp_path / "first")) == 1
    err = capsys.readouterr().err
    assert "this run wrote none before it" in err and "checkpoint-last.pth" not in err
    assert not list((tmp_path / "first").glob("checkpoint-*"))
    calls.update(n=0, nan_at=7)  # in epoch 1, after epoch 0's checkpoint
    assert run(pretrain_args(tmp_path / "second")) == 1
    assert f"the last good one is {tmp_path / 'second' / 'checkpoint-last.pth'}" in capsys.readouterr().err


def test_pin_mem_help_shows_the_default_once(capsys):
    with pytest.raises(SystemExit):
        cli_main(["pretrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--pin_mem pin CPU memory in the DataLoader for faster transfer to the GPU (default: True)" in out
    assert "--no_pin_mem do not pin CPU memory --" in out  # no "(default: True)" on the flag that turns it off
    assert pretrain_args("x").pin_mem is True and pretrain_args("x", "--no_pin_mem").pin_mem is False
    assert pretrain_args("x", "--no_pin_mem", "--pin_mem").pin_mem is True  # the last one wins


def test_a_file_with_an_epoch_but_no_optimizer_says_what_it_lacks(tmp_path, capsys):
    src = tmp_path / "src"
    train(pretrain_args(src, "--epochs", "1"))
    weights = tmp_path / "weights.pth"
    torch.save({"model": read_checkpoint(src / "checkpoint-0.pth")["model"], "epoch": 3}, weights)
    train(pretrain_args(tmp_path / "dst", "--resume", str(weights), "--max_steps", "1"))
    assert f"loaded the weights of {weights} (no optimizer state in it)" in capsys.readouterr().out


def test_a_run_removes_the_temp_files_of_killed_writers(tmp_path, capsys):
    """A checkpoint temp file whose writer no longer runs (a hard kill while saving) is removed at the start of
    the next run in that folder, and said; a file of a live process stays."""
    dead = dead_pid()
    out = tmp_path / "out"
    out.mkdir()
    stale, live = out / f".checkpoint-last.pth.tmp-{dead}", out / ".checkpoint-last.pth.tmp-1"
    # pid 1 runs (since boot, or since the container started); its file was written after that, long ago
    started = ckpt_io._start_time(1) or 1e9
    for f, when in ((stale, 1e9), (live, started + 1)):
        f.write_bytes(b"half a checkpoint")
        os.utime(f, (when, when))
    train(pretrain_args(out, "--epochs", "1", "--max_steps", "1"))
    assert not stale.exists() and live.exists()
    assert f"removed {stale}" in capsys.readouterr().out


def test_sigterm_stops_a_run_as_an_exit_with_cleanup(tmp_path):
    """SIGTERM (kill, timeout, a scheduler's preemption) ends `fastmae pretrain` through SystemExit(143), so a
    checkpoint being written is removed as on Ctrl-C, and no temp file is left."""
    import signal
    import subprocess
    import time

    from fastmae.cli import sigterm_as_exit

    before, before_chld = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGCHLD)
    try:
        with pytest.raises(SystemExit) as stopped:
            with sigterm_as_exit():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler runs at the next bytecode: never reached
        assert stopped.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is before  # restored
    finally:
        signal.signal(signal.SIGCHLD, before_chld)  # the handler let go of DataLoader's, the process exiting

    out = tmp_path / "out"
    argv = [sys.executable, "-m", "fastmae", "pretrain", "--model", "mae_vit_tiny_patch4", "--input_size", "32",
            "--num_workers", "0", "--device", "cpu", "--precision", "fp32", "--builtin_size", "64",
            "--batch_size", "16", "--epochs", "400", "--output_dir", str(out), "--log_dir", ""]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint-last.pth").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (out / "checkpoint-last.pth").exists(), proc.communicate()[0] if proc.poll() is not None else ""
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert output.rstrip().endswith("fastmae pretrain: terminated (SIGTERM); the checkpoints written so far are "
                                    "whole (--resume auto continues from the latest)"), output[-2000:]
    assert "Traceback" not in output
    assert not [f.name for f in out.iterdir() if ".tmp-" in f.name or ".link-" in f.name]
    read_checkpoint(out / "checkpoint-last.pth")  # whole


def test_only_rank_0_probes_the_output_dir(tmp_path, capsys, monkeypatch):
    """Under torchrun only rank 0 writes to --output_dir: another rank does not probe it (a folder its node
    cannot write to does not stop the job there) and would fail on its own errors instead."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    args = pretrain_args(a_file / "out", "--data_path", str(tmp_path / "no_data"))
    assert "cannot write there" in _refused(capsys, args)
    monkeypatch.setenv("RANK", "1")  # without WORLD_SIZE: one process, as rank 1 would check its flags
    assert "cannot write there" not in _refused(capsys, args)


def test_a_tilde_in_a_path_flag_means_home_everywhere(tmp_path, monkeypatch):
    """`--output_dir=~/run` (the shell leaves a `~` after `=` alone): the run writes under $HOME, and nothing named
    `~` appears in the working directory; `--resume=~/...` reads from there too."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert cli_main(pretrain_argv("~/run", "--epochs", "1", "--max_steps", "1")) == 0
    assert (home / "run" / "checkpoint-last.pth").is_file() and list(cwd.iterdir()) == []
    assert cli_main(pretrain_argv("~/again", "--epochs", "1", "--max_steps", "2",
                                  "--resume=~/run/checkpoint-last.pth")) == 0
    assert read_checkpoint(home / "again" / "checkpoint-last.pth")["step"] == 2 and list(cwd.iterdir()) == []


def test_a_folder_holding_a_run_is_not_overwritten_without_overwrite(tmp_path, capsys):
    """A new run (no --resume) in an --output_dir with checkpoints is refused before any work; --resume auto
    continues it; --overwrite starts afresh there: the old checkpoints and logs are gone, not mixed in."""
    assert run(pretrain_args(tmp_path, "--epochs", "2", "--save_every", "1")) == 0
    before = (tmp_path / "checkpoint-last.pth").read_bytes()
    capsys.readouterr()
    assert run(pretrain_args(tmp_path, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run's checkpoints (checkpoint-last.pth)" in err and "--resume auto" in err
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == before
    assert run(pretrain_args(tmp_path, "--epochs", "1", "--max_steps", "2", "--overwrite", "--seed", "3")) == 0
    assert "--overwrite: removed" in capsys.readouterr().out
    assert [p.name for p in tmp_path.glob("checkpoint-*.pth")] == ["checkpoint-last.pth"]  # the old ones gone
    assert read_checkpoint(tmp_path / "checkpoint-last.pth")["step"] == 2
    assert [(s["epoch"], s["iter"]) for s in read_step_log(tmp_path)] == [(0, 0), (0, 1)]  # this run's alone
    assert [json.loads(x)["epoch"] for x in (tmp_path / "log.txt").read_text().splitlines()] == [0]


def test_a_run_whose_step_limit_is_reached_trains_nothing_and_says_so_once(tmp_path, capsys):
    assert run(pretrain_args(tmp_path, "--epochs", "1", "--max_steps", "2")) == 0
    capsys.readouterr()
    result = train(pretrain_args(tmp_path, "--epochs", "1", "--max_steps", "2", "--resume", "auto"))
    out = capsys.readouterr().out
    assert result.step == 2 and result.stopped_early and result.losses == []
    assert "--max_steps 2 already reached (step 2); nothing to train" in out and "start training" not in out


def test_the_time_estimate_counts_the_iterations_up_to_the_step_limit(tmp_path, monkeypatch):
    import fastmae.train.logs as logs
    seen = []
    real = logs.RunLogger

    def logger(*args, **kwargs):
        seen.append(kwargs["total_iters"])
        return real(*args, **kwargs)

    monkeypatch.setattr(logs, "RunLogger", logger)
    train(pretrain_args(tmp_path / "a", "--epochs", "3", "--max_steps", "5", "--accum_iter", "2"))
    train(pretrain_args(tmp_path / "b", "--epochs", "3"))
    assert seen == [10, 12]  # 5 steps of 2 iterations; 3 epochs of 4 iterations


def test_a_backend_that_cannot_serve_is_refused_before_the_data_is_opened(tmp_path, capsys, monkeypatch):
    import fastmae.train.data as data
    monkeypatch.setattr(data, "open_dataset", lambda *a, **k: pytest.fail("the dataset was opened"))
    assert cli_main(pretrain_argv(tmp_path / "out", "--backend", "xformers")) == 2
    assert "backend 'xformers' cannot run attention" in error_line(capsys.readouterr().err, "pretrain", alone=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--blr", "0"], "--blr must be positive, got 0.0"),
    (["--min_lr", "-5"], "--min_lr must not be negative, got -5.0"),
    (["--weight_decay", "-1"], "--weight_decay must not be negative, got -1.0"),
    (["--dist_on_itp"], "--dist_on_itp reads the ranks from OpenMPI's environment"),
])
def test_bad_optimizer_and_launcher_flags_are_refused_in_one_line(tmp_path, capsys, monkeypatch, extra, message):
    for var in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert run(pretrain_args(tmp_path / "out", *extra)) == 2
    assert message in error_line(capsys.readouterr().err, "pretrain", alone=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["pretrain", "visualize", "linprobe"])
def test_a_negative_seed_is_refused_by_the_flag(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main([command, "--seed", "-1"])
    assert exit_.value.code == 2
    assert "argument --seed: must be a seed in [0, 2**63), got -1" in capsys.readouterr().err
