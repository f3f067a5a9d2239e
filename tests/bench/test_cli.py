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
    # the run was made with --quick, which its records say: no result to show
    assert all(r.get("quick") for r in json.loads((run_dir / "results.json").read_text()))
    assert main(["bench", "readme", "--results", str(root), "--readme", str(path)]) == 0
    assert "No CPU results recorded yet" in path.read_text() and "No GPU results recorded yet" in path.read_text()
    # the same records as a full run's
    copied = root / "cpu-x" / "2099-01-01" / "results.json"
    copied.write_text(json.dumps([{k: v for k, v in r.items() if k != "quick"}
                                  for r in json.loads(copied.read_text())]))
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
    for argv in (["encoder", "--backends", ","], ["train", "--variants", " , "], ["attention", "--impls", ","],
                 ["ops", "--ops", ","]):  # a list that names nothing: not "run nothing" or "the defaults"
        assert main(["bench", *argv, "--quick"]) == 2, argv
        assert "names nothing" in capsys.readouterr().err
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


# ------------------------------------------------------------------------------------------ paths and files
def test_path_flags_expand_a_leading_tilde(monkeypatch, tmp_path):
    """`--out=~/x` reaches the command as written (the shell expands no `~` after `=`): every path flag expands it
    itself, and `bench tune --write` alone still means the kernels' own file."""
    from fastmae.cli import build_parser

    monkeypatch.setenv("HOME", str(tmp_path))
    parser = build_parser()
    home = str(tmp_path)
    for argv, attr in [(["bench", "ops", "--out=~/bo"], "out"), (["bench", "train", "--out", "~/bo"], "out"),
                       (["bench", "ops", "--write-priority=~/bo"], "write_priority"),
                       (["bench", "ops", "--rank-from=~/bo"], "rank_from"),
                       (["bench", "readme", "--results=~/bo"], "results"),
                       (["bench", "readme", "--readme=~/bo"], "readme"),
                       (["bench", "tune", "--out=~/bo"], "out"), (["bench", "tune", "--write=~/bo"], "write")]:
        assert getattr(parser.parse_args(argv), attr) == f"{home}/bo", argv
    assert parser.parse_args(["bench", "tune", "--write"]).write == ""  # the kernels' attention_tuned.json
    assert parser.parse_args(["bench", "tune", "--write="]).write == ""
    assert parser.parse_args(["bench", "tune"]).write is None and parser.parse_args(["bench", "ops"]).out is None


def test_a_tilde_out_folder_is_written_in_home(monkeypatch, tmp_path, capsys):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert main(["bench", "train", "--quick", "--device", "cpu", "--no-progress", "--threads", "1", "--no-plots",
                 "--variants", "fastmae", "--out=~/bo"]) == 0
    assert (home / "bo" / "results.json").is_file() and list(cwd.iterdir()) == []  # no folder named "~"
    assert main(["bench", "ops", "--rank-from=~/bo", "--write-priority=~/prio.json"]) == 2  # train records only
    assert f"{home}/bo holds no successful op measurements" in error_line(capsys.readouterr().err, "bench ops")
    assert list(cwd.iterdir()) == []


def test_warm_json_expands_a_leading_tilde(monkeypatch, tmp_path, capsys):
    from fastmae.bench import warm
    from fastmae.kernels import compile_check

    monkeypatch.setattr(compile_check, "interpreter_active", lambda: False)  # the tests' TRITON_INTERPRET
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    monkeypatch.setattr(warm, "collect", lambda workloads, arch: ([], []))
    monkeypatch.setattr(warm, "warm", lambda recipes, workers, arch, launchers, timeout_s: ([], []))
    monkeypatch.setattr(warm, "summary", lambda *a: "summary")
    assert warm.main(["--arch", "90", "--quick", "--json=~/warm.json"]) == 0
    assert json.loads((tmp_path / "home" / "warm.json").read_text())["arch"] == 90
    assert not (tmp_path / "~").exists()


@pytest.fixture
def no_measuring(monkeypatch):
    """Any measurement fails the test: what is checked must be checked before."""
    from fastmae.bench import limits

    def refuse(*a, **k):
        raise AssertionError("measured before the arguments were checked")

    monkeypatch.setattr(limits, "measure_limits", refuse)
    monkeypatch.setattr(limits, "measure_matmul_tflops", refuse)


