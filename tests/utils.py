"""Helpers for the tests: devices to run on, backend skips with the registry's reasons, and comparisons.

The tolerance rule for kernels is stated once, in `fastmae/bench/tolerance.py` (the tuner applies it too):
err(fast, fp32 reference) <= ERROR_FACTOR x err(plain path in the same dtype) + ERROR_FLOOR[dtype] x scale.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import NamedTuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastmae import ops
from fastmae.bench.tolerance import ERROR_FACTOR, error_bound, floor_scale, max_error
from fastmae.kernels.utils import interpreter_problem
from fastmae.ops.registry import Inputs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# whether Triton's interpreter can run the kernels with the installed packages (triton 3.6 cannot with NumPy 2.4
# or newer): where it cannot, the kernels' CPU tests skip with that reason, and the tests that expect triton
# among the backends that serve the CPU leave it out
INTERPRETER_RUNS = interpreter_problem() is None


def skip_unless_serves(op: str, backend: str, device, dtype, head_dim=None, **tensors) -> None:
    """Skip the test with the registry's own reasons when `backend` cannot serve this input."""
    inputs = Inputs(torch.device(device), dtype, head_dim=head_dim, tensors=tensors, options={"op": op})
    reasons = ops.not_supported_reasons(op, backend, inputs)
    if reasons:
        pytest.skip("; ".join(reasons))


class OpRecorder(TorchDispatchMode):
    """The operators the dispatcher runs inside the block, in order (`funcs`: ATen's and custom ops' overloads);
    `names` their short names (`add`, `scatter_`), `calls` how often each name ran."""

    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))

    @property
    def names(self) -> list[str]:
        return [f.overloadpacket.__name__ for f in self.funcs]

    @property
    def calls(self) -> Counter:
        return Counter(self.names)


class Launch(NamedTuple):
    name: str  # the kernel function's name
    args: tuple  # positional arguments: tensors, strides, sizes
    kwargs: dict  # the constexprs, num_warps, num_stages


@contextlib.contextmanager
def launched_kernels():
    """Record the Triton kernels launched inside the block (they still run, compiled or interpreted): yields a
    list of `Launch` items."""
    from fastmae.kernels import attention  # every kernel of the project is an object of this one class

    cls = type(attention.KERNELS["fwd_short"])
    original = cls.run
    launched: list[Launch] = []

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            launched.append(Launch(self.fn.__name__, args, dict(kwargs)))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    cls.run = run
    try:
        yield launched
    finally:
        cls.run = original


def error_line(err: str, command: str, *, alone: bool = False) -> str:
    """The error line a command printed to stderr for a user error, "fastmae <command>: error: ...", checked: no
    traceback, no colour codes, short enough to read, nothing before it but an argparse usage line or notes
    (with `alone`, nothing at all)."""
    assert "Traceback" not in err and "\x1b" not in err, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(f"fastmae {command}: error: ") and len(lines[-1]) < 600, err
    assert not (alone and len(lines) > 1), err
    assert all(line.startswith(("usage:", " ", "note: ")) for line in lines[:-1]), err
    return lines[-1]


def describe_difference(actual: torch.Tensor, expected: torch.Tensor) -> str:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    msg = []
    if not torch.isfinite(a).all():
        msg.append(f"actual has {int((~torch.isfinite(a)).sum())} non-finite values")
    if not torch.isfinite(e).all():
        msg.append(f"expected has {int((~torch.isfinite(e)).sum())} non-finite values")
    diff = (a - e).abs().nan_to_num(float("inf"))
    if diff.numel():
        i = int(diff.argmax())
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), diff.shape))
        msg.append(f"max abs diff {float(diff.max()):.3e} at {idx}: actual {float(a.flatten()[i]):.6g}, "
                   f"expected {float(e.flatten()[i]):.6g}; {int((diff > 0).sum())} of {diff.numel()} differ")
    return "; ".join(msg)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "") -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    ok = torch.allclose(actual.detach().double().cpu(), expected.detach().double().cpu(), atol=atol, rtol=rtol)
    assert ok, f"{name}: not within atol={atol}, rtol={rtol}: {describe_difference(actual, expected)}"


