"""`kernels.launch`: a specialisation's later launches hand the kernel's launcher what Triton's own path hands it.

On a CPU the launches are checked with a stand-in for Triton's driver (no GPU, nothing launched): each compile is
replaced by a stand-in compiled kernel that records what its launcher is called with, so Triton's own path
(`JITFunction.run`) and `launch`'s kept path can be compared call for call, for every launch of a training step.
These run in a process of their own with the interpreter off (the CPU suite runs with it on, and then kernels are
not `JITFunction`s). On a GPU, every kernel's kept launches give what its first launch gave, bit for bit.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton", reason="the launch path needs triton")

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

_PRELUDE = textwrap.dedent("""
    import torch
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
    from fastmae.kernels import compile_check as cc, launch as L, probe

    class Driver(cc.TargetDriver):
        device = 0

        def get_current_device(self):
            return self.device

        def get_current_stream(self, device=None):
            return 1000 + self.device

    class Compiled:
        # what JITFunction.run uses of a compiled kernel; its launcher records its arguments
        function, packed_metadata = "function", "packed metadata"

        def __init__(self, calls):
            self.calls = calls

        def launch_metadata(self, grid, stream, *args):
            return None

        def run(self, *args):
            self.calls.append(args)

    calls, compiles = [], []

    def compile(self, key, signature, device, constexprs, options, attrs, warmup):
        compiles.append(self)
        return Compiled(calls)

    def same(a, b):
        return len(a) == len(b) and all(x is y or (type(x) is type(y) and not isinstance(x, torch.Tensor) and x == y)
                                        for x, y in zip(a, b))
