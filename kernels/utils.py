"""Small helpers shared by the kernel launchers, and the compile-spec record every kernel module exports."""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import torch
from torch.autograd.function import once_differentiable


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET set before importing triton)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Set only inside `compile_check.record_launches`: launches are recorded instead of run, so the launchers and
# the triton backend take CPU tensors without the interpreter, choosing settings for this GPU capability.
_RECORDING: dict[str, Any] = {}


def recording_capability() -> tuple[int, int] | None:
    """The GPU compute capability that launches are being recorded for, or None when they run."""
    return _RECORDING.get("capability")


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device (the current one when it has no index), read once per GPU: the
    registry and the launchers ask for it on every call."""
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


def launch_capability(device: torch.device) -> tuple[int, int]:
    """The GPU compute capability launch settings are chosen for: the device's own for CUDA tensors; for CPU
    tensors the one launches are recorded for (`compile_check.record_launches`), else (9, 0) (the interpreter:
    the CPU tests run the short backward at the largest tiles any GPU gets)."""
    if device.type == "cuda":
        return cuda_capability(device)
    return recording_capability() or (9, 0)


def launches_on_device_of(arg: str) -> Callable[[Callable], Callable]:
    """Decorate a kernel launcher to run with the GPU of its tensor argument `arg` as the current device: Triton
    launches on the current device, so a tensor on another GPU than the current one would otherwise be handed to
    a kernel running elsewhere. Free when it is already current, and for CPU tensors; `arg` may be passed by
    position or by keyword."""
    def wrap(launcher: Callable) -> Callable:
        position = list(inspect.signature(launcher).parameters).index(arg)

        @functools.wraps(launcher)
        def run(*args, **kwargs):
            t = args[position] if len(args) > position else kwargs[arg]
            if t.is_cuda and t.device.index != torch.cuda.current_device():
                with torch.cuda.device(t.device):
                    return launcher(*args, **kwargs)
            return launcher(*args, **kwargs)

        return run

    return wrap


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels with the installed packages, or None (read from the
    packages' metadata: triton is not imported). Triton 3.6 and older convert one-element arrays to Python
    ints in the interpreter, which NumPy 2.4 and newer refuse; triton 3.7 fixed it."""
    try:
        triton_v, numpy_v = metadata.version("triton"), metadata.version("numpy")
    except metadata.PackageNotFoundError:
        return None
    if _release(triton_v) < (3, 7) and _release(numpy_v) >= (2, 4):
        return (f"triton {triton_v}'s interpreter fails with NumPy {numpy_v} (NumPy 2.4 refuses its int() of "
                f"one-element arrays): use numpy<2.4 or triton>=3.7 to run the kernels on a CPU")
    return None


def custom_op(name: str, impl: Callable, setup_context: Callable | None = None,
              backward: Callable | None = None) -> Callable:
    """`impl` registered as the torch.library custom op `name`, returned as a function that calls the custom op
    while torch.compile traces (the graph holds one opaque op, with the fake registered through the returned
    function's `register_fake`) and runs `impl` directly otherwise: in eager mode the custom op's Python
    dispatch costs about 10 to 25 µs a call, as much as some of the kernels it launches.

    With `setup_context` and `backward` (the autograd formula, in `register_autograd`'s form), eager calls run
    through an autograd.Function built from the same two functions, so both modes differentiate alike. Calls
    with a tensor subclass among the arguments (fake tensors, tracers) take the custom op in either mode."""
    op = torch.library.custom_op(name, impl, mutates_args=())
    eager = impl
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)

        class Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                output = impl(*args)
                setup_context(ctx, args, output)
                return output

            @staticmethod
            @once_differentiable  # no graph through its kernels: a double backward raises
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        eager = Eager.apply

    def call(*args):
        if torch.compiler.is_compiling() or not _plain_tensors(args):
            return op(*args)
        if eager is not impl and not (torch.is_grad_enabled() and _any_requires_grad(args)):
            return impl(*args)  # nothing to differentiate: no autograd.Function either
        return eager(*args)

    call.op, call.impl, call.register_fake = op, impl, op.register_fake
    return call


PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _any_requires_grad(args: tuple) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _plain_tensors(args: tuple) -> bool:
    """True when every tensor argument is a plain tensor; a subclass (a fake tensor, a tracer's proxy, a
    functional wrapper) goes through the custom op, which has the fake implementation."""
    return all(type(a) in PLAIN_TENSOR_TYPES for a in args if isinstance(a, torch.Tensor))


