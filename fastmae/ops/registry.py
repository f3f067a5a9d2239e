"""The backend registry: who can run which op on which input, and why not.

Each backend registers one `OpImpl` per op it implements. An `OpImpl` states what it supports as plain
attributes (devices, dtypes, head dims, minimum GPU capability, the modules it needs) plus an optional
input check; `OpImpl.reasons(inputs)` turns them into sentences, and "supported" means "no reasons".

Choosing a backend, most specific first:
  1. the `backend=` argument of the call (the model passes its own `backend` here);
  2. the innermost `use_backend(...)` context;
  3. the `FASTMAE_BACKEND` environment variable;
  4. automatic: the first backend of the op's priority list for the input's device that serves it.
A backend may be a name (`"triton"`), `"auto"`, or a mapping from op name to name
(`{"attention": "xformers"}`; ops it does not name are chosen automatically). A single name covers the ops
that backend implements; the others are chosen as if it had not been named (xformers implements attention
only, so `backend="xformers"` means xformers attention and automatic token ops). A backend that was asked
for and cannot serve the input raises `BackendUnavailable` with its reasons: never a silent fallback.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence, Union

import torch

from ..kernels.utils import cuda_capability  # torch only, never triton

OPS = ("attention", "gather_patches", "gather_tokens", "unshuffle_tokens", "masked_mse_loss")
BACKENDS = ("reference", "sdpa", "xformers", "triton")
ENV_VAR = "FASTMAE_BACKEND"

BackendSpec = Union[None, str, Mapping[str, str]]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_FLOAT_DTYPES = FLOAT_DTYPES + (torch.float64,)  # the plain PyTorch paths (reference, sdpa)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve the input (the message lists the reasons)."""


@dataclass
class Inputs:
    """What a backend needs to know about one call: the tensors' device and dtype and a few sizes."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int | None = None
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    options: Mapping[str, object] = field(default_factory=dict)


class LazyFn:
    """A function imported on first use (kernel modules import triton). The registry replaces it with the real
    function when it first picks the implementation (`OpImpl.ready`), outside any traced code: torch.compile
    cannot trace `importlib.import_module`, so the ops never import while a model is being compiled."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        self.__name__, self.__qualname__ = name, f"{module}.{name}"

    def load(self) -> Callable:
        return getattr(importlib.import_module(self.module), self.name)

    def __call__(self, *args, **kwargs):
        return self.load()(*args, **kwargs)


@dataclass
class OpImpl:
    """One backend's implementation of one op, and what it supports."""

    op: str
    backend: str
    fn: Callable
    devices: tuple[str, ...] | None = ("cpu", "cuda")  # None: any device PyTorch runs the code on
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    head_dims: tuple[int, int] | None = None  # inclusive range, attention only
    min_capability: tuple[int, int] | None = None  # CUDA compute capability
    requires: tuple[str, ...] = ()  # importable modules
    check: Callable[[Inputs], list[str]] | None = None  # input-dependent reasons
    # attention only, optional: (qkv [B, N, 3*H*D], heads, scale) -> [B, H, N, D] on the packed projection,
    # for implementations that write the gradient of qkv in one piece (`fastmae.ops.attention_qkv`)
    packed: Callable | None = None

    def ready(self) -> "OpImpl":
        """Replace lazily imported functions by the real ones (once; the registry calls it when it picks this)."""
        if isinstance(self.fn, LazyFn):
            self.fn = self.fn.load()
        if isinstance(self.packed, LazyFn):
            self.packed = self.packed.load()
        return self

    def install_reasons(self) -> list[str]:
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            return [f"{self.backend} needs the Python package(s) {', '.join(missing)}, which are not installed"
                    f" (pip install 'fastmae[{self.backend}]')"]
        return []

    def reasons(self, inputs: Inputs) -> list[str]:
        """Plain sentences saying why this implementation cannot serve `inputs`; empty if it can."""
        out = self.install_reasons()
        dev = inputs.device.type
        if self.devices is not None and dev not in self.devices:
            out.append(f"{self.backend} runs on {' or '.join(self.devices)} tensors, not {dev}")
        if inputs.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            out.append(f"{self.backend} supports dtypes {names}, not {str(inputs.dtype).replace('torch.', '')}")
        if self.head_dims is not None and inputs.head_dim is not None:
            lo, hi = self.head_dims
            if not lo <= inputs.head_dim <= hi:
                out.append(f"{self.backend} supports head dims {lo} to {hi}, not {inputs.head_dim}")
        if self.min_capability is not None and dev == "cuda":
            cap = cuda_capability(inputs.device)
            if cap < self.min_capability:
                out.append(f"{self.backend} needs compute capability {self.min_capability[0]}.{self.min_capability[1]}"
                           f" or newer, this GPU has {cap[0]}.{cap[1]}")
        if self.check is not None and not out:
            out.extend(self.check(inputs))
        return out


