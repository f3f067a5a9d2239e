"""The device's limits, measured in the same run as the benchmarks that are compared against them.

- compute: a large square matrix product `a @ b` in the benchmark's dtype; FLOPs = 2 * n^3.
- bandwidth: a device-to-device copy `dst.copy_(src)`; bytes = 2 * size (read once, written once).
- launch: the host's time to issue one kernel that does next to nothing (`measure_launch_costs`): a one-element
  PyTorch op, and Triton's launch probes (`fastmae.kernels.probe`: one argument, and the 25 of the attention
  forward's launch), each as fastmae's kernels launch (`kernels.launch`) and through Triton's own path. Where a
  step is bound by the host, these set the price of each kernel it launches.

Each limit is taken from the 20th-percentile time (the 80th percentile of throughput) of its repetitions:
a ceiling the device reached in this run, not a datasheet number. GPU sizes: n = 8192, 512 MiB copied.
CPU sizes are smaller (n = 1024, 64 MiB; quick mode n = 512, 16 MiB) so that the run stays short.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .common import error_line
from .timing import measure, runs_per_call_s


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


# Launch costs. A burst is this many calls back to back: far fewer than CUDA's launch queue holds, so the host
# never waits on the GPU inside one, and the burst's time over its calls is the host's time per call.
LAUNCH_BURST = 200
LAUNCH_BURSTS = 7
LAUNCH_QUICK = (5, 2)  # (burst, bursts) in quick mode and under the interpreter (a launch runs the kernel in Python)


def host_us_per_call(fn: Callable[[], object], device: torch.device, burst: int = LAUNCH_BURST,
                     bursts: int = LAUNCH_BURSTS) -> float:
    """The median over `bursts` bursts of the host's time per call, in µs, for `burst` calls of `fn` made back to
    back; the device is synchronised before each burst (nothing queued ahead), not inside it. One untimed call
    first (a Triton kernel compiles on its first launch)."""
    fn()
    return statistics.median(runs_per_call_s(fn, device, burst, bursts, until_done=False)) * 1e6


def triton_launch_reason(device: torch.device, allow_interpreter: bool = False) -> str | None:
    """Why Triton's launch probes are not timed on `device`, or None."""
    from ..kernels.utils import interpreter_enabled, interpreter_problem

    if device.type not in ("cuda", "cpu"):
        return f"Triton launches CUDA kernels (or runs them in its CPU interpreter), not on {device.type}"
    if device.type == "cpu":
        if not interpreter_enabled():
            return ("Triton launches GPU kernels: on a CPU it runs them only in its interpreter (TRITON_INTERPRET=1 "
                    "set before triton is imported), whose launches cost what running the kernel in Python costs")
        if not allow_interpreter:
            from .ops_bench import interpreter_reason
            return interpreter_reason(device)
        return interpreter_problem()
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def measure_launch_costs(device: torch.device | str, quick: bool = False, allow_interpreter: bool = False,
                         case: str = "bench ops") -> list[dict]:
    """Records (kind "limit", op "launch") of the host's time to issue one kernel: `host_us`, per call, for a
    one-element in-place add (backend "torch") and Triton's two launch probes (backend "triton", `shape`
    giving their argument counts), each launched as fastmae's kernels are (`path` "fastmae": Triton's binding
    done once, `kernels.launch`) and through Triton's own path (`path` "triton"). The Triton rows are skipped
    with the reason where Triton cannot launch on `device`, and carry `interpreter: true` where they ran in the
    CPU interpreter (a code-path check)."""
    from ..kernels.utils import interpreter_enabled

    device = torch.device(device)
    interp = device.type == "cpu" and interpreter_enabled()
    burst, bursts = LAUNCH_QUICK if quick else (LAUNCH_BURST, LAUNCH_BURSTS)
    x = torch.zeros(1, device=device)
    head = {"kind": "limit", "op": "launch", "case": case, "dtype": "float32"}
    records = [{**head, "backend": "torch", "shape": {"arguments": 2, "elements": 1}, "what": "x.add_(1)",
                "status": "ok", "host_us": host_us_per_call(lambda: x.add_(1), device, burst, bursts),
                "burst": burst}]
    reason = triton_launch_reason(device, allow_interpreter)
    probes = [(what, n_args, fn_name, path)
              for what, n_args, fn_name in (("probe small", 1, "launch_small"), ("probe wide", 25, "launch_wide"))
              for path in ("fastmae", "triton")]
    for what, n_args, fn_name, path in probes:
        rec = {**head, "backend": "triton", "shape": {"arguments": n_args, "elements": 1}, "path": path,
               "what": what + ("" if path == "fastmae" else ", Triton's launch path")}
        if reason:
            records.append({**rec, "status": "skipped", "reason": reason})
            continue
        try:
            from ..kernels import probe

            launch = getattr(probe, fn_name)
            kept = path == "fastmae"
            us = host_us_per_call(lambda: launch(x, kept=kept), device,
                                  *(LAUNCH_QUICK if interp else (burst, bursts)))
        except Exception as exc:  # noqa: BLE001 (one probe's failure is its record's, not the run's)
            records.append({**rec, "status": "failed", "reason": error_line(exc)})
            continue
        records.append({**rec, "status": "ok", "host_us": us, "burst": LAUNCH_QUICK[0] if interp else burst,
                        **({"interpreter": True} if interp else {})})
    return records


def launch_line(records: list[dict]) -> str | None:
    """One sentence of the launch costs in `records` (bench ops' own), or None when there are none."""
    rows = [r for r in records if r.get("kind") == "limit" and r.get("op") == "launch"
            and r.get("case", "bench ops") == "bench ops" and r.get("status") == "ok"]
    if not rows:
        return None
    parts = []
    for r in rows:
        if r["backend"] == "torch":
            parts.append(f"PyTorch {r['what']} {r['host_us']:.3g} µs")
        else:
            n = r["shape"]["arguments"]
            path = "" if r.get("path") == "fastmae" else " (Triton's own launch path)"  # older records: Triton's
            parts.append(f"Triton{path}, {n} argument{'s' if n != 1 else ''}, {r['host_us']:.3g} µs"
                         + (" (in its CPU interpreter: a code-path check)" if r.get("interpreter") else ""))
    return "host time to issue one kernel, back to back: " + "; ".join(parts)
