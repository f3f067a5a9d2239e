"""The fused masked-MSE loss (`fastmae.kernels.loss`) against the reference path, forward and backward.

Tolerance: the suite's one rule, `tests.utils.assert_error_within_plain`: the kernel's error against an
fp32 reference <= 2 x the plain reference path's error in the test dtype + a floor per dtype. Inputs are
drawn in fp32 and rounded to the test dtype once, and the fp32 reference runs on those rounded values, so
the errors measure the computation, not the input rounding. The upstream gradient is `denominator * P / 2`,
which makes grad_pred = w * (pred - target), of order one, so the per-dtype floors do not hide errors.

bf16 runs on the CPU too (convert after load, before store). The interpreter converts fp32 -> bf16 by
truncating where the GPU rounds to nearest, so on the CPU the "plain path's error" for bf16 is the larger of
the plain path's own and that of truncating the fp32 reference (`plain_for_rule`).

Masks are built as the model builds them (noise -> argsort -> ids_shuffle, ids_restore -> mask).
"""
from __future__ import annotations

import pytest
import torch

from fastmae import ops
from fastmae.ops import reference
from tests.utils import (DEVICES, assert_error_within_plain, launched_kernels, masking, plain_for_rule,
                         skip_unless_serves)

loss_mod = pytest.importorskip("fastmae.kernels.loss", reason="the Triton kernels need triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, C, p, grid h, grid w, kept K): L = 4, 64, 196, 256 with ratios 0.5, 0.75, 0.9 and a single kept
# patch; the ViT-B (3x16x16) and ViT-H (3x14x14) patch vectors; a non-square image; no patch removed.
CASES = [(2, 3, 4, 2, 2, 2), (2, 1, 8, 8, 8, 16), (1, 3, 4, 14, 14, 19), (1, 1, 4, 16, 16, 1),
         (1, 3, 16, 4, 4, 4), (2, 3, 14, 2, 2, 1), (2, 3, 4, 2, 3, 3), (2, 2, 4, 4, 4, 16)]


def _inputs(case, device, seed=1, pred_rows=None):
    n, c, p, gh, gw, K = case
    L, P = gh * gw, c * p * p
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(n, c, gh * p, gw * p, generator=g).to(device)
    pred = (0.5 * torch.randn(n, L if pred_rows is None else pred_rows, P, generator=g)).to(device)
    return imgs, pred


def _loss_and_grad(fn, pred, imgs, mask, p, norm_pix, pred_ids, upstream):
    leaf = pred.detach().requires_grad_(True)
    loss = fn(leaf, imgs, mask, p, norm_pix, pred_ids)
    (grad,) = torch.autograd.grad(loss, [leaf], torch.tensor(upstream, device=loss.device, dtype=loss.dtype))
    return loss.detach(), grad


def _compare(device, dtype, case, norm_pix, pred_ids_mode=False, img_dtype=None):
    n, c, p, gh, gw, K = case
    L, P = gh * gw, c * p * p
    ids_shuffle, _, mask = masking(n, L, K, device, seed=L + K)
    pred_ids = ids_shuffle[:, K:].contiguous() if pred_ids_mode else None
    imgs32, pred32 = _inputs(case, device, pred_rows=None if pred_ids is None else L - K)
    img_dtype = img_dtype or dtype
    imgs, pred = imgs32.to(img_dtype), pred32.to(dtype)
    denom = float(n * (L - K)) if pred_ids_mode else max(float(mask.sum()), 1.0)
    upstream = denom * P / 2
    args = (mask, p, norm_pix, pred_ids, upstream)
    loss, grad = _loss_and_grad(loss_mod.masked_mse_loss, pred, imgs, *args)
    plain, plain_grad = _loss_and_grad(reference.masked_mse_loss, pred, imgs, *args)
    ref, ref_grad = _loss_and_grad(reference.masked_mse_loss, pred.float(), imgs.float(), *args)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == dtype and grad.shape == pred.shape
    assert_error_within_plain(loss, plain, ref, "loss")
    assert_error_within_plain(grad, plain_for_rule(plain_grad, ref_grad), ref_grad, "grad pred")
    if pred_ids is None:  # kept patches get exactly zero gradient
        assert not grad[mask == 0].any()
    return loss, grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_masked_mse_matches_reference(device, dtype, norm_pix, case):
    skip_unless_serves("masked_mse_loss", "triton", device, dtype)
    loss, grad = _compare(device, dtype, case, norm_pix)
    if case[5] == case[3] * case[4]:  # nothing removed: 0 / max(0, 1) as the reference
        assert float(loss) == 0.0 and not grad.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[6]])