@pytest.mark.parametrize("content, what", [
    ("", "empty, not a list of records"), ("  \n", "empty, not a list of records"),
    ('[{"kind": "op", ', "not JSON, or cut short"), ("results", "not JSON, or cut short"),
    ("[1]", "expected a list of records, item 0 is a JSON number"),
    ('{"kind": "op"}', "expected a list of records, found a JSON object")])
@pytest.mark.parametrize("what_cmd", ["train", "ops"])
def test_an_out_folder_with_a_broken_results_file_is_refused_up_front(tmp_path, capsys, no_measuring, content, what,
                                                                       what_cmd):
    from fastmae.bench import records

    (tmp_path / "results.json").write_text(content)
    assert main(["bench", what_cmd, "--quick", "--no-progress", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert f"{tmp_path / 'results.json'}: {what}" in error_line(captured.err, f"bench {what_cmd}")
    assert captured.out == "" and (tmp_path / "results.json").read_text() == content  # left as it was
    assert not records._UNWRITTEN  # nothing for the exit hook to retry


def test_a_broken_results_file_ends_without_an_exit_traceback(tmp_path):
    """In a real process: one error line, exit 2, and no "Exception ignored in atexit callback" after it."""
    import subprocess
    import sys

    (tmp_path / "results.json").write_text("")
    res = subprocess.run([sys.executable, "-m", "fastmae", "bench", "train", "--quick", "--no-progress",
                          "--variants", "fastmae", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and res.stdout == "" and "Exception ignored" not in res.stderr
    assert error_line(res.stderr, "bench train") == (
        f"fastmae bench train: error: {tmp_path / 'results.json'}: empty, not a list of records")


def test_rank_from_a_file_that_is_not_json_names_it(tmp_path, capsys):
    bad = tmp_path / "results.json"
    bad.write_text("not json")
    for source in (bad, tmp_path):  # the file, or its folder
        assert main(["bench", "ops", "--rank-from", str(source), "--write-priority", str(tmp_path / "p.json")]) == 2
        assert f"error: {bad}: not JSON, or cut short" in error_line(capsys.readouterr().err, "bench ops", alone=True)
    assert not (tmp_path / "p.json").exists()


def test_a_priority_file_that_cannot_be_written_is_refused_up_front(tmp_path, capsys, no_measuring):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    not_json = tmp_path / "priority.json"
    not_json.write_text("not json")
    for path, why in [(a_file / "p.json", "cannot write there"), (tmp_path, "cannot write there (it is a folder"),
                      (not_json, "not a JSON order file"), (a_file, "not a JSON order file")]:
        for extra in ([], ["--rank-from", str(tmp_path / "none")]):  # measuring, or ranking a recorded run
            assert main(["bench", "ops", "--quick", "--no-progress", "--ops", "attention", "--write-priority",
                         str(path), *extra]) == 2
            captured = capsys.readouterr()
            assert f"--write-priority {path}: {why}" in error_line(captured.err, "bench ops", alone=True)
            assert captured.out == ""
    assert a_file.read_text() == "x" and not_json.read_text() == "not json"


# ------------------------------------------------------------------------------------------ mask ratios
@pytest.mark.parametrize("argv, message", [
    (["train", "--mask-ratio", "0.99"], "--mask-ratio 0.99 keeps none of the model's 64 patches"),
    (["train", "--model", "mae_vit_base_patch16", "--mask-ratio", "0.996"],
     "--mask-ratio 0.996 keeps none of the model's 196 patches"),
    (["encoder", "--ratios", "0.5,0.99"], "--ratios 0.99 keeps none of the model's 64 patches"),
    (["encoder", "--model", "mae_vit_huge_patch14", "--ratios", "0.997"],
     "--ratios 0.997 keeps none of the model's 256 patches"),
])
def test_a_mask_ratio_that_keeps_no_patch_is_refused_up_front(tmp_path, capsys, no_measuring, argv, message):
    out = tmp_path / "out"
    assert main(["bench", *argv, "--quick", "--no-progress", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert message in error_line(captured.err, f"bench {argv[0]}") and captured.out == ""
    assert not out.exists()


def test_num_patches_reads_the_preset_without_building_it():
    from fastmae.bench.common import num_patches

    assert [num_patches(m) for m in ("mae_vit_tiny_patch4", "mae_vit_base_patch16", "mae_vit_huge_patch14")] == \
        [64, 196, 256]


# ------------------------------------------------------------------------------------------ profile
def test_profile_table_caps_the_busy_share_with_a_note():
    """A share above 100% (the profiler's own overhead, above all on a CPU) shows as 100%* with the note why."""
    from fastmae.bench.cli import profile_table
    from fastmae.bench.records import BUSY_CAPPED_NOTE

    prof = {"kind": "cpu operators' own time", "busy_ms": 7.3, "calls": 1809, "by_kind": {"matmul": 2.5}}
    recs = [{"kind": "train", "status": "ok", "backend": "fastmae", "profile": prof, "busy_share": 1.21},
            {"kind": "train", "status": "ok", "backend": "official-eager", "profile": prof, "busy_share": 0.734}]
    text = profile_table(recs)
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:] if line.split()[0] in
            ("fastmae", "official-eager")}
    assert rows["fastmae"][2] == "100%*" and rows["official-eager"][2] == "73%"
    assert "121%" not in text and text.rstrip().endswith(BUSY_CAPPED_NOTE)
    recs[0]["busy_share"] = 1.004  # rounds to 100%: nothing to cap
    text = profile_table(recs)
    assert "100%*" not in text and BUSY_CAPPED_NOTE not in text and " 100% " in text


# ------------------------------------------------------------------------------------------ fastmae info
@pytest.mark.parametrize("env, shown", [
    ("", "auto (FASTMAE_BACKEND unset: the automatic order)"),
    ("gather_tokens=reference", "gather_tokens=reference; the other ops auto (from FASTMAE_BACKEND)"),
    ("attention=sdpa,gather_tokens=reference",
     "attention=sdpa, gather_tokens=reference; the other ops auto (from FASTMAE_BACKEND)"),
    ("reference", "reference for every op (from FASTMAE_BACKEND)"),
])
def test_info_shows_the_whole_backend_request(monkeypatch, capsys, env, shown):
    monkeypatch.setenv("FASTMAE_BACKEND", env)
    assert main(["info", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert f"\n  backend   {shown}\n" in out
    # the automatic choice is the automatic order's, whatever the variable asks (shown above it)
    assert "  attention  (automatic choice: sdpa)\n" in out and "  gather_tokens  (automatic choice: sdpa)\n" in out


def test_info_names_fastmae_backend_in_its_error(monkeypatch, capsys):
    monkeypatch.setenv("FASTMAE_BACKEND", "bogus")
    assert main(["info", "--dtype", "float32"]) == 2
    captured = capsys.readouterr()
    assert "FASTMAE_BACKEND=bogus: unknown backend 'bogus'" in error_line(captured.err, "info", alone=True)
    assert captured.out == ""


def test_a_run_whose_every_case_failed_exits_1(monkeypatch, capsys):
    """A benchmark whose every case that ran raised exits with status 1 and says so last (the GPU suite's summary
    then shows the part failed, with that line); cases failing beside measured ones are counted and exit 0."""
    from fastmae.bench import encoder_bench

    runner = encoder_bench.make_encoder_runner

    def broken(model, *a, **k):
        if model.backend in broken.backends:
            raise RuntimeError("kernel exploded")
        return runner(model, *a, **k)

    monkeypatch.setattr(encoder_bench, "make_encoder_runner", broken)
    argv = ["bench", "encoder", "--quick", "--device", "cpu", "--no-progress", "--threads", "1", "--ratios", "0.75",
            "--backends", "reference,sdpa", "--modes", "fwd"]
    broken.backends = ("reference", "sdpa")
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "kernel exploded" in captured.out
    assert captured.err.strip().splitlines()[-1] == "fastmae bench encoder: every case failed (4)"
    broken.backends = ("sdpa",)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == "2 of 4 cases failed: their errors are in the status column"
    assert "failed" not in captured.err
    broken.backends = ("reference",)  # and triton, which the benchmark skips on a CPU
    assert main(argv[:-3] + ["reference,triton", "--modes", "fwd"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fastmae bench encoder: every case that ran failed (2 of 4; the others were skipped)")
