"""Training checkpoints: what they hold, how they are written (atomically) and how a run resumes.

A checkpoint is a dict of tensors and plain Python values only, so it loads with
`torch.load(..., weights_only=True)`:

    model       the model state dict, official key names (as `misc.save_model` writes it)
    optimizer   the AdamW state dict
    scaler      the fp16 gradient scaler's state dict ({} when the scaler is off)
    epoch       the epoch the state belongs to (the last completed one, unless `next_iter` > 0)
    next_iter   data iterations of `epoch` already done; 0 means `epoch` is complete (the official meaning)
    epoch_sums  (only when next_iter > 0) the sums that epoch's log line averages, so far (`engine.EpochSums`)
    step        optimizer steps taken so far
    args        the run's arguments as a plain dict
    rng         torch / cuda / numpy / python `random` states (as tensors, lists and ints)
    fastmae     the version that wrote it

Official checkpoints (`model`, `optimizer`, `scaler`, `epoch`, `args` as an argparse.Namespace) resume too,
with `allow_pickle=True` because of the Namespace.

A process killed hard while saving leaves its temporary file behind (`.checkpoint-last.pth.tmp-<pid>`):
`remove_stale_temp_files` deletes those of processes that no longer run.
"""
from __future__ import annotations

import os
import random
import re
import stat
import time
from pathlib import Path

import numpy as np
import torch

from ..model.checkpoint import CheckpointError, CheckpointShapeError, atomic_save, read_checkpoint
from .optim import load_optimizer_state, plain_lr_state

LAST = "checkpoint-last.pth"
_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pth$")
# the temporary files of `atomic_save` (`model.checkpoint.temp_path`) and of `save`'s link, named after the pid
_TEMP = re.compile(r"^\.checkpoint[^/]*\.pth\.(?:tmp|link)-([1-9][0-9]*)$")


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


def make_checkpoint(model, optimizer, scaler, *, epoch: int, step: int, args, next_iter: int = 0,
                    epoch_sums: dict | None = None) -> dict:
    """The checkpoint dict (see the module docstring); raises `NonFiniteStateError` on NaN/inf weights."""
    from .. import __version__
    model_state = model.state_dict()
    check_finite(model_state)
    ckpt = {
        "model": model_state,
        "optimizer": plain_lr_state(optimizer.state_dict()),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": int(epoch),
        "next_iter": int(next_iter),
        "step": int(step),
        "args": plain_args(args),
        "rng": rng_state(),
        "fastmae": __version__,
    }
    if next_iter > 0 and epoch_sums is not None:
        ckpt["epoch_sums"] = dict(epoch_sums)
    return ckpt


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
    except BaseException as exc:  # a file system without hard links; or Ctrl-C / SIGTERM, after the cleanup
        tmp.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        atomic_save(checkpoint, last)
    return [path, last]


def remove_stale_temp_files(output_dir: str | Path, *, min_age_s: float = 60.0) -> list[Path]:
    """Delete what unfinished checkpoint writes left in `output_dir`: `.checkpoint*.pth.tmp-<pid>` (and `save`'s
    `.checkpoint-last.pth.link-<pid>`) files whose process <pid> no longer runs on this machine, or (on Linux)
    runs but started more than `min_age_s` seconds after the file was last written (the pid reused, e.g. by a
    restarted container). Files a live process may be writing, files changed in the last `min_age_s` seconds
    (maybe another machine's, in a shared folder) and every other file are left alone. Returns the removed
    paths."""
    out = Path(output_dir)
    if os.name != "posix" or not out.is_dir():  # os.kill(pid, 0) only probes on POSIX
        return []
    removed = []
    for p in sorted(out.iterdir()):
        found = _TEMP.match(p.name)
        if not found:
            continue
        try:
            st = p.lstat()
            if (not stat.S_ISREG(st.st_mode) or time.time() - st.st_mtime < min_age_s
                    or _writer_may_run(int(found.group(1)), st.st_mtime, margin=max(min_age_s, 2.0))):
                continue
            p.unlink()
        except OSError:  # removed meanwhile, or not ours to remove
            continue
        removed.append(p)
    return removed


