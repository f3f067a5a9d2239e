"""Ahead-of-time compile check for real GPUs (sm_80 and sm_90), runnable without a GPU.

The Triton interpreter accepts code the GPU compiler rejects and says nothing about registers, so the
configurations each kernel module exports (`compile_specs()`) are compiled for A100 and H100 targets and
must compile, not spill, and fit the target's register and shared-memory limits (`compile_check.LIMITS`).
Compiling every configuration takes tens of minutes on a small CPU machine (hundreds of configurations,
0.3 to 5 s each, some far longer), so by default these tests compile `compile_check.representative(...)`
of each module: per kernel function its largest fp16/bf16 tile and its smallest tile. Set
FASTMAE_COMPILE_CHECK=all to compile every configuration here, or run
`python -m fastmae.kernels.compile_check`, which checks all of them and prints a table.

The checker itself is tested on small kernels defined here: one that compiles cleanly, one that must
spill, a tl.dot that must use tensor cores, and specs that must come back as compile errors, not crashes.
Under the CPU suite (TRITON_INTERPRET=1) the compiles run in a worker process with the interpreter off;
the kernels here are found there by module and name, so they stay at module level.
"""
from __future__ import annotations

import functools
import os
import re

import pytest

triton = pytest.importorskip("triton", reason="the compile check needs triton (pip install triton)")
import triton.language as tl  # noqa: E402

from fastmae.kernels import compile_check as cc  # noqa: E402
from fastmae.kernels.utils import FP_FUSION, CompileSpec  # noqa: E402

COMPILE_ALL = os.environ.get("FASTMAE_COMPILE_CHECK", "").lower() == "all"


@functools.lru_cache(maxsize=None)
def _module_results() -> dict[str, cc.ModuleResult]:
    # one call for all modules: under the interpreter that is one worker process (its start-up, mostly
    # importing torch and the kernel modules, costs several seconds)
    results = cc.check_modules(cc.KERNEL_MODULES, (*cc.ARCHS, 100), sample=not COMPILE_ALL)  # and sm_100
    return {r.module: r for r in results}


@pytest.mark.parametrize("arch", (*cc.ARCHS, 100))
@pytest.mark.parametrize("module", cc.KERNEL_MODULES)
def test_kernel_module_compiles(module, arch):
    """The module's configurations (all, or the representative ones) compile for `arch` with no spills and
    within the limits; every problem is listed. Data-centre Blackwell (sm_100, B200), which takes Hopper's tiles,
    is checked beside the default architectures."""
    result = _module_results()[module]
    assert result.status == "checked", f"{module}: {result.status}: {result.message}"
    reports = [r for r in result.reports if r.arch == arch]
    assert reports, f"{module} exported no configurations"
    problems = [f"{r.name}: {p}" for r in reports for p in r.problems]
    scope = "all" if COMPILE_ALL else "representative"
    assert not problems, (f"{len(problems)} problem(s) in {len(reports)} {scope} configurations on sm_{arch}:\n"
                          + "\n".join(problems))
    for r in reports:
        assert r.registers and 0 < r.registers <= cc.LIMITS[arch].max_registers_per_thread, r
        assert r.shared_bytes <= cc.LIMITS[arch].max_shared_per_block, r


def test_representative_sample():
    """The sample keeps, per kernel function and set of architectures, its largest 16-bit tile and its smallest
    tile."""
    def spec(name, block, dtype, warps=4):
        return CompileSpec(name, _add_kernel, {"x_ptr": dtype, "y_ptr": dtype, "out_ptr": dtype, "n": "i32"},
                           {"BLOCK": block}, num_warps=warps)
    specs = [spec("a", 256, "*fp32"), spec("b", 4096, "*fp32"), spec("c", 1024, "*fp16"), spec("d", 2048, "*bf16"),
             spec("e", 4096, "*fp16", warps=8), CompileSpec("f", _hoard_kernel, {"x_ptr": "*fp32", "out_ptr": "*fp32"},
                                                            {"BLOCK": 64})]
    assert [s.name for s in cc.representative(specs)] == ["a", "d", "f"]
    # a larger tile launched on sm_90 only does not stand for sm_80's largest: each set of archs has its own
    hopper = spec("g", 8192, "*fp16")
    hopper.archs = (90,)
    assert [s.name for s in cc.representative(specs + [hopper])] == ["a", "d", "f", "g"]


# --- the checker itself --------------------------------------------------------------------------

