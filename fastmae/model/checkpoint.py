"""Loading released MAE checkpoints and exporting the encoder for fine-tuning.

Files are read with `torch.load(..., weights_only=True)`: loading never runs code from a file. Old pickles
that need more (for example an `argparse.Namespace` stored beside the weights) fail with a clear message;
`allow_pickle=True` is the explicit opt-in for files you trust.
"""
from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .pos_embed import resize_pos_embed

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model (the message names the keys)."""


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
    """Read a checkpoint file safely. `allow_pickle=True` runs the full unpickler: only for trusted files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if allow_pickle:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds Python objects beyond tensors and plain values, and fastmae loads with "
            f"weights_only=True so that no code from the file runs. If you trust the file, pass "
            f"allow_pickle=True (command line: --allow-pickle). Details: {exc}") from exc


def extract_state_dict(obj) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint object: `{'model': sd}`, `{'state_dict': sd}` or a state dict."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("checkpoint holds no state dict (expected {'model': state_dict} or a state dict)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_checkpoint(model: nn.Module, checkpoint, *, allow_pickle: bool = False, strict: bool = False) -> LoadReport:
    """Load official or fastmae weights into `model`.

    checkpoint: a path, a checkpoint dict or a state dict. Position embeddings of another resolution are
    resized to the model's grid; an encoder-only checkpoint loads the encoder and reports the decoder keys
    it lacks (`report.missing_decoder_keys`). Tensors of the wrong shape raise `CheckpointError` naming every
    such key. With `strict=True` any missing or unexpected key raises too.
    """
    obj = read_checkpoint(checkpoint, allow_pickle) if isinstance(checkpoint, (str, Path)) else checkpoint
    state = dict(extract_state_dict(obj))
    own = model.state_dict()
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
        raise CheckpointError("checkpoint shapes do not fit the model: " + "; ".join(wrong))
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
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(ENCODER_PREFIXES)}


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, flushed to disk, then renamed over it: a run killed
    while writing leaves the previous file intact and never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_encoder(model: nn.Module, path: str | Path) -> None:
    """Write `{'model': export_encoder(model)}` atomically."""
    atomic_save({"model": export_encoder(model)}, path)
