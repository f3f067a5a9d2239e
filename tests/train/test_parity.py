"""Loss parity: the same pretraining run (seed, data, masking noise, fp32) with the plain reference ops and
with the fastest CPU backend (sdpa) gives the same loss curve.

Tolerance: every one of the 32 losses within 1e-5 relative (plus 1e-7 absolute). The two paths differ only
in the order of floating-point operations (fused attention, patches gathered before the embedding), about
1e-7 relative per op; Adam carries such differences forward from step to step. Measured: at most 1.9e-7
relative over the 32 steps (norm_pix_loss on), so the bound leaves a 50x margin.
"""
import math

import pytest

from fastmae import ops
from fastmae.train.logs import read_step_log
from fastmae.train.pretrain import train

from .common import pretrain_args

STEPS = 32
RTOL, ATOL = 1e-5, 1e-7


def test_reference_and_sdpa_loss_curves_agree(tmp_path):
    common = ("--builtin_size", "256", "--batch_size", "16", "--epochs", "2", "--norm_pix_loss")
    ref = train(pretrain_args(tmp_path / "reference", *common, "--backend", "reference"))
    fast = train(pretrain_args(tmp_path / "sdpa", *common, "--backend", "sdpa"))
    assert len(ref.losses) == len(fast.losses) == STEPS
    worst = 0.0
    for i, (a, b) in enumerate(zip(ref.losses, fast.losses)):
        assert math.isfinite(a) and math.isfinite(b)
        worst = max(worst, abs(a - b) / abs(a))
        assert b == pytest.approx(a, rel=RTOL, abs=ATOL), f"step {i}: reference {a:.8f} vs sdpa {b:.8f}"
    # the runs did learn (a curve worth comparing): the last quarter is below the first quarter
    q = STEPS // 4
    assert sum(ref.losses[-q:]) < sum(ref.losses[:q])
    steps_ref, steps_fast = read_step_log(tmp_path / "reference"), read_step_log(tmp_path / "sdpa")
    assert [s["lr"] for s in steps_ref] == [s["lr"] for s in steps_fast]
    print(f"largest relative loss difference over {STEPS} steps: {worst:.2e}")


def test_triton_loss_curve_matches_reference_on_cpu(tmp_path):
    """`fastmae pretrain --backend triton` runs the training loop on fastmae's kernels (under the suite's Triton
    interpreter here): two fp32 steps (the second after an AdamW update) give the reference's losses within the
    bound above, and every op of the model is served by triton."""
    import torch

    from tests.utils import skip_unless_serves

    skip_unless_serves("attention", "triton", "cpu", torch.float32, head_dim=16)
    common = ("--epochs", "1", "--max_steps", "2", "--batch_size", "4", "--norm_pix_loss")
    ref = train(pretrain_args(tmp_path / "reference", *common, "--backend", "reference"))
    with ops.record_choices() as served:
        fast = train(pretrain_args(tmp_path / "triton", *common, "--backend", "triton"))
    assert served == {op: "triton" for op in ops.OPS}, served
    assert len(ref.losses) == len(fast.losses) == 2
    for i, (a, b) in enumerate(zip(ref.losses, fast.losses)):
        assert math.isfinite(b) and b == pytest.approx(a, rel=RTOL, abs=ATOL), f"step {i}: {a:.8f} vs {b:.8f}"


# On a GPU: the same run in bf16 autocast with the triton backend against the reference in bf16. bf16 rounds
# every activation to 8 mantissa bits and the paths round at different places, so the bound is looser: each
# loss within 2e-2 relative of the reference's, and both curves must fall.
GPU_RTOL = 2e-2


@pytest.mark.gpu
def test_triton_bf16_loss_curve_matches_reference_on_gpu(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (the GPU suite runs it)")
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    common = ("--builtin_size", "256", "--batch_size", "16", "--epochs", "2", "--norm_pix_loss",
              "--device", "cuda", "--precision", "bf16")
    ref = train(pretrain_args(tmp_path / "reference", *common, "--backend", "reference"))
    fast = train(pretrain_args(tmp_path / "triton", *common, "--backend", "triton"))
    assert len(ref.losses) == len(fast.losses) == STEPS
    for i, (a, b) in enumerate(zip(ref.losses, fast.losses)):
        assert math.isfinite(b) and b == pytest.approx(a, rel=GPU_RTOL), \
            f"step {i}: reference {a:.5f} vs triton {b:.5f}"
    q = STEPS // 4
    assert sum(fast.losses[-q:]) < sum(fast.losses[:q])