_REGISTRY: dict[tuple[str, str], OpImpl] = {}
# Automatic choice: per op and device type, backends in order of preference. The CUDA orders are read
# from measurements (benchmarks/results/); a backend that cannot serve an input is skipped.
_PRIORITY: dict[tuple[str, str], list[str]] = {}
_DEFAULT_PRIORITY = {
    "cpu": ["sdpa", "reference"],
    "cuda": ["triton", "sdpa", "xformers", "reference"],
}
_OTHER_DEVICES = ["sdpa", "reference"]  # mps, xpu, meta, ...: the plain PyTorch paths


def register(impl: OpImpl) -> OpImpl:
    if impl.op not in OPS:
        raise ValueError(f"unknown op {impl.op!r}; ops are {', '.join(OPS)}")
    if impl.backend not in BACKENDS:
        raise ValueError(f"unknown backend {impl.backend!r}; backends are {', '.join(BACKENDS)}")
    _REGISTRY[(impl.op, impl.backend)] = impl
    return impl


def set_priority(op: str, device_type: str, order: Sequence[str]) -> None:
    """Set the automatic order of backends for one op on one device type."""
    unknown = [b for b in order if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; backends are {', '.join(BACKENDS)}")
    _PRIORITY[(op, device_type)] = list(order)


def priority(op: str, device_type: str) -> list[str]:
    return list(_PRIORITY.get((op, device_type), _DEFAULT_PRIORITY.get(device_type, _OTHER_DEVICES)))


def get_impl(op: str, backend: str) -> OpImpl | None:
    _ensure_loaded()
    return _REGISTRY.get((op, backend))


def not_supported_reasons(op: str, backend: str, inputs: Inputs) -> list[str]:
    impl = get_impl(op, backend)
    if impl is None:
        return [f"{backend} does not implement {op}"]
    return impl.reasons(inputs)


def _validate_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a backend name is a string, got {type(name).__name__}")
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    return name


def _parse_env() -> BackendSpec:
    raw = os.environ.get(ENV_VAR, "")  # read every call, parsed once per value
    if not raw.strip():
        return None
    try:
        return _parse_cached(raw, ENV_VAR)
    except ValueError as exc:  # named as the commands name it: where the bad value came from
        raise ValueError(f"{ENV_VAR}={raw}: {str(exc).removeprefix(ENV_VAR + ': ')}") from None


@functools.lru_cache(maxsize=64)
def _parse_cached(raw: str, where: str) -> BackendSpec:
    """`_parse_text`, once per value: for the environment variable and a call's own text form, read on every
    op call (per-op specs come back as read-only mappings, safe to share)."""
    return _parse_text(raw, where)


def _parse_text(raw: str, where: str) -> BackendSpec:
    """A backend name, or the text form of a per-op mapping ("attention=triton,gather_tokens=reference")."""
    raw = raw.strip()
    if "=" not in raw:
        return _validate_name(raw)
    spec = {}
    for part in raw.split(","):
        op, _, name = part.partition("=")
        op = op.strip().lower()  # as backend names: "Attention=SDPA" is attention=sdpa
        if op not in OPS:
            raise ValueError(f"{where}: unknown op {op!r}; ops are {', '.join(OPS)}")
        if op in spec:
            raise ValueError(f"{where}: op {op!r} is given twice")
        spec[op] = _validate_name(name)
    return types.MappingProxyType(spec)


def parse_backend(backend) -> BackendSpec:
    """A backend choice, checked: None, "auto" or a backend name, a mapping op -> name, or the text form of a
    mapping as `FASTMAE_BACKEND` and `--backend` take it ("attention=triton,gather_tokens=reference"). Returns
    None, a lower-case name or a read-only mapping; raises ValueError naming what is wrong."""
    if backend is None:
        return None
    if isinstance(backend, str):
        return _parse_text(backend, "backend")
    if not isinstance(backend, Mapping):
        raise TypeError(f"a backend is a name, a mapping op -> name or None, got {type(backend).__name__}")
    _check_ops(backend)
    # None for an op: no choice for it here (the context, environment or automatic order decides)
    return types.MappingProxyType({op: None if name is None else _validate_name(name)
                                   for op, name in backend.items()})


def _name_for(spec: BackendSpec, op: str) -> str | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        name = _validate_name(spec)
        # a single name covers the ops that backend implements (xformers: attention only)
        return name if name == "auto" or (op, name) in _REGISTRY else None
    name = spec.get(op)
    return None if name is None else _validate_name(name)


def _check_ops(spec: Mapping[str, str]) -> None:
    """A per-op spec names ops only: a misspelt op would otherwise be ignored without a word."""
    unknown = [op for op in spec if op not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(map(repr, unknown))} in a backend mapping; ops are "
                         f"{', '.join(OPS)}")


