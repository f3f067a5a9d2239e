"""Launching a Triton kernel with less host work: `launch(kernel, grid, *args, **kwargs)`.

`kernel[grid](*args, **kwargs)` makes Triton bind every argument, specialise it (dtype and 16-byte alignment of
each pointer, divisibility by 16 and the width of each integer), build the cache key from that and look the
compiled kernel up, every time: 14 to 27 µs of host time for the 25 arguments of the attention forward (the wide
launch probe, on a 2-core CPU with the launch itself stubbed out, triton 3.6 and 3.9), about as long as many of
the kernels run on the GPU at MAE's shapes, where a step is bound by the host's time to issue it. The kept path
below took 8 to 15 µs there.

`launch` does that once per specialisation: its first call with a given key goes through Triton's own path
(`JITFunction.run`, which compiles or finds the kernel and launches it) and keeps the compiled kernel it
returns; the calls after it with the same key hand the arguments to that kernel's launcher as
`JITFunction.run` does (the same call, `CompiledKernel.run(grid..., stream, function, packed metadata, launch
metadata, Triton's launch hooks, *every parameter in order)`, unchanged from triton 3.6 to 3.9).

The key is finer than Triton's, never coarser: each tensor's dtype and address modulo 16, every other argument's
exact value (so each integer value, not just its divisibility, gets an entry of its own; a float's too, which
Triton does not specialise on), every keyword (constexprs and options such as `num_warps`), the kernel and the
current device. Whatever Triton would specialise differently therefore has a key of its own and takes Triton's
path first. Not seen by a kept kernel: Triton's knobs changed at run time (`TRITON_DEBUG` and the like are read
when a key is first launched) and a kernel's `pre_run_hooks` (a kernel that has any always takes Triton's path).

Triton's path is taken every time in its interpreter (the kernels are then not `JITFunction`s), while launches are
recorded (`compile_check.record_launches`), for arguments that cannot be part of a key (a list), and when
`FASTMAE_FAST_LAUNCH=0` (read at import).
"""
from __future__ import annotations

import inspect
import operator
import os

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from .utils import _RECORDING

ENABLED = os.environ.get("FASTMAE_FAST_LAUNCH", "1") != "0"
# Kept kernels, all kernels and devices together, at most MAX_KEYS (then the whole cache starts again: a key per
# distinct set of sizes and strides, so only a run through many shapes fills it)
MAX_KEYS = 4096

# (id of the kernel, device, keyword names, argument key) -> (kernel, compiled kernel, names of the parameters
# after the positional ones, their defaults); the kernel itself is kept so that a reused id cannot match
_KEPT: dict[tuple, tuple] = {}
# the types of a launch's arguments (positional, then keyword values) -> (tensors' getter, other values' getter)
_LAYOUTS: dict[tuple, tuple] = {}


def _getter(positions: list[int]):
    if len(positions) == 1:
        i = positions[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*positions) if positions else (lambda args: ())


def _layout(types: tuple) -> tuple:
    tensors = [i for i, t in enumerate(types) if issubclass(t, torch.Tensor)]
    others = [i for i, t in enumerate(types) if not issubclass(t, torch.Tensor)]
    layout = _LAYOUTS[types] = (_getter(tensors), _getter(others))
    return layout


def _arg_key(values: tuple) -> tuple:
    """Every argument's type; each tensor's dtype and address modulo 16; every other argument itself."""
    types = tuple(map(type, values))
    layout = _LAYOUTS.get(types) or _layout(types)
    tensors = layout[0](values)
    return (types, layout[1](values), tuple([t.dtype for t in tensors]),
            tuple([t.data_ptr() & 15 for t in tensors]))


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, with Triton's binding and specialisation done once per key (see the module
    docstring). `grid`: a tuple of one to three ints."""
    if not ENABLED or _RECORDING or type(kernel) is not JITFunction or kernel.pre_run_hooks:
        kernel[grid](*args, **kwargs)
        return
    device = driver.active.get_current_device()
    key = (id(kernel), device, tuple(kwargs), _arg_key(args + tuple(kwargs.values())))
    try:
        kept = _KEPT.get(key)
    except TypeError:  # an argument that cannot be a key (a list, say): Triton's path, which judges it
        kernel[grid](*args, **kwargs)
        return
    if kept is None or kept[0] is not kernel:
        _first_launch(key, kernel, grid, args, kwargs)
        return
    _, compiled, names, defaults = kept
    if names:
        args = args + tuple([kwargs.get(name, default) for name, default in zip(names, defaults)])
    stream = driver.active.get_current_stream(device)
    enter_hook = knobs.runtime.launch_enter_hook
    metadata = None if enter_hook is None else compiled.launch_metadata(grid, stream, *args)
    n = len(grid)
    compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, compiled.function,
                 compiled.packed_metadata, metadata, enter_hook, knobs.runtime.launch_exit_hook, *args)


def _first_launch(key: tuple, kernel: JITFunction, grid: tuple, args: tuple, kwargs: dict) -> None:
    """Triton's own launch; the compiled kernel it returns is kept under `key`."""
    compiled = kernel.run(*args, grid=grid, warmup=False, **kwargs)
    if compiled is None:  # nothing to keep (Triton returns the kernel it launched in 3.6 to 3.9)
        return
    params = kernel.params[len(args):]
    if any(p.name not in kwargs and p.default is inspect.Parameter.empty for p in params):
        return  # Triton's binding accepted what this cannot rebuild: launch those through Triton every time
    if len(_KEPT) >= MAX_KEYS:
        _KEPT.clear()
    _KEPT[key] = (kernel, compiled, tuple(p.name for p in params), tuple(p.default for p in params))


def kept_launches() -> int:
    """How many specialisations are kept (tests)."""
    return len(_KEPT)


def forget_launches() -> None:
    """Drop every kept kernel: the next launch of each key takes Triton's path again (tests)."""
    _KEPT.clear()
