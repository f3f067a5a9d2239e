"""`fastmae bench ...` end to end in quick mode: output files, clear errors, the README block."""
from __future__ import annotations

import json
import shutil

import pytest

from fastmae.bench import readme
from fastmae.bench.records import fmt
from fastmae.cli import main
from tests.utils import error_line


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One quick run of ops (two ops), encoder and train into one folder, as the suite does."""
    out = tmp_path_factory.mktemp("run")
    common = ["--quick", "--device", "cpu", "--no-progress", "--threads", "1", "--out", str(out)]
    assert main(["bench", "ops", "--ops", "attention,masked_mse_loss", "--no-plots", *common]) == 0
    assert main(["bench", "encoder", "--ratios", "0.75", "--backends", "reference,sdpa", "--modes", "fwd",
                 "--no-plots", *common]) == 0
    assert main(["bench", "train", "--variants", "official-eager,fastmae,fastmae+compile,fastmae+lean", *common]) == 0
    return out


def test_out_folder_holds_json_csv_and_plots(run_dir, capsys):
    recs = json.loads((run_dir / "results.json").read_text())
    kinds = {r["kind"] for r in recs}
    assert kinds == {"limit", "op", "encoder", "train"}
    for r in recs:  # every record stamped
        assert r["device_type"] == "cpu" and r["torch"] and r["git_commit"] and r["date"]
    enc = [r for r in recs if r["kind"] == "encoder"]
    assert sorted(r["mask_ratio"] for r in enc) == [0.0, 0.0, 0.75, 0.75]  # ratio 0 added as the baseline
    assert all("of_ideal" in r for r in enc)  # speedups reach the file
    train = {r["backend"]: r for r in recs if r["kind"] == "train"}
    assert train["fastmae+compile"]["status"] == "skipped" and "--compile" in train["fastmae+compile"]["reason"]
    assert train["fastmae"]["status"] == "ok" and "mfu" in train["fastmae"]
    assert train["fastmae+lean"]["status"] == "ok" and train["fastmae+lean"]["mem_vs_official_eager"] > 0
    # activations kept for the backward, per image: fastmae's path keeps less than the official order of
    # operations, and lean_blocks less again (deterministic byte counts, not timings)
    saved = {v: train[v]["saved_mb_per_image"] for v in ("official-eager", "fastmae", "fastmae+lean")}
    assert saved["official-eager"] > saved["fastmae"] > saved["fastmae+lean"] > 0, saved
    assert "saved_mb_per_image" not in train["fastmae+compile"]
    assert list(train) == ["fastmae", "official-eager", "fastmae+lean", "fastmae+compile"]  # compiled ones last
    assert (run_dir / "results.csv").read_text().count("\n") == len(recs) + 1
    pngs = sorted(p.name for p in run_dir.glob("*.png"))
    assert pngs == ["encoder_mae_vit_tiny_patch4.png", "ops.png", "train_mae_vit_tiny_patch4.png"]


def test_rank_from_writes_the_priority_file(run_dir, tmp_path, capsys):
    path = tmp_path / "priority.json"
    assert main(["bench", "ops", "--rank-from", str(run_dir), "--write-priority", str(path)]) == 0
    data = json.loads(path.read_text())
    assert set(data["cpu"]) == {"attention", "masked_mse_loss"}
    assert set(data["cpu"]["attention"]) == {"reference", "sdpa"}  # triton/xformers never served here
    assert data["source"]["cpu"]["torch"] and "geometric mean" in data["source"]["cpu"]["metric"]


def test_readme_block_is_rendered_from_the_files(run_dir, tmp_path, capsys):
    root = tmp_path / "results"
    shutil.copytree(run_dir, root / "cpu-x" / "2099-01-01")
    text = "# fastmae\n\nintro\n\n" + readme.START + "\nold stuff\n" + readme.END + "\n\n## After\n"
    path = tmp_path / "README.md"
    path.write_text(text)
    assert main(["bench", "readme", "--results", str(root), "--readme", str(path)]) == 0
    new = path.read_text()
    assert new.startswith("# fastmae\n\nintro\n\n" + readme.START) and new.endswith(readme.END + "\n\n## After\n")
    assert "old stuff" not in new
    recs = json.loads((run_dir / "results.json").read_text())
    assert recs[0]["device"] in new and recs[0]["git_commit"][:12] in new  # stamped from the files
    assert "No GPU results recorded yet" in new
    enc = next(r for r in recs if r["kind"] == "encoder" and r["mask_ratio"] == 0.75 and r["backend"] == "sdpa")
    assert f"({enc['speedup']:.2f}x, {enc['of_ideal']:.0%})" in new
    assert "| official-eager |" in new and "![encoder_mae_vit_tiny_patch4](results/cpu-x/2099-01-01/" in new
    train = {r["backend"]: r for r in recs if r["kind"] == "train"}
    assert f"| fused, {fmt(train['fastmae']['optimizer_ms'])} ms |" in new  # the AdamW step column
    assert f"| for-loop, {fmt(train['official-eager']['optimizer_ms'])} ms |" in new
    assert main(["bench", "readme", "--results", str(root), "--readme", str(path)]) == 0
    assert path.read_text() == new  # idempotent
    path.write_text("no markers\n")
    assert main(["bench", "readme", "--results", str(root), "--readme", str(path)]) == 2
    assert "bench-results:start" in capsys.readouterr().err


def test_clear_errors(capsys):
    assert main(["bench", "ops", "--quick", "--backends", "cuda-magic"]) == 2
    assert "unknown backend" in capsys.readouterr().err
    assert main(["bench", "encoder", "--quick", "--model", "vit_giant"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["bench", "encoder", "--quick", "--ratios", "0.5,1.5"]) == 2
    assert "[0, 1)" in capsys.readouterr().err
    assert main(["bench"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["bench", "train", "--help"])
    assert exc.value.code == 0 and "--no-compile" in capsys.readouterr().out


def test_readme_ops_table_shows_the_host_time_of_hidden_launches():
    """A GPU op record timed with the launch hidden shows its host time beside the GPU's, with a footnote."""
    from fastmae.bench.readme import ops_section

    base = {"kind": "op", "op": "gather_tokens", "case": "enc-B", "mode": "fwd+bwd", "status": "ok",
            "dtype": "bfloat16", "shape": {"B": 64}, "device_type": "cuda"}
    recs = [{**base, "backend": "reference", "median_ms": 0.05, "speedup": 1.0, "host_ms": 0.08,
             "launch_hidden": True},
            {**base, "backend": "triton", "median_ms": 0.01, "speedup": 5.0, "host_ms": 0.06, "launch_hidden": True}]
    launch = {"kind": "limit", "op": "launch", "case": "bench ops", "backend": "torch", "what": "x.add_(1)",
              "shape": {"arguments": 2, "elements": 1}, "status": "ok", "host_us": 9.87, "dtype": "float32"}
    text = "\n".join(ops_section(recs + [launch]))
    assert "0.01 ms 5.00x, host 0.06 ms" in text and "0.05 ms, host 0.08 ms" in text
    assert "host's time to issue the call" in text
    assert "The host time to issue one kernel, back to back: PyTorch x.add_(1) 9.87 µs." in text
    assert "Limits measured" not in text  # a launch row is not a matmul or copy limit
    cpu = "\n".join(ops_section([{**r, "device_type": "cpu", "launch_hidden": False} for r in recs]))
    assert "host" not in cpu


