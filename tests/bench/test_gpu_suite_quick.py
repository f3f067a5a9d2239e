"""`benchmarks/gpu_suite.sh --cpu-quick`: the one-shot script's code paths on the CPU with tiny shapes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from fastmae.bench.suite import read_parts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_suite.sh")


@pytest.mark.skipif(os.environ.get("FASTMAE_SUITE_RUNNING") == "1", reason="already inside gpu_suite.sh")
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_cpu_quick_suite(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FASTMAE_SUITE_CPU_QUICK"}
    env.update(PYTHON=sys.executable, FASTMAE_RESULTS_ROOT=str(tmp_path / "results"), OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", SCRIPT, "--cpu-quick"], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (slug,) = os.listdir(tmp_path / "results")
    (date,) = os.listdir(tmp_path / "results" / slug)
    run = tmp_path / "results" / slug / date
    parts = {p["name"]: p for p in read_parts(str(run / "parts.tsv"))}
    expected = {"wheels": "skipped", "install": "skipped", "gpu-tests": "skipped", "bench-ops": "ok",
                "priority": "ok", "encoder-vit-b": "ok", "encoder-vit-l": "skipped", "train-vit-b": "ok",
                "train-vit-l": "skipped"}
    assert {n: p["status"] for n, p in parts.items()} == expected, proc.stdout[-3000:]
    assert "CUDA only" in parts["gpu-tests"]["note"]
    for name in ("results.json", "results.csv", "priority.json", "summary.md", "ops.png",
                 "encoder_mae_vit_tiny_patch4.png", "train_mae_vit_tiny_patch4.png", "logs/bench-ops.log"):
        assert (run / name).is_file(), name
    summary = (run / "summary.md").read_text()
    assert "| bench-ops | ok |" in summary
    assert "| gpu-tests | skipped: the GPU test suite runs on CUDA only" in summary
    assert "## Key results" in summary and "of ideal" in summary
    assert "cpu attention:" in summary  # the measured order
    # with OUT set: three flat files, the tarball holding the run folder
    out = sorted(os.listdir(tmp_path / "out"))
    assert out == sorted(["summary.md", "results.json", f"results-{slug}-{date}.tar.gz"])
    with tarfile.open(tmp_path / "out" / f"results-{slug}-{date}.tar.gz") as tar:
        assert f"{slug}/{date}/results.json" in tar.getnames()
