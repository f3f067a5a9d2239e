"""Training checkpoints: what they hold, how they are written (atomically) and how a run resumes.

A checkpoint is a dict of tensors and plain Python values only, so it loads with
`torch.load(..., weights_only=True)`:

    model       the model state dict, official key names (as `misc.save_model` writes it)
    optimizer   the AdamW state dict
    scaler      the fp16 gradient scaler's state dict ({} when the scaler is off)
    epoch       the epoch the state belongs to (the last completed one, unless `next_iter` > 0)
    next_iter   data iterations of `epoch` already done; 0 means `epoch` is complete (the official meaning)
    step        optimizer steps taken so far
    args        the run's arguments as a plain dict
    rng         torch / cuda / numpy / python `random` states (as tensors, lists and ints)
    fastmae     the version that wrote it

Official checkpoints (`model`, `optimizer`, `scaler`, `epoch`, `args` as an argparse.Namespace) resume too,
with `allow_pickle=True` because of the Namespace.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from ..model.checkpoint import atomic_save, read_checkpoint
from .optim import load_optimizer_state

LAST = "checkpoint-last.pth"
_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pth$")


class NonFiniteStateError(RuntimeError):
    """The model holds NaN or inf values: such a state is never written to a checkpoint."""


def plain(value):
    """`value` reduced to what `weights_only=True` loads: None, bool, int, float, str, and lists / dicts of
    them (paths become strings, other objects their repr; callables are dropped by `plain_args`)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, torch.device):
        return str(value)
    return repr(value)


def plain_args(args) -> dict:
    """An argparse.Namespace (or dict) as a plain dict, without private or callable entries."""
    items = vars(args).items() if not isinstance(args, dict) else args.items()
    return {k: plain(v) for k, v in items if not k.startswith("_") and not callable(v)}


def rng_state() -> dict:
    """The global random states, as tensors and plain lists."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (parts that are missing are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["kind"], np.asarray(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
    if "python" in state:
        s = state["python"]
        random.setstate((s["version"], tuple(s["internal"]), s["gauss"]))


def check_finite(state_dict: dict) -> None:
    bad = [k for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteStateError(f"not saving: non-finite values in {', '.join(bad[:8])}"
                                  f"{', ...' if len(bad) > 8 else ''}")


def make_checkpoint(model, optimizer, scaler, *, epoch: int, step: int, args, next_iter: int = 0) -> dict:
    """The checkpoint dict (see the module docstring); raises `NonFiniteStateError` on NaN/inf weights."""
    from .. import __version__
    model_state = model.state_dict()
    check_finite(model_state)
    return {
        "model": model_state,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": int(epoch),
        "next_iter": int(next_iter),
        "step": int(step),
        "args": plain_args(args),
        "rng": rng_state(),
        "fastmae": __version__,
    }


def save(checkpoint: dict, output_dir: str | Path, *, numbered: bool) -> list[Path]:
    """Write `checkpoint-last.pth` and, if `numbered`, `checkpoint-{epoch}.pth`, each atomically (temp file
    + rename: an interrupted write leaves the previous file intact). The numbered file is written once and
    `checkpoint-last.pth` is made a hard link to it where the file system allows."""
    out = Path(output_dir)
    last = out / LAST
    if not numbered:
        atomic_save(checkpoint, last)
        return [last]
    path = out / f"checkpoint-{checkpoint['epoch']}.pth"
    atomic_save(checkpoint, path)
    tmp = out / f".{LAST}.link-{os.getpid()}"
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(path, tmp)
        os.replace(tmp, last)
    except OSError:
        if tmp.exists():
            tmp.unlink()
        atomic_save(checkpoint, last)
    return [path, last]


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest checkpoint in `output_dir`: `checkpoint-last.pth`, unless the highest-numbered
    `checkpoint-N.pth` was written after it (a run stopped between writing that file and linking
    `checkpoint-last.pth` to it); the highest-numbered file when there is no `checkpoint-last.pth`."""
    out = Path(output_dir)
    numbered = [(int(m.group(1)), p) for p in out.glob("checkpoint-*.pth") if (m := _NUMBERED.match(p.name))]
    newest = max(numbered)[1] if numbered else None
    if (out / LAST).is_file():
        if newest is not None and newest.stat().st_mtime_ns > (out / LAST).stat().st_mtime_ns:
            return newest
        return out / LAST
    return newest


def resolve_resume(resume: str, output_dir: str) -> Path | None:
    """`--resume`: '' (none), 'auto' (latest in output_dir, or none if it has no checkpoint) or a path."""
    if not resume:
        return None
    if resume == "auto":
        return find_latest(output_dir) if output_dir else None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--resume: checkpoint not found: {path}")
    return path


def saved_args(ckpt) -> dict:
    """A checkpoint's `args` as a dict: fastmae's plain dict, the official script's argparse.Namespace, or {}."""
    raw = ckpt.get("args") if isinstance(ckpt, dict) else None
    if raw is None:
        return {}
    return raw if isinstance(raw, dict) else dict(vars(raw))