class _Choice:
    """One `use_backend` block's choice: an object of its own, so that leaving the block removes that entry and
    no other (a generator that leaves its block after its caller entered one)."""
    __slots__ = ("spec",)

    def __init__(self, spec: BackendSpec):
        self.spec = spec


# the open `use_backend` blocks, innermost last: per thread and per asyncio task (each runs in a context of its own)
_CHOICES: contextvars.ContextVar[tuple[_Choice, ...]] = contextvars.ContextVar("fastmae_use_backend", default=())


@contextlib.contextmanager
def use_backend(backend: BackendSpec) -> Iterator[None]:
    """Choose the backend for every op called inside the block (unless a call or model names one): a name, a
    mapping op -> name, or its text form "attention=triton,gather_tokens=reference" (`parse_backend`). The
    choice holds in this thread or asyncio task, not in others running meanwhile.

    >>> with use_backend("sdpa"):
    ...     loss, pred, mask = model(imgs)
    """
    choice = _Choice(parse_backend(backend))
    _CHOICES.set(_CHOICES.get() + (choice,))
    try:
        yield
    finally:
        _CHOICES.set(tuple(c for c in _CHOICES.get() if c is not choice))


def requested(op: str, backend: BackendSpec = None) -> str:
    """The backend name asked for op, by call, context or environment ("auto" if none)."""
    _ensure_loaded()
    if backend is not None and not isinstance(backend, str):
        _check_ops(backend)  # a call's own mapping; use_backend and the environment check theirs once
    if isinstance(backend, str) and "=" in backend:  # a call's own text form of a mapping (the others come parsed)
        backend = _parse_cached(backend, "backend")
    for spec in (backend, *(c.spec for c in reversed(_CHOICES.get()))):
        name = _name_for(spec, op)
        if name is not None:
            return name
    # the environment last, read only when nothing above decided (a bad value then fails only where it is used)
    name = _name_for(_parse_env(), op)
    return "auto" if name is None else name


# the open `record_choices` blocks, per thread and per asyncio task as `use_backend`'s
_RECORDERS: contextvars.ContextVar[tuple[dict[str, str], ...]] = contextvars.ContextVar("fastmae_record_choices",
                                                                                         default=())


@contextlib.contextmanager
def record_choices() -> Iterator[dict[str, str]]:
    """Record which backend served each op inside the block (in this thread or asyncio task): yields a dict
    op -> backend name. Nested blocks each record what runs inside them."""
    record: dict[str, str] = {}
    _RECORDERS.set(_RECORDERS.get() + (record,))
    try:
        yield record
    finally:
        _RECORDERS.set(tuple(r for r in _RECORDERS.get() if r is not record))