def qkv_head_dim(qkv: torch.Tensor, num_heads: int) -> int:
    """The head dim of a packed projection [B, N, 3 * H * D], checking its shape (no views made)."""
    if qkv.dim() != 3 or num_heads < 1 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv must be [B, N, 3 * heads * head_dim] with {num_heads} heads; got {tuple(qkv.shape)}")
    return qkv.shape[-1] // (3 * num_heads)


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed projection [B, N, 3 * H * D] (timm's layout) as q, k, v [B, H, N, D] views."""
    d = qkv_head_dim(qkv, num_heads)
    B, N, _ = qkv.shape
    return qkv.reshape(B, N, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)


# Pipeline stages of the token and loss kernels, passed at every launch and used by their compile specs alike
# (Triton's own default, 3 in triton 3.6 to 3.9, stated so that a change of that default changes nothing here).
NUM_STAGES = 3
# Floating-point contraction (a * b + c as one FMA) in every kernel, passed at every launch and to the compile check
# alike: on in triton 3.6 to 3.9 by default, stated so that triton 3.9's warning about a coming change of that
# default stays silent and the kernels' numbers and register use do not change with it.
FP_FUSION = True
# Triton's names of the float types the kernels take (pointer types '*fp16', table keys, compile specs)
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids (`triton.cdiv` is a Triton function: a few µs per call from Python)."""
    return -(-int(a) // int(b))


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_device(*tensors: torch.Tensor) -> None:
    """Triton serves CUDA tensors, and CPU tensors only under the interpreter: say so instead of crashing."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and recording_capability() is None and not interpreter_enabled():  # device first
            raise RuntimeError("fastmae's Triton kernels run CPU tensors only under Triton's interpreter "
                               "(set TRITON_INTERPRET=1 before importing triton); use backend='reference' or 'sdpa'")


def image_patches(imgs: torch.Tensor, patch_size: int) -> tuple[int, int, int, int, int]:
    """Check an image batch against a patch size: returns (N, C, grid rows, grid columns, p)."""
    if imgs.dim() != 4:
        raise ValueError(f"imgs must be [N, C, H, W], got {tuple(imgs.shape)}")
    n, c, h, w = imgs.shape
    p = int(patch_size)
    if p < 1 or h % p or w % p:
        raise ValueError(f"image sides {h}x{w} are not divisible by the patch size {p}")
    return n, c, h // p, w // p, p


@dataclass
class CompileSpec:
    """One kernel configuration a launcher can pick, for the ahead-of-time compile check.

    `signature` maps every non-constexpr argument name to a Triton type string ('*fp16', '*fp32', '*i64',
    'i32', 'fp32', ...); `constexprs` maps every constexpr argument name to its value.
    """

    name: str
    fn: Callable
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = NUM_STAGES  # as every token and loss launch passes it
    # integer arguments a launch sees as multiples of 16 (Triton specialises on that at run time, e.g. the
    # strides of MAE's tensors); the compile check compiles the spec with that assumption
    divisible_by_16: tuple[str, ...] = ()
    # pointer arguments a launch sees as not 16-byte aligned (all others are, as PyTorch's allocator gives)
    unaligned: tuple[str, ...] = ()
    # the GPU architectures whose launches can pick this configuration (compute capability x10)
    archs: tuple[int, ...] = (80, 90, 100)


# ---------------------------------------------------------------------------------------------------------
# Tuned launch settings (`fastmae bench tune` measures them on a GPU; each kernel module keeps its own file):
# {"sm_90": {kernel: {key: [settings...]}}, "source": {...}, "measured": {...}}
# ---------------------------------------------------------------------------------------------------------

_TABLE_INFO = ("source", "measured")  # a tuned table's top-level entries that are not architectures
# A folder to read (and `fastmae bench tune --write` to write) the tuned tables from instead of the kernels' own
# folder: for an installation that cannot be written to, or to try a table a GPU run recorded without copying it.
TUNED_DIR_ENV = "FASTMAE_TUNED_DIR"


@functools.lru_cache(maxsize=None)
def tuned_dir() -> str | None:
    """The folder FASTMAE_TUNED_DIR names, or None: read once per process (the launchers ask on every launch);
    `tuned_dir.cache_clear()` reads it again."""
    folder = os.environ.get(TUNED_DIR_ENV)
    return os.path.expanduser(folder) if folder else None


def tuned_path(own: str) -> str:
    """Where a kernel module's tuned table is read and written: `own` (beside the kernels), or the file of the
    same name in the folder FASTMAE_TUNED_DIR names (`tuned_dir`)."""
    folder = tuned_dir()
    return os.path.join(folder, os.path.basename(own)) if folder else own


def tuned_entries(table: dict, kernels, what: str, problems: list[str]):
    """Yield (kernel, key, settings, where) for each entry of a tuned table under a known architecture name and
    kernel; what is neither is added to `problems` (`what` names the op in the message)."""
    for arch, per_kernel in table.items():
        if arch in _TABLE_INFO:
            continue
        if not (arch.startswith("sm_") and arch[3:].isdigit()) or not isinstance(per_kernel, dict):
            problems.append(f"{arch}: not an architecture like sm_90")
            continue
        for kernel, entries in per_kernel.items():
            if kernel not in kernels or not isinstance(entries, dict):
                problems.append(f"{arch}.{kernel}: not a tunable {what} kernel")
                continue
            for key, cfg in entries.items():
                yield kernel, key, cfg, f"{arch}.{kernel}[{key}]"


def tuned_archs(table: dict):
    """(architecture, {kernel: {key: settings}}) of a tuned table, in order."""
    return [(arch, per_kernel) for arch, per_kernel in sorted(table.items()) if arch not in _TABLE_INFO]


def tuned_table_specs(table: dict, make_spec: Callable[[str, str, list, str], CompileSpec]) -> list[CompileSpec]:
    """The configurations of a tuned table, each compiled for its own architecture only and in every compile
    check (`--sample` too, as `make test` runs it); `make_spec(kernel, key, settings, arch)` builds one's spec."""
    specs = []
    for arch, per_kernel in tuned_archs(table):
        for kernel, entries in sorted(per_kernel.items()):
            for key, cfg in sorted(entries.items()):
                spec = make_spec(kernel, key, cfg, arch)
                spec.archs = (int(arch[3:]),)
                spec.always_check = True
                specs.append(spec)
    return specs


def read_tuned_table(path: str, validate: Callable[[dict], list[str]], what: str) -> dict:
    """A tuned table from `path` ({} when there is none); an unsound file is ignored with a warning."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
        problems = validate(table) if isinstance(table, dict) else ["not a JSON object"]
    except (OSError, ValueError) as exc:
        problems = [str(exc)]
    if problems:
        warnings.warn(f"ignoring the tuned {what} settings in {path}: " + "; ".join(problems[:5]))
        return {}
    return table


def tuned_entry(table: dict, capability: tuple[int, int], kernel: str, key: Callable[[], str]):
    """The settings a tuned table holds for this GPU architecture, kernel and key (built only when the table
    has entries for the kernel), or None."""
    entries = table.get(f"sm_{capability[0]}{capability[1]}", {}).get(kernel)
    return entries.get(key()) if entries else None


class TunedSettings:
    """A kernel module's tuned launch settings: `table(path=None)` reads its table (the kernels' own file `own`,
    or FASTMAE_TUNED_DIR's: `tuned_path`), validated by `validate` and read once per path (an unsound file is
    ignored with a warning: {}); `force(**{kernel: settings})` is a context in which `forced` holds those
    settings (`fastmae bench tune` times candidates so)."""

    def __init__(self, own: str, kernels, what: str, validate: Callable[[dict], list[str]]):
        self.own, self.kernels, self.what, self.validate = own, kernels, what, validate
        self.forced: dict = {}
        self._read = functools.lru_cache(maxsize=None)(self._read_file)

    def _read_file(self, path: str) -> dict:
        return read_tuned_table(path, self.validate, self.what)

    def table(self, path: str | None = None) -> dict:
        return self._read(path or tuned_path(self.own))

    def force(self, **settings):
        return forcing(self.forced, self.kernels, self.what, settings)

    def clear(self) -> None:
        """Forget what was read (a test that rewrote a table)."""
        self._read.cache_clear()


@contextlib.contextmanager
def forcing(forced: dict, kernels, what: str, settings: dict):
    """Put `settings` ({kernel: settings}) into the module's `forced` dict inside the block, as they were after."""
    for kernel in settings:
        if kernel not in kernels:
            raise ValueError(f"unknown {what} kernel {kernel!r}; kernels are {', '.join(kernels)}")
    saved = dict(forced)
    forced.update(settings)
    try:
        yield
    finally:
        forced.clear()
        forced.update(saved)
