"""`fastmae bench tune` and the tuned launch settings it records (`attention_tuned.json`).

On the CPU the tuner runs under Triton's interpreter in quick mode: the code paths (compile check of every
candidate, the tolerance check, timing, the table it writes) are exercised; the timings mean nothing.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastmae.bench import tune
from fastmae.kernels.compile_check import LIMITS
from fastmae.cli import main
from fastmae.ops import reference
from tests.utils import assert_error_within_plain, launched_kernels, make_qkv, skip_unless_serves

attn = pytest.importorskip("fastmae.kernels.attention")
TUNED_KERNELS = {"fwd_short", "bwd_short", "fwd_flash", "bwd_dkdv", "bwd_dq"}


def test_quick_tune_writes_a_sound_table(tmp_path):
    skip_unless_serves("attention", "triton", "cpu", torch.float32, head_dim=16)
    table_path, out = tmp_path / "tuned.json", tmp_path / "out"
    assert main(["bench", "tune", "--device", "cpu", "--quick", "--allow-interpreter", "--no-progress",
                 "--max-time", "0.001", "--write", str(table_path), "--out", str(out)]) == 0
    table = json.loads(table_path.read_text())
    assert attn.validate_tuned(table) == []
    assert set(table["measured"]["sm_90"]) == TUNED_KERNELS  # both paths, every kernel
    assert table["source"]["sm_90"]["torch"] == torch.__version__
    cands = json.loads((out / "tune.json").read_text())["candidates"]
    assert {c["kernel"] for c in cands} == TUNED_KERNELS
    for c in cands:  # each candidate was either rejected with a reason, or checked and timed
        assert c["problems"] or (c["median_ms"] > 0 and c["error"] is not None)
    assert all(c["median_ms"] and not c["problems"] for c in cands if c["default"])  # the rule's own settings pass


def test_candidates_beyond_the_tolerance_rule_are_rejected(monkeypatch):
    """A candidate whose numbers break the tolerance rule is rejected with its error and never timed; the rule's
    own settings pass (the wrong numbers are injected for one candidate's forced settings)."""
    skip_unless_serves("attention", "triton", "cpu", torch.float32, head_dim=32)
    n, d, dtype = 40, 32, torch.float32
    key = attn.tuned_key("fwd_short", n, d, dtype)
    rule = attn.default_settings("fwd_short", n, d, dtype)
    wrong = attn.LaunchSettings(16, rule.block_n, 2, 1)
    assert wrong != rule
    real = tune._run

    def run(attn_, kernel, *args):
        got = real(attn_, kernel, *args)
        if attn_.launch_settings(kernel, n, d, dtype) == wrong:  # inside this candidate's forced settings
            got = (got[0] * 1.001, *got[1:])
        return got

    monkeypatch.setattr(tune, "_run", run)
    cands = [tune.Candidate("s", "fp32", "fwd_short", key, tuple(vars(rule).values()), default=True),
             tune.Candidate("s", "fp32", "fwd_short", key, tuple(vars(wrong).values()))]
    tune.check_and_time(attn, cands, (1, 2, n, d), torch.device("cpu"), max_time=0.001, quick=True)
    assert not cands[0].problems and cands[0].median_ms > 0 and cands[0].error < 1e-4
    assert cands[1].median_ms is None and cands[1].error > 1e-4
    assert len(cands[1].problems) == 1 and "beyond the tolerance rule's bound" in cands[1].problems[0]


def test_a_run_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    """The table and tune.json are written after every shape: a tuner stopped by a timeout keeps its shapes."""
    skip_unless_serves("attention", "triton", "cpu", torch.float32, head_dim=16)
    real, calls = tune.check_and_time, []

    def first_shape_only(attn_, cands, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # as a timeout would stop it
        calls.append(cands[0].shape)
        return real(attn_, cands, *args, **kwargs)

    monkeypatch.setattr(tune, "check_and_time", first_shape_only)
    table_path, out = tmp_path / "tuned.json", tmp_path / "out"
    assert main(["bench", "tune", "--device", "cpu", "--quick", "--allow-interpreter", "--no-progress",
                 "--max-time", "0.001", "--write", str(table_path), "--out", str(out)]) == 130  # interrupted
    table = json.loads(table_path.read_text())
    assert attn.validate_tuned(table) == []
    shapes = {e["shape"] for k in table["measured"]["sm_90"].values() for e in k.values()}
    assert shapes == set(calls)  # the first shape's measurements, nothing else
    cands = json.loads((out / "tune.json").read_text())["candidates"]
    assert {c["shape"] for c in cands if c["median_ms"]} == set(calls)


def _cand(kernel, key, settings, ms, default=False):
    return tune.Candidate("s", key.split(",")[0], kernel, key, settings, default=default, median_ms=ms)


def test_only_clear_wins_are_recorded():
    k1, k2 = "bf16,N64,D64", "bf16,D64"
    results = [_cand("fwd_short", k1, (64, 64, 4, 1), 1.0, True), _cand("fwd_short", k1, (32, 64, 4, 1), 0.90),
               _cand("fwd_flash", k2, (128, 64, 8, 3), 1.0, True), _cand("fwd_flash", k2, (64, 64, 4, 2), 0.99)]
    bad = _cand("fwd_flash", k2, (64, 32, 4, 2), 0.5)
    bad.problems = ["3 spill bytes"]  # faster, but rejected: never recorded
    best = tune.winners(results + [bad])
    assert best[("fwd_flash", k2)][1].settings == (64, 64, 4, 2)
    old = {"sm_90": {"fwd_flash": {k2: [64, 32, 4, 2]}}}  # an earlier winner the new run does not confirm
    table = tune.update_table(old, "sm_90", best, {"device": "gpu", "torch": "t"})
    assert table["sm_90"] == {"fwd_short": {k1: [32, 64, 4, 1]}}  # 10% faster: kept; 1%: the rule stays
    assert table["measured"]["sm_90"]["fwd_flash"][k2]["best_ms"] == 0.99
    assert attn.validate_tuned(table) == []
    assert json.loads(tune.dump_table(table)) == table


def test_launchers_use_the_tuned_settings_of_their_architecture(monkeypatch):
    skip_unless_serves("attention", "triton", "cpu", torch.float32, head_dim=32)
    n, d, dtype = 40, 32, torch.float32
    rule = attn.default_settings("fwd_short", n, d, dtype)
    tuned = [16, 64, 2, 1]  # differs from the rule in rows per program and warps
    assert (rule.block_m, rule.num_warps) != (16, 2)
    table = {"sm_90": {"fwd_short": {attn.tuned_key("fwd_short", n, d, dtype): tuned}}}
    monkeypatch.setattr(attn, "tuned_table", lambda: table)
    assert attn.launch_settings("fwd_short", n, d, dtype, (9, 0)) == attn.LaunchSettings(*tuned)
    assert attn.launch_settings("fwd_short", n, d, dtype, (8, 0)) == rule  # other GPUs keep the rule
    assert attn.launch_settings("fwd_short", n, d, dtype) == rule
    with attn.forced_settings(fwd_short=attn.LaunchSettings(32, 64, 4, 1)):
        assert attn.launch_settings("fwd_short", n, d, dtype, (9, 0)).block_m == 32
    # the interpreter launches as sm_90 does: the tuned setting runs, and matches the reference
    q, k, v = make_qkv(1, 2, n, d, dtype, "packed", "cpu")
    with launched_kernels() as launched:
        out = attn.attention(q, k, v)
    assert [(kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]) for name, _, kw in launched
            if name == "_attn_fwd_short"] == [tuple(tuned)]
    ref = reference.attention(*(t.detach() for t in (q, k, v)))
    assert_error_within_plain(out.detach(), ref, ref, name="out with tuned settings")
    specs = [s for s in attn.tuned_specs(table)]
    assert len(specs) == 1 and specs[0].archs == (90,) and specs[0].always_check
    assert specs[0].num_warps == 2 and specs[0].constexprs["BLOCK_M"] == 16


def test_unsound_tables_are_refused(tmp_path):
    bad = {"sm_90": {"fwd_short": {"bf16,N64,D64": [64, 32, 4, 1]}},  # a short kernel must take all keys
           "sm_80": {"bwd_delta": {"bf16,D64": [64, 16, 4, 1]}}, "gpu": {}}
    problems = attn.validate_tuned(bad)
    assert len(problems) == 3 and any("BLOCK_N must be the key tile 64" in p for p in problems)
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(bad))
    with pytest.warns(UserWarning, match="ignoring the tuned attention settings"):
        assert attn.tuned_table(str(path)) == {}