def resolve(op: str, inputs: Inputs, backend: BackendSpec = None) -> OpImpl:
    """The implementation that serves `op` for `inputs`, or `BackendUnavailable` with every reason.

    Under `torch.compile` the choice is made once, while tracing, and is a constant of the compiled graph
    (the registry itself is never traced): change backends by recompiling.
    """
    if torch.compiler.is_compiling():
        grad_mode = torch.is_grad_enabled()  # a tensor that requires grad gets none under no_grad
        tensors = tuple((k, bool(t.requires_grad) and grad_mode, t.dtype) for k, t in inputs.tensors.items()
                        if t is not None)
        spec = backend if backend is None or isinstance(backend, str) else tuple(sorted(backend.items()))
        # plain ints and key-sorted options: after a recompile Dynamo may trace a size as a symbol, which neither
        # a constant function's arguments nor a sort of (key, value) pairs can take (int() specialises it)
        head_dim = None if inputs.head_dim is None else int(inputs.head_dim)
        options = tuple(sorted(inputs.options.items(), key=lambda kv: kv[0]))
        name = _resolve_constant(op, inputs.device.type, inputs.device.index, inputs.dtype, head_dim, tensors,
                                 options, spec)
        return _REGISTRY[(op, name)]
    impl = _resolve(op, inputs, backend)
    for record in _RECORDERS.get():
        record[op] = impl.backend
    return impl


def _assume_constant_result(fn):
    """`torch.compiler.assume_constant_result`, without importing torch._dynamo (about 2 s) at import time.

    That decorator only marks `fn` with the attribute below, which dynamo reads when it traces a call to `fn`;
    tests/ops/test_registry.py checks that this torch version still marks functions that way.
    """
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _resolve_constant(op, device_type, device_index, dtype, head_dim, tensors, options, spec) -> str:
    """`resolve` on plain values, run eagerly while torch.compile traces; its result is a graph constant. `tensors`:
    (name, requires a gradient, dtype) of each tensor input, what the backends' checks read of them."""
    from types import SimpleNamespace

    tensors = {k: SimpleNamespace(requires_grad=g, dtype=d) for k, g, d in tensors}
    inputs = Inputs(torch.device(device_type, device_index), dtype, head_dim, tensors, dict(options))
    backend = spec if spec is None or isinstance(spec, str) else dict(spec)
    return _resolve(op, inputs, backend).backend


def _resolve(op: str, inputs: Inputs, backend: BackendSpec) -> OpImpl:
    _ensure_loaded()
    name = requested(op, backend)
    if name != "auto":
        impl = _REGISTRY.get((op, name))
        reasons = [f"{name} does not implement {op}"] if impl is None else impl.reasons(inputs)
        if reasons:
            raise BackendUnavailable(f"backend {name!r} cannot run {op} on this input: " + "; ".join(reasons))
        return impl.ready()
    tried = []
    for cand in priority(op, inputs.device.type):
        impl = _REGISTRY.get((op, cand))
        if impl is None:
            continue
        reasons = impl.reasons(inputs)
        if not reasons:
            return impl.ready()
        tried.append(f"{cand}: " + "; ".join(reasons))
    raise BackendUnavailable(f"no backend can run {op} on this input. " + " | ".join(tried))


_loaded = False
_loading = False
_load_lock = threading.RLock()


def _ensure_loaded() -> None:
    """Import the backend modules once; each registers its implementations. Other threads wait until the
    registry is whole (a thread that saw it half-filled would take a missing backend for one not asked for);
    a failed load is tried again, and fails again, at the next call."""
    global _loaded, _loading
    if _loaded:
        return
    with _load_lock:
        if _loaded or _loading:  # _loading: this thread, re-entering while it imports the modules
            return
        _loading = True
        try:
            from . import reference_ops, sdpa_ops, triton_ops, xformers_ops  # noqa: F401

            load_priority_file(PRIORITY_FILE)
            _loaded = True
        finally:
            _loading = False


PRIORITY_FILE = os.path.join(os.path.dirname(__file__), "priority.json")


def load_priority_file(path: str) -> bool:
    """Read measured backend orders, `{"cuda": {"attention": ["triton", "sdpa", ...], ...}, "source": {...}}`,
    as `fastmae bench ops --write-priority` writes them. Backends a file omits keep their default place
    after the measured ones. Returns whether a file was read."""
    import json

    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for device_type, per_op in data.items():
        if device_type not in _DEFAULT_PRIORITY or not isinstance(per_op, dict):
            continue
        for op, order in per_op.items():
            if op in OPS:
                # Triton on CPU is the interpreter, for tests only: never chosen automatically there.
                measured = [b for b in order if b in BACKENDS and not (device_type == "cpu" and b == "triton")]
                rest = [b for b in _DEFAULT_PRIORITY[device_type] if b not in measured]
                set_priority(op, device_type, measured + rest)
    return True
