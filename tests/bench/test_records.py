"""Records: the environment stamp, the merge into results.json, the CSV, device folder names."""
from __future__ import annotations

import csv
import json
import os
import re

import pytest

from fastmae.bench import records


def test_environment_stamp_has_every_field():
    env = records.environment("cpu")
    for field in records.STAMP_FIELDS:
        assert field in env and env[field], field
    assert env["device_type"] == "cpu"
    assert env["torch"].split("+")[0].count(".") >= 1
    assert env["git_commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", env["git_commit"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", env["date"])


def test_the_stamp_names_a_backend_chosen_through_the_environment(monkeypatch):
    monkeypatch.delenv("FASTMAE_BACKEND", raising=False)
    assert "fastmae_backend_env" not in records.environment("cpu")
    monkeypatch.setenv("FASTMAE_BACKEND", "attention=reference")
    assert records.environment("cpu")["fastmae_backend_env"] == "attention=reference"


def test_a_stated_commit_wins_over_git(tmp_path, monkeypatch):
    """The commit the caller states in FASTMAE_COMMIT, marked as stated, inside a checkout too (a copy may carry a
    stale .git folder); without it git's answer, or "unknown" outside a checkout."""
    monkeypatch.delenv(records.COMMIT_ENV, raising=False)
    assert records.git_commit(str(tmp_path)) == "unknown"
    read = records.git_commit()
    assert read == "unknown" or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", read)
    monkeypatch.setenv(records.COMMIT_ENV, "0123abcd" * 5)
    for repo in (str(tmp_path), records.REPO_ROOT):
        assert records.git_commit(repo) == "0123abcd" * 5 + " (from FASTMAE_COMMIT)"


def test_slugs_are_folder_names():
    assert records.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert records.slugify("Intel(R) Xeon(R) Platinum 8480+") == "intel-xeon-platinum-8480"
    assert re.fullmatch(r"cpu-[a-z0-9-]+", records.device_slug("cpu"))


def test_write_results_merges_by_key_and_writes_csv(tmp_path):
    a = {"kind": "op", "op": "attention", "backend": "sdpa", "mode": "fwd", "shape": {"B": 1}, "dtype": "float32",
         "status": "ok", "median_ms": 2.0, "device": "d"}
    b = dict(a, backend="reference", median_ms=3.0)
    records.write_results(str(tmp_path), [a, b])
    a2 = dict(a, median_ms=1.5)  # the same measurement again replaces the old one
    c = dict(a, shape={"B": 2})  # another shape is a new record
    merged = records.write_results(str(tmp_path), [a2, c])
    assert [r["median_ms"] for r in merged] == [3.0, 1.5, 2.0]
    assert json.loads((tmp_path / "results.json").read_text()) == merged
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and rows[1]["median_ms"] == "1.5" and rows[2]["shape"] == "B=2"


def test_write_csv_is_all_or_nothing(tmp_path, monkeypatch):
    """A failure while the CSV is written leaves the previous file as it was, and no stray file beside it."""
    path = tmp_path / "results.csv"
    records.write_csv(str(path), [{"op": "a", "median_ms": 1.0}])
    before = path.read_bytes()

    def broken(v):
        raise RuntimeError("stopped mid-write")

    monkeypatch.setattr(records, "_csv_value", broken)
    with pytest.raises(RuntimeError, match="mid-write"):
        records.write_csv(str(path), [{"op": "b", "median_ms": 2.0}])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_recorder_stamps_in_place_and_flushes(tmp_path):
    rec = records.Recorder(str(tmp_path), {"device": "d", "date": "x"})
    r = {"kind": "encoder", "model": "m", "backend": "sdpa", "mode": "fwd", "mask_ratio": 0.0, "status": "ok"}
    rec.add(r)
    r["speedup"] = 1.0  # figures added later reach the file at the next flush
    rec.flush()
    saved = records.read_results(str(tmp_path))
    assert saved[0]["device"] == "d" and saved[0]["speedup"] == 1.0


def test_recorder_writes_as_records_come_at_most_every_interval(tmp_path):
    """The first record is written at once, the next ones when `interval_s` has passed since the last write
    (a run cut short keeps all but the last moments), and flush() writes the rest; records from an earlier
    run in the file are kept unless measured again."""
    def r(i):
        return {"kind": "op", "op": "o", "case": f"c{i}", "backend": "b", "mode": "fwd", "status": "ok"}

    records.write_results(str(tmp_path), [r(0)])  # an earlier part of the run
    rec = records.Recorder(str(tmp_path), {"device": "d"}, interval_s=3600.0)
    rec.add(r(1))
    assert [x["case"] for x in records.read_results(str(tmp_path))] == ["c0", "c1"]
    rec.add(r(2))
    assert len(records.read_results(str(tmp_path))) == 2  # within the interval: not yet written
    rec.flush()
    assert [x["case"] for x in records.read_results(str(tmp_path))] == ["c0", "c1", "c2"]
    rec.interval_s = 0.0
    rec.add(r(3))
    assert len(records.read_results(str(tmp_path))) == 4


def test_table_and_footnotes():
    rs = [{"status": "ok"}, {"status": "skipped", "reason": "r1"}, {"status": "failed", "reason": "r2"},
          {"status": "skipped", "reason": "r1"}]
    numbers, notes = records.reasons_footnotes(rs)
    assert numbers == {"r1": 1, "r2": 2} and "[2] r2" in notes
    assert records.status_cell(rs[3], numbers) == "skipped [1]"
    text = records.table(["a", "b"], [["x", 1.5], ["yy", None]])
    assert text.splitlines()[0].startswith("a ") and "1.5" in text and "-" in text.splitlines()[3]


def test_a_training_variant_that_kills_the_process_loses_only_itself(tmp_path):
    """`bench train` writes its results after every variant: a variant that ends the process at once (as a
    segfault does, with no exit hook; os._exit here) leaves the variants before it in results.json, although
    they came within the Recorder's usual 2 s of each other."""
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "out"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from fastmae.bench import train_bench
        from fastmae.cli import main

        def run_variant(device, model, batch, dtype, variant, **kw):
            if variant == "reference+sdpa":
                os._exit(139)
            head = train_bench.record_head(variant, model, batch, 0.75, dtype)
            return {{**head, "status": "skipped", "reason": "stub"}}

        train_bench.run_variant = run_variant
        main(["bench", "train", "--device", "cpu", "--no-progress", "--model", "mae_vit_tiny_patch4", "--batch", "2",
              "--variants", "fastmae,official-eager,reference+sdpa", "--no-compile", "--out", {str(out)!r}])
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 139, proc.stderr[-2000:]
    kept = [r["backend"] for r in records.read_results(str(out)) if r.get("kind") == "train"]
    assert kept == ["fastmae", "official-eager"]


def test_a_run_stopped_by_sigterm_keeps_its_last_records(tmp_path):
    """`timeout` stops a part with SIGTERM: the bench command turns it into SystemExit, and the records not yet
    written (the Recorder writes at most every 2 s) reach the file on the way out."""
    import signal
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from fastmae.bench import cli, records

        def bench(args):
            rec = records.Recorder({str(tmp_path)!r}, {{"device": "d"}}, interval_s=3600.0)
            for i in range(3):
                rec.add({{"kind": "op", "op": "o", "case": f"c{{i}}", "backend": "b", "mode": "fwd"}})
            print("ready", flush=True)
            time.sleep(60)

        class Args:
            bench_run = staticmethod(bench)

        cli.run(Args())
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert len(records.read_results(str(tmp_path))) == 1  # the first record only, within the interval
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert [r["case"] for r in records.read_results(str(tmp_path))] == ["c0", "c1", "c2"]


def test_error_line_is_the_type_and_first_line_even_for_empty_messages():
    from fastmae.bench.common import error_line

    assert error_line(ValueError("bad shape\nmore detail")) == "ValueError: bad shape"
    assert error_line(RuntimeError()) == "RuntimeError: "  # no IndexError from an empty message
    assert error_line(RuntimeError("  \n ")) == "RuntimeError: "
    assert error_line(OSError("x" * 50), 10) == "OSError: " + "x" * 10


def test_table_reasons_are_cut_at_a_clause():
    """A long reason in a README table is cut before a parenthesis or clause, not mid-word, and marked."""
    from fastmae.bench.readme import _short

    reason = ("backend 'triton' cannot run gather_tokens on this input: triton runs CPU tensors only under its "
              "interpreter (set TRITON_INTERPRET=1 before importing triton)")
    assert _short(reason) == reason[:reason.index(" (")] + " …"
    assert _short(reason, 80) == "backend 'triton' cannot run gather_tokens on this input …"
    assert _short("a|b\nc") == "a/b c"  # table-safe, whole when it fits
    word = "x" * 200
    assert _short(word, 50) == "x" * 48 + " …" and len(_short(reason, 30)) <= 30


@pytest.mark.parametrize("content, what", [
    (b"", "empty, not a list of records"), (b"\n \n", "empty, not a list of records"),
    (b'[{"kind": "op", "op"', "not JSON, or cut short (Expecting ':' delimiter at line 1 column 21)"),
    (b"nope", "not JSON, or cut short (Expecting value at line 1 column 1)"),
    (b"\xff\xfe[]", "not a results file (not UTF-8 text)"),
    (b'{"records": []}', "expected a list of records, found a JSON object"),
    (b'[{"kind": "op"}, 1]', "expected a list of records, item 1 is a JSON number"),
    (b'[null]', "expected a list of records, item 0 is a JSON null"),
])
def test_read_results_says_which_file_is_broken_and_how(tmp_path, content, what):
    path = tmp_path / "results.json"
    path.write_bytes(content)
    for source in (path, tmp_path):  # the file, or its folder
        with pytest.raises(ValueError) as exc:
            records.read_results(str(source))
        assert str(exc.value) == f"{path}: {what}"
    path.write_text('[{"kind": "op"}]')
    assert records.read_results(str(tmp_path)) == [{"kind": "op"}]


def test_a_recorder_reads_the_folder_once_and_a_failed_write_is_not_retried_at_exit(tmp_path, capsys):
    """The caller reports a write that fails; the exit hook does not try it again (it would fail again, as an
    "Exception ignored in atexit callback" traceback). Records a SIGTERM left unwritten that cannot be written at
    exit get one line."""
    (tmp_path / "results.json").write_text("[1]")
    rec = records.Recorder(str(tmp_path), {"device": "d"}, interval_s=3600.0)
    with pytest.raises(ValueError, match="item 0 is a JSON number"):
        rec.earlier()
    with pytest.raises(ValueError, match="item 0 is a JSON number"):
        rec.add({"kind": "op", "op": "o", "backend": "b", "mode": "fwd"})
    assert rec not in records._UNWRITTEN
    records._UNWRITTEN.add(rec)  # as if a SIGTERM had come before the first write
    try:
        records._flush_unwritten()
    finally:
        records._UNWRITTEN.discard(rec)
    err = capsys.readouterr().err
    assert err == f"fastmae bench: the last records were not written to {tmp_path}: {tmp_path / 'results.json'}: " \
                  "expected a list of records, item 0 is a JSON number\n"


def test_busy_cell_caps_the_share_at_100_percent():
    assert records.busy_cell(0.734) == "73%" and records.busy_cell(1.004) == "100%"
    assert records.busy_cell(1.21) == "100%*" and records.busy_cell(None) == "-"


def test_records_name_the_tuned_tables_the_launchers_read(tmp_path, tuned_dir):
    """The stamp says which tuned tables were in effect, by content: the commit names the kernels' own, not a
    FASTMAE_TUNED_DIR's."""
    import hashlib

    loss = pytest.importorskip("fastmae.kernels.loss")
    tuned_dir(None)
    own = os.path.dirname(loss.TUNED_FILE)
    committed = [n for n in ("attention_tuned.json", "loss_tuned.json") if os.path.isfile(os.path.join(own, n))]
    assert (records.tuned_tables() == "none") == (not committed)  # the kernels' own tables, by default
    tuned_dir(tmp_path)
    assert records.tuned_tables() == "none"
    text = '{"sm_90": {"fwd": {"bf16,fp32,C3,p16,norm1,ids0,grad1": [1, 4, 4, 1]}}}\n'
    (tmp_path / "loss_tuned.json").write_text(text)
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    assert loss.tuned_table() == json.loads(text)  # the launchers read the same table
    assert records.tuned_tables() == f"loss {digest} (FASTMAE_TUNED_DIR)"
    assert records.environment("cpu")["tuned_tables"] == f"loss {digest} (FASTMAE_TUNED_DIR)"
    bad = '{"sm_90": {"fwd": {"no key": [1, 4, 4, 1]}}}\n'  # unsound: the launchers ignore it, with a warning
    (tmp_path / "attention_tuned.json").write_text(bad)
    with pytest.warns(UserWarning, match="ignoring the tuned attention settings"):
        stamp = records.tuned_tables()
    assert stamp.startswith(f"attention {hashlib.sha1(bad.encode()).hexdigest()[:12]} (FASTMAE_TUNED_DIR) ignored, ")


def test_readme_training_table_has_a_back_to_back_column_only_for_records_with_the_figure():
    """The README's training table gains a "back to back" column when a row carries the figure (records since it
    exists), in the row's own cell; tables of older records keep their columns."""
    from fastmae.bench.readme import train_section

    row = {"kind": "train", "status": "ok", "model": "m", "backend": "fastmae", "shape": {"batch": 8},
           "dtype": "bfloat16", "amp": True, "mask_ratio": 0.75, "images_per_s": 100.0}
    old = train_section([row])
    new = train_section([{**row, "back_to_back_images_per_s": 125.0}])
    header_old, = [line for line in old if line.startswith("| variant")]
    header_new, = [line for line in new if line.startswith("| variant")]
    assert "back to back" not in header_old
    assert header_new.startswith("| variant | images/s | back to back | vs official-eager")
    body, = [line for line in new if line.startswith("| fastmae")]
    assert body.startswith("| fastmae | 100 | 125 |"), body


def test_tables_and_plots_of_a_folder_several_runs_wrote_into_show_the_last_configuration(tmp_path):
    """Two training runs into one folder, batch 4 then batch 2 (and an old skipped row without a shape): the
    README table and the plot take the batch-2 run's rows, the skipped row of its dtype and device with them."""
    from fastmae.bench.plots import plot_train
    from fastmae.bench.readme import train_section

    def row(backend, batch, date, **extra):
        return {"kind": "train", "status": "ok", "model": "m", "backend": backend, "shape": {"batch": batch},
                "dtype": "float32", "device": "cpu", "amp": False, "mask_ratio": 0.75, "images_per_s": 10.0 * batch,
                "date": date, **extra}

    rows = [row("fastmae", 4, "2026-01-01"), row("official-eager", 4, "2026-01-01"),
            {"kind": "train", "status": "skipped", "model": "m", "backend": "fastmae+compile", "dtype": "float32",
             "device": "cpu", "mask_ratio": 0.75, "reason": "off", "date": "2026-01-01"},
            row("fastmae", 2, "2026-01-02")]
    assert records.newest_run_rows(rows) == [rows[2], rows[3]]
    table = train_section(rows)
    assert any("batch 2" in line for line in table) and not any("batch 4" in line for line in table)
    assert [line.split(" |")[0] for line in table if line.startswith("| fastmae")] == ["| fastmae+compile",
                                                                                         "| fastmae"]
    pytest.importorskip("matplotlib")
    (path,) = plot_train(rows, str(tmp_path))
    assert os.path.getsize(path) > 1000


def test_quick_runs_are_not_shown_as_results(tmp_path):
    """A run made with --quick (its records say so) is passed over when the README picks the latest run."""
    from fastmae.bench.readme import latest_runs
    base = {"kind": "encoder", "status": "ok", "model": "m", "device_type": "cpu"}
    records.write_results(str(tmp_path / "full"), [{**base, "backend": "a", "date": "2026-01-01"}])
    records.write_results(str(tmp_path / "quick"), [{**base, "backend": "b", "date": "2026-01-02", "quick": True}])
    assert latest_runs(str(tmp_path))["cpu"][0] == str(tmp_path / "full")
    # and a quick run written into the full run's folder: its records are kept apart (another key) and not shown
    full = {**base, "backend": "a", "date": "2026-01-01", "images_per_s": 1.0}
    quick = {**base, "backend": "a", "date": "2026-01-03", "images_per_s": 9.0, "quick": True}
    both = tmp_path / "both"
    records.write_results(str(both), [{**full, "date": "2026-01-02"}])
    records.write_results(str(both), [quick])
    kept = records.read_results(str(both))
    assert [r["images_per_s"] for r in kept] == [1.0, 9.0]  # the full run's measurement not replaced
    folder, shown = latest_runs(str(tmp_path))["cpu"]
    assert folder == str(both) and [r["images_per_s"] for r in shown] == [1.0]


def test_op_tables_and_plots_show_the_last_run_only(tmp_path):
    """Two `bench ops` runs into one folder (batch 2 in bfloat16, then batch 1): the README's ops table, its limits
    and the plot take the last run's rows alone; a bf16 run's gather_patches rows (float32: the images' dtype) stay
    with their run; training runs at two mask ratios are two configurations."""
    from fastmae.bench.plots import plot_ops
    from fastmae.bench.readme import ops_section

    def op(case, batch, date, dtype, op_name="attention", **extra):
        return {"kind": "op", "status": "ok", "op": op_name, "case": case, "backend": "reference", "mode": "fwd",
                "shape": {"B": batch}, "dtype": dtype, "device": "cpu", "device_type": "cpu", "median_ms": 1.0,
                "speedup": 1.0, "date": date, **extra}

    def limit(date, tflops):
        return {"kind": "limit", "op": "matmul", "case": "bench ops", "status": "ok", "tflops": tflops,
                "dtype": "bfloat16", "date": date}

    old = [op("old case", 2, "2026-01-01", "bfloat16"), limit("2026-01-01", 5.0)]
    new = [op("new case", 1, "2026-01-02", "bfloat16"), op("patches", 1, "2026-01-02", "float32", "gather_patches"),
           limit("2026-01-02", 7.0)]
    text = "\n".join(ops_section(old + new))
    assert "new case" in text and "patches" in text and "old case" not in text
    assert "batch 1" in text and "matmul 7 TFLOP/s" in text and "matmul 5 TFLOP/s" not in text
    assert records.newest_run([r for r in old + new if r["kind"] == "op"]) == new[:2]
    train = [{"kind": "train", "shape": {"batch": 2}, "dtype": "float32", "device": "cpu", "mask_ratio": m}
             for m in (0.5, 0.75)]
    assert records.run_config(train[0]) != records.run_config(train[1])
    pytest.importorskip("matplotlib")
    (path,) = plot_ops(old + new, str(tmp_path))
    assert os.path.getsize(path) > 1000