def _writer_may_run(pid: int, mtime: float, margin: float) -> bool:
    """Whether process `pid`, which wrote a file last changed at `mtime`, may still run: it is alive and did not
    start more than `margin` seconds after `mtime` (clocks and /proc's whole-second boot time). True when unsure."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: alive, another user's
        pass
    started = _start_time(pid)
    return started is None or started > time.time() + 1.0 or started <= mtime + margin


def _start_time(pid: int) -> float | None:
    """When process `pid` started, in seconds since the epoch, from /proc (Linux); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def find_latest(output_dir: str | Path) -> Path | None:
    """The latest checkpoint in `output_dir`: `checkpoint-last.pth`, unless the highest-numbered
    `checkpoint-N.pth` holds a later point of training (a run stopped between writing that file and linking
    `checkpoint-last.pth` to it); the highest-numbered file when there is no `checkpoint-last.pth`. The points
    are the (epoch, iteration) the files hold; where one cannot be read that way (an official file), the file
    written later wins (file times, which a copy of the folder does not keep)."""
    out = Path(output_dir)
    numbered = _numbered(out)
    newest = max(numbered)[1] if numbered else None
    last = out / LAST
    if not last.is_file():
        return newest
    if newest is None:
        return last
    points = _point(newest), _point(last)
    if None not in points:
        return newest if points[0] > points[1] else last
    return newest if newest.stat().st_mtime_ns > last.stat().st_mtime_ns else last


def _point(path: Path) -> tuple | None:
    """(epoch, iterations done in it) of a fastmae checkpoint, a finished epoch counting as all of them; read
    with the tensors mapped, not loaded. None for a file that cannot be read so."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        epoch, next_iter = int(ckpt["epoch"]), int(ckpt.get("next_iter", 0))
    except Exception:  # an official (pickled) file, a damaged one: resuming from it reports what is wrong
        return None
    return (epoch, next_iter if next_iter > 0 else float("inf"))


def _numbered(out: Path) -> list[tuple[int, Path]]:
    """(N, path) of every `checkpoint-N.pth` in `out`."""
    return [(int(m.group(1)), p) for p in out.glob("checkpoint-*.pth") if (m := _NUMBERED.match(p.name))]


def remove_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete the checkpoints in `output_dir` (`checkpoint-last.pth` and `checkpoint-N.pth`); returns them."""
    out = Path(output_dir)
    gone = [p for _, p in sorted(_numbered(out))] + ([out / LAST] if os.path.lexists(out / LAST) else [])
    for p in gone:
        p.unlink()
    return gone


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


def model_name_of(model) -> str | None:
    """The `MODELS` preset that builds `model`'s architecture (the same state dict keys and shapes at its input
    size), or None. The first of aliases (mae_vit_base_patch16 and ..._dec512d8b) is named."""
    from ..model import MODELS
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    size = model.patch_embed.img_size[0]
    for name, factory in MODELS.items():
        try:
            with torch.device("meta"):
                other = factory(img_size=size)
        except ValueError:  # e.g. an input size its patch does not divide
            continue
        if {k: tuple(v.shape) for k, v in other.state_dict().items()} == own:
            return name
    return None