def test_masked_mse_pred_ids_matches_reference(device, dtype, norm_pix, case):
    """A decoder that predicts the removed patches only: pred [N, M, P] for patches pred_ids [N, M]."""
    skip_unless_serves("masked_mse_loss", "triton", device, dtype)
    _compare(device, dtype, case, norm_pix, pred_ids_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pred_ids_mode", [False, True])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]])
def test_masked_mse_pipelined_programs(monkeypatch, device, dtype, pred_ids_mode, case):
    """The forward's software pipeline with several tiles per program (at MAE's sizes each program takes up
    to PIPELINE_MAX_TILES; these small cases take one unless told otherwise): 3 tiles per program, the last
    program with fewer, against the reference, loss and gradient."""
    skip_unless_serves("masked_mse_loss", "triton", device, dtype)
    monkeypatch.setattr(loss_mod, "PIPELINE_MIN_PROGRAMS", 1)
    monkeypatch.setattr(loss_mod, "PIPELINE_MAX_TILES", 3)
    with launched_kernels() as launched:
        _compare(device, dtype, case, True, pred_ids_mode)
    fwd = [launch for launch in launched if launch.name == "_masked_mse_fwd_kernel"]
    assert len(fwd) == 1
    tiles = fwd[0].args[loss_mod._FWD_NAMES.index("tiles")]
    assert tiles == 3, f"expected 3 tiles per program, got {tiles}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pred_ids_mode", [False, True])
def test_masked_mse_sums_programs_over_several_finalize_blocks(monkeypatch, device, pred_ids_mode):
    """Each forward program writes its rows' summed partials and weights; the finalize kernel sums them block
    by block. Here 8 programs of 2 tiles each meet a finalize block of 4 (two passes): loss and gradient against
    the reference."""
    skip_unless_serves("masked_mse_loss", "triton", device, torch.float32)
    monkeypatch.setattr(loss_mod, "PIPELINE_MIN_PROGRAMS", 1)
    monkeypatch.setattr(loss_mod, "PIPELINE_MAX_TILES", 2)
    monkeypatch.setattr(loss_mod, "FINALIZE_BLOCK", 4)
    with launched_kernels() as launched:
        _compare(device, torch.float32, (4, 1, 8, 8, 8, 32), True, pred_ids_mode)
    fwd = [launch for launch in launched if launch.name == "_masked_mse_fwd_kernel"]
    fin = [launch for launch in launched if launch.name == "_masked_mse_finalize_kernel"]
    assert len(fwd) == 1 and len(fin) == 1
    assert fwd[0].args[loss_mod._FWD_NAMES.index("tiles")] == 2
    assert fin[0].args[4] > 4, f"expected more programs than one finalize block, got {fin[0].args[4]}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masked_mse_half_pred_fp32_images(device, dtype):
    """Mixed precision: half predictions against fp32 images (the target stays fp32, as in the reference)."""
    skip_unless_serves("masked_mse_loss", "triton", device, dtype)
    _compare(device, dtype, CASES[1], True, img_dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_mse_strided_images(device):
    """Channels-last and other strided images are read in place (the kernel is given the image itself, not a
    copy), with the reference's loss and gradient."""
    skip_unless_serves("masked_mse_loss", "triton", device, torch.float32)
    case = (2, 3, 4, 8, 8, 16)
    imgs, pred = _inputs(case, device)
    _, _, mask = masking(2, 64, 16, device)
    channels_last = imgs.to(memory_format=torch.channels_last)
    transposed = imgs.transpose(2, 3).contiguous().transpose(2, 3)
    upstream = 16 * 48 / 2
    for strided in (channels_last, transposed):
        assert not strided.is_contiguous()
        for norm_pix in (False, True):
            with launched_kernels() as launched:
                loss, grad = _loss_and_grad(loss_mod.masked_mse_loss, pred, strided, mask, 4, norm_pix, None,
                                            upstream)
            # the one kernel that reads the image (it writes the gradient's rows in the same pass)
            (reader,) = [ln for ln in launched if ln.name == "_masked_mse_fwd_kernel"]
            assert any(a is strided for a in reader.args) and reader.kwargs["WRITE_GRAD"]
            ref, ref_grad = _loss_and_grad(reference.masked_mse_loss, pred, imgs, mask, 4, norm_pix, None, upstream)
            assert_error_within_plain(loss, ref, ref, "strided loss")
            assert_error_within_plain(grad, ref_grad, ref_grad, "strided grad pred")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pred_ids_mode", [False, True])
def test_masked_mse_is_deterministic(device, pred_ids_mode):
    """The same inputs give the same bits for the loss and the gradient, run after run (no atomics)."""
    skip_unless_serves("masked_mse_loss", "triton", device, torch.float32)
    case = (4, 3, 4, 8, 8, 16)
    ids_shuffle, _, mask = masking(4, 64, 16, device)
    pred_ids = ids_shuffle[:, 16:].contiguous() if pred_ids_mode else None
    imgs, pred = _inputs(case, device, pred_rows=None if pred_ids is None else 48)
    pred = pred * 1000  # large values make any change of summation order visible
    runs = [_loss_and_grad(loss_mod.masked_mse_loss, pred, imgs, mask, 4, True, pred_ids, 3.0) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]), "loss bits differ between runs"
    assert torch.equal(runs[0][1], runs[1][1]), "grad bits differ between runs"


