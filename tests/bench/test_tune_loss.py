"""`fastmae bench tune --op loss` and the masked-MSE loss's tuned launch settings (`loss_tuned.json`).

On the CPU the tuner runs under Triton's interpreter in quick mode: the code paths (compile check of every
candidate, the tolerance check, timing, the table it writes) are exercised; the timings mean nothing. The
tuned settings themselves are checked as the kernel tests check the rule's: against the reference path,
loss and gradient, under the suite's tolerance rule.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastmae.bench import tune, tune_loss
from fastmae.cli import main
from fastmae.ops import reference
from tests.utils import assert_error_within_plain, error_line, launched_kernels, masking, skip_unless_serves

loss = pytest.importorskip("fastmae.kernels.loss")
QUICK = ["bench", "tune", "--op", "loss", "--device", "cpu", "--quick", "--allow-interpreter", "--no-progress",
         "--max-time", "0.001"]


def test_quick_loss_tune_writes_a_sound_table(tmp_path):
    skip_unless_serves("masked_mse_loss", "triton", "cpu", torch.float32)
    table_path, out = tmp_path / "loss_tuned.json", tmp_path / "out"
    assert main([*QUICK, "--write", str(table_path), "--out", str(out)]) == 0
    table = json.loads(table_path.read_text())
    assert loss.validate_tuned(table) == []
    assert set(table["measured"]["sm_90"]) == {"fwd", "bwd"}
    # quick: norm_pix with the gradient buffer, and neither (the full run: all four pairs, see the plan test)
    assert set(table["measured"]["sm_90"]["fwd"]) == {"fp32,fp32,C3,p4,norm1,ids0,grad1",
                                                      "fp32,fp32,C3,p4,norm0,ids0,grad0"}
    cands = json.loads((out / "tune_loss.json").read_text())["candidates"]
    assert {c["kernel"] for c in cands} == {"fwd", "bwd"}
    for c in cands:  # each candidate was either rejected with a reason, or checked and timed
        assert c["problems"] or (c["median_ms"] > 0 and c["error"] is not None)
    assert all(c["median_ms"] and not c["problems"] for c in cands if c["default"])  # the rule's own settings pass
    assert not (out / "tune.json").exists()  # the attention's file is not the loss's


def test_loss_candidates_beyond_the_tolerance_rule_are_rejected(monkeypatch):
    """A candidate whose gradient breaks the tolerance rule is rejected with its error and never timed; the
    rule's own settings pass (the wrong numbers are injected for one candidate's forced settings)."""
    skip_unless_serves("masked_mse_loss", "triton", "cpu", torch.float32)
    shape = tune_loss.QUICK_SHAPES["quick-loss"]
    _, C, _, p = shape
    key = loss.fwd_key(torch.float32, torch.float32, C, p, True, False, True)
    rule = loss.default_settings("fwd", C, p)
    wrong = loss.LossSettings(rule.block_r // 2, rule.num_warps, 1, rule.num_stages)
    real = tune_loss._run

    def run(loss_, *args):
        value, grad, rest = real(loss_, *args)
        if loss_._FORCED.get("fwd") == wrong:  # inside this candidate's forced settings
            grad = grad * 1.001
        return value, grad, rest

    monkeypatch.setattr(tune_loss, "_run", run)
    cands = [tune.Candidate("s", "fp32/fp32", "fwd", key, tuple(rule), default=True),
             tune.Candidate("s", "fp32/fp32", "fwd", key, tuple(wrong))]
    tune_loss.check_and_time(loss, cands, shape, torch.device("cpu"), max_time=0.001, quick=True)
    assert not cands[0].problems and cands[0].median_ms > 0 and cands[0].error < 1e-4
    assert cands[1].median_ms is None and cands[1].error > 1e-4
    assert len(cands[1].problems) == 1 and "beyond the tolerance rule's bound" in cands[1].problems[0]


def test_loss_plan_lists_each_launch_once():
    """The rule's setting first for each kernel and key; no two candidates of a key launch alike at the tuned
    shape (caps on tiles per program above what the rows allow are the same launch); every candidate within
    the values-per-thread and tile bounds, and sound as a table entry."""
    shapes = tune_loss.resolve_shapes(tune_loss.SHAPES, 64)
    cands = tune_loss.plan(loss, shapes, [torch.bfloat16], torch.device("cpu"), False)
    keys = list(dict.fromkeys((c.kernel, c.key) for c in cands))
    assert {k for k, _ in keys} == {"fwd", "bwd"} and len(keys) == 9  # 2 shapes x norm x grad, one backward
    for kernel, key in keys:
        group = [c for c in cands if (c.kernel, c.key) == (kernel, key)]
        assert group[0].default and not any(c.default for c in group[1:])
        B, C, side, p = shapes[group[0].shape]
        rows = B * (side // p) ** 2
        launches = [tune_loss._effective(kernel, c.settings, rows) for c in group]
        assert len(set(launches)) == len(launches) > 5
        for c in group[1:]:
            assert loss.validate_tuned({"sm_90": {kernel: {key: list(c.settings)}}}) == [], (key, c.settings)
    fwd = [c for c in cands if c.kernel == "fwd" and c.shape == "loss-B" and not c.default]
    assert {c.settings[2] for c in fwd} >= {1, 2, 4}  # pipelines of several depths are tried
    assert all(2 <= c.settings[0] * 1024 // (32 * c.settings[1]) <= 16 for c in fwd)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_launchers_use_the_tuned_settings_of_their_architecture(monkeypatch, norm_pix):
    skip_unless_serves("masked_mse_loss", "triton", "cpu", torch.float32)
    n, C, p, g = 2, 3, 4, 4
    L, P = g * g, C * p * p
    rule_f, rule_b = loss.default_settings("fwd", C, p), loss.default_settings("bwd", C, p)
    tuned_f, tuned_b = [2, 2, 2, 1], [4, 2, 1, 1]  # both differ from the rule in rows per tile and warps
    assert (rule_f.block_r, rule_f.num_warps) != (2, 2) and (rule_b.block_r, rule_b.num_warps) != (4, 2)
    table = {"sm_90": {"fwd": {loss.fwd_key(torch.float32, torch.float32, C, p, norm_pix, False, True): tuned_f},
                       "bwd": {loss.bwd_key(torch.float32, P, True): tuned_b}}}
    assert loss.validate_tuned(table) == []
    monkeypatch.setattr(loss, "tuned_table", lambda: table)
    monkeypatch.setattr(loss, "PIPELINE_MIN_PROGRAMS", 1)  # so that the tuned cap of 2 tiles per program applies
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(n, C, g * p, g * p, generator=gen)
    pred = torch.randn(n, L, P, generator=gen)
    _, _, mask = masking(n, L, 4, seed=3)
    leaf = pred.clone().requires_grad_(True)
    with launched_kernels() as launched:
        value = loss.masked_mse_loss(leaf, imgs, mask, p, norm_pix)
        (grad,) = torch.autograd.grad(value, [leaf])
    fwd = [x for x in launched if x.name == "_masked_mse_fwd_kernel"]
    bwd = [x for x in launched if x.name == "_masked_mse_bwd_kernel"]
    tiles = loss._FWD_NAMES.index("tiles")  # the forward's argument: tiles per program
    assert [(x.kwargs["BLOCK_R"], x.kwargs["num_warps"], x.args[tiles], x.kwargs["num_stages"]) for x in fwd] == \
        [tuple(tuned_f)]
    assert [(x.kwargs["BLOCK_R"], x.kwargs["num_warps"], x.kwargs["num_stages"]) for x in bwd] == [(4, 2, 1)]
    ref_leaf = pred.clone().requires_grad_(True)
    ref = reference.masked_mse_loss(ref_leaf, imgs, mask, p, norm_pix)
    (ref_grad,) = torch.autograd.grad(ref, [ref_leaf])
    assert_error_within_plain(value.detach(), ref.detach(), ref.detach(), name="loss with tuned settings")
    assert_error_within_plain(grad, ref_grad, ref_grad, name="grad with tuned settings")
    key = loss.fwd_key(torch.float32, torch.float32, C, p, norm_pix, False, True)
    assert loss.launch_settings("fwd", (8, 0), lambda: key, lambda: rule_f) == rule_f  # other GPUs keep the rule
    assert loss.launch_settings("fwd", None, lambda: key, lambda: rule_f) == rule_f
    with loss.forced_settings(fwd=loss.LossSettings(1, 4, 1, 1)):
        assert loss.launch_settings("fwd", (9, 0), lambda: key, lambda: rule_f).num_warps == 4
    specs = loss.tuned_specs(table)
    assert len(specs) == 2 and all(s.archs == (90,) and s.always_check for s in specs)
    assert {(s.constexprs["BLOCK_R"], s.num_warps) for s in specs} == {(2, 2), (4, 2)}


def test_unsound_loss_tables_are_refused(tmp_path):
    bad = {"sm_90": {"fwd": {"bf16,fp32,C3,p16,norm1,ids0,grad1": [16, 8, 1, 1],  # 16 x 1024 values: too large
                             "bf16,C3,p16": [1, 8, 1, 1],  # not a key
                             "bf16,fp32,C3,p16,norm0,ids0,grad1": [1, 3, 1, 1]},  # 3 warps
                     "bwd": {"bf16,B1024,mask1": [2, 4, 2, 1]}},  # the backward takes one tile per program
           "sm_80": {"finalize": {"x": [1, 1, 1, 1]}}, "gpu": {}}
    problems = loss.validate_tuned(bad)
    assert len(problems) == 6, problems
    assert any("more than 8192 elements" in p for p in problems)
    assert any("not a tunable loss kernel" in p for p in problems)
    path = tmp_path / "loss_tuned.json"
    path.write_text(json.dumps(bad))
    with pytest.warns(UserWarning, match="ignoring the tuned loss settings"):
        assert loss.tuned_table(str(path)) == {}


def test_tune_names_the_shapes_of_the_op(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr("fastmae.kernels.utils.interpreter_problem", lambda: None)
    monkeypatch.setattr(tune_loss, "plan", lambda *a, **k: pytest.fail("tuning started"))
    base = ["bench", "tune", "--device", "cpu", "--allow-interpreter"]
    assert main([*base, "--op", "loss", "--shapes", "enc-B"]) == 2
    assert "unknown loss shapes ['enc-B']; choose from loss-B, loss-H" in error_line(capsys.readouterr().err,
                                                                                     "bench tune")
    assert main([*base, "--shapes", "loss-B"]) == 2  # the attention's shapes by default
    assert "unknown attention shapes ['loss-B']" in capsys.readouterr().err


def test_suite_summary_lists_what_the_tuners_measured(tmp_path):
    """summary.md's tuned section: per kernel and key, the rule's time, the fastest candidate's and whether it
    was recorded; a table that cannot be read is named, and the rest of the summary is still written."""
    from fastmae.bench import suite

    key = "bf16,fp32,C3,p16,norm1,ids0,grad1"
    measured = {"sm_90": {"fwd": {key: {"rule": [1, 8, 8, 1], "rule_ms": 0.05, "best": [1, 4, 4, 1],
                                        "best_ms": 0.025, "shape": "loss-B"}},
                          "bwd": {"bf16,B1024,mask1": {"rule": [2, 8, 1, 3], "rule_ms": 0.02, "best": [2, 8, 1, 3],
                                                       "best_ms": 0.02, "shape": "loss-B"}}}}
    (tmp_path / "loss_tuned.json").write_text(json.dumps({"sm_90": {"fwd": {key: [1, 4, 4, 1]}},
                                                          "measured": measured}))
    (tmp_path / "attention_tuned.json").write_text("{not json")
    (tmp_path / "parts.tsv").write_text("tune-loss\tok\t0\t40\t\tfastmae bench tune --op loss\n")
    text = suite.write_summary(str(tmp_path / "parts.tsv"), str(tmp_path), "gpu", str(tmp_path / "summary.md"))
    assert "## Tuned launch settings" in text
    assert (f"- masked-MSE loss fwd [{key}] sm_90, shape loss-B: rule r1/w8/t8/s1 50.0 µs, fastest r1/w4/t4/s1 "
            "25.0 µs, 2.00x (recorded)") in text
    assert "- masked-MSE loss bwd [bf16,B1024,mask1] sm_90, shape loss-B: rule r2/w8/t1/s3 20.0 µs, fastest " \
           "r2/w8/t1/s3 20.0 µs, 1.00x (the rule stays)" in text
    assert "- attention: attention_tuned.json could not be read: JSONDecodeError: " in text
    # JSON of another shape than a table's: named too, the summary still written
    (tmp_path / "attention_tuned.json").write_text(json.dumps({"sm_90": [], "measured": {"sm_90": {"fwd_short": {
        "k": {"rule": [64, 64, 4, 1], "best": [32, 64, 4, 1], "rule_ms": 1.0, "best_ms": 0.5}}}}}))
    text = suite.write_summary(str(tmp_path / "parts.tsv"), str(tmp_path), "gpu", str(tmp_path / "summary.md"))
    assert "- attention: attention_tuned.json could not be read: AttributeError: " in text
    assert "- masked-MSE loss fwd [" in text


def test_tuned_tables_in_the_folder_fastmae_tuned_dir_names(tmp_path, tuned_dir):
    """With FASTMAE_TUNED_DIR set, `bench tune --write` (no FILE) writes the op's table there and the launchers
    read it from there; the kernels' own folder is left alone."""
    import argparse

    tuned_dir(tmp_path)
    key = loss.fwd_key(torch.bfloat16, torch.float32, 3, 16, True, False, True)
    rule = tuple(loss.default_settings("fwd", 3, 16))
    results = [tune.Candidate("loss-B", "bf16/fp32", "fwd", key, rule, default=True, median_ms=1.0),
               tune.Candidate("loss-B", "bf16/fp32", "fwd", key, (1, 4, 4, 1), median_ms=0.5)]
    args = argparse.Namespace(op="loss", out=None, write="")
    own = loss.TUNED_FILE
    existed = os.path.isfile(own)
    loss._TUNED.clear()
    try:
        assert tune.save(args, loss, results, {"device": "test GPU"}, "sm_90", quiet=True)
        table = json.loads((tmp_path / "loss_tuned.json").read_text())
        assert table["sm_90"] == {"fwd": {key: [1, 4, 4, 1]}}
        assert os.path.isfile(own) == existed  # the kernels' own table untouched
        assert loss.tuned_table() == table
        got = loss.launch_settings("fwd", (9, 0), lambda: key, lambda: None)
        assert got == loss.LossSettings(1, 4, 4, 1)
    finally:
        loss._TUNED.clear()
