"""`fastmae.bench.profile` and `bench train --profile`: kinds read from real kernel and operator names, per-step
sums that add up, and the share of the step."""
from __future__ import annotations

import pytest
import torch

from fastmae.bench import train_bench
from fastmae.bench.cli import profile_table
from fastmae.bench.profile import OTHER, kind_of, profile_step

CPU = torch.device("cpu")


@pytest.mark.parametrize("name, kind", [
    ("_attn_fwd_short", "fastmae attention"),
    ("_attn_bwd_dkdv", "fastmae attention"),
    ("_masked_mse_fwd_kernel", "fastmae tokens+loss"),
    ("_gather_patches_kernel", "fastmae tokens+loss"),
    ("_unshuffle_bwd_kernel", "fastmae tokens+loss"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4> >(Flash_fwd_params)",
     "attention (peers)"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)",
     "attention (peers)"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0",
     "attention (peers)"),
    ("void (anonymous namespace)::softmax_warp_forward<c10::BFloat16, c10::BFloat16, float, 6, false>",
     "attention (peers)"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_kernel__5x_cublas",
     "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "matmul"),
    ("aten::addmm", "matmul"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float, false>", "layernorm"),
    ("aten::native_layer_norm_backward", "layernorm"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>",
     "optimizer"),
    ("aten::_foreach_mul_", "optimizer"),
    ("triton_per_fused_native_layer_norm_0", "torch.compile"),
    ("triton_tem_fused_mm_3", "torch.compile"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", OTHER),
    ("aten::gelu", OTHER),
])
def test_kinds_from_names(name, kind):
    assert kind_of(name) == kind


def test_profile_step_adds_up():
    w = torch.randn(96, 96, requires_grad=True)
    x = torch.randn(64, 96)

    def step():
        with torch.profiler.record_function("a user span"):  # spans are not work of their own: left out
            y = torch.nn.functional.layer_norm(x @ w, (96,))
        y.square().sum().backward()
        w.grad = None

    prof = profile_step(step, CPU, steps=2, top=4)
    assert prof["steps"] == 2 and prof["kind"] == "cpu operators' own time"
    assert prof["busy_ms"] > 0 and prof["step_ms"] >= prof["busy_ms"]  # operators' own time fits in the step
    assert sum(prof["by_kind"].values()) == pytest.approx(prof["busy_ms"], rel=1e-9)
    assert list(prof["calls_by_kind"]) == list(prof["by_kind"])  # the kinds in the same order
    assert sum(prof["calls_by_kind"].values()) == pytest.approx(prof["calls"], abs=0.05)
    assert {"matmul", "layernorm"} <= set(prof["by_kind"])
    ms = [row[2] for row in prof["top"]]
    assert len(ms) == 4 and ms == sorted(ms, reverse=True) and ms[0] <= prof["busy_ms"]
    # per step, aten::mm runs once forward and once backward (w's gradient; x needs none)
    full = profile_step(step, CPU, steps=2, top=100)
    calls = {name: n for name, n, _ in full["top"]}
    assert calls["aten::mm"] == 2
    assert full["calls"] == pytest.approx(sum(calls.values()), abs=0.01) and full["calls"] >= 4
    assert "a user span" not in calls
    with pytest.raises(ValueError, match="steps"):
        profile_step(step, CPU, steps=0)


def test_train_records_with_profile():
    recs = train_bench.run_train(CPU, "mae_vit_tiny_patch4", 2, torch.float32, variants=["official-eager", "fastmae"],
                                 timing=dict(warmup=1, min_reps=2, max_reps=2, max_time_s=0.0),
                                 show_progress=False, profile=True)
    for r in recs:
        assert r["status"] == "ok", r.get("reason")
        prof = r["profile"]
        # on a CPU against the profiled steps' own time (the profiler slows the operators it times): at most 1
        assert r["busy_share"] == pytest.approx(prof["busy_ms"] / prof["step_ms"]) and 0 < r["busy_share"] <= 1
        assert prof["by_kind"].get("matmul", 0) > 0
    text = profile_table(recs)
    assert "official-eager" in text and "fastmae" in text and "of the step" in text
    # without the flag: no profile, and the table says so
    plain = train_bench.run_train(CPU, "mae_vit_tiny_patch4", 2, torch.float32, variants=["official-eager"],
                                  timing=dict(warmup=1, min_reps=2, max_reps=2, max_time_s=0.0),
                                  show_progress=False)
    assert "profile" not in plain[0] and "busy_share" not in plain[0]
    assert "not profiled" in profile_table(plain)
