"""The Triton attention kernels (`fastmae.kernels.attention`) against the reference path, forward and backward.

Tolerance: `tests.utils.assert_error_within_plain` (the kernel's error against the fp32 reference at most twice
the plain same-dtype reference's error, plus a floor per dtype). The cases cover, without taking the full
product: sequence lengths 1, 7, 50, 65, 197, 257 and 300, head dims 16, 32, 48, 64, 80 and 128, fp32, fp16 and
bf16, contiguous and strided inputs (views of one packed qkv projection, and [B, N, H, D] tensors transposed),
both kernel paths (forced where the shape would pick the other), and non-default scales. bf16 runs on the CPU
too: under the interpreter the kernels convert bf16 tiles to fp32 right after loading them (`UPCAST`).
"""
from __future__ import annotations

import pytest
import torch

from fastmae import ops
from fastmae.ops import reference
from tests.utils import (DEVICES, OpRecorder, assert_error_within_plain, launched_kernels, make_qkv,
                         skip_unless_serves)

attn = pytest.importorskip("fastmae.kernels.attention")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (B, H, N, D, dtype, layout, path, scale)
CASES = [
    (1, 2, 1, 32, F32, "contiguous", "auto", None),
    (2, 2, 1, 64, F16, "packed", "auto", None),
    (2, 2, 7, 64, F16, "contiguous", "auto", None),
    (2, 2, 7, 32, F32, "packed", "flash", None),
    (2, 3, 50, 64, F32, "packed", "auto", None),  # MAE ViT-B/L encoder: 49 visible patches + class token
    (2, 3, 50, 64, F16, "packed", "auto", None),
    (1, 2, 50, 64, BF16, "packed", "auto", None),
    (1, 2, 50, 128, F32, "transposed", "auto", None),
    (1, 2, 65, 80, F32, "contiguous", "auto", None),  # ViT-H/14 encoder
    (1, 2, 65, 80, F16, "packed", "flash", None),
    (1, 2, 33, 128, F16, "packed", "short", 0.3),
    (2, 1, 20, 16, F16, "transposed", "auto", None),
    (1, 2, 197, 32, F16, "packed", "auto", None),  # decoder, 224/16
    (1, 1, 197, 32, F32, "contiguous", "flash", None),
    (1, 1, 197, 32, BF16, "contiguous", "auto", None),
    (1, 2, 100, 48, F16, "packed", "flash", 1.0),
    (1, 1, 257, 32, F16, "packed", "auto", None),  # decoder, 224/14
    (1, 1, 257, 80, F32, "contiguous", "auto", 0.05),
    (1, 1, 300, 64, F32, "transposed", "auto", None),  # longer than one tile: the flash path
    (1, 1, 300, 128, F16, "contiguous", "auto", None),
    (1, 1, 300, 80, BF16, "packed", "auto", None),
    (1, 1, 60, 32, F16, "contiguous", "short", None),  # forced short: fits every GPU's one-program backward
    (1, 2, 30, 48, F32, "packed", "auto", 0.25),  # fp32 short backward
]


def _case_id(case) -> str:
    B, H, N, D, dtype, layout, path, scale = case
    name = f"B{B}H{H}N{N}D{D}-{str(dtype).replace('torch.', '')}-{layout}-{path}"
    return name if scale is None else f"{name}-scale{scale}"


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_attention_matches_reference(case, device):
    B, H, N, D, dtype, layout, path, scale = case
    skip_unless_serves("attention", "triton", device, dtype, head_dim=D)
    q, k, v = make_qkv(B, H, N, D, dtype, layout, device)
    dout = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)

    out = attn.attention(q, k, v, scale, path=path)
    assert out.dtype == dtype and out.shape == (B, H, N, D)
    grads = _grads(out, (q, k, v), dout)

    # ground truth: the reference in fp32; the plain path: the reference in the test dtype
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref32 = reference.attention(q32, k32, v32, scale)
    grads32 = _grads(ref32, (q32, k32, v32), dout.float())
    qp, kp, vp = (t.detach().clone().requires_grad_() for t in (q, k, v))
    plain = reference.attention(qp, kp, vp, scale)
    grads_plain = _grads(plain, (qp, kp, vp), dout)

    assert_error_within_plain(out, plain, ref32, name="out")
    for name, g, gp, g32 in zip(("dq", "dk", "dv"), grads, grads_plain, grads32):
        assert g.dtype == dtype
        assert_error_within_plain(g, gp, g32, name=name)


