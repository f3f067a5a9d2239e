"""Launch probes: two Triton kernels that do almost nothing, for timing what the host pays to launch one.

At MAE's shapes a training step launches about a thousand kernels of a few microseconds each, so where a step
is bound by the host, what one launch costs it decides the step's time. `fastmae bench ops` times these probes
beside a one-element PyTorch op (`fastmae.bench.limits.measure_launch_costs`):

- `launch_small(x)`: one pointer argument;
- `launch_wide(x)`: the argument list of the attention forward (`attention._attn_fwd_short`): five tensors,
  sixteen strides, three sizes and a float, so that Triton's per-argument work (binding, specialising on
  alignment and divisibility by 16, packing for the driver) is paid as in the model.

Both launch as fastmae's kernels do (`launch.launch`: Triton's binding done once per specialisation), or with
`kept=False` through Triton's own path, which binds every argument at every launch.

Each adds 1 to x[0] (one program, one element): the GPU's part is the smallest a launch can have.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from .utils import FP_FUSION, CompileSpec, check_device

WIDE_ARGS = 25  # pointers and scalars `launch_wide` passes, as the attention forward's launch


@triton.jit
def _probe_small_kernel(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1.0)


@triton.jit
def _probe_wide_kernel(x_ptr, a_ptr, b_ptr, c_ptr, d_ptr,
                       s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15,
                       n0, n1, n2, scale, BLOCK: tl.constexpr):
    # every argument reaches the kernel (Triton drops none that the host packs); only x[0] changes
    tl.store(x_ptr, tl.load(x_ptr) + 1.0)


def _probe_inputs(x: torch.Tensor) -> None:
    check_device(x)
    if x.dtype != torch.float32 or x.numel() < 1:
        raise ValueError(f"a launch probe takes a float32 tensor of at least one element, got {x.dtype} "
                         f"with {x.numel()}")


def launch_small(x: torch.Tensor, kept: bool = True) -> None:
    """One launch of the one-argument probe: x[0] += 1. `kept`: through `launch.launch`, as fastmae's kernels
    launch; False: through Triton's own path (`kernel[grid](...)`)."""
    _probe_inputs(x)
    if kept:
        launch(_probe_small_kernel, (1,), x, enable_fp_fusion=FP_FUSION)
    else:
        _probe_small_kernel[(1,)](x, enable_fp_fusion=FP_FUSION)


def launch_wide(x: torch.Tensor, others: tuple[torch.Tensor, ...] | None = None, kept: bool = True) -> None:
    """One launch of the wide probe (`WIDE_ARGS` arguments, x first): x[0] += 1. `others`: the four other
    tensors passed (read by nothing; x itself when None). Strides and sizes are those of a ViT-B encoder
    launch (batch 64, 12 heads, 50 tokens, head dim 64, a packed [B, N, 3 * 768] projection). `kept`: as in
    `launch_small`."""
    _probe_inputs(x)
    a, b, c, d = others if others is not None else (x, x, x, x)
    args = (x, a, b, c, d, 115200, 64, 2304, 1, 115200, 64, 2304, 1, 115200, 64, 2304, 1, 38400, 64, 768, 1,
            12, 50, 64, 0.18033688011112042)
    if kept:
        launch(_probe_wide_kernel, (1,), *args, BLOCK=16, enable_fp_fusion=FP_FUSION)
    else:
        _probe_wide_kernel[(1,)](*args, BLOCK=16, enable_fp_fusion=FP_FUSION)


def compile_specs() -> list[CompileSpec]:
    """Both probes, as they launch: fp32 pointers, and the wide one's strides as Triton sees them."""
    wide = {"x_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32", "d_ptr": "*fp32"}
    wide.update({f"s{i}": "i32" for i in range(16)})
    wide.update({"n0": "i32", "n1": "i32", "n2": "i32", "scale": "fp32"})
    return [CompileSpec("probe_small", _probe_small_kernel, {"x_ptr": "*fp32"}),
            CompileSpec("probe_wide", _probe_wide_kernel, wide, {"BLOCK": 16})]
