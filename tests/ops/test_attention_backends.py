"""`fastmae.ops.attention` on every fast backend, device and dtype, against the fp32 reference, forward and backward.

The Triton kernels have their own, wider tests (tests/kernels/test_attention.py); this file holds every backend
to the same rule at MAE's shapes, through the public op. Tolerance: `tests.utils.assert_error_within_plain`
(at most twice the plain same-dtype reference's error against fp32, plus a floor per dtype). A backend that
cannot serve a case (xformers on a CPU, or not installed) is skipped with the registry's reason.
"""
from __future__ import annotations

import pytest
import torch

from fastmae import ops
from fastmae.ops import reference
from tests.utils import DEVICES, assert_error_within_plain, make_qkv, plain_for_rule, skip_unless_serves

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, H, N, D, layout): encoder ViT-B/L at 75% masking, ViT-H/14 encoder, decoder 224/16
SHAPES = [(2, 2, 50, 64, "packed"), (1, 2, 65, 80, "transposed"), (1, 2, 197, 32, "packed")]


@pytest.mark.parametrize("device", DEVICES)
# not the reference itself: it is the rule's plain path, so it would be held to its own error; its definition is
# tested against SDPA (tests/ops/test_reference_ops.py) and timm's formula (tests/model)
@pytest.mark.parametrize("backend", [b for b in ops.BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}N{}D{}-{}".format(*s))
def test_attention_backend_matches_reference(shape, dtype, backend, device):
    B, H, N, D, layout = shape
    skip_unless_serves("attention", backend, device, dtype, head_dim=D)
    q, k, v = make_qkv(B, H, N, D, dtype, layout, device)
    dout = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    scale = 0.3 if D == 80 else None  # one case with an explicit scale

    out = ops.attention(q, k, v, scale=scale, backend=backend)
    assert out.dtype == dtype and out.shape == (B, H, N, D) and out.device == q.device
    grads = torch.autograd.grad(out, (q, k, v), dout)

    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref32 = reference.attention(q32, k32, v32, scale)
    grads32 = torch.autograd.grad(ref32, (q32, k32, v32), dout.float())
    qp, kp, vp = (t.detach().clone().requires_grad_() for t in (q, k, v))
    plain = reference.attention(qp, kp, vp, scale)
    grads_plain = torch.autograd.grad(plain, (qp, kp, vp), dout)

    assert_error_within_plain(out, plain_for_rule(plain, ref32), ref32, name=f"{backend} out")
    for name, g, gp, g32 in zip(("dq", "dk", "dv"), grads, grads_plain, grads32):
        assert g.dtype == dtype and g.shape == (B, H, N, D)
        assert_error_within_plain(g, plain_for_rule(gp, g32), g32, name=f"{backend} {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_attention_qkv_matches_attention_on_views(backend, device):
    """The packed entry point (what the model calls) gives the numbers of `attention` on q, k, v views of the
    same projection, forward and gradient, on every backend (triton has its own packed kernels' entry)."""
    skip_unless_serves("attention", backend, device, torch.float16, head_dim=32)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 50, 3 * 2 * 32, generator=g).to(device=device, dtype=torch.float16).requires_grad_()
    dout = torch.randn(2, 2, 50, 32, generator=g).to(device=device, dtype=torch.float16)
    with ops.record_choices() as chosen:
        out = ops.attention_qkv(qkv, 2, scale=0.2, backend=backend)
    assert chosen["attention"] == backend
    (grad,) = torch.autograd.grad(out, qkv, dout)
    q, k, v = qkv.reshape(2, 50, 3, 2, 32).permute(2, 0, 3, 1, 4).unbind(0)
    ref = ops.attention(q, k, v, scale=0.2, backend=backend)
    (grad_ref,) = torch.autograd.grad(ref, qkv, dout)
    assert torch.equal(out, ref) and torch.equal(grad, grad_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_plan_asks_the_registry_once_per_kind_of_call(device, monkeypatch):
    """An AttentionPlan chooses as attention_qkv does on its first call and reuses the choice for calls alike (the
    same numbers as attention_qkv with the plan's backend); a call that differs in dtype, shape or requires_grad
    is chosen afresh."""
    asked = []
    resolve = ops.resolve

    def counting(op, inputs, backend=None):
        asked.append((op, inputs.dtype))
        return resolve(op, inputs, backend)

    monkeypatch.setattr(ops, "resolve", counting)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 50, 3 * 2 * 32, generator=g).to(device).requires_grad_()
    plan = ops.AttentionPlan("reference")
    with ops.record_choices() as chosen:
        outs = [ops.attention_qkv(qkv, 2, scale=0.2, backend=plan) for _ in range(3)]
    assert chosen["attention"] == "reference" and len(asked) == 1
    assert all(torch.equal(o, ops.attention_qkv(qkv, 2, scale=0.2, backend="reference")) for o in outs)
    asked.clear()
    plan(qkv.detach().half(), 2)  # another dtype
    plan(qkv[:1], 2)  # another shape
    plan(qkv.detach(), 2)  # no gradient
    plan(qkv.detach(), 2)
    assert [dt for _, dt in asked] == [torch.float16, torch.float32, torch.float32]
    with pytest.raises(TypeError, match="not another plan"):
        ops.AttentionPlan(plan)
    with pytest.raises(ValueError, match="3 \\* heads"):  # checked as attention_qkv checks
        ops.AttentionPlan()(torch.randn(1, 5, 10), 2)


def test_attention_qkv_rejects_bad_shapes():
    with pytest.raises(ValueError, match="3 \\* heads"):
        ops.attention_qkv(torch.randn(1, 5, 10), 2)
    with pytest.raises(TypeError, match="floating-point"):
        ops.attention_qkv(torch.zeros(1, 5, 12, dtype=torch.int64), 2)