PEAKED = [(2, 3, 3, 128, 3.0, 0.3), (1, 2, 17, 64, 3.0, None), (1, 2, 50, 64, 4.0, None)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,B,H,N,D,std,scale", [(dt, *case) for dt in (F16, BF16) for case in PEAKED]
                         + [(F32, 1, 2, 31, 16, 3.0, 1.0)])  # fp32's short backward takes up to 32 keys
def test_short_backward_with_nearly_one_hot_rows(device, dtype, B, H, N, D, std, scale):
    """Large scores make a row's softmax nearly one-hot, where dS = P * (dP - delta) is a small difference of
    large terms. The short backward takes delta as rowsum(P * dP) / rowsum(P) from its own fp32 tiles, so dS
    sums to zero over the row as the exact gradient does. Taken from O rounded to fp16/bf16 (rowsum(dO * O)),
    delta was off by the rounding of O, and dQ and dK failed the rule in bf16 (error 0.8 against a bound of 0.24,
    first case); without the division by rowsum(P), the rounding that P recomputed from the saved log-sum-exp
    shares across its row did not cancel, and fp32 dQ was 10x the plain path's error (last case)."""
    skip_unless_serves("attention", "triton", device, dtype, head_dim=D)
    g = torch.Generator().manual_seed(7085)
    q, k, v = ((std * torch.randn(B, H, N, D, generator=g)).to(device=device, dtype=dtype).requires_grad_()
               for _ in range(3))
    dout = torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype)
    grads = _grads(attn.attention(q, k, v, scale, path="short"), (q, k, v), dout)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    grads32 = _grads(reference.attention(q32, k32, v32, scale), (q32, k32, v32), dout.float())
    qp, kp, vp = (t.detach().clone().requires_grad_() for t in (q, k, v))
    grads_plain = _grads(reference.attention(qp, kp, vp, scale), (qp, kp, vp), dout)
    for name, gk, gp, g32 in zip(("dq", "dk", "dv"), grads, grads_plain, grads32):
        assert_error_within_plain(gk, gp, g32, name=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path,N", [("short", 50), ("flash", 130)])
def test_log_sum_exp_saved_by_forward(path, N, device):
    skip_unless_serves("attention", "triton", device, F32, head_dim=48)
    q, k, v = make_qkv(1, 2, N, 48, F32, "packed", device)
    out, lse = attn.attention_forward(q, k, v, 0.2, path=path)
    expected = torch.logsumexp(0.2 * q.detach() @ k.detach().transpose(-2, -1), dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, N)
    assert_error_within_plain(lse, expected, expected, name="lse")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path,N,D", [("auto", 60, 32), ("flash", 70, 64)])
def test_backward_is_deterministic(path, N, D, device):
    skip_unless_serves("attention", "triton", device, F16, head_dim=D)
    q, k, v = make_qkv(2, 2, N, D, F16, "packed", device)
    dout = torch.randn(2, 2, N, D, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=F16)
    runs = []
    for _ in range(2):
        out = attn.attention(q, k, v, path=path)
        runs.append((out, *_grads(out, (q, k, v), dout)))
    for a, b, name in zip(*runs, ("out", "dq", "dk", "dv")):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["short", "flash"])
def test_backward_takes_strided_gradients(path, device):
    """dout as autograd may hand it over: broadcast (stride 0) or a transposed view; same bits as contiguous."""
    skip_unless_serves("attention", "triton", device, F16, head_dim=32)
    q, k, v = make_qkv(1, 2, 40, 32, F16, "packed", device)
    out, lse = attn.attention_forward(q, k, v, path=path)
    g = torch.Generator().manual_seed(2)
    for dout in (torch.randn(1, 1, 1, 32, generator=g).expand(1, 2, 40, 32),
                 torch.randn(1, 40, 2, 32, generator=g).transpose(1, 2)):
        dout = dout.to(device=device, dtype=F16)
        strided = attn.attention_backward(dout, q, k, v, out, lse, path=path)
        dense = attn.attention_backward(dout.contiguous(), q, k, v, out, lse, path=path)
        for a, b, name in zip(strided, dense, ("dq", "dk", "dv")):
            assert torch.equal(a, b), name