def load_for_resume(path: str | Path, model, optimizer, scaler, *, allow_pickle: bool = False,
                    iters_per_epoch: int, accum_iter: int, restore_rng: bool = True,
                    layout: dict | None = None) -> dict:
    """Load a checkpoint into model / optimizer / scaler; returns where to continue:
    {'start_epoch', 'skip_iters', 'step', 'path'}. `start_epoch` is None for a weights-only file (no optimizer
    state or epoch): the caller keeps its own `--start_epoch`, as the official script does.

    `layout` ({'batch_size', 'world_size', 'accum_iter'} of this run): a checkpoint written in the middle of an
    epoch resumes only with the layout it was written with, since its position counts that run's iterations.
    """
    ckpt = read_checkpoint(path, allow_pickle=allow_pickle)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a training checkpoint (no 'model' entry)")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not fit this model (check --model and --input_size): {exc}") from exc
    if not ("optimizer" in ckpt and "epoch" in ckpt):
        # weights only: no schedule position to continue from
        return {"start_epoch": None, "skip_iters": 0, "step": 0, "path": str(path)}
    epoch = int(ckpt["epoch"])
    next_iter = int(ckpt.get("next_iter", 0))  # 0 for a finished epoch: > 0 only in the middle of one
    if next_iter > 0 and layout:
        saved = saved_args(ckpt)
        differ = [f"--{k} {saved[k]} then, {v} now" for k, v in layout.items()
                  if k in saved and int(saved[k]) != int(v)]
        if differ:
            raise ValueError(f"{path} stopped in the middle of epoch {epoch} (iteration {next_iter}) with another "
                             f"batch layout ({'; '.join(differ)}): its position counts that run's iterations. "
                             "Resume with the same --batch_size, --accum_iter and number of processes, or from "
                             "a checkpoint written at the end of an epoch (checkpoint-N.pth)")
        if next_iter >= iters_per_epoch:
            raise ValueError(f"{path} stopped at iteration {next_iter} of epoch {epoch}, but an epoch of this run "
                             f"has {iters_per_epoch} iterations: the dataset is not the one it was written with")
    load_optimizer_state(optimizer, ckpt["optimizer"])  # keeps this run's AdamW implementation
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if 0 < next_iter < iters_per_epoch:
        start_epoch, skip = epoch, next_iter
    else:
        start_epoch, skip = epoch + 1, 0
    step = ckpt.get("step")
    if step is None:
        # official checkpoints: every completed epoch took iters_per_epoch // accum_iter steps (a last partial
        # group is dropped), then the steps of this epoch's first `skip` iterations
        accum = max(accum_iter, 1)
        step = start_epoch * (iters_per_epoch // accum) + skip // accum
    if restore_rng and isinstance(ckpt.get("rng"), dict):
        set_rng_state(ckpt["rng"])
    return {"start_epoch": start_epoch, "skip_iters": skip, "step": int(step), "path": str(path)}


def model_from_checkpoint(path: str | Path | None, *, model: str | None = None, input_size: int | None = None,
                          norm_pix_loss: bool | None = None, allow_pickle: bool = False, backend=None,
                          default_model: str | None = None):
    """Build the model a checkpoint was trained as and load its weights; returns (model, info dict).

    The model name, input size and norm_pix_loss come from the arguments when given, else from the
    checkpoint's `args` (fastmae and official training checkpoints), else the input size from the shape of
    `pos_embed` and the patch projection. Released checkpoints without `args` need `model=`.
    `path=None` builds a randomly initialised `model` (or `default_model`), e.g. for a baseline.
    """
    from ..model import create_model, load_checkpoint
    ckpt, saved = None, {}
    if path:
        ckpt = read_checkpoint(path, allow_pickle=allow_pickle)
        saved = saved_args(ckpt)
    name = model or saved.get("model") or (default_model if not path else None)
    if not name:
        raise ValueError(f"{path} does not say which model it holds; pass --model (e.g. mae_vit_base_patch16)")
    if input_size is None:
        input_size = saved.get("input_size")
    if input_size is None and ckpt is not None:
        from ..model.checkpoint import extract_state_dict
        sd = extract_state_dict(ckpt)
        if "pos_embed" in sd and "patch_embed.proj.weight" in sd:
            grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
            input_size = grid * int(sd["patch_embed.proj.weight"].shape[-1])
    if norm_pix_loss is None:
        norm_pix_loss = bool(saved.get("norm_pix_loss", False))
    kwargs = {"norm_pix_loss": norm_pix_loss, "backend": backend}
    if input_size:
        kwargs["img_size"] = int(input_size)
    net = create_model(name, **kwargs)
    report = None
    if ckpt is not None:
        report = load_checkpoint(net, ckpt)
    info = {"model": name, "input_size": net.patch_embed.img_size[0], "norm_pix_loss": norm_pix_loss,
            "checkpoint": str(path) if path else None, "epoch": ckpt.get("epoch") if isinstance(ckpt, dict) else None,
            "load_report": str(report) if report is not None else "random initialisation"}
    return net, info