def test_training_ratios_agree_across_two_runs_into_one_folder(tmp_path):
    """As the GPU suite times the eager variants, then the compiled ones with the eager pair again: after the
    second run every ratio in the folder is against the official-eager record the folder keeps."""
    common = ["--quick", "--device", "cpu", "--no-progress", "--threads", "1", "--no-plots", "--out", str(tmp_path)]
    assert main(["bench", "train", "--variants", "fastmae,official-eager,fastmae+lean", *common]) == 0
    assert main(["bench", "train", "--variants", "fastmae,official-eager", *common]) == 0
    recs = {r["backend"]: r for r in json.loads((tmp_path / "results.json").read_text()) if r["kind"] == "train"}
    assert set(recs) == {"fastmae", "official-eager", "fastmae+lean"}
    base = recs["official-eager"]
    for r in recs.values():
        assert r["vs_official_eager"] == pytest.approx(r["images_per_s"] / base["images_per_s"], rel=1e-12)
        assert r["mem_vs_official_eager"] == pytest.approx(r["peak_mem_mb"] / base["peak_mem_mb"], rel=1e-12)


@pytest.mark.parametrize("argv, message", [
    (["ops", "--ops", "bogus"], "unknown op 'bogus'"),
    (["ops", "--models", "B,X"], "unknown model size 'X'"),
    (["ops", "--device", "bogus"], "--device 'bogus' is not a device"),
    (["attention", "--models", "X"], "unknown model size 'X'"),
    (["encoder", "--device", "meta"], "this command runs on cpu or cuda"),
    (["encoder", "FASTMAE_BACKEND=bogus"], "FASTMAE_BACKEND=bogus: unknown backend 'bogus'"),
])
def test_bad_values_are_refused_before_anything_is_measured(tmp_path, capsys, monkeypatch, argv, message):
    from fastmae.bench import limits

    for arg in [a for a in argv if a.startswith("FASTMAE_BACKEND=")]:
        monkeypatch.setenv("FASTMAE_BACKEND", arg.partition("=")[2])
        argv = [a for a in argv if a != arg]

    def no_measuring(*a, **k):
        raise AssertionError("measured before the arguments were checked")

    monkeypatch.setattr(limits, "measure_limits", no_measuring)
    monkeypatch.setattr(limits, "measure_matmul_tflops", no_measuring)
    out = tmp_path / "new" / "out"
    assert main(["bench", *argv, "--quick", "--no-progress", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert message in error_line(captured.err, f"bench {argv[0]}")
    assert captured.out == ""  # not even the header
    assert list(tmp_path.iterdir()) == []  # no empty --out folder left behind


@pytest.mark.parametrize("what", ["ops", "encoder", "train"])
@pytest.mark.parametrize("flag, value, what_it_must_be", [
    ("--batch", "0", "a positive integer"), ("--batch", "-1", "a positive integer"),
    ("--max-time", "-1", "a non-negative number")])  # --max-time 0: the minimum repetitions only
def test_sizes_and_times_out_of_range_are_refused(capsys, what, flag, value, what_it_must_be):
    with pytest.raises(SystemExit) as exc:
        main(["bench", what, "--quick", flag, value])
    assert exc.value.code == 2
    assert f"argument {flag}: must be {what_it_must_be}" in error_line(capsys.readouterr().err, f"bench {what}")


def test_an_out_folder_that_cannot_be_written_is_refused(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        assert main(["bench", "train", "--quick", "--no-progress", "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert f"--out {out}: cannot write there" in error_line(captured.err, "bench train") and captured.out == ""


def test_train_help_lists_every_variant(capsys, monkeypatch):
    from fastmae.bench.train_bench import VARIANTS

    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside a hyphenated name

    with pytest.raises(SystemExit):
        main(["bench", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    description = text.split("options:")[0]
    for v in VARIANTS:
        assert v in description, v