@pytest.mark.parametrize("op", tune.OPS)
def test_recorded_table_is_sound(op):
    """The committed attention_tuned.json and loss_tuned.json must be what the launchers accept."""
    module = tune.op_tuner(op).kernel_module()
    name = os.path.basename(module.TUNED_FILE)
    if not os.path.isfile(module.TUNED_FILE):
        pytest.skip(f"no {name} is committed yet (`fastmae bench tune --op {op} --write` on a GPU writes it)")
    with open(module.TUNED_FILE, encoding="utf-8") as f:
        table = json.load(f)
    assert module.validate_tuned(table) == []


def test_tune_refuses_to_time_on_a_cpu_without_asking(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a GPU machine's CPU: no interpreter, no tuning
    assert main(["bench", "tune", "--device", "cpu", "--allow-interpreter"]) == 2
    assert "GPU" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as under the CPU suite: interpreter on, still no kernels' file
    assert main(["bench", "tune", "--device", "cpu"]) == 2
    assert "GPU" in capsys.readouterr().err
    assert main(["bench", "tune", "--device", "cpu", "--allow-interpreter", "--quick", "--write"]) == 2
    assert "--write needs a FILE" in capsys.readouterr().err


def test_tune_refuses_output_paths_it_cannot_write_before_timing(tmp_path, capsys, monkeypatch):
    import fastmae.bench.tune as tune
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr("fastmae.kernels.utils.interpreter_problem", lambda: None)
    monkeypatch.setattr(tune, "plan", lambda *a, **k: pytest.fail("tuning started"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    base = ["bench", "tune", "--device", "cpu", "--allow-interpreter", "--quick"]
    for flag, value in (("--out", a_file), ("--write", a_file / "t.json"), ("--write", tmp_path)):
        assert main([*base, flag, str(value)]) == 2
        assert f"{flag} {value}: cannot write there" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,what", [("--batch", "0", "a positive integer"),
                                             ("--jobs", "-1", "a non-negative integer"),  # 0: no worker processes
                                             ("--max-time", "-1", "a non-negative number")])  # 0: minimum reps
def test_tune_refuses_numbers_out_of_range(capsys, flag, value, what):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "tune", "--device", "cpu", flag, value])
    assert exit_.value.code == 2 and f"{flag}: must be {what}, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("cap,check_arch,taught", [((a // 10, a % 10), a, False) for a in sorted(LIMITS)]
                         + [((12, 0), None, False), ((12, 0), 120, True)])
def test_tune_compile_checks_on_every_architecture_the_check_knows(monkeypatch, capsys, cap, check_arch, taught):
    """The tuner screens candidates with the compile check for the GPU's architecture when the check knows it
    (`compile_check.LIMITS`: sm_80, sm_90, sm_100, and any architecture added there), and says which it knows when
    it does not."""
    skip_unless_serves("attention", "triton", "cpu", torch.float32, head_dim=16)

    class Screened(Exception):
        pass

    def screen(results, shapes, arch, *rest):
        raise Screened(arch)

    if taught:
        monkeypatch.setitem(LIMITS, 120, LIMITS[90])
    monkeypatch.setattr(tune, "launch_capability", lambda device: cap)
    monkeypatch.setattr(tune, "screen", screen)
    with pytest.raises(Screened) as stop:
        main(["bench", "tune", "--device", "cpu", "--quick", "--allow-interpreter", "--no-progress"])
    assert stop.value.args == (check_arch,)
    out = capsys.readouterr().out
    assert ("no compile check for sm_120 (it knows sm_80, sm_90, sm_100)" in out) == (check_arch is None), out
