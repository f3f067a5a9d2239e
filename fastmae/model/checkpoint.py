"""Loading released MAE checkpoints and exporting the encoder for fine-tuning.

Files are read with `torch.load(..., weights_only=True)`: loading never runs code from a file. Old pickles
that need more (for example an `argparse.Namespace` stored beside the weights) fail with a clear message;
`allow_pickle=True` is the explicit opt-in for files you trust. Empty, truncated and corrupt files fail with a
one-line `CheckpointError` too.
"""
from __future__ import annotations

import errno
import importlib.util
import os
import pickle
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .pos_embed import resize_pos_embed

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model (the message says why in one line)."""


class CheckpointShapeError(CheckpointError):
    """Tensors of the checkpoint have other shapes than the model's: `wrong` lists them, one line each."""

    def __init__(self, wrong: list[str]):
        super().__init__("checkpoint shapes do not fit the model: " + "; ".join(wrong))
        self.wrong = wrong


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# torch's weights_only unpickler (the same wording in torch 2.11 to 2.14)
_DISALLOWED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")
_BLOCKED_GLOBAL = re.compile(r"unsupported GLOBAL (\S+) whose module (\S+) is blocked")


@dataclass
class LoadReport:
    """What `load_checkpoint` did: keys the model has but the file lacks, keys the file has but the model
    lacks, and position embeddings resized to the model's grid."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    resized_keys: list[str] = field(default_factory=list)

    @property
    def missing_decoder_keys(self) -> list[str]:
        return [k for k in self.missing_keys if not k.startswith(ENCODER_PREFIXES)]

    def __str__(self) -> str:
        parts = []
        if self.missing_keys:
            parts.append(f"not in the checkpoint ({len(self.missing_keys)}): {', '.join(self.missing_keys)}")
        if self.unexpected_keys:
            parts.append(f"not in the model ({len(self.unexpected_keys)}): {', '.join(self.unexpected_keys)}")
        if self.resized_keys:
            parts.append(f"resized: {', '.join(self.resized_keys)}")
        return "; ".join(parts) or "all keys matched"


def read_checkpoint(path: str | Path, allow_pickle: bool = False, map_location="cpu") -> dict:
    """Read a checkpoint file safely. `allow_pickle=True` runs the full unpickler: only for trusted files.

    Raises `FileNotFoundError` for a missing file and a one-line `CheckpointError` for a folder, an empty,
    truncated or corrupt file, and a file that holds Python objects `weights_only=True` refuses (naming the
    first one). torch's own exception stays on the error's `__context__`.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        empty = path.stat().st_size == 0
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if empty:
        raise CheckpointError(f"{path} is an empty file, not a checkpoint (a run stopped while writing it?)")
    try:
        return torch.load(path, map_location=map_location, weights_only=not allow_pickle)
    except Exception as exc:
        error = _read_error(path, exc, allow_pickle)
        if error is None:
            raise
        raise error from None


def _read_error(path: Path, exc: Exception, allow_pickle: bool) -> CheckpointError | None:
    """The one-line error for `torch.load(path)` raising `exc`; None for a failure that is not the file's."""
    text = _ANSI.sub("", str(exc))
    if "deserialize object on" in text:  # a map_location device this machine lacks
        return None
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # the machine's, not the file's
        return None
    if isinstance(exc, pickle.UnpicklingError) and not allow_pickle:
        found = _DISALLOWED_GLOBAL.search(text)
        if found and _may_exist(found.group(1)):
            return CheckpointError(
                f"{path} holds Python objects beyond tensors and plain values ({found.group(1)}), and fastmae "
                f"loads with weights_only=True so that no code from the file runs. If you trust the file, pass "
                f"allow_pickle=True (command line: --allow-pickle)")
        if found and zipfile.is_zipfile(path):  # whole (its index was read): a class of the program that wrote it
            return CheckpointError(f"{path} refers to {found.group(1)}, which is not available here (a class of "
                                   "the program that wrote it): it cannot be loaded without that code")
        found = _BLOCKED_GLOBAL.search(text)
        if found:
            return CheckpointError(f"{path} refers to {found.group(1)}, which can run commands on this machine: "
                                   "it is not a file of weights, and it is not loaded")
    if allow_pickle and isinstance(exc, (ImportError, AttributeError)):
        return CheckpointError(f"{path} refers to Python code that is not available here: {_reason(exc)}")
    if isinstance(exc, OSError):
        return CheckpointError(f"cannot read {path}: {exc.strerror or _reason(exc)}")
    return CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt): {_reason(exc)}")


def _may_exist(full_name: str) -> bool:
    """Whether `full_name` ('module.name') can name something here: its module is imported and has the name, or
    can be found and imported. False for a reference cut short by a truncated file ('torch._utils._rebuild_tens',
    'collecti.') and for a class this program does not have ('__main__.Config' of another script)."""
    module, _, name = full_name.rpartition(".")
    if not module or not name:
        return False
    loaded = sys.modules.get(module)
    if loaded is not None:
        return hasattr(loaded, name)
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that does not exist, or a malformed name
        return False


def _reason(exc: BaseException) -> str:
    """The first sentence of an exception's message, without torch's advice around it or terminal escapes."""
    text = _ANSI.sub("", str(exc))
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if unpickler:
        text = unpickler.group(1)
    text = " ".join(text.removeprefix("Weights only load failed.").split())
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)  # torch's C++ source location, not a reason
    line = text.split(". ", 1)[0].rstrip(".")
    if not line:
        return type(exc).__name__
    return line if isinstance(exc, (RuntimeError, pickle.UnpicklingError)) else f"{type(exc).__name__}: {line}"


def extract_state_dict(obj) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint object: `{'model': sd}`, `{'state_dict': sd}` or a state dict."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("checkpoint holds no state dict (expected {'model': state_dict} or a state dict)")
    return {_plain_key(k): v for k, v in obj.items()}