@pytest.mark.parametrize("device", DEVICES)
def test_masked_mse_keeps_the_mask_without_a_copy(device):
    """A contiguous fp32 mask (the model's) is saved for the backward as it is, not copied (a copy is one more
    kernel per step on a GPU); changing it in place before the backward is then an error, not a silent change
    of the gradient."""
    skip_unless_serves("masked_mse_loss", "triton", device, torch.float32)
    imgs, pred = _inputs(CASES[0], device)
    _, _, mask = masking(2, 4, 2, device)
    assert mask.dtype == torch.float32 and mask.is_contiguous()
    leaf = pred.detach().requires_grad_(True)
    value = loss_mod.masked_mse_loss(leaf, imgs, mask, 4, True)
    assert any(t.data_ptr() == mask.data_ptr() for t in value.grad_fn.saved_tensors)
    (grad,) = torch.autograd.grad(value, [leaf], retain_graph=True)
    _, ref_grad = _loss_and_grad(reference.masked_mse_loss, pred, imgs, mask, 4, True, None, 1.0)
    assert_error_within_plain(grad, ref_grad, ref_grad, "grad pred")
    mask.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(value, [leaf])


@pytest.mark.parametrize("device", DEVICES)
def test_masked_mse_forward_only_writes_no_grad(device):
    """Without grad the kernel writes no gradient buffer, and the loss has the same bits as with grad."""
    skip_unless_serves("masked_mse_loss", "triton", device, torch.float16)
    imgs, pred = _inputs(CASES[0], device)
    _, _, mask = masking(2, 4, 2, device)
    pred = pred.half().requires_grad_(True)
    loss_fwd, g, denom, _ = loss_mod.masked_mse_loss_forward(pred, imgs, mask, 4, True, None, write_grad=False)
    assert g is None and float(denom) == float(mask.sum())
    with torch.no_grad():
        loss_nograd = loss_mod.masked_mse_loss(pred, imgs, mask, 4, True)
    assert loss_nograd.grad_fn is None
    loss_grad = loss_mod.masked_mse_loss(pred, imgs, mask, 4, True)
    assert loss_grad.grad_fn is not None
    assert torch.equal(loss_fwd, loss_nograd) and torch.equal(loss_nograd, loss_grad.detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pred_ids_mode", [False, True])
def test_masked_mse_fp16_gradient_keeps_small_errors(device, pred_ids_mode):
    """fp16 predictions close to their targets (errors of about 1e-4, as late in training) under a loss scale of
    2^16: the gradient is as exact as the plain path's. The kernel's buffer holds the errors themselves; it held
    them times 2 w / P (1/24 here), below fp16's smallest normal number, and lost their digits (norm-relative error
    1.8e-3, against the plain path's 2.0e-4)."""
    skip_unless_serves("masked_mse_loss", "triton", device, torch.float16)
    n, c, p, L = 2, 3, 4, 16
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(n, c, 16, 16, generator=g).to(device)
    ids_shuffle, _, mask = masking(n, L, 4, device, seed=5)
    pred_ids = ids_shuffle[:, 4:].contiguous() if pred_ids_mode else None
    target = reference.patchify(imgs, p)
    if pred_ids is not None:
        target = torch.gather(target, 1, pred_ids.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
    pred = (target + 1e-4 * torch.randn(target.shape, generator=g).to(device)).half()
    errors = {}
    for name, fn in (("triton", loss_mod.masked_mse_loss), ("plain", reference.masked_mse_loss)):
        leaf = pred.detach().requires_grad_(True)
        loss = fn(leaf, imgs, mask, p, False, pred_ids)
        (grad,) = torch.autograd.grad(loss, [leaf], torch.tensor(65536.0, device=device))
        exact_leaf = pred.detach().double().requires_grad_(True)
        exact = reference.masked_mse_loss(exact_leaf, imgs.double(), mask.double(), p, False, pred_ids)
        (truth,) = torch.autograd.grad(exact, [exact_leaf], torch.tensor(65536.0, device=device, dtype=torch.float64))
        errors[name] = float((grad.double() - truth).norm() / truth.norm())
    assert errors["triton"] <= 2 * errors["plain"] + 1e-4, errors


@pytest.mark.parametrize("device", DEVICES)
def test_masked_mse_backward_twice_with_retained_graph(device):
    """The saved per-pixel gradient is not overwritten: a second backward (retain_graph) gives the same grad."""
    skip_unless_serves("masked_mse_loss", "triton", device, torch.float32)
    imgs, pred = _inputs(CASES[1], device)
    _, _, mask = masking(2, 64, 16, device)
    pred.requires_grad_(True)
    loss = loss_mod.masked_mse_loss(pred, imgs, mask, 8, False)
    (g1,) = torch.autograd.grad(loss, [pred], retain_graph=True)
    (g2,) = torch.autograd.grad(loss, [pred], torch.tensor(2.0, device=device))
    assert torch.equal(g1 * 2, g2)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_mse_refuses_imgs_requiring_grad(device):
    skip_unless_serves("masked_mse_loss", "triton", device, torch.float32)
    imgs, pred = _inputs(CASES[0], device)
    _, _, mask = masking(2, 4, 2, device)
    with pytest.raises(ValueError, match="no gradient to imgs"):
        loss_mod.masked_mse_loss(pred, imgs.requires_grad_(True), mask, 4)
    # a mask requiring a gradient (the reference gives it one) is refused too, by the kernel and the registry
    # (the automatic choice then takes the reference), not left without a gradient
    mask = mask.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="no gradient to mask"):
        loss_mod.masked_mse_loss(pred, imgs.detach(), mask, 4)
    with pytest.raises(ops.BackendUnavailable, match="gives no gradient to mask"):
        ops.masked_mse_loss(pred, imgs.detach(), mask, 4, backend="triton")
    with ops.record_choices() as served:
        loss = ops.masked_mse_loss(pred.requires_grad_(True), imgs.detach(), mask, 4)
    assert served["masked_mse_loss"] != "triton"
    assert torch.autograd.grad(loss, [mask])[0].abs().sum() > 0
    # an image in float64 (which the kernel would read in fp32 and answer in fp32) is for the plain paths
    with pytest.raises(ops.BackendUnavailable, match="takes imgs in float32, float16 or bfloat16"):
        ops.masked_mse_loss(pred.detach(), imgs.detach().double(), mask.detach(), 4, backend="triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pred_ids_mode", [False, True])
def test_masked_mse_empty_batch_is_zero_as_the_reference(device, pred_ids_mode):
    """N = 0: loss 0 (0 / max(0, 1)) and an empty gradient, as the reference gives, not a reshape error."""
    skip_unless_serves("masked_mse_loss", "triton", device, torch.float32)
    imgs = torch.randn(0, 3, 8, 8, device=device)
    mask = torch.ones(0, 4, device=device)
    pred_ids = torch.zeros(0, 2, dtype=torch.int64, device=device) if pred_ids_mode else None
    pred = torch.randn(0, 2 if pred_ids_mode else 4, 48, device=device, requires_grad=True)
    for fn in (loss_mod.masked_mse_loss, reference.masked_mse_loss):
        loss = fn(pred, imgs, mask, 4, False, pred_ids)
        (grad,) = torch.autograd.grad(loss, [pred])
        assert float(loss.detach()) == 0.0 and grad.shape == pred.shape, fn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("pred_ids_mode", [False, True])
def test_masked_mse_double_backward_matches_reference(device, norm_pix, pred_ids_mode):
    """create_graph=True (a gradient penalty): the gradient is built from torch ops autograd can differentiate
    again, so second derivatives with respect to pred and to a weight on the loss match the reference's."""
    skip_unless_serves("masked_mse_loss", "triton", device, torch.float32)
    case = (2, 3, 4, 2, 3, 3)
    n, c, p, gh, gw, K = case
    L = gh * gw
    ids_shuffle, _, mask = masking(n, L, K, device, seed=5)
    pred_ids = ids_shuffle[:, K:].contiguous() if pred_ids_mode else None
    imgs, pred32 = _inputs(case, device, pred_rows=None if pred_ids is None else L - K)

    def second_order(fn):
        pred = pred32.clone().requires_grad_(True)
        weight = torch.tensor(1.5, device=device, requires_grad=True)
        loss = weight * fn(pred, imgs, mask, p, norm_pix, pred_ids)
        (grad,) = torch.autograd.grad(loss, [pred], create_graph=True)
        (grad * grad).sum().backward()
        return grad.detach(), pred.grad, weight.grad

    got, want = second_order(loss_mod.masked_mse_loss), second_order(reference.masked_mse_loss)
    for name, a, b in zip(("grad", "d/dpred", "d/dweight"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