def test_rows_too_far_apart_for_32_bit_offsets_are_copied():
    """Inside a head the kernels address rows with 32-bit offsets: q as a view of a sequence-first packed
    [N, B, 3*H*D] projection at B 256, H 16, D 64, N 8192 spans 8191 x 786432 elements. Such inputs are copied
    first (meta tensors: no memory), the layouts MAE makes are passed as they are."""
    seq_first = torch.empty(8192, 256, 3 * 16 * 64, device="meta", dtype=F16)
    wide = seq_first.view(8192, 256, 3, 16, 64).permute(2, 1, 3, 0, 4)[0]  # q: [B, H, N, D]
    assert wide.shape == (256, 16, 8192, 64) and attn._head_span(wide) >= 2 ** 31
    assert attn._i32_addressable(wide).is_contiguous()
    packed = torch.empty(512, 8192, 3 * 16 * 128, device="meta", dtype=F16)
    for view in ops.split_qkv(packed, 16):
        assert attn._i32_addressable(view) is view
    # the forward's output: heads merged ([B, N, H, D] underneath) up to where that layout's rows leave 32 bits
    out, _ = attn._new_outputs(torch.empty(2, 16, 8192, 128, device="meta", dtype=F16))
    assert out.transpose(1, 2).is_contiguous()
    out, _ = attn._new_outputs(torch.empty(1, 16, 1_100_000, 128, device="meta", dtype=F16))
    assert out.is_contiguous() and attn._head_span(out) < 2 ** 31


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["short", "flash"])
def test_the_copies_for_32_bit_offsets_give_the_same_numbers(path, device, monkeypatch):
    """With the limit lowered so that packed views and the packed gradient count as too far apart, the forward
    copies q, k, v and the backward writes the gradient of qkv through a fresh tensor: the same bits."""
    skip_unless_serves("attention", "triton", device, F16, head_dim=32)
    qkv = torch.randn(1, 40, 3 * 2 * 32, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=F16)
    dout = torch.randn(1, 2, 40, 32, generator=torch.Generator().manual_seed(4)).to(device=device, dtype=F16)
    runs = []
    for limit in (2 ** 31, 64 * 40):  # the packed views span 39 * 192 + 31 elements, a copy (1, 2, 40, 32) 1279
        monkeypatch.setattr(attn, "_I32_LIMIT", limit)
        x = qkv.clone().requires_grad_()
        with launched_kernels() as launched:
            out = attn.attention_packed(x, 2, path=path)
            (dqkv,) = torch.autograd.grad(out, x, dout)
        # what the kernels were given: q, k, v read in place from x, or copies; gradients written into dqkv, or
        # into fresh tensors copied there afterwards
        inputs = [a for ln in launched if ln.name.startswith("_attn_fwd_") for a in ln.args[:3]]
        grads = [a for ln in launched if ln.name in _GRAD_ARGS for a in ln.args[_GRAD_ARGS[ln.name]]]
        assert len(inputs) == 3 and len(grads) == 3, [ln.name for ln in launched]
        in_place = ({_same_storage(a, x) for a in inputs}, {_same_storage(g, dqkv) for g in grads})
        assert in_place == (({True}, {True}) if limit == 2 ** 31 else ({False}, {False})), (limit, in_place)
        runs.append((out, dqkv))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_packed_views_are_split_qkv():
    """The packed launchers' q, k, v (`as_strided`, for host time) are the views `split_qkv` makes: the same
    storage offsets, shapes and strides for a contiguous projection, a slice of a wider one, one with a
    non-unit channel stride and a batch taken from a sequence-first tensor."""
    base = torch.arange(2 * 5 * 3 * 2 * 4 * 3, dtype=torch.float32)
    layouts = {
        "contiguous": base[:2 * 5 * 24].view(2, 5, 24),
        "slice of a wider projection": base[:2 * 5 * 30].view(2, 5, 30)[:, :, 3:27],
        "channel stride 3": base.view(2, 5, 72)[:, :, ::3],
        "sequence-first": base[:5 * 2 * 24].view(5, 2, 24).transpose(0, 1),
    }
    for name, qkv in layouts.items():
        assert qkv.shape == (2, 5, 24), name
        for mine, ref in zip(attn._packed_views(qkv, 2), ops.split_qkv(qkv, 2)):
            assert mine.shape == ref.shape and mine.stride() == ref.stride(), name
            assert mine.storage_offset() == ref.storage_offset(), name
            assert torch.equal(mine, ref), name


