"""Optional outputs: TensorBoard scalars as the official script logs them (checked with a stand-in writer,
since tensorboard is an optional install), and the loss curve skipped cleanly without matplotlib."""
import sys
import types

import pytest

from fastmae.train.logs import CURVE, plot_loss_curve, read_step_log
from fastmae.train.pretrain import train

from .common import pretrain_args


class _Writer:
    instances = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        _Writer.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_scalars_against_epoch_1000x(tmp_path, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    _Writer.instances.clear()
    args = pretrain_args(tmp_path, "--epochs", "1")
    args.log_dir = str(tmp_path / "tb")
    train(args)
    (w,) = _Writer.instances
    assert w.log_dir == str(tmp_path / "tb") and w.closed
    steps = read_step_log(tmp_path)
    losses = [(v, s) for t, v, s in w.scalars if t == "train_loss"]
    assert [s for _, s in losses] == [int(i / 4 * 1000) for i in range(4)]  # epoch_1000x
    assert [v for v, _ in losses] == pytest.approx([r["loss"] for r in steps])
    assert [v for t, v, _ in w.scalars if t == "lr"] == pytest.approx([r["lr"] for r in steps])


def test_loss_curve_needs_matplotlib_only_optionally(tmp_path, monkeypatch, capsys):
    train(pretrain_args(tmp_path, "--epochs", "1"))
    assert (tmp_path / CURVE).stat().st_size > 1000
    (tmp_path / CURVE).unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert plot_loss_curve(tmp_path) is None
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / CURVE).exists()


def test_the_step_log_keeps_the_latest_record_of_each_iteration(tmp_path):
    """A run that crashed in epoch 1 and resumed from the end of epoch 0 records epoch 1's first iterations
    twice: the reader keeps the resumed run's records, in (epoch, iteration) order."""
    import json
    from fastmae.train.logs import STEP_LOG
    rows = [(0, 0, 1.0), (0, 1, 0.9), (1, 0, 0.8), (1, 1, 0.7), (1, 0, 0.75), (1, 1, 0.65), (1, 2, 0.6)]
    (tmp_path / STEP_LOG).write_text("".join(json.dumps({"epoch": e, "iter": i, "step": 0, "loss": x, "lr": 0.0})
                                             + "\n" for e, i, x in rows))
    assert [(r["epoch"], r["iter"], r["loss"]) for r in read_step_log(tmp_path)] == \
        [(0, 0, 1.0), (0, 1, 0.9), (1, 0, 0.75), (1, 1, 0.65), (1, 2, 0.6)]


def test_a_torn_line_left_by_a_killed_run_is_skipped_and_ended(tmp_path):
    """A run killed while appending leaves half a line: the reader skips it (the loss curve of the resumed run is
    still drawn), and a resumed run's logger ends that line before its first record."""
    import json
    from fastmae.train.logs import EPOCH_LOG, STEP_LOG, RunLogger
    record = {"epoch": 0, "iter": 0, "step": 0, "loss": 1.0, "lr": 0.0}
    (tmp_path / STEP_LOG).write_text(json.dumps(record) + "\n" + '{"epoch": 0, "iter": 1, "st')
    (tmp_path / EPOCH_LOG).write_text('{"train_loss": 1.0, "epo')
    assert read_step_log(tmp_path) == [record]
    logger = RunLogger(str(tmp_path), None, progress=False)
    logger.iteration(epoch=0, it=1, iters_per_epoch=4, step=0, loss=0.5, lr=0.0, images=2, seconds=1.0)
    logger.end_epoch({"train_loss": 0.7, "epoch": 0})
    assert [r["loss"] for r in read_step_log(tmp_path)] == [1.0, 0.5]
    assert (tmp_path / EPOCH_LOG).read_text().splitlines()[1] == '{"train_loss": 0.7, "epoch": 0}'
    RunLogger(str(tmp_path), None, progress=False)  # a file that ends its last line is left as it is
    assert (tmp_path / STEP_LOG).read_text().endswith('"lr": 0.0}\n')
    assert len((tmp_path / STEP_LOG).read_text().splitlines()) == 3
