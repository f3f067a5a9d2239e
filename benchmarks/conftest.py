"""pytest-benchmark set-up for `pytest benchmarks/` (not part of `make test`).

The cases are the ones `fastmae bench` runs, imported from `fastmae.bench`. The device is CUDA when torch
sees one (or FASTMAE_BENCH_DEVICE=cpu|cuda); on CUDA every benchmarked function ends with
`torch.cuda.synchronize()`, so pytest-benchmark's wall clock covers the GPU work. On the CPU the cases use
the quick sizes unless FASTMAE_BENCH_QUICK=0, and FASTMAE_BENCH_THREADS (default auto) sets torch's threads.
Triton is not timed under its CPU interpreter.

    pytest benchmarks/ --benchmark-sort=name --benchmark-columns=median,iqr,rounds
"""
from __future__ import annotations

import os

import torch

from fastmae.bench.cli import cpu_threads
from fastmae.bench.common import env_settings

DEVICE, DTYPE, QUICK = env_settings()
if DEVICE.type == "cpu":  # as `fastmae bench --threads auto`: the cores the load average leaves idle
    torch.set_num_threads(cpu_threads(os.environ.get("FASTMAE_BENCH_THREADS", "auto")))


def pytest_report_header(config):
    return f"fastmae benchmarks: device {DEVICE}, dtype {DTYPE}, {'quick' if QUICK else 'full'} sizes"
