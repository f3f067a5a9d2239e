"""What a pretraining run writes besides checkpoints (rank 0 only):

    log.txt            one JSON line per epoch, as the official script writes it
                       ({"train_lr": ..., "train_loss": ..., "epoch": ...} plus a few extra keys)
    train_steps.jsonl  one JSON line per data iteration: epoch, iter, step, loss (mean over ranks), lr
    loss_curve.png     the per-iteration loss at the end of the run (needs matplotlib; skipped otherwise)
    events.*           TensorBoard scalars `train_loss` and `lr` against epoch_1000x, as the official script
                       logs them (needs the tensorboard package; skipped otherwise)
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

STEP_LOG = "train_steps.jsonl"
EPOCH_LOG = "log.txt"
CURVE = "loss_curve.png"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class RunLogger:
    """Progress bar, JSON-lines logs and TensorBoard for one run. `enabled=False` (ranks > 0) does nothing."""

    def __init__(self, output_dir: str | None, log_dir: str | None, *, enabled: bool = True,
                 progress: bool = True, total_iters: int = 0, done_iters: int = 0, fresh: bool = False):
        """`fresh`: a run that continues no checkpoint; the logs an earlier run left in output_dir are removed
        (a resumed run appends to them)."""
        self.enabled = enabled
        self.out = Path(output_dir) if (output_dir and enabled) else None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            for name in (STEP_LOG, EPOCH_LOG, CURVE) if fresh else ():
                (self.out / name).unlink(missing_ok=True)
            for name in (STEP_LOG, EPOCH_LOG):
                _end_last_line(self.out / name)
        self.progress = progress and enabled
        self.total_iters, self.done_iters = total_iters, done_iters
        self.start = time.time()
        self.iters_this_run = 0
        self.bar = None
        self.tb = None
        if enabled and log_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: optional
                _say("TensorBoard logging off (the tensorboard package is not installed)")
            else:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                self.tb = SummaryWriter(log_dir=log_dir)

    # ------------------------------------------------------------------ progress
    def start_epoch(self, epoch: int, iters: int, skip: int = 0) -> None:
        if not self.progress:
            return
        from tqdm.auto import tqdm
        self.bar = tqdm(total=iters, initial=skip, desc=f"epoch {epoch}", unit="it", dynamic_ncols=True,
                        leave=True, file=sys.stderr)

    def iteration(self, *, epoch: int, it: int, iters_per_epoch: int, step: int, loss: float, lr: float,
                  images: int, seconds: float) -> None:
        self.done_iters += 1
        self.iters_this_run += 1
        if not self.enabled:
            return
        if self.out is not None:
            with open(self.out / STEP_LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps({"epoch": epoch, "iter": it, "step": step, "loss": loss, "lr": lr}) + "\n")
        if self.tb is not None:
            epoch_1000x = int((it / iters_per_epoch + epoch) * 1000)
            self.tb.add_scalar("train_loss", loss, epoch_1000x)
            self.tb.add_scalar("lr", lr, epoch_1000x)
        if self.bar is not None:
            elapsed = time.time() - self.start
            left = (self.total_iters - self.done_iters) * elapsed / max(self.iters_this_run, 1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images / max(seconds, 1e-9):.0f}",
                                 left=_duration(left), refresh=False)
            self.bar.update(1)

    def end_epoch(self, stats: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.enabled:
            return
        if self.out is not None:
            with open(self.out / EPOCH_LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps(stats) + "\n")
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _end_last_line(path: Path) -> None:
    """End the file's last line if a run stopped in the middle of writing it (killed, a full disk), so that the
    next record starts a line of its own."""
    try:
        with open(path, "rb+") as f:
            if f.seek(0, 2) == 0:  # empty
                return
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
    except FileNotFoundError:
        pass


def read_step_log(output_dir: str | Path) -> list[dict]:
    """The records of `train_steps.jsonl`, one per (epoch, iteration) in that order. Every run appends to the
    file; where a run resumed from an earlier point than the last one recorded (after a crash, from
    `checkpoint-last.pth` of the last finished epoch), the later record of an iteration replaces the earlier.
    A line that is not a whole record (a run killed while writing it) is skipped."""
    path = Path(output_dir) / STEP_LOG
    if not path.is_file():
        return []
    latest = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
                latest[(int(record["epoch"]), int(record["iter"]))] = record
            except (ValueError, TypeError, KeyError):  # blank, torn or not a step record
                continue
    return [latest[key] for key in sorted(latest)]


def plot_loss_curve(output_dir: str | Path) -> Path | None:
    """Draw `loss_curve.png` from `train_steps.jsonl`; returns its path, or None (with a message) when
    matplotlib is not installed or there is nothing to draw."""
    records = read_step_log(output_dir)
    if not records:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("loss curve not drawn (matplotlib is not installed: pip install matplotlib)")
        return None
    iters = max(1, max(r["iter"] for r in records) + 1)
    x = [r["epoch"] + r["iter"] / iters for r in records]
    y = [r["loss"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(x, y, lw=0.8, alpha=0.5, label="loss per iteration")
    k = max(1, len(y) // 50)
    if k > 1:
        smooth = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]
        ax.plot(x, smooth, lw=1.5, label=f"moving average ({k})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reconstruction loss (masked patches)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(output_dir) / CURVE
    from ..model.checkpoint import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))  # whole or not at all
    plt.close(fig)
    return path
