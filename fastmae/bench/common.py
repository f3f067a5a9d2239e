"""Helpers shared by the model-level benchmarks: devices, dtypes, autocast, backend paths, progress."""
from __future__ import annotations

import contextlib
import functools
from typing import Iterable, Iterator, Mapping

import torch

from .. import ops
from ..ops.registry import OPS
from ..train.engine import autocast  # noqa: F401 - the benchmarks' mixed precision is training's

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# The model-level paths: a backend name applies to every op; xformers implements attention only, so its
# path names attention alone and leaves the other ops to the automatic choice; "auto" is fastmae's own choice.
MODEL_PATHS: dict[str, object] = {
    "reference": "reference",
    "sdpa": "sdpa",
    "xformers": {"attention": "xformers"},
    "triton": "triton",
    "auto": None,
}


def error_line(exc: BaseException, limit: int = 300) -> str:
    """"Type: first line of the message" (cut to `limit` characters) for a record's reason; safe for empty messages."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit] if text else ''}"


def resolve_device(name: str | None) -> torch.device:
    """`--device`: auto (cuda when available), else the command line's one device check."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from ..cli import check_device

    return check_device(name)


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """Default: bfloat16 on CUDA, float32 on the CPU."""
    if name in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose float32, bfloat16 or float16") from None


def parse_list(text: str | Iterable[str]) -> list[str]:
    """The items of a comma-separated list; a list given that names nothing (',') is an error, not 'nothing to
    run' or 'the defaults' ('' is for the caller: its default)."""
    if isinstance(text, str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items and text.strip():
            raise ValueError(f"{text!r} names nothing: give one or more names, separated by commas")
        return items
    return list(text)


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(t) for t in parse_list(text)]
    except ValueError:
        raise ValueError(f"mask ratios must be numbers separated by commas, got {text!r}") from None
    bad = [r for r in ratios if not 0.0 <= r < 1.0]
    if bad:
        raise ValueError(f"mask ratios must be in [0, 1), got {bad}")
    if 0.0 not in ratios:  # the baseline of every speedup
        ratios.insert(0, 0.0)
    return sorted(set(ratios))


def num_patches(model_name: str) -> int:
    """The patches of one image for a model preset, at the image size the benchmarks build it with (its
    default)."""
    return image_grid(model_name)[1]


@functools.lru_cache(maxsize=None)
def image_grid(model_name: str) -> tuple[int, int]:
    """(image side, patches) of a model preset at its default image size: read from the model built on the meta
    device, which allocates and initialises nothing."""
    from ..model.mae import create_model

    with torch.device("meta"):
        model = create_model(model_name)
    return model.patch_embed.img_size[0], model.num_patches


def path_interpreter_reason(spec, device: torch.device, allow_interpreter: bool) -> str | None:
    """The benchmark's own reason not to time a path that would run triton in its CPU interpreter."""
    from .ops_bench import interpreter_reason

    names = {spec} if isinstance(spec, str) else set(spec.values()) if isinstance(spec, Mapping) else set()
    if "triton" in names and not allow_interpreter:
        return interpreter_reason(device)
    return None


@contextlib.contextmanager
def capture_dispatch() -> Iterator[dict[str, str]]:
    """Record which backend served each op called inside the block: {op: backend}."""
    seen: dict[str, str] = {}
    original = ops.resolve

    def resolve(op, inputs, backend=None):
        impl = original(op, inputs, backend)
        seen[op] = impl.backend
        return impl

    ops.resolve = resolve
    try:
        yield seen
    finally:
        ops.resolve = original


def dispatch_str(seen: Mapping[str, str]) -> str:
    return ", ".join(f"{op}={seen[op]}" for op in OPS if op in seen)


def progress(iterable, desc: str, enabled: bool = True, total: int | None = None):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)


def free(device: torch.device) -> None:
    """Release what earlier measurements left behind: CUDA's cache, or on the CPU the C heap's free pages
    (glibc's malloc_trim), so that the next measurement's resident-memory increase is its own."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


def _malloc_trim() -> None:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def env_settings() -> tuple[torch.device, torch.dtype, bool]:
    """(device, dtype, quick) for `pytest benchmarks/`, from FASTMAE_BENCH_DEVICE, FASTMAE_BENCH_DTYPE and
    FASTMAE_BENCH_QUICK (default: quick sizes on the CPU, full sizes on CUDA)."""
    import os

    device = resolve_device(os.environ.get("FASTMAE_BENCH_DEVICE", "auto"))
    dtype = parse_dtype(os.environ.get("FASTMAE_BENCH_DTYPE", "auto"), device)
    quick = os.environ.get("FASTMAE_BENCH_QUICK", "1" if device.type == "cpu" else "0") not in ("", "0")
    return device, dtype, quick
