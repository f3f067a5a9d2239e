"""The whole model on the triton backend against the reference: same weights and noise, loss, prediction and
every parameter's gradient (on the CPU through Triton's interpreter, on CUDA when present).

Tolerance: the suite's one rule (`tests.utils.assert_error_within_plain`), at the model's level: the ground
truth is the reference path in float64, the plain path the reference in fp32; the triton model in fp32 may be
off the ground truth by at most twice the plain path's error plus the fp32 floor.
"""
import copy

import pytest
import torch

import fastmae
from fastmae.ops.registry import Inputs
from tests.utils import DEVICES, assert_close, assert_error_within_plain, skip_unless_serves

# compiled against eager on the same backend: the same kernels, but the traced graph may regroup PyTorch's own
# operations (the accumulation of gradients, for one), so the two agree to rounding, not bit for bit
COMPILED_ATOL, COMPILED_RTOL = 1e-5, 1e-4


def skip_unless_triton(device):
    reasons = fastmae.ops.not_supported_reasons("gather_tokens", "triton",
                                                Inputs(torch.device(device), torch.float32))
    if reasons:
        pytest.skip("; ".join(reasons))


def run(model, imgs, noise, backend, mask_ratio=0.75):
    model.zero_grad()
    model.backend = backend
    with fastmae.ops.record_choices() as served:
        loss, pred, mask = model(imgs, mask_ratio, noise=noise)
        loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), pred.detach(), mask, grads, dict(served)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_pix,pred_masked_only", [(False, False), (True, False), (True, True)])
def test_triton_model_matches_reference(device, norm_pix, pred_masked_only):
    skip_unless_triton(device)
    torch.manual_seed(0)
    model = fastmae.mae_vit_tiny_patch4(norm_pix_loss=norm_pix, pred_masked_only=pred_masked_only).to(device)
    imgs = torch.randn(2, 3, 32, 32, device=device)
    noise = torch.rand(2, 64, device=device)
    l_ref, p_ref, m_ref, g_ref, s_ref = run(model, imgs, noise, "reference")
    l_tri, p_tri, m_tri, g_tri, s_tri = run(model, imgs, noise, "triton")
    l_64, p_64, m_64, g_64, _ = run(copy.deepcopy(model).double(), imgs.double(), noise.double(), "reference")
    assert set(s_ref.values()) == {"reference"} and set(s_tri.values()) == {"triton"}
    assert torch.equal(m_ref, m_tri) and torch.equal(m_ref, m_64.float())
    assert_error_within_plain(l_tri, l_ref, l_64, "loss")
    assert_error_within_plain(p_tri, p_ref, p_64, "pred")
    assert g_ref.keys() == g_tri.keys() == g_64.keys()
    assert "patch_embed.proj.weight" in g_tri and "mask_token" in g_tri
    for k in g_ref:
        assert_error_within_plain(g_tri[k], g_ref[k], g_64[k], f"grad {k}")


@pytest.mark.parametrize("device", DEVICES)
def test_triton_model_is_deterministic(device):
    skip_unless_triton(device)
    torch.manual_seed(0)
    model = fastmae.mae_vit_tiny_patch4(norm_pix_loss=True).to(device)
    imgs = torch.randn(2, 3, 32, 32, device=device)
    noise = torch.rand(2, 64, device=device)
    first = run(model, imgs, noise, "triton")
    second = run(model, imgs, noise, "triton")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])  # loss and prediction
    for k in first[3]:
        assert torch.equal(first[3][k], second[3][k]), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pred_masked_only", [False, True])
def test_triton_model_compiles_without_graph_breaks(device, pred_masked_only):
    """Every triton op is a torch.library custom op with a fake implementation: the whole model on the triton
    backend compiles with fullgraph=True (a graph break raises) and gives the eager numbers, at a second
    masking ratio too (once: the recompile takes as long as the first compile)."""
    skip_unless_triton(device)
    torch.manual_seed(0)
    model = fastmae.mae_vit_tiny_patch4(norm_pix_loss=True, pred_masked_only=pred_masked_only).to(device)
    model.backend = "triton"
    imgs = torch.randn(2, 3, 32, 32, device=device)
    noise = torch.rand(2, 64, device=device)
    eager = run(model, imgs, noise, "triton")
    torch._dynamo.reset()  # a fresh cache: earlier tests compiled the same forward for other models
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.zero_grad()
    loss, pred, _ = compiled(imgs, noise=noise)
    loss.backward()
    assert_close(loss.detach(), eager[0], COMPILED_ATOL, COMPILED_RTOL, "loss")
    assert_close(pred.detach(), eager[1], COMPILED_ATOL, COMPILED_RTOL, "pred")
    for k, p in model.named_parameters():
        if p.grad is not None:
            assert_close(p.grad, eager[3][k], COMPILED_ATOL, COMPILED_RTOL, f"grad {k}")
    with torch.no_grad():  # the no-grad loss path is an op too
        assert_close(compiled(imgs, noise=noise)[0], eager[0], COMPILED_ATOL, COMPILED_RTOL, "no-grad loss")
    if pred_masked_only:
        return
    # Another masking ratio recompiles with the ratio as a symbolic float; the number of kept patches is made a
    # constant again (an expression in that float was a size the token ops' autograd functions refused)
    eager = run(model, imgs, noise, "triton", mask_ratio=0.6)
    model.zero_grad()
    loss, pred, _ = compiled(imgs, 0.6, noise=noise)
    loss.backward()
    assert_close(loss.detach(), eager[0], COMPILED_ATOL, COMPILED_RTOL, "loss at ratio 0.6")
    assert pred.shape == eager[1].shape
    for k, p in model.named_parameters():
        if p.grad is not None:
            assert_close(p.grad, eager[3][k], COMPILED_ATOL, COMPILED_RTOL, f"grad {k} at ratio 0.6")


def _second_order(model, backend):
    """A gradient penalty: the gradient of the loss with create_graph=True, then the backward of its square."""
    model.backend = backend
    model.zero_grad(set_to_none=True)
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(2))
    loss = model(imgs, noise=noise)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    sum((g * g).sum() for g in grads).backward()
    return {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


OPS_ON_TRITON = ["attention", "gather_tokens", "unshuffle_tokens", "masked_mse_loss"]


@pytest.mark.parametrize("op", OPS_ON_TRITON + ["all", "lean"])
def test_a_double_backward_is_exact_or_refused(op):
    """The triton kernels' backward passes (and the lean blocks' recomputing ones) build no graph: a double
    backward through them raises instead of returning second derivatives with terms silently missing. The
    loss's is exact (its gradient is rebuilt from torch ops under create_graph)."""
    if op != "lean":
        skip_unless_serves("attention", "triton", "cpu", torch.float32, head_dim=32)
    torch.manual_seed(0)
    model = fastmae.mae_vit_tiny_patch4(norm_pix_loss=True)
    want = _second_order(model, "reference")
    if op == "lean":
        model.lean_blocks, backend = True, "reference"
    else:
        backend = "triton" if op == "all" else {o: ("triton" if o == op else "reference") for o in fastmae.ops.OPS}
    if op == "masked_mse_loss":
        got = _second_order(model, backend)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)
        return
    with pytest.raises(RuntimeError, match="differentiate twice"):
        _second_order(model, backend)
