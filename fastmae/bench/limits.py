"""The device's limits, measured in the same run as the benchmarks that are compared against them.

- compute: a large square matrix product `a @ b` in the benchmark's dtype; FLOPs = 2 * n^3.
- bandwidth: a device-to-device copy `dst.copy_(src)`; bytes = 2 * size (read once, written once).

Each limit is taken from the 20th-percentile time (the 80th percentile of throughput) of its repetitions:
a ceiling the device reached in this run, not a datasheet number. GPU sizes: n = 8192, 512 MiB copied.
CPU sizes are smaller (n = 1024, 64 MiB; quick mode n = 512, 16 MiB) so that the run stays short.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .timing import measure


@dataclass
class Limits:
    device_type: str
    dtype: str
    matmul_n: int
    matmul_tflops: float
    copy_bytes: int
    copy_gbps: float

    def records(self, case: str = "bench ops") -> list[dict]:
        """The limits as result records (kind "limit"; `case` says which command measured them)."""
        return [
            {"kind": "limit", "op": "matmul", "case": case, "backend": "torch", "dtype": self.dtype,
             "shape": {"M": self.matmul_n, "N": self.matmul_n, "K": self.matmul_n}, "status": "ok",
             "tflops": self.matmul_tflops},
            {"kind": "limit", "op": "copy", "case": case, "backend": "torch", "dtype": self.dtype,
             "shape": {"bytes": self.copy_bytes}, "status": "ok", "gbps": self.copy_gbps},
        ]

    def as_dict(self) -> dict:
        return asdict(self)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def sizes(device_type: str, quick: bool = False) -> tuple[int, int]:
    """(matmul side n, bytes copied one way) for a device type."""
    if device_type == "cuda":
        return 8192, 512 * 1024 * 1024
    return (512, 16 * 1024 * 1024) if quick else (1024, 64 * 1024 * 1024)


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, max_time_s: float = 0.5) -> float:
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    t = measure(lambda: a @ b, device, warmup=2, min_reps=3, max_reps=50, max_time_s=max_time_s)
    return 2.0 * n ** 3 / (t.p20_ms * 1e-3) / 1e12


def measure_copy_gbps(device: torch.device, nbytes: int, max_time_s: float = 0.5) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, warmup=2, min_reps=3, max_reps=50, max_time_s=max_time_s)
    return 2.0 * nbytes / (t.p20_ms * 1e-3) / 1e9


def measure_limits(device: torch.device | str, dtype: torch.dtype, quick: bool = False) -> Limits:
    device = torch.device(device)
    n, nbytes = sizes(device.type, quick)
    budget = 0.1 if quick else 0.5
    return Limits(device_type=device.type, dtype=dtype_name(dtype), matmul_n=n,
                  matmul_tflops=measure_matmul_tflops(device, dtype, n, budget),
                  copy_bytes=nbytes, copy_gbps=measure_copy_gbps(device, nbytes, budget))
