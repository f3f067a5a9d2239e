"""Every `fastmae::` custom op under `torch.library.opcheck`.

opcheck runs each op for real and checks what torch.compile relies on and the kernel tests do not see: the
schema (no undeclared mutation, no output aliasing an input), the fake implementation (same shapes, dtypes,
devices and strides as the real outputs, also with dynamic shapes), the autograd registration, and the op
under AOTAutograd. A fake whose strides differ from the kernel's output would make compiled code read the
wrong elements on a GPU; this catches it on the CPU (under Triton's interpreter) and on CUDA alike.

The checks themselves are torch's; each case fails on the first one that does not hold. One output is
exempt from one check, with the reason beside it: the loss kernel's gradient buffer, whose kept-patch rows
are never written nor read.
"""
from __future__ import annotations

import pytest
import torch
from functorch.compile import aot_function, nop

from fastmae.kernels.utils import split_qkv
from tests.utils import DEVICES, OpRecorder, kept_ids, seeded_randn, skip_unless_serves

attn = pytest.importorskip("fastmae.kernels.attention", reason="the Triton kernels need triton")
tokens = pytest.importorskip("fastmae.kernels.tokens", reason="the Triton kernels need triton")
loss = pytest.importorskip("fastmae.kernels.loss", reason="the Triton kernels need triton")

OPS = torch.ops.fastmae


