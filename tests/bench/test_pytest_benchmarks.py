"""`pytest benchmarks/` (pytest-benchmark; not part of make test itself) still collects and runs: every case at
the quick sizes with one round, so the benchmark files cannot rot between the runs that time them."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_pytest_benchmarks_run_at_quick_sizes(tmp_path):
    pytest.importorskip("pytest_benchmark")
    # not an xdist worker (make test runs under xdist, which pytest-benchmark reads from the environment and then
    # turns itself off): the child times its cases
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(FASTMAE_BENCH_QUICK="1", FASTMAE_BENCH_DEVICE="cpu", FASTMAE_BENCH_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/",
                           "--benchmark-max-time=0.001", "--benchmark-min-rounds=1", "--benchmark-warmup=off",
                           f"--benchmark-storage={tmp_path}", f"--benchmark-json={tmp_path / 'run.json'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
    # and timed them: pytest-benchmark was on (its figures are in the JSON, one entry per case that ran)
    timed = json.loads((tmp_path / "run.json").read_text())["benchmarks"]
    passed = int(re.search(r"(\d+) passed", proc.stdout).group(1))
    assert len(timed) == passed and all(b["stats"]["median"] > 0 for b in timed), tail
