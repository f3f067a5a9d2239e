"""`benchmarks/gpu_suite.sh --cpu-quick`: the one-shot script's code paths on the CPU with tiny shapes."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

from fastmae.bench.suite import read_parts

from ..utils import INTERPRETER_RUNS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_suite.sh")


def _probe_wheel(folder) -> str:
    """A minimal pure-Python wheel (one module), as a carried wheel would be; returns its module name."""
    import zipfile

    name, version = "fastmae_suite_probe", "0.0.1"
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}.py": "VALUE = 1\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n"
    folder.mkdir()
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return name


@pytest.mark.skipif(os.environ.get("FASTMAE_SUITE_RUNNING") == "1", reason="already inside gpu_suite.sh")
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_cpu_quick_suite(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FASTMAE_SUITE_CPU_QUICK"}
    env.update(PYTHON=sys.executable, FASTMAE_RESULTS_ROOT=str(tmp_path / "results"), OUT=str(tmp_path / "out"))
    # carried wheels: installed into a folder of the run's own (not this environment), removed at the end
    probe = _probe_wheel(tmp_path / "wheels")
    env["FASTMAE_SUITE_WHEELS"] = str(tmp_path / "wheels")
    proc = subprocess.run(["bash", SCRIPT, "--cpu-quick"], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (slug,) = os.listdir(tmp_path / "results")
    (date,) = os.listdir(tmp_path / "results" / slug)
    run = tmp_path / "results" / slug / date
    parts = {p["name"]: p for p in read_parts(str(run / "parts.tsv"))}
    assert "Successfully installed fastmae-suite-probe-0.0.1" in (run / "logs" / "wheels.log").read_text()
    target = re.search(r"wheels: starting .* --target (\S+)", proc.stdout).group(1)
    assert not os.path.exists(target)  # the wheels' folder went with the run
    assert subprocess.run([sys.executable, "-c", f"import {probe}"], capture_output=True).returncode != 0
    expected = {"wheels": "ok", "install": "skipped", "warm": "ok", "gpu-tests": "ok", "bench-ops": "ok",
                "priority": "ok", "bench-attention": "ok", "encoder-vit-b": "ok", "encoder-vit-l": "skipped",
                "train-vit-b": "ok", "train-vit-l": "skipped", "train-compile-vit-b": "skipped",
                "tune-loss": "ok" if INTERPRETER_RUNS else "skipped", "tune": "ok" if INTERPRETER_RUNS else "skipped"}
    assert {n: p["status"] for n, p in parts.items()} == expected, proc.stdout[-3000:]
    # the sharded test runner ran a few CPU tests, each shard with its own verbose log
    shard_logs = sorted((run / "logs").glob("tests-shard*.log"))
    assert shard_logs and all(" PASSED " in p.read_text() for p in shard_logs)
    assert "failed" not in (run / "logs" / "gpu-tests.log").read_text()
    for name in ("results.json", "results.csv", "priority.json", "summary.md", "ops.png",
                 "encoder_mae_vit_tiny_patch4.png", "train_mae_vit_tiny_patch4.png", "logs/bench-ops.log"):
        assert (run / name).is_file(), name
    if INTERPRETER_RUNS:
        tuned = json.loads((run / "attention_tuned.json").read_text())  # the tuners' tables, in the run folder
        assert tuned["measured"]["sm_90"] and (run / "tune.json").is_file()
        tuned = json.loads((run / "loss_tuned.json").read_text())
        assert set(tuned["measured"]["sm_90"]) == {"fwd", "bwd"} and (run / "tune_loss.json").is_file()
        summary = (run / "summary.md").read_text()
        assert "## Tuned launch settings" in summary and "- masked-MSE loss fwd [fp32,fp32,C3,p4,norm1" in summary
    # the warm-up recorded a tiny model's launches and compiled them for sm_90 through Triton's launch path
    warm = json.loads((run / "warm.json").read_text())
    assert warm["arch"] == 90 and warm["results"] and all(r["ok"] for r in warm["results"]), warm
    summary = (run / "summary.md").read_text()
    assert "| bench-ops | ok |" in summary
    assert "| gpu-tests | ok |" in summary
    assert "| warm | ok (" in summary and "distinct launches warmed" in summary  # ran beside the tests
    assert "## Key results" in summary and "of ideal" in summary
    assert "- launch: host time to issue one kernel, back to back: PyTorch x.add_(1)" in summary
    assert "cpu attention:" in summary  # the measured order
    # the training part ran with --profile: each step's profiled share, in the records and the summary
    trains = [r for r in json.loads((run / "results.json").read_text()) if r.get("kind") == "train"
              and r.get("status") == "ok"]
    assert trains and all(r["profile"]["busy_ms"] > 0 and r["busy_share"] > 0 for r in trains)
    assert "CPU operators busy" in summary
    # with OUT set: three flat files, the tarball holding the run folder
    out = sorted(os.listdir(tmp_path / "out"))
    assert out == sorted(["summary.md", "results.json", f"results-{slug}-{date}.tar.gz"])
    with tarfile.open(tmp_path / "out" / f"results-{slug}-{date}.tar.gz") as tar:
        assert f"{slug}/{date}/results.json" in tar.getnames()


def test_shards_put_the_named_cases_first_and_cover_every_id():
    from fastmae.bench.suite import shard

    ids = [f"t.py::a[{d}-{i}]" for i in range(5) for d in ("cpu", "cuda")]
    shards = shard(ids, 3, first=("cuda",))
    assert sorted(i for s in shards for i in s) == sorted(ids)
    assert all("cuda" in s[0] for s in shards)  # each shard starts with CUDA cases
    assert shard(ids[:2], 8) == [[ids[0]], [ids[1]]]  # no empty shards


def test_sharded_runner_reports_a_failure(tmp_path):
    (tmp_path / "test_demo.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('i', range(4))\ndef test_ok(i):\n    assert i < 4\n\n\n"
        "def test_bad():\n    assert 1 == 2\n")
    proc = subprocess.run([sys.executable, "-m", "fastmae.bench.suite", "tests", "--jobs", "2", "--logs",
                           str(tmp_path / "logs"), "--", "test_demo.py"], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "5 tests in 2 shards" in proc.stdout and "FAILED test_demo.py::test_bad" in proc.stdout
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("tests-shard*.log")))
    assert logs.count(" PASSED ") == 4 and logs.count(" FAILED ") == 1


@pytest.mark.skipif(os.environ.get("FASTMAE_SUITE_RUNNING") == "1", reason="already inside gpu_suite.sh")
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_a_run_stopped_from_outside_leaves_its_parts_in_out(tmp_path):
    """With OUT set the run folder is copied there after every part: stop the suite after its first measured
    part and the tarball in OUT already holds that part's results and its line in parts.tsv. (Only the parts
    FASTMAE_SUITE_PARTS selects run: the others are recorded as skipped, not selected.)"""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k != "FASTMAE_SUITE_CPU_QUICK"}
    env.update(PYTHON=sys.executable, FASTMAE_RESULTS_ROOT=str(tmp_path / "results"), OUT=str(tmp_path / "out"),
               FASTMAE_SUITE_PARTS="bench-ops,bench-attention,encoder-vit-b")  # the run goes on after bench-ops
    proc = subprocess.Popen(["bash", SCRIPT, "--cpu-quick"], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (tmp_path / "out" / "results.json").is_file():
            time.sleep(0.2)  # results.json reaches OUT once bench-ops has recorded and finished
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    out = tmp_path / "out"
    (tarball,) = [p for p in os.listdir(out) if p.endswith(".tar.gz")]
    with tarfile.open(out / tarball) as tar:
        names = tar.getnames()
        parts_name = next(n for n in names if n.endswith("/parts.tsv"))
        parts = tar.extractfile(parts_name).read().decode()
    assert any(n.endswith("/results.json") for n in names)
    assert "bench-ops\tok" in parts and "gpu-tests\tskipped\t\t0\tnot selected (FASTMAE_SUITE_PARTS=" in parts
    assert not (out / "summary.md").exists()  # the run never reached its summary


def test_parts_are_selected_by_known_names_only():
    """FASTMAE_SUITE_PARTS names parts of the script's list, which holds every part it runs (set-up aside); an
    unknown name stops the script before anything runs."""
    text = open(SCRIPT, encoding="utf-8").read()
    listed = set(re.search(r'^PARTS="([^"]*)"', text, re.M).group(1).replace("\\\n", " ").split())
    ran = set(re.findall(r"\b(?:run_part|bg_start|tune_part) ([a-z][\w-]*) ", text))
    assert ran - {"wheels", "install"} == listed, (ran, listed)
    env = {**os.environ, "FASTMAE_SUITE_PARTS": "bench-ops,bench-opps", "FASTMAE_RESULTS_ROOT": "/nonexistent"}
    proc = subprocess.run(["bash", SCRIPT, "--cpu-quick"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown part bench-opps (parts: warm gpu-tests" in proc.stderr, proc.stderr
    assert proc.stdout == ""


@pytest.mark.skipif(os.environ.get("FASTMAE_SUITE_RUNNING") == "1", reason="already inside gpu_suite.sh")
def test_the_suite_does_not_start_itself_from_its_test_part(tmp_path):
    """gpu_suite.sh runs the test suite with FASTMAE_SUITE_RUNNING=1: there the test above must skip, or the
    GPU run would spend its test part on a nested CPU-quick run."""
    env = {**os.environ, "FASTMAE_SUITE_RUNNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           f"{__file__}::test_cpu_quick_suite"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "1 skipped" in proc.stdout and "already inside gpu_suite.sh" in proc.stdout, \
        proc.stdout[-2000:] + proc.stderr[-2000:]


def test_the_gpu_parts_cover_every_training_variant():
    """The GPU mode splits `bench train` into an eager part per model and a torch.compile part: together they
    name every variant, and the compile part times the eager pair its speedups are stated against."""
    from fastmae.bench.train_bench import VARIANTS
    text = open(SCRIPT, encoding="utf-8").read()
    eager = re.search(r"^TRAIN_EAGER=(\S+)$", text, re.M).group(1).split(",")
    eager_b = re.search(r"^TRAIN_EAGER_B=\$TRAIN_EAGER,(\S+)$", text, re.M).group(1).split(",")
    assert re.search(r'--variants "\$TRAIN_EAGER_B"', text)
    eager += eager_b
    compiled = re.search(r"^TRAIN_COMPILE=(\S+)$", text, re.M).group(1).split(",")
    assert set(eager) | set(compiled) == set(VARIANTS)
    assert not any(VARIANTS[v]["compile"] for v in eager)
    assert {"official-eager", "reference+compile"} <= set(compiled)


def test_the_gpu_tests_part_selects_what_runs_on_cuda():
    """The GPU run's test part is `-m "cuda and not slow"`: tests/conftest.py marks `cuda` the CUDA case of every
    device-parametrized test and every test marked gpu, before `-m` deselects; CPU cases are left out."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "cuda and not slow", "tests/bench/test_model_bench.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert any("test_graph_replay_matches_eager" in i for i in ids), proc.stdout  # marked gpu
    assert not any(i.endswith("[cpu]") or "-cpu]" in i for i in ids), ids  # a device-parametrized test's CPU case
    assert not any("test_graphed_runner_flow" in i for i in ids), ids  # a CPU-only test
    with open(SCRIPT, encoding="utf-8") as f:
        assert 'tests -m "cuda and not slow"' in f.read()


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_parts_left_out_are_recorded_as_not_selected(tmp_path):
    """A run of one part records each other part as not selected, the ranking of bench-ops' results too (not as
    a part that found no results)."""
    env = {k: v for k, v in os.environ.items() if k != "FASTMAE_SUITE_CPU_QUICK"}
    env.update(PYTHON=sys.executable, FASTMAE_RESULTS_ROOT=str(tmp_path / "results"), FASTMAE_SUITE_PARTS="train-vit-l")
    proc = subprocess.run(["bash", SCRIPT, "--cpu-quick"], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (run,) = (tmp_path / "results").glob("*/*")
    parts = {p["name"]: p for p in read_parts(str(run / "parts.tsv"))}
    for name in ("bench-ops", "priority", "bench-attention"):
        assert parts[name]["status"] == "skipped" and parts[name]["note"].startswith("not selected"), parts[name]