def _check(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", ["short", "flash"])
def test_attention_ops(device, dtype, path):
    skip_unless_serves("attention", "triton", device, dtype, head_dim=32)
    B, H, N, D = 2, 2, 7, 32
    qkv = seeded_randn(B, N, 3 * H * D, device=device, dtype=dtype, requires_grad=True)
    q, k, v = (t.detach().requires_grad_() for t in split_qkv(qkv, H))  # strided views, as the model passes them
    scale = D ** -0.5
    _check(OPS.attention_fwd, (q, k, v, scale, path))
    out, lse = OPS.attention_fwd(q.detach(), k.detach(), v.detach(), scale, path)
    dout = seeded_randn(B, H, N, D, device=device, dtype=dtype, seed=1)
    _check(OPS.attention_bwd, (dout, q.detach(), k.detach(), v.detach(), out, lse, scale, path))

    _check(OPS.attention_qkv_fwd, (qkv, H, scale, path))
    out, lse = OPS.attention_qkv_fwd(qkv.detach(), H, scale, path)
    _check(OPS.attention_qkv_bwd, (dout, qkv.detach(), out, lse, H, scale, path))


@pytest.mark.parametrize("device", DEVICES)
def test_token_ops(device):
    skip_unless_serves("gather_tokens", "triton", device, torch.float32)
    n, L, K, D, p, C = 2, 16, 4, 32, 4, 3
    ids_keep, ids_restore = kept_ids(n, L, K, device)
    imgs = seeded_randn(n, C, 16, 16, device=device)
    _check(OPS.gather_patches, (imgs, ids_keep, p))

    x = seeded_randn(n, L, D, device=device, seed=1)
    pos = seeded_randn(1, L + 1, D, device=device, seed=2)
    cls = seeded_randn(1, 1, D, device=device, seed=3)
    _check(OPS.gather_tokens_fwd, (x, ids_keep, pos, cls, False))
    _check(OPS.gather_tokens_fwd, (x[:, :K].contiguous(), ids_keep, pos, None, True))
    _check(OPS.gather_tokens_fwd, (x.half(), ids_keep, pos, cls, False))  # mixed dtypes, as under autocast
    grad = seeded_randn(n, K + 1, D, device=device, seed=4)
    _check(OPS.gather_tokens_bwd_x, (grad, ids_keep, L, torch.float32, True))
    _check(OPS.gather_tokens_bwd_x, (grad.half(), ids_keep, L, torch.float16, True))
    _check(OPS.gather_tokens_bwd_cls, (grad, ids_keep, torch.float32))
    _check(OPS.gather_tokens_bwd_cls, (grad.half(), ids_keep, torch.float32))

    xd = seeded_randn(n, K + 1, D, device=device, seed=5)
    mask_token = seeded_randn(1, 1, D, device=device, seed=6)
    _check(OPS.unshuffle_tokens_fwd, (xd, ids_restore, mask_token, pos))
    _check(OPS.unshuffle_tokens_fwd, (xd.half(), ids_restore, mask_token, pos))
    grad = seeded_randn(n, L + 1, D, device=device, seed=7)
    _check(OPS.unshuffle_tokens_bwd, (grad, ids_restore, K, torch.float32, torch.float32))
    _check(OPS.unshuffle_tokens_bwd, (grad.half(), ids_restore, K, torch.float16, torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pred_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_ops(device, pred_dtype, norm_pix):
    skip_unless_serves("masked_mse_loss", "triton", device, pred_dtype)
    n, L, K, p, C = 2, 16, 4, 4, 3
    imgs = seeded_randn(n, C, 16, 16, device=device)
    pred = seeded_randn(n, L, p * p * C, device=device, dtype=pred_dtype, seed=1)
    ids_keep, ids_restore = kept_ids(n, L, K, device)
    mask = torch.ones(n, L, device=device)
    mask.scatter_(1, ids_keep, 0.0)
    _check(OPS.masked_mse_fwd, (pred, imgs, mask, p, norm_pix, None, False))
    # With write_grad, g is left unwritten at kept patches (the backward never reads it there), so the outputs
    # of two runs differ in those rows, which opcheck's AOT check compares too: that check is run here on the
    # defined part, after opcheck's other checks.
    args = (pred, imgs, mask, p, norm_pix, None, True)
    torch.library.opcheck(OPS.masked_mse_fwd, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    eager = OPS.masked_mse_fwd(*args)
    traced = aot_function(lambda *a: OPS.masked_mse_fwd(*a), nop, nop, dynamic=True)(*args)
    removed = mask.bool()
    assert len(eager) == len(traced) == 3
    for name, a, b in zip(("loss", "g", "denom"), eager, traced):
        a, b = (a[removed], b[removed]) if name == "g" else (a, b)
        assert torch.equal(a, b), f"masked_mse_fwd {name}: traced output differs from eager"
    _, g, denom = eager
    _check(OPS.masked_mse_bwd, (torch.ones((), device=device), g, denom, mask, False))

    # pred_masked_only: pred holds the removed patches alone, in shuffled order; every row is scored
    ids_removed = torch.argsort(mask, dim=1, descending=True, stable=True)[:, :L - K].contiguous()
    pred_removed = pred[:, :L - K].contiguous()
    args = (pred_removed, imgs, mask, p, norm_pix, ids_removed, True)
    _check(OPS.masked_mse_fwd, args)
    _, g, denom = OPS.masked_mse_fwd(*args)
    _check(OPS.masked_mse_bwd, (torch.ones((), device=device), g, denom, mask, True))


@pytest.mark.parametrize("device", DEVICES)
def test_eager_calls_skip_the_custom_op_dispatch(device):
    """In eager mode the kernels are called without the custom ops' Python dispatch (10 to 25 µs a call): the
    dispatcher sees only the aten ops around the launches, forward and backward. Called directly, the custom op
    is seen, so the check can fail; fake tensors and torch.compile take the custom ops (tested above and in
    tests/model/test_triton_model.py)."""
    skip_unless_serves("attention", "triton", device, torch.float32, head_dim=32)

    B, H, N, D, L, K = 2, 2, 7, 32, 16, 4
    qkv = seeded_randn(B, N, 3 * H * D, device=device, requires_grad=True)
    x = seeded_randn(2, L, D, device=device, seed=1, requires_grad=True)
    pos = seeded_randn(1, L + 1, D, device=device, seed=2)
    ids_keep, ids_restore = kept_ids(2, L, K, device)
    def namespaces(recorder):
        return {str(f).split(".")[0] for f in recorder.funcs}

    with OpRecorder() as seen:
        out = attn.attention_packed(qkv, H)
        tok = tokens.gather_tokens(x, ids_keep, pos)
        (out.float().sum() + tok.float().sum()).backward()
    assert qkv.grad is not None and x.grad is not None
    assert "fastmae" not in namespaces(seen) and "aten" in namespaces(seen)
    with OpRecorder() as seen:
        OPS.attention_qkv_fwd(qkv.detach(), H, D ** -0.5, "auto")
    assert "fastmae" in namespaces(seen)