# what wrappers put in front of a model's keys: DistributedDataParallel / DataParallel, and torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _plain_key(key: str) -> str:
    """A state-dict key without the prefixes of the wrappers the model was saved in (in any order)."""
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel, DataParallel and torch.compile wrappers (in any order), whose
    state dict has the plain keys."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def load_checkpoint(model: nn.Module, checkpoint, *, allow_pickle: bool = False, strict: bool = False) -> LoadReport:
    """Load official or fastmae weights into `model`.

    model: the model, or the model inside DistributedDataParallel, DataParallel or torch.compile (the prefixes
    these wrappers give keys, `module.` and `_orig_mod.`, are taken off a checkpoint's keys too). checkpoint: a
    path, a checkpoint dict or a state dict; one with no key of the model's raises `CheckpointError`. Position
    embeddings of another resolution are resized to the model's grid; an encoder-only checkpoint loads the
    encoder and reports the decoder keys it lacks (`report.missing_decoder_keys`). Tensors of the wrong shape
    raise `CheckpointError` naming every such key. With `strict=True` any missing or unexpected key raises too.
    """
    obj = read_checkpoint(checkpoint, allow_pickle) if isinstance(checkpoint, (str, Path)) else checkpoint
    state = dict(extract_state_dict(obj))
    model = unwrap_model(model)
    own = model.state_dict()
    if not any(k in own for k in state):
        some = ", ".join(list(state)[:4]) + (", ..." if len(state) > 4 else "")
        raise CheckpointError(f"no key of the checkpoint is one of the model's: the checkpoint holds "
                              f"{len(state)} ({some or 'none'}), the model {len(own)} ({', '.join(list(own)[:4])}, "
                              f"...)")
    report = LoadReport()
    for key in POS_EMBED_KEYS:
        if key in state and key in own and state[key].shape != own[key].shape:
            new_grid = int(round((own[key].shape[1] - 1) ** 0.5))
            if state[key].shape[-1] == own[key].shape[-1]:
                state[key] = resize_pos_embed(state[key], new_grid)
                report.resized_keys.append(key)
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise CheckpointShapeError(wrong)
    report.missing_keys = [k for k in own if k not in state]
    report.unexpected_keys = [k for k in state if k not in own]
    if strict and (report.missing_keys or report.unexpected_keys):
        raise CheckpointError(f"strict load failed: {report}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if report.missing_keys:
        warnings.warn(f"load_checkpoint: {len(report.missing_keys)} model keys were not in the checkpoint "
                      f"({', '.join(report.missing_keys[:8])}{', ...' if len(report.missing_keys) > 8 else ''})",
                      stacklevel=2)
    return report


def export_encoder(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder as a timm-style VisionTransformer state dict (cls_token, pos_embed, patch_embed.proj.*,
    blocks.*, norm.*), the form MAE fine-tuning loads."""
    return {k: v.detach().clone() for k, v in unwrap_model(model).state_dict().items()
            if k.startswith(ENCODER_PREFIXES)}


def temp_path(path: str | Path, pid: int | None = None) -> Path:
    """The temporary file `atomic_save` writes `path` through: `.{name}.tmp-{pid}` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid() if pid is None else pid}")


def atomic_save(obj, path: str | Path) -> None:
    """torch.save through `atomic_write`: a run killed while writing leaves the previous file intact and never
    a half-written one.

    torch.save gets the temporary file's path, not an open file, so no Python file object sits under its zip
    writer. A Ctrl-C or SIGTERM whose handler stops the save before the writer has finished the file leaves the
    writer alive in the exception's traceback, and it finishes itself at interpreter exit: into a Python file
    closed meanwhile that ended the process with "terminate called ... write to closed file" (an abort, status
    134, instead of the exit); into its own C++ file it is harmless. (torch itself falls back to a Python file for
    a path that is not ASCII.) Failures of torch's writer (a full disk) are raised as OSError naming the file, as
    a Python file's would be; other RuntimeErrors pass unchanged."""
    def save(tmp: Path) -> None:
        try:
            torch.save(obj, os.fspath(tmp))
        except RuntimeError as exc:
            message = str(exc).strip()
            if "PytorchStreamWriter" not in message and "inline_container" not in message:
                raise  # not the writer's (a CUDA error while storages are copied out, say): as it is
            # torch's C++ writer: a failed write, a full disk
            raise OSError(errno.EIO, message.splitlines()[0], os.fspath(path)) from exc

    atomic_write(path, save)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` creates a temporary file beside `path` (`temp_path`), which is flushed to disk and renamed over
    `path`: the file is written whole or not at all. The temporary file is removed whatever stops the write; a
    Ctrl-C (or SystemExit) during it is re-raised as itself."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        open(tmp, "wb").close()  # a folder that cannot be written fails here, as the OSError it is
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY if os.name == "posix" else os.O_RDWR)  # fsync wants write access on Windows
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        interrupt = _interruption(exc)
        if interrupt is not None and interrupt is not exc:
            # interrupted inside torch.save, say: its zip writer then fails to close ("unexpected pos ..."),
            # and that RuntimeError would replace the KeyboardInterrupt
            raise interrupt from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write` of a UTF-8 text file."""
    atomic_write(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))


def _interruption(exc: BaseException) -> BaseException | None:
    """The KeyboardInterrupt / SystemExit that `exc` is or was raised while handling, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if not isinstance(exc, Exception):
            return exc
        seen.add(id(exc))
        exc = exc.__context__
    return None


def save_encoder(model: nn.Module, path: str | Path) -> None:
    """Write `{'model': export_encoder(model)}` atomically."""
    atomic_save({"model": export_encoder(model)}, path)