""")


def _run(body: str, tmp_path) -> str:
    script = tmp_path / "launches.py"  # a file: Triton reads a kernel's source from it
    script.write_text(_PRELUDE + textwrap.dedent(body))
    proc = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_kept_launches_call_the_launcher_as_triton_does(tmp_path):
    """Every launch of a ViT-B bf16 training step, a tiny fp32 step predicting removed patches only and the flash
    attention forward and backward (launches recorded, then replayed): the first `launch` of each goes through
    Triton's path, the second through the kept kernel, and the launcher gets the same arguments from both (grid,
    stream, function, metadata, launch hooks, every parameter in order with constexprs and defaults; tensors the
    same objects). A kept launch that drops, reorders or adds an argument fails."""
    out = _run("""
        from fastmae.kernels import attention
        workloads = [cc.Workload("mae_vit_base_patch16", "bf16"),
                     cc.Workload("mae_vit_tiny_patch4", "fp32", batch=2, pred_masked_only=True)]
        recorded = []
        for w in workloads:
            with cc.record_launches((9, 0)) as rec:
                w.run()
            recorded += rec
        with cc.record_launches((9, 0)) as rec:
            q, k, v = (torch.randn(2, 2, 300, 64, dtype=torch.bfloat16) for _ in range(3))
            o, lse = attention.attention_forward(q, k, v, path="flash")
            attention.attention_backward(torch.randn_like(o), q, k, v, o, lse, path="flash")
        recorded += rec
        driver.set_active(Driver(90))
        JITFunction._do_compile = compile
        names = set()
        for c in recorded:
            L.forget_launches()
            calls.clear()
            compiles.clear()
            L.launch(c.fn, c.grid, *c.args, **c.kwargs)
            assert len(compiles) == 1 and len(calls) == 1 and L.kept_launches() == 1, c.fn
            L.launch(c.fn, c.grid, *c.args, **c.kwargs)
            assert len(compiles) == 1 and len(calls) == 2, (c.fn, "the second launch took Triton's path")
            assert same(calls[0], calls[1]), (c.fn, calls[0], calls[1])
            assert len(calls[0]) == 9 + len(c.fn.arg_names), (c.fn, len(calls[0]))
            names.add(c.fn.fn.__name__)
        print(len(recorded), sorted(names))
    """, tmp_path)
    count, names = out.split(" ", 1)
    assert int(count) > 20
    for kernel in ("_attn_fwd_short", "_attn_fwd_flash", "_attn_bwd_short", "_attn_bwd_dq", "_attn_bwd_dkdv",
                   "_gather_patches_kernel", "_gather_tokens_fwd_kernel", "_unshuffle_fwd_kernel",
                   "_unshuffle_bwd_kernel", "_masked_mse_fwd_kernel", "_masked_mse_finalize_kernel",
                   "_masked_mse_bwd_kernel"):
        assert kernel in names, (kernel, names)


def test_what_triton_would_specialise_differently_gets_a_key_of_its_own(tmp_path):
    """The wide probe's arguments launched again: the same arguments take the kept kernel; a tensor's other
    alignment or dtype, another integer value, True or 1.0 for 1, another constexpr, another option or another
    device each go through Triton's path first (and are then kept too). A kernel with parameters left to their
    defaults gets them, in their places, on kept launches too."""
    _run("""
        import triton
        import triton.language as tl

        @triton.jit
        def defaults(x_ptr, n, step=7, SIDE: tl.constexpr = 4, LAST: tl.constexpr = 2):
            tl.store(x_ptr, n + step + SIDE + LAST)

        driver.set_active(Driver(90))
        JITFunction._do_compile = compile
        out = torch.zeros(1)
        for kwargs in ({}, {"LAST": 5}, {"step": 3}):
            calls.clear()
            for _ in range(2):
                L.launch(defaults, (1,), out, 3, **kwargs)
            assert len(calls) == 2 and same(*calls), (kwargs, calls)
            assert calls[1][11:] == (kwargs.get("step", 7), 4, kwargs.get("LAST", 2)), calls[1]
        fn = probe._probe_wide_kernel
        x = torch.zeros(64)
        base = [x, x, x, x, x, 115200, 64, 2304, 1, 115200, 64, 2304, 1, 115200, 64, 2304, 1, 38400, 64, 768, 1,
                12, 50, 64, 0.18]
        kw = dict(BLOCK=16, enable_fp_fusion=True)

        def took_triton(args, kwargs=kw):
            before = len(compiles)
            L.launch(fn, (1,), *args, **kwargs)
            return len(compiles) > before

        assert took_triton(base) and not took_triton(base) and not took_triton(list(base))
        assert not took_triton([torch.zeros(64)] + base[1:])  # another tensor, same dtype and alignment
        variants = {"misaligned": [x[1:]] + base[1:], "dtype": [x.double()] + base[1:],
                    "value": base[:6] + [65] + base[7:], "bool for 1": base[:8] + [True] + base[9:],
                    "float for 1": base[:8] + [1.0] + base[9:], "divisible by 16": base[:6] + [48] + base[7:]}
        for name, args in variants.items():
            assert took_triton(args), name
            assert not took_triton(args), name
        triton_path = JITFunction.run
        JITFunction.run = lambda self, *a, grid, warmup, **k: compiles.append("unhashable")
        L.launch(fn, (1,), *base[:-1], [0.18], **kw)  # a list cannot be a key: Triton's path (which judges it)
        JITFunction.run = triton_path
        assert compiles[-1] == "unhashable"
        assert took_triton(base, dict(BLOCK=32, enable_fp_fusion=True))
        assert took_triton(base, dict(BLOCK=16, enable_fp_fusion=True, num_warps=2))
        driver.active.device = 1
        assert took_triton(base) and not took_triton(base)
        assert calls[-1][3] == 1001  # the current device's stream
    """, tmp_path)


def test_triton_path_when_recording_disabled_hooked_or_full(tmp_path):
    """Recorded launches, `ENABLED` off, a kernel with a pre-run hook: Triton's path every time, nothing kept.
    Past `MAX_KEYS` the kept kernels are dropped and kept again from there."""
    _run("""
        fn = probe._probe_small_kernel
        x = torch.zeros(4)
        with cc.record_launches((9, 0)) as rec:
            for _ in range(3):
                L.launch(fn, (1,), x, enable_fp_fusion=True)
        assert len(rec) == 3 and L.kept_launches() == 0
        driver.set_active(Driver(90))
        JITFunction._do_compile = compile
        L.ENABLED = False
        for _ in range(3):
            L.launch(fn, (1,), x, enable_fp_fusion=True)
        assert len(compiles) == 3 and L.kept_launches() == 0
        L.ENABLED = True
        fn.add_pre_run_hook(lambda *a, **k: None)
        for _ in range(2):
            L.launch(fn, (1,), x, enable_fp_fusion=True)
        assert len(compiles) == 5 and L.kept_launches() == 0
        fn.pre_run_hooks.clear()
        L.MAX_KEYS = 3
        wide = probe._probe_wide_kernel
        for n in range(5):
            L.launch(wide, (1,), x, x, x, x, x, *range(16, 32), 12, 50, n, 0.5, BLOCK=16)
            assert L.kept_launches() == n % 3 + 1, (n, L.kept_launches())
    """, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU suite runs it)")
def test_kept_launches_give_what_the_first_launch_gave():
    """On a GPU: each op's Triton launches first through Triton's path, then through the kept kernels; forward and
    backward of attention (short and flash), the token ops and the loss give the same bits both times."""
    from fastmae.kernels import attention, launch, loss, tokens

    device = "cuda"
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 197, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    imgs = torch.randn(2, 3, 64, 64, device=device)
    ids = torch.argsort(torch.rand(2, 16, device=device), dim=1)
    x = torch.randn(2, 16, 32, device=device)
    pos = torch.randn(1, 17, 32, device=device)
    cls = torch.randn(1, 1, 32, device=device)
    pred = torch.randn(2, 16, 768, device=device)
    mask = (torch.rand(2, 16, device=device) > 0.5).float()

    def ops():
        results = []
        for path in ("short", "flash"):
            o, lse = attention.attention_forward(q, k, v, path=path)
            results += [o, lse, *attention.attention_backward(torch.ones_like(o), q, k, v, o, lse, path=path)]
        results.append(tokens.gather_patches_forward(imgs, ids[:, :4], 16))
        results.append(tokens.gather_tokens_forward(x, ids[:, :4], pos, cls, False))
        results.append(tokens.unshuffle_tokens_forward(x[:, :5], ids, cls, pos))
        value, grad, *_ = loss.masked_mse_loss_forward(pred, imgs, mask, 16, True, None, True)
        return results + [value, grad]

    launch.forget_launches()
    first = ops()
    assert launch.kept_launches() > 0
    kept = launch.kept_launches()
    second = ops()
    assert launch.kept_launches() == kept  # nothing new: every launch of the second round was a kept one
    for a, b in zip(first, second):
        assert torch.equal(a, b)