# where each backward kernel takes the gradients it writes, among its positional arguments
_GRAD_ARGS = {"_attn_bwd_short": slice(5, 8), "_attn_bwd_dkdv": slice(6, 8), "_attn_bwd_dq": slice(7, 8)}


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_traces_without_graph_break(device):
    skip_unless_serves("attention", "triton", device, F32, head_dim=32)
    q, k, v = make_qkv(1, 2, 50, 32, F32, "packed", device)

    def loss_fn(q, k, v):
        return (attn.attention(q, k, v) * torch.linspace(-1, 1, 32, device=q.device)).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    loss = compiled(q, k, v)
    grads = _grads(loss, (q, k, v), None)
    loss_eager = loss_fn(q, k, v)
    grads_eager = _grads(loss_eager, (q, k, v), None)
    torch.testing.assert_close(loss, loss_eager, atol=0, rtol=0)
    for g, ge in zip(grads, grads_eager):
        torch.testing.assert_close(g, ge, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_public_op_dispatches_to_the_kernel(device):
    skip_unless_serves("attention", "triton", device, F16, head_dim=64)
    q, k, v = make_qkv(1, 2, 50, 64, F16, "packed", device)
    with torch.no_grad():
        assert torch.equal(ops.attention(q, k, v, backend="triton"), attn.attention(q, k, v))
        assert torch.equal(ops.attention(q, k, v, scale=0.5, backend="triton"), attn.attention(q, k, v, 0.5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,D,dtype,path", [(50, 64, F16, "auto"), (197, 32, F32, "auto"), (70, 48, F16, "flash")])
def test_packed_qkv_gives_the_same_bits_with_one_gradient(N, D, dtype, path, device):
    """attention_packed(qkv) runs the same kernels as attention on the split views; its backward writes dq, dk,
    dv straight into one contiguous d(qkv) instead of autograd's stack-and-copy."""
    skip_unless_serves("attention", "triton", device, dtype, head_dim=D)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, N, 3 * 2 * D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    dout = torch.randn(2, 2, N, D, generator=g).to(device=device, dtype=dtype)
    with launched_kernels() as launched:
        out_p = attn.attention_packed(qkv, 2, path=path)
        (dqkv_p,) = torch.autograd.grad(out_p, qkv, dout)
    # the backward kernels wrote dq, dk and dv into d(qkv) itself, and q, k, v were read from qkv in place
    written = [a for ln in launched if ln.name in _GRAD_ARGS for a in ln.args[_GRAD_ARGS[ln.name]]]
    read = [a for ln in launched if ln.name.startswith("_attn_fwd_") for a in ln.args[:3]]
    assert len(written) == 3 and all(_same_storage(g, dqkv_p) for g in written), [ln.name for ln in launched]
    assert len(read) == 3 and all(_same_storage(t, qkv) for t in read)
    out_s = attn.attention(*attn.split_qkv(qkv, 2), path=path)
    (dqkv_s,) = torch.autograd.grad(out_s, qkv, dout)
    assert torch.equal(out_p, out_s) and torch.equal(dqkv_p, dqkv_s)
    assert dqkv_p.is_contiguous() and dqkv_p.grad_fn is None
    with pytest.raises(ValueError, match="3 \\* heads"):
        attn.attention_packed(qkv[..., :-1], 2)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        attn.attention_packed(qkv.detach().to(torch.float64), 2)
    with pytest.raises(ValueError, match="head dims 1 to"):
        attn.attention_packed(qkv.detach().new_zeros(1, 4, 3 * (attn.MAX_HEAD_DIM + 1)), 1)


def test_packed_attention_takes_the_custom_op_for_tensor_subclasses():
    """attention_packed runs its own autograd.Function on plain tensors (eager) and the custom op, with its fake
    implementation and registered formula, on anything else (here fake tensors, as torch.compile traces)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        qkv = torch.empty(2, 50, 3 * 2 * 32, requires_grad=True)
        out = attn.attention_packed(qkv, 2)
        (grad,) = torch.autograd.grad(out.sum(), qkv)
    assert type(out).__name__ == "FakeTensor" and out.shape == (2, 2, 50, 32) and out.stride() == (3200, 32, 64, 1)
    assert grad.shape == qkv.shape and grad.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True])
def test_backward_makes_no_gradient_for_lse(packed, device):
    """lse is an output without a gradient: the backward makes no zeros for it (a kernel and an allocation per
    block and step, which autograd makes unless told not to)."""
    skip_unless_serves("attention", "triton", device, F16, head_dim=32)

    qkv = torch.randn(2, 20, 3 * 2 * 32, generator=torch.Generator().manual_seed(0)).to(device, F16).requires_grad_()
    out = attn.attention_packed(qkv, 2) if packed else attn.attention(*attn.split_qkv(qkv, 2))
    dout = torch.ones_like(out)
    with OpRecorder() as ops_seen:
        torch.autograd.grad(out, qkv, dout)
    seen = [str(f.overloadpacket) for f in ops_seen.funcs]
    made = [name for name in seen if name in ("aten.zeros", "aten.zero_", "aten.fill_", "aten.new_zeros")]
    assert not made, seen


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_traces_the_packed_op(device):
    skip_unless_serves("attention", "triton", device, F32, head_dim=32)
    qkv = torch.randn(1, 50, 3 * 2 * 32, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_()

    def loss_fn(qkv):
        return (attn.attention_packed(qkv, 2) * torch.linspace(-1, 1, 32, device=qkv.device)).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    (g_c,) = torch.autograd.grad(compiled(qkv), qkv)
    (g_e,) = torch.autograd.grad(loss_fn(qkv), qkv)
    torch.testing.assert_close(g_c, g_e, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_output_merges_heads_without_a_copy(device):
    """out is a [B, H, N, D] tensor laid out as a [B, N, H, D] one: the model's merge of the heads before the
    output projection is a view (as with flash-attention's SDPA), for the forward and under torch.compile's fake."""
    skip_unless_serves("attention", "triton", device, F16, head_dim=32)
    q, k, v = make_qkv(2, 3, 20, 32, F16, "packed", device)
    out = attn.attention(q, k, v)
    merged = out.transpose(1, 2).reshape(2, 20, 3 * 32)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None  # a view
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake_out = attn.attention(fq, fk, fv)
    assert fake_out.stride() == out.stride()  # what torch.compile plans with is what runs


def test_paths_for_mae_shapes():
    # encoder tokens (ViT-B/L; ViT-H/14) and decoder tokens (224/16; 224/14), then long sequences
    for n, d in [(50, 64), (65, 80), (128, 32)]:
        assert attn.forward_path(n, d, F16) == "short"
    # from a 256-key tile on "auto" takes the flash kernels (faster there on an H200); "short" still fits
    assert attn.forward_path(197, 32, F16) == "flash" and attn.forward_path(197, 32, F16, "short") == "short"
    assert attn.forward_path(257, 32, F16) == "flash" and attn.forward_path(4096, 64, BF16) == "flash"
    assert attn.forward_path(197, 32, F32) == "flash"  # fp32 tiles are twice as large
    # fp32 takes one tile up to 64 keys: at 128 triton 3.8 spills whatever the block
    assert attn.forward_path(64, 32, F32) == "short" and attn.forward_path(65, 32, F32) == "flash"
    for cap in ((8, 0), (9, 0)):
        assert attn.backward_path(50, 64, F16, capability=cap) == "short"
        assert attn.backward_path(4096, 64, F16, capability=cap) == "flash"
    # Hopper holds twice the tile of Ampere in the one-program backward
    assert attn.backward_path(197, 32, BF16, "short", capability=(9, 0)) == "short"
    assert attn.backward_path(197, 32, BF16, capability=(9, 0)) == "flash"  # "auto" stops at 128 keys
    assert attn.backward_path(65, 80, BF16, capability=(9, 0)) == "short"
    assert attn.backward_path(197, 32, BF16, capability=(8, 0)) == "flash"
    assert attn.backward_path(100, 32, BF16, capability=(8, 0)) == "flash"  # Ampere: up to 64 keys, or 128
    assert attn.backward_path(65, 16, BF16, capability=(8, 0)) == "short"  # at head dim 16 (the CIFAR decoders)
    # compute capability 12.x (consumer Blackwell: no wgmma, about 99 KB of shared memory per block) and 8.6/8.9
    # take Ampere's tiles: Hopper's at N 129-256 x D 64 or N 65-128 x D 128 need 110 KB there
    for cap in ((8, 6), (8, 9), (12, 0), (12, 1)):
        assert attn.backward_path(197, 64, BF16, capability=cap) == "flash"
        assert attn.backward_path(65, 80, F16, capability=cap) == "flash"
        assert attn.backward_path(50, 64, F16, capability=cap) == "short"
    assert attn.backward_path(65, 80, BF16, capability=(10, 0)) == "short"
    assert attn.kernels_for(300, 64, F16) == ["fwd_flash", "bwd_dq", "bwd_dkdv"]
    with pytest.raises(ValueError, match="short"):
        attn.forward_path(300, 64, F16, "short")
    with pytest.raises(ValueError, match="short"):
        attn.backward_path(197, 32, F16, "short", capability=(8, 0))
    with pytest.raises(ValueError, match="path"):
        attn.forward_path(30, 64, F16, "fast")


def test_rejects_bad_inputs():
    q = torch.randn(1, 1, 8, 160)
    with pytest.raises(ValueError, match="head dims"):
        attn.attention(q, q, q)
    with pytest.raises(ValueError, match="one shape"):
        attn.attention(q, q[..., :4, :], q)
    with pytest.raises(TypeError, match="dtype"):
        attn.attention(q[..., :64], q[..., :64].half(), q[..., :64])


def test_compile_specs_cover_every_launch():
    """Every configuration the launchers pick for a sweep of shapes is listed by compile_specs(), and each
    spec names every argument of its kernel once (pure Python: no compilation here)."""
    specs = attn.compile_specs()
    listed = {}
    for spec in specs:
        names = set(spec.signature) | set(spec.constexprs)
        assert names == set(spec.fn.arg_names), spec.name
        assert not set(spec.signature) & set(spec.constexprs), spec.name
        assert all(t in ("*fp16", "*bf16", "*fp32", "i32", "fp32") for t in spec.signature.values()), spec.name
        assert set(spec.divisible_by_16) <= set(spec.signature), spec.name
        constexprs = tuple(sorted((k, v) for k, v in spec.constexprs.items() if k.isupper()))
        key = (spec.fn, spec.signature.get("Q", spec.signature.get("O")), constexprs, spec.num_warps, spec.num_stages,
               bool(spec.divisible_by_16))  # aligned (head dims multiples of 16) or the unaligned variant
        assert key not in listed, f"duplicate spec {spec.name}"
        listed[key] = spec
    pointer = {F32: "*fp32", F16: "*fp16", BF16: "*bf16"}
    for dtype in (F32, F16, BF16):
        for d in (16, 24, 32, 48, 64, 80, 96, 128):
            for n in (1, 7, 16, 33, 50, 65, 100, 128, 197, 256, 257, 1000, 4096):
                for cap in ((8, 0), (9, 0)):
                    kernels = set(attn.kernels_for(n, d, dtype, capability=cap))
                    try:  # a forced short path (tests, benchmarks, the tuner) launches up to SHORT_MAX_N keys
                        kernels.add("fwd_" + attn.forward_path(n, d, dtype, "short"))
                        kernels.add("bwd_" + attn.backward_path(n, d, dtype, "short", capability=cap))
                    except ValueError:
                        pass  # a tile the short path does not take
                    for kernel in sorted(kernels):
                        cfg = attn.launch_settings(kernel, n, d, dtype)
                        fn = attn.KERNELS[kernel]
                        constexprs = {"BLOCK_M": cfg.block_m, "D_PAD": attn._pad(d)}
                        if "BLOCK_N" in fn.arg_names:
                            constexprs["BLOCK_N"] = cfg.block_n
                        if "UPCAST" in fn.arg_names:
                            constexprs["UPCAST"] = False
                        key = (fn, pointer[dtype], tuple(sorted(constexprs.items())), cfg.num_warps, cfg.num_stages,
                               True)
                        assert key in listed, f"{kernel} for N={n}, D={d}, {dtype}, sm{cap}: {cfg} not listed"
                        # a spec restricted to some architectures must cover every one that launches it
                        assert cap[0] * 10 in getattr(listed[key], "archs", (80, 90)), listed[key].name