def check_fits(path: str | Path, ckpt: dict, state: dict, model, *, model_name: str | None = None) -> None:
    """Raise a one-line `CheckpointError` when `state` (the weights of `ckpt`, read from `path`) does not load
    strictly into `model`: "<path> holds <model> at input size <n>; this run builds <model> at <n>" from the
    checkpoint's saved args, else the first mismatched keys and their count. `model_name`: this run's
    `--model` (found from the model's shapes when not given)."""
    own = model.state_dict()
    problems = [f"{k}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
                for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    problems += [f"{k} missing" for k in own if k not in state]
    problems += [f"{k} unexpected" for k in state if k not in own]
    if not problems:
        return
    saved = saved_args(ckpt)
    size = model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else None
    if saved.get("model") and saved.get("input_size") and size is not None:
        name = model_name or model_name_of(model)
        if (str(saved["model"]), int(saved["input_size"])) != (name, int(size)):
            raise CheckpointError(f"{path} holds {saved['model']} at input size {saved['input_size']}; this run "
                                  f"builds {name or 'another model'} at {size} (resume it with --model "
                                  f"{saved['model']} --input_size {saved['input_size']})")
    more = f"; ... ({len(problems) - 3} more)" if len(problems) > 3 else ""
    raise CheckpointError(f"{path} does not fit this model (check --model and --input_size): {len(problems)} "
                          f"mismatched keys: {'; '.join(problems[:3])}{more}")


def load_for_resume(path: str | Path, model, optimizer, scaler, *, allow_pickle: bool = False,
                    iters_per_epoch: int, accum_iter: int, restore_rng: bool = True,
                    layout: dict | None = None, model_name: str | None = None) -> dict:
    """Load a checkpoint into model / optimizer / scaler; returns where to continue:
    {'start_epoch', 'skip_iters', 'step', 'path', 'missing', 'epoch_sums'}. `start_epoch` is None for a
    weights-only file (no optimizer state or no epoch): the caller keeps its own `--start_epoch`, as the official
    script does, and `missing` says what the file lacks, for "no {missing} in it": "optimizer state", "epoch" or
    "optimizer state or epoch" ('' for a full checkpoint). `epoch_sums`: what a checkpoint written in the middle
    of an epoch holds of that epoch's log sums (None otherwise).

    `layout` ({'batch_size', 'world_size', 'accum_iter'} of this run): a checkpoint written in the middle of an
    epoch resumes only with the layout it was written with, since its position counts that run's iterations.
    `model_name` (this run's `--model`) names the model when the checkpoint holds another (see `check_fits`).
    """
    ckpt = read_checkpoint(path, allow_pickle=allow_pickle)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path} is not a training checkpoint (no 'model' entry)")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt["model"].items()}
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a training checkpoint (its 'model' entry is not a state dict)")
    check_fits(path, ckpt, state, model, model_name=model_name)
    model.load_state_dict(state)
    missing = " or ".join(k for k, key in (("optimizer state", "optimizer"), ("epoch", "epoch")) if key not in ckpt)
    if missing:
        # weights only: no schedule position to continue from
        return {"start_epoch": None, "skip_iters": 0, "step": 0, "path": str(path), "missing": missing,
                "epoch_sums": None}
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
    sums = ckpt.get("epoch_sums") if skip else None  # the resumed epoch's log sums so far (a dict, or None)
    return {"start_epoch": start_epoch, "skip_iters": skip, "step": int(step), "path": str(path), "missing": "",
            "epoch_sums": sums}


def model_from_checkpoint(path: str | Path | None, *, model: str | None = None, input_size: int | None = None,
                          norm_pix_loss: bool | None = None, allow_pickle: bool = False, backend=None,
                          default_model: str | None = None, encoder_only: bool = False):
    """Build the model a checkpoint was trained as and load its weights; returns (model, info dict).

    The model name, input size and norm_pix_loss come from the arguments when given, else from the
    checkpoint's `args` (fastmae and official training checkpoints), else the input size from the shape of
    `pos_embed` and the patch projection. Released checkpoints without `args` need `model=`.
    `path=None` builds a randomly initialised `model` (or `default_model`), e.g. for a baseline.
    `encoder_only`: the caller uses the encoder alone (a linear probe): decoder weights missing from the file
    (an encoder-only checkpoint) are not warned about. A checkpoint of another model or size raises a one-line
    `CheckpointError` saying which it holds.
    """
    import warnings

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
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the missing keys are warned about below, as this caller needs
                report = load_checkpoint(net, ckpt)
        except CheckpointShapeError as exc:
            wrong = exc.wrong
            held = f"{saved['model']} at input size {saved['input_size']}" \
                if saved.get("model") and saved.get("input_size") else "weights of other shapes"
            more = f"; ... ({len(wrong) - 3} more)" if len(wrong) > 3 else ""
            size = net.patch_embed.img_size[0]
            raise CheckpointError(f"{path} holds {held}; this builds {name} at input size {size} (--model and "
                                  f"--input_size default to the checkpoint's): {len(wrong)} mismatched keys: "
                                  f"{'; '.join(wrong[:3])}{more}") from None
        missing = [k for k in report.missing_keys if not (encoder_only and k in report.missing_decoder_keys)]
        if missing:
            warnings.warn(f"{path}: {len(missing)} model keys were not in the checkpoint and keep their initial "
                          f"values ({', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''})", stacklevel=2)
    info = {"model": name, "input_size": net.patch_embed.img_size[0], "norm_pix_loss": norm_pix_loss,
            "checkpoint": str(path) if path else None, "epoch": ckpt.get("epoch") if isinstance(ckpt, dict) else None,
            "load_report": str(report) if report is not None else "random initialisation"}
    return net, info