def assert_error_within_plain(fast: torch.Tensor, plain: torch.Tensor, ref32: torch.Tensor, name: str = "") -> None:
    """The tolerance rule above: err(fast, ref32) <= ERROR_FACTOR * err(plain, ref32) + floor[dtype] * scale."""
    assert fast.shape == ref32.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(ref32.shape)}"
    assert torch.isfinite(fast).all(), f"{name}: non-finite values: {describe_difference(fast, ref32)}"
    scale = floor_scale(ref32)
    bound = error_bound(plain, ref32, fast.dtype)
    err = max_error(fast, ref32)
    assert err <= bound, (f"{name}: error {err:.3e} against the fp32 reference exceeds {bound:.3e} "
                          f"({ERROR_FACTOR} x the plain {fast.dtype} path's error + floor x {scale:.3g}): "
                          f"{describe_difference(fast, ref32)}")


def seeded_randn(*shape, device, dtype=torch.float32, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    """A standard normal tensor drawn on the CPU from `seed` (the same numbers on every device), then moved."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)


def kept_ids(n: int, L: int, K: int, device="cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_keep [n, K] contiguous, ids_restore [n, L]) of one masking draw (`masking`), as the model makes it."""
    ids_shuffle, ids_restore, _ = masking(n, L, K, device, seed)
    return ids_shuffle[:, :K].contiguous(), ids_restore


def masking(n: int, L: int, len_keep: int, device="cpu", seed: int = 0):
    """One masking draw as the model makes it: (ids_shuffle [N, L], ids_restore [N, L], mask [N, L])."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, L, generator=g)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, L)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_shuffle.to(device), ids_restore.to(device), mask.to(device)


def _truncate_to_bf16(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by dropping the low 16 bits, as the Triton interpreter converts."""
    bits = t.detach().float().contiguous().view(torch.int32) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)


def plain_for_rule(plain: torch.Tensor, ref32: torch.Tensor) -> torch.Tensor:
    """The plain path for the tolerance rule. Triton's interpreter converts fp32 to bf16 by truncation, not
    rounding, so on the CPU a bf16 kernel is also allowed the error of truncating the fp32 reference."""
    if plain.dtype != torch.bfloat16 or plain.device.type != "cpu":
        return plain
    trunc = _truncate_to_bf16(ref32)
    return trunc if max_error(trunc, ref32) > max_error(plain, ref32) else plain


def make_qkv(B, H, N, D, dtype, layout, device, seed=0):
    """q, k, v [B, H, N, D] that require grad, in the given layout: "contiguous", "packed" (views of one qkv
    projection [B, N, 3*H*D], split the way timm does) or "transposed" ([B, N, H, D] tensors viewed)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        return [torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
                for _ in range(3)]
    if layout == "packed":
        qkv = torch.randn(B, N, 3 * H * D, generator=g).to(device=device, dtype=dtype).requires_grad_()
        q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        assert not q.is_contiguous()
        return q, k, v
    if layout == "transposed":
        leaves = [torch.randn(B, N, H, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
                  for _ in range(3)]
        return [t.transpose(1, 2) for t in leaves]
    raise ValueError(layout)


class FakeGraphs:
    """Stand-ins for torch.cuda's stream and graph calls, so that capture-and-replay flows run on a CPU: the
    'capture' runs the work once, eagerly; a 'replay' counts and calls `on_replay(graph)` (by default nothing:
    the captured output stays). `pools` lists the memory pool each capture was given (a graph's pool is its
    own identity)."""

    def __init__(self, monkeypatch, on_replay=None):
        self.captures, self.replays, self.on_replay, self.pools = 0, 0, on_replay, []
        fake = self

        class Graph:
            def replay(self):
                fake.replays += 1
                if fake.on_replay is not None:
                    fake.on_replay(self)

            def pool(self):
                return id(self)

        class Capture:
            def __init__(self, graph, pool=None, stream=None, capture_error_mode="global"):
                fake.pools.append(pool)

            def __enter__(self):
                fake.captures += 1

            def __exit__(self, *exc):
                return False

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "set_stream", lambda s: None)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", Capture)
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
