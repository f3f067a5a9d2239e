"""`python -m fastmae.bench.warm`: the recorded launches, described as recipes, specialise as the launches
themselves, and the command's clear errors. (The whole path, recording and compiling for sm_90 through Triton's
launch path in worker processes, runs in tests/bench/test_gpu_suite_quick.py.)"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from fastmae.bench import warm

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # recording needs the interpreter off


def test_tensor_arguments_are_described_by_dtype_and_alignment():
    base = torch.zeros(64, dtype=torch.bfloat16)
    aligned, unaligned = warm._encode(base), warm._encode(base[1:])  # 2 bytes in: off the 16-byte grid
    assert aligned == {"tensor": "bfloat16", "aligned": True} and unaligned["aligned"] is False
    p, q = warm._decode(aligned), warm._decode(unaligned)
    assert p.dtype is torch.bfloat16 and p.data_ptr() % 16 == 0 and q.data_ptr() % 16 != 0
    assert warm._decode(warm._encode(torch.float16)) is torch.float16
    for v in (3, 16, 1, 2.5, True, None, "x"):
        assert warm._decode(warm._encode(v)) == v
    with pytest.raises(TypeError, match="cannot describe"):
        warm._encode(object())


def test_recipes_compile_under_the_cache_keys_of_the_launches(tmp_path):
    """Every launch of a tiny model's training step and of a ViT-B bf16 one goes through Triton's own launch path
    (the stand-in driver names sm_90; the compile itself is replaced by a probe), once as recorded and once
    rebuilt from its recipe with stand-in pointers, as the warm-up runs it: Triton computes the same cache key
    for both, so the launches of a benchmark find what the warm-up compiled."""
    script = tmp_path / "keys.py"
    script.write_text(textwrap.dedent("""
        import json
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction
        from triton.compiler.compiler import get_cache_key
        from triton._C.libtriton import get_cache_invalidating_env_vars
        from fastmae.bench import warm
        from fastmae.kernels import compile_check as cc

        workloads = warm.quick_workloads() + [(w.label, w.run) for w in [cc.Workload("mae_vit_base_patch16", "bf16")]]
        calls = []
        for label, run in workloads:
            with cc.record_launches((9, 0)) as rec:
                run()
            calls += rec
        driver.set_active(cc.TargetDriver(90))
        env, keys = get_cache_invalidating_env_vars(), []

        def probe(self, key, signature, device, constexprs, options, attrs, warmup):
            backend = self.device_caches[device][3]
            keys.append(get_cache_key(self.ASTSource(self, signature, constexprs, attrs), backend, options, env))

        JITFunction._do_compile = probe
        roundtrip = lambda v: warm._decode(json.loads(json.dumps(warm._encode(v))))
        distinct = set()
        for c in calls:
            keys.clear()
            c.fn.run(*c.args, grid=c.grid, warmup=False, **c.kwargs)
            c.fn.run(*map(roundtrip, c.args), grid=(1,), warmup=True, **{k: roundtrip(v) for k, v in c.kwargs.items()})
            assert len(keys) == 2 and keys[0] == keys[1], cc.launch_spec(c, 90).name
            distinct.add(keys[0])
        recipes, errors = warm.collect(workloads, 90)
        assert not errors and len(recipes) == len(distinct), (len(recipes), len(distinct))
        print("launches", len(calls), "kernels", len(distinct))
    """))
    proc = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    counts = re.search(r"^launches (\d+) kernels (\d+)$", proc.stdout, re.M)
    assert counts and int(counts.group(1)) > 0 and int(counts.group(2)) > 0, proc.stdout[-2000:]


def test_bench_workloads_cover_every_benchmark_part():
    from fastmae.bench.cli import ENCODER_RATIOS

    labels = [label for label, _ in warm.bench_workloads()]
    assert labels[0].startswith("bench ops") and labels[1].startswith("bench attention")
    for model in ("base/16", "large/16"):
        for ratio in (float(r) for r in ENCODER_RATIOS.split(",")):  # bench encoder's default ratios
            assert f"{model} bf16 b16 r{ratio:g} norm_pix no_grad" in labels  # encoder forward
            assert f"{model} bf16 b16 r{ratio:g} norm_pix" in labels  # encoder forward+backward
        assert f"{model} bf16 b16 r0.75" in labels  # the training step, without norm_pix_loss


def test_clear_errors(capsys):
    from fastmae.kernels.compile_check import interpreter_active

    if interpreter_active():  # the CPU suite's process: Triton's interpreter is on
        assert warm.main(["--arch", "90", "--quick"]) == 2
        assert "interpreter" in capsys.readouterr().err
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, "-m", "fastmae.bench.warm", "--quick"], env=ENV,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "pass --arch" in proc.stderr, proc.stderr


def test_workers_report_kernel_errors_and_their_own_timeouts(tmp_path, monkeypatch):
    """A recipe that names no kernel fails alone, with its error; a worker that runs out of time is reported as
    such (with the kernel it was on, if it got that far), apart from the kernels' results."""
    (tmp_path / "fastmae_test_slow_kernels.py").write_text("import time\ntime.sleep(60)\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the workers import what this process can
    bogus = {"module": "fastmae.kernels.tokens", "kernel": "no_such_kernel", "name": "nope[fp32]", "source": "t",
             "args": [], "kwargs": {}}
    results, problems = warm.warm([bogus], workers=1, arch=90, timeout_s=120)
    assert problems == [] and len(results) == 1
    assert results[0]["ok"] is False and "AttributeError" in results[0]["error"]
    # a kernel module whose import takes a minute: a 1 s limit (the least) stops its worker
    slow = dict(bogus, module="fastmae_test_slow_kernels")
    results, problems = warm.warm([slow, dict(slow, name="nope2")], workers=1, arch=90, timeout_s=0.0)
    assert len(problems) == 1 and "worker 0 timed out" in problems[0] and "of its kernels done" in problems[0]
    text = warm.summary([bogus, bogus], results, problems, 1.0, 1)
    assert text.startswith(f"{len(results)} of 2 distinct launches") and "timed out" in text


@pytest.mark.slow
def test_every_benchmark_workload_records(tmp_path):
    """The GPU suite's warm-up records every workload of `bench_workloads()` (bench ops and attention at their
    CUDA defaults, the encoder at every ratio, the training step) without an error, on the CPU (about 10 s: the
    models' matrix products are not computed, nor the cases' inputs drawn; see the test below)."""
    script = tmp_path / "collect.py"
    script.write_text(textwrap.dedent("""
        from fastmae.bench import warm

        recipes, errors = warm.collect(warm.bench_workloads(), 90)
        assert not errors, errors
        kernels = {r["kernel"] for r in recipes}
        print(len(recipes), sorted(kernels))
    """))
    proc = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    count, kernels = proc.stdout.split(" ", 1)
    assert int(count) >= 50
    for name in ("_attn_fwd_short", "_attn_bwd_dkdv", "_gather_patches_kernel", "_unshuffle_fwd_kernel",
                 "_masked_mse_fwd_kernel"):
        assert name in kernels, (name, kernels)


def test_workloads_record_the_same_launches_without_computing_their_matmuls(tmp_path):
    """Workloads skip the values of their matrix products, and the benchmarks' cases their inputs' samples
    (nothing recorded is run, so no value means anything): the launches they record are the same as with the
    products computed and the samples drawn."""
    script = tmp_path / "same.py"
    script.write_text(textwrap.dedent("""
        import contextlib
        import torch
        from fastmae.bench import ops_bench, warm
        from fastmae.kernels import compile_check as cc

        ws = [cc.Workload("mae_vit_tiny_patch4", "bf16", batch=16).run,
              cc.Workload("mae_vit_tiny_patch4", "fp16", batch=16, pred_masked_only=True, mask_ratio=0.9).run,
              lambda: warm._ops_launches(["B"], torch.bfloat16, 2),
              lambda: warm._attention_launches(["B"], torch.float16, 2, [256], [32, 64], 512)]
        fast = [[k for k, _, _ in cc.recorded_specs(w, 90)] for w in ws]
        cc._uncomputed_matmuls = contextlib.nullcontext
        ops_bench.undrawn_inputs = contextlib.nullcontext
        full = [[k for k, _, _ in cc.recorded_specs(w, 90)] for w in ws]
        assert fast == full and all(fast), (fast, full)
        print("same", [len(f) for f in fast])
    """))
    proc = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("same"), proc.stdout[-2000:] + proc.stderr[-3000:]