@triton.jit
def _add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (x + y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hoard_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    """Keeps a whole BLOCK-long row live across a reduction: with one warp, BLOCK / 32 values per thread."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs).to(tl.float32)
    x = x * tl.exp(x)
    total = tl.sum(x, axis=0)
    tl.store(out_ptr + offs, x - total)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b))


ADD = CompileSpec("add_fp16_b1024", _add_kernel, {"x_ptr": "*fp16", "y_ptr": "*fp16", "out_ptr": "*fp16", "n": "i32"},
                  {"BLOCK": 1024}, num_warps=4, num_stages=2)
HOARD = CompileSpec("hoard_b8192_w1", _hoard_kernel, {"x_ptr": "*fp32", "out_ptr": "*fp32"}, {"BLOCK": 8192},
                    num_warps=1)
DOT = CompileSpec("dot_64x64x32_fp16", _dot_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32"},
                  {"M": 64, "N": 64, "K": 32}, num_warps=4)
# On the GPU, tl.dot on 16-bit inputs needs K >= 16 (M and N may be small: they are padded); the
# interpreter runs K=8 without complaint.
DOT_TOO_SMALL = CompileSpec("dot_64x64x8_fp16", _dot_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32"},
                            {"M": 64, "N": 64, "K": 8}, num_warps=4)
MISSING_ARG = CompileSpec("add_without_n", _add_kernel, {"x_ptr": "*fp16", "y_ptr": "*fp16", "out_ptr": "*fp16"},
                          {"BLOCK": 1024})
SCALAR_FOR_POINTER = CompileSpec("add_x_as_scalar", _add_kernel,
                                 {"x_ptr": "fp32", "y_ptr": "*fp16", "out_ptr": "*fp16", "n": "i32"}, {"BLOCK": 1024})
CHECKER_SPECS = (ADD, HOARD, DOT, DOT_TOO_SMALL, MISSING_ARG, SCALAR_FOR_POINTER)


@functools.lru_cache(maxsize=None)
def _checker_reports() -> dict[tuple[str, int], cc.Report]:
    reports = cc.check_specs(CHECKER_SPECS, cc.ARCHS)
    return {(r.name, r.arch): r for r in reports}


@pytest.mark.parametrize("arch", cc.ARCHS)
def test_checker_passes_a_clean_kernel(arch):
    r = _checker_reports()[ADD.name, arch]
    assert r.ok, r.problems
    assert r.registers is not None and 0 < r.registers < 64, r
    assert r.spill_bytes == 0 and r.shared_bytes == 0, r
    assert (r.num_warps, r.num_stages) == (4, 2)


@pytest.mark.parametrize("arch", cc.ARCHS)
def test_checker_reports_spills(arch):
    """8192 fp32 values on one warp is 256 per thread, past the 255-register limit: ptxas must spill."""
    r = _checker_reports()[HOARD.name, arch]
    assert r.spill_stores > 0 and r.spill_loads > 0, r
    assert r.registers is not None and r.stack_frame > 0, r
    assert any("register spills" in p for p in r.problems), r.problems


@pytest.mark.parametrize("arch", cc.ARCHS)
def test_checker_sees_tensor_cores(arch):
    """A 64x64x32 fp16 tl.dot compiles to mma.sync on sm_80 and to wgmma on sm_90, using shared memory."""
    r = _checker_reports()[DOT.name, arch]
    assert r.ok, r.problems
    assert r.mma == ("wgmma" if arch >= 90 else "mma"), r
    assert r.shared_bytes > 0, r


@pytest.mark.parametrize("arch", cc.ARCHS)
def test_checker_reports_compile_errors(arch):
    """Wrong specs and GPU-only compile errors come back as problems, not exceptions."""
    reports = _checker_reports()
    small = reports[DOT_TOO_SMALL.name, arch]
    assert small.problems and small.problems[0].startswith("compile error"), small
    assert "K >= 16" in small.problems[0] and small.registers is None, small
    missing = reports[MISSING_ARG.name, arch]
    assert missing.problems and "compile error" in missing.problems[0] and "'n'" in missing.problems[0], missing
    scalar = reports[SCALAR_FOR_POINTER.name, arch]
    assert scalar.problems and scalar.problems[0].startswith("compile error"), scalar


def test_limits_are_checked():
    """The limit rules on synthetic numbers (no compile): registers per block and shared memory per block."""
    r = cc.Report("synthetic", 80, num_warps=16, registers=129, dynamic_shared=cc.LIMITS[80].max_shared_per_block + 1)
    cc._check_limits(r)
    assert any("registers of a block" in p for p in r.problems), r.problems
    assert any("shared memory" in p for p in r.problems), r.problems
    ok = cc.Report("synthetic", 90, num_warps=8, registers=255, dynamic_shared=cc.LIMITS[80].max_shared_per_block + 1)
    cc._check_limits(ok)
    assert ok.problems == [], ok.problems  # 8 warps x 256 allocated registers fit; 163 KiB + 1 fits an H100 block
    edge = cc.Report("synthetic", 90, num_warps=16, registers=128)
    cc._check_limits(edge)
    assert edge.problems == [], edge.problems  # 512 threads x 128 registers is exactly 65536


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem\n")
    assert cc.parse_ptxas_log(log) == dict(registers=255, stack_frame=8, spill_stores=12, spill_loads=16,
                                           static_shared=2048)


def test_missing_module_is_reported():
    result = cc.check_module("fastmae.kernels.no_such_module", [80])
    assert result.status == "missing" and not result.ok and result.reports == []


# --- launches recorded from a training step, specialised as a GPU run specialises them -------------------

TRACED_WORKLOADS = (cc.Workload("mae_vit_base_patch16", "bf16"),
                    cc.Workload("mae_vit_base_patch16", "bf16", norm_pix_loss=False, pred_masked_only=True),
                    "tests.kernels.test_compile:_launch_adds")
# the row-copy kernels must read and write whole vectors at MAE's widths (a unit last stride and strides that
# are multiples of 16 elements): their stores are only data, so the widest store says it
VECTOR_STORES = ("gather_patches_kernel", "gather_tokens_fwd_kernel", "unshuffle_fwd_kernel", "unshuffle_bwd_kernel",
                 "masked_mse_bwd_kernel")


def _launch_adds():
    """Three launches of `_add_kernel` (run under `record_launches`: nothing executes): a length of 1, a length
    that is a multiple of 16, and a misaligned input with an odd length."""
    import torch
    x = torch.zeros(64)
    _add_kernel[(1,)](x, x, x, 1, BLOCK=64)
    _add_kernel[(1,)](x, x, x, 32, BLOCK=64)
    _add_kernel[(1,)](x[1:], x, x, 7, BLOCK=64, num_warps=2)


@functools.lru_cache(maxsize=None)
def _traced_reports() -> tuple[cc.Report, ...]:
    return tuple(cc.check_traced(TRACED_WORKLOADS, cc.ARCHS))


def _kernel(report: cc.Report) -> str:
    return report.name.split("[")[0]


def test_traced_launches_are_specialised_as_triton_does():
    """Triton's launcher turns an integer 1 into a constant, marks multiples of 16, and drops the alignment of a
    misaligned pointer; options not passed take Triton's defaults (num_stages=3)."""
    adds = [r for r in _traced_reports() if _kernel(r) == "add_kernel" and r.arch == 90]
    assert len(adds) == 3, [r.name for r in adds]
    one, sixteen, odd = adds
    assert "equal to 1: n" in one.specialized and one.name.endswith("|n=1]"), one
    assert "multiples of 16: n;" in sixteen.specialized and "unaligned pointers: none" in sixteen.specialized, sixteen
    assert "multiples of 16: none" in odd.specialized and "unaligned pointers: x_ptr" in odd.specialized, odd
    assert (one.num_warps, one.num_stages, odd.num_warps) == (4, 3, 2)
    assert all(r.ok for r in adds), [r.problems for r in adds]
    assert all(r.sources == ["tests.kernels.test_compile:_launch_adds"] for r in adds)


@pytest.mark.parametrize("option, message", [
    ({"enable_fp_fusion": not FP_FUSION}, f"passes enable_fp_fusion={not FP_FUSION}; the compile check compiles with"),
    ({"maxnreg": 128}, "passes options ['maxnreg'] that the compile check does not model"),
])
def test_launch_spec_refuses_options_the_check_does_not_compile_with(option, message):
    import torch
    x = torch.zeros(64)
    launch = cc.Launch(_add_kernel, (x, x, x, 64), {"BLOCK": 64, "num_warps": 4, **option}, (1,))
    with pytest.raises(ValueError, match=re.escape(message)):
        cc.launch_spec(launch, 90)


@pytest.mark.parametrize("arch", cc.ARCHS)
def test_traced_training_step_compiles(arch):
    """Every launch of a ViT-B training step (bf16 autocast; with and without norm_pix_loss and the masked-only
    head), as a GPU of that architecture specialises it, compiles without spills within the limits; the
    memory-bound row kernels store whole vectors."""
    reports = [r for r in _traced_reports() if r.arch == arch and _kernel(r) != "add_kernel"]
    problems = [f"{r.name}: {p}" for r in reports for p in r.problems]
    assert not problems, "\n".join(problems)
    kernels = {_kernel(r) for r in reports}
    expected = {"gather_patches_kernel", "gather_tokens_fwd_kernel", "unshuffle_fwd_kernel", "unshuffle_bwd_kernel",
                "colsum_kernel", "masked_mse_fwd_kernel", "masked_mse_finalize_kernel", "masked_mse_bwd_kernel"}
    assert expected <= kernels, sorted(expected - kernels)
    assert any(k.startswith("attn_fwd") for k in kernels) and any(k.startswith("attn_bwd") for k in kernels), kernels
    assert any("HAS_IDS=1" in r.name for r in reports), "the masked-only head's loss launch was not recorded"
    patches = [r for r in reports if _kernel(r) == "gather_patches_kernel"]
    assert all("equal to 1: stride_w" in r.specialized for r in patches), [r.specialized for r in patches]
    for r in reports:
        if _kernel(r) in VECTOR_STORES:
            assert r.store_bytes and max(r.store_bytes) >= 8, (r.name, r.store_bytes)
        if _kernel(r).startswith("attn_"):
            assert "equal to 1: s" in r.specialized, r.specialized  # unit head-dim strides are constants


def test_launch_probes_compile():
    """The benchmark's launch probes (`kernels/probe.py`, outside KERNEL_MODULES: no model step launches them)
    compile for the default targets and sm_100, each as one tiny kernel."""
    (result,) = cc.check_modules(("fastmae.kernels.probe",), (*cc.ARCHS, 100))
    assert result.status == "checked", result.message
    assert sorted((r.name, r.arch) for r in result.reports) == sorted(
        (name, arch) for name in ("probe_small", "probe_wide") for arch in (*cc.ARCHS, 100))
    assert not [p for r in result.reports for p in r.problems]


def test_global_access_sizes():
    ptx = ("ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n@%p1 ld.global.L1::evict_last.b16 {%rs1}, [%rd2];\n"
           "ld.global.b64 %rd3, [%rd4];\nst.global.v2.b32 [%rd5], {%r5, %r6};\natom.global.add.f32 %f1, [%rd6], %f2;")
    assert cc.global_access_bytes(ptx) == ([2, 8, 16], [8])
    assert cc.global_access_bytes("") == ([], [])


def test_traced_launches_are_among_the_listed_configurations():
    """Each launch of the traced training steps has its configuration (pointer types, block constants, warps,
    stages) among its module's `compile_specs()`: the listed configurations follow the launchers' own rules."""
    import importlib
    listed = {cc.config_key(s) for m in cc.KERNEL_MODULES for s in importlib.import_module(m).compile_specs()}
    traced = [r for r in _traced_reports() if _kernel(r) != "add_kernel"]
    assert traced and all(r.config for r in traced)
    missing = sorted({f"{r.config} (sm_{r.arch})" for r in traced if r.config not in listed})
    assert not missing, "traced launches whose configuration compile_specs() does not list:\n" + "\n".join(missing)


def test_every_kernel_is_launched_with_the_fp_fusion_the_check_compiles_with():
    """Every kernel the modules list for the check, launched by a training step (plus the flash attention path
    and the gather of ungathered tokens), passes enable_fp_fusion=FP_FUSION, the option the check compiles with:
    what runs and what is checked stay the same code whatever the installed triton's default (triton 3.9 warns
    that its default changes in 3.10)."""
    import importlib

    import torch

    import fastmae
    from fastmae.kernels import attention as attn
    from tests.utils import launched_kernels, skip_unless_serves

    skip_unless_serves("gather_tokens", "triton", "cpu", torch.float32)
    listed = {cc.python_function(s.fn).__name__ for m in cc.KERNEL_MODULES
              for s in importlib.import_module(m).compile_specs()}
    model = fastmae.mae_vit_tiny_patch4(norm_pix_loss=True, backend="triton")
    q = torch.randn(1, 2, 40, 32, requires_grad=True)
    x = torch.randn(2, 64, 64, requires_grad=True)
    with launched_kernels() as launched:
        model(torch.randn(2, 3, 32, 32), mask_ratio=0.75)[0].backward()
        attn.attention(q, q, q, path="flash").sum().backward()
        fastmae.ops.gather_tokens(x, torch.randperm(64)[:16].repeat(2, 1), model.pos_embed, model.cls_token,
                                  backend="triton").sum().backward()
    assert {ln.name for ln in launched} == listed, sorted({ln.name for ln in launched} ^ listed)
    assert all(ln.kwargs.get("enable_fp_fusion") is FP_FUSION for ln in launched), \
        sorted({ln.name for ln in launched if ln.kwargs.get("enable_fp_fusion") is not FP_FUSION})


def test_blocks_per_sm_takes_the_tightest_limit():
    """Resident blocks per SM from synthetic numbers: warps (64 per SM), registers (64 K per SM, allocated per
    warp in units of 256), shared memory (plus 1 KB per block), and at most 32 blocks."""
    assert cc.blocks_per_sm(90, 32, 4, 0) == 16  # warps: 64 / 4
    assert cc.blocks_per_sm(90, 128, 4, 0) == 4  # registers: 65536 / (128 * 32 * 4)
    assert cc.blocks_per_sm(90, 129, 4, 0) == 3  # 129 registers allocate 4352 per warp
    assert cc.blocks_per_sm(90, 32, 4, 60 * 1024) == 3  # shared memory: 228 KB / 61 KB
    assert cc.blocks_per_sm(80, 32, 4, 60 * 1024) == 2  # 164 KB on an A100
    assert cc.blocks_per_sm(90, 16, 1, 0) == 32  # the block limit
    assert cc.blocks_per_sm(90, 255, 8, 0) == 1 and cc.blocks_per_sm(90, 255, 16, 0) == 0


def test_traced_launches_report_their_grid():
    """Each traced launch carries its grid's size and, from its registers and shared memory, its waves."""
    reports = _traced_reports()
    adds = [r for r in reports if _kernel(r) == "add_kernel"]
    assert adds and all(r.programs == 1 for r in adds), [(r.name, r.programs) for r in adds]
    for r in reports:
        assert r.programs >= 1 and r.blocks_per_sm >= 1, (r.name, r.programs, r.blocks_per_sm)
        sms = cc.LIMITS[r.arch].sms
        assert r.waves == pytest.approx(r.programs / (sms * r.blocks_per_sm), abs=0.01), r
    # the ViT-B encoder's attention forward at batch 16: one program per 64-row block of each of 16 x 12 heads
    fwd = [r for r in reports if r.arch == 90 and _kernel(r) == "attn_fwd_short" and "D_PAD=64" in r.name]
    assert fwd and all(r.programs == 16 * 12 for r in fwd), [(r.name, r.programs) for r in fwd]


def test_traced_specs_are_the_sources_tritons_launch_path_compiles(tmp_path):
    """For every launch of a traced ViT-B bf16 training step, the source the compile check builds from the
    launch (`launch_spec` + `_make_source`) is the one Triton's own launch path builds on sm_90 (a stand-in
    driver names the target; the compile is replaced by a probe): the same argument types, constants,
    attributes (alignment, divisibility) and options, fp fusion included. Triton's launch path also lists the
    arguments without attributes, with an empty list, which changes its cache key but nothing compiled."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "sources.py"
    script.write_text(textwrap.dedent("""
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction
        from fastmae.kernels import compile_check as cc

        with cc.record_launches((9, 0)) as calls:
            cc.Workload("mae_vit_base_patch16", "bf16").run()
        driver.set_active(cc.TargetDriver(90))
        seen = {}

        def probe(self, key, signature, device, constexprs, options, attrs, warmup):
            seen.update(src=self.ASTSource(self, signature, constexprs, attrs), options=options,
                        backend=self.device_caches[device][3])

        JITFunction._do_compile = probe
        for c in calls:
            c.fn.run(*c.args, grid=c.grid, warmup=False, **c.kwargs)
            spec = cc.launch_spec(c, 90)
            src = cc._make_source(cc._jit_function(spec.fn), dict(spec.signature), dict(spec.constexprs),
                                  cc._divisible_names(spec, False), spec.unaligned)
            real = seen["src"]
            assert src.signature == real.signature, (spec.name, src.signature, real.signature)
            assert src.constants == real.constants, (spec.name, src.constants, real.constants)
            assert src.attrs == {k: v for k, v in real.attrs.items() if v}, (spec.name, src.attrs, real.attrs)
            ours = seen["backend"].parse_options(cc.compile_options(spec.num_warps, spec.num_stages))
            assert ours.hash() == seen["options"].hash(), (spec.name, ours, seen["options"])
        print("launches", len(calls))
    """))
    # with Triton's fp-fusion default turned off, the options still agree only if every launch and the check's
    # compiles state the fusion themselves (kernels.utils.FP_FUSION)
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "TRITON_DEFAULT_FP_FUSION": "0"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    launches = re.search(r"^launches (\d+)$", proc.stdout, re.M)
    assert launches and int(launches.group(1)) > 0, proc.stdout[-2000:]  # a training step launches kernels
