"""`lean_blocks`: a block recomputes its LayerNorms and GELU in the backward (fastmae/model/lean.py).

It must give the plain block's numbers, forward and backward, in fp32 and under bf16 autocast, while keeping
less for the backward. Tolerances: fp32 atol 1e-6 / rtol 1e-5 (the same ops in the same order; on a CPU the
results are bitwise equal); bf16 autocast atol 1e-2 / rtol 1e-2 on values of order one (one bf16 rounding
apart at most where a GPU picks another matmul algorithm).
"""
from __future__ import annotations

import pytest
import torch

import fastmae
from fastmae.model.layers import Block
from tests.utils import DEVICES, assert_close, skip_unless_serves

TOL = {False: (1e-6, 1e-5), True: (1e-2, 1e-2)}


def _block_run(blk, x, lean, amp, device):
    blk.lean_blocks = lean
    blk.zero_grad()
    x = x.detach().clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
        y = blk(x)
    weight = torch.linspace(-1, 1, y.shape[-1], device=device)
    (y.float() * weight).sum().backward()
    return {"out": y.detach().float(), "dx": x.grad, **{n: p.grad for n, p in blk.named_parameters()}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_lean_block_matches_plain_block(amp, device):
    torch.manual_seed(0)
    blk = Block(64, 4).to(device)
    x = torch.randn(3, 17, 64, device=device)
    plain, lean = _block_run(blk, x, False, amp, device), _block_run(blk, x, True, amp, device)
    assert lean.keys() == plain.keys() and all(v is not None for v in lean.values())
    for name in plain:
        assert lean[name].dtype == plain[name].dtype, name
        assert_close(lean[name], plain[name], *TOL[amp], name)


def test_lean_block_keeps_less_for_the_backward():
    torch.manual_seed(0)
    blk = Block(64, 4)
    x = torch.randn(2, 50, 64, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in blk.parameters()}

    def saved_bytes(lean):
        blk.lean_blocks = lean
        seen, total = set(), [0]

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen and ptr not in params and ptr != x.untyped_storage().data_ptr():
                seen.add(ptr)
                total[0] += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            blk(x)
        return total[0]

    plain, lean = saved_bytes(False), saved_bytes(True)
    # per token, the lean block no longer keeps the two LayerNorm outputs (64 floats each) and the GELU output
    # (256); both keep the LayerNorms' inputs, means and rstds, q/k/v/out, the fc1 output and the weights
    assert plain - lean == 2 * 50 * (64 + 64 + 256) * 4, (plain, lean)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_lean_model_matches_and_compiles(backend):
    if backend == "triton":
        skip_unless_serves("attention", "triton", "cpu", torch.float32, head_dim=16)
    torch.manual_seed(0)
    model = fastmae.create_model("mae_vit_tiny_patch4", norm_pix_loss=True, backend=backend)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)

    def run(fn):
        model.zero_grad()
        loss, pred, _ = fn(imgs, noise=noise)
        loss.backward()
        return [loss.detach(), pred.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = run(model)
    model.lean_blocks = True
    assert model.lean_blocks and all(b.lean_blocks for b in model.decoder_blocks)
    lean = run(model)
    torch._dynamo.reset()  # a fresh cache: earlier tests compiled the same forward for other models
    compiled = run(torch.compile(model, fullgraph=True, backend="aot_eager"))  # fullgraph: no graph breaks
    assert len(lean) == len(plain) == len(compiled)
    for i, (a, b, c) in enumerate(zip(plain, lean, compiled)):
        assert_close(b, a, 1e-6, 1e-5, f"lean tensor {i}")
        assert_close(c, a, 1e-6, 1e-5, f"compiled lean tensor {i}")
    assert "lean_blocks" not in "".join(model.state_dict())  # the official keys, unchanged


def test_lean_functions_reject_layers_they_cannot_recompute():
    from fastmae.model.lean import norm_linear, norm_mlp

    blk = Block(16, 2)
    with pytest.raises(TypeError, match="LayerNorm"):
        norm_mlp(torch.randn(1, 3, 16), torch.nn.Identity(), blk.mlp.fc1, blk.mlp.fc2)
    with pytest.raises(TypeError, match="biases"):
        norm_mlp(torch.randn(1, 3, 16), blk.norm2, torch.nn.Linear(16, 64, bias=False), blk.mlp.fc2)
    with pytest.raises(TypeError, match="LayerNorm"):
        norm_linear(torch.randn(1, 3, 16), torch.nn.LayerNorm((3, 16)), blk.attn.qkv)


class _ScaledNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return 2 * super().forward(x)


class _ScaledLinear(torch.nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("change", ["act", "tanh-gelu", "norm-subclass", "linear-subclass"])
def test_a_lean_block_refuses_layers_it_would_bypass(change):
    """The lean functions compute LayerNorm, Linear and GELU themselves instead of calling the modules: a block
    whose activation was replaced or whose layers are subclasses with their own forward is refused with a clear
    error (the plain block, which calls them, gives other numbers: the lean one computed the unmodified block)."""
    torch.manual_seed(0)
    blk = Block(16, 2)
    if change == "act":
        blk.mlp.act = torch.nn.ReLU()
    elif change == "tanh-gelu":
        blk.mlp.act = torch.nn.GELU(approximate="tanh")
    elif change == "norm-subclass":
        blk.norm2 = _ScaledNorm(16)
    else:
        fc1 = _ScaledLinear(16, 64)
        fc1.load_state_dict(blk.mlp.fc1.state_dict())
        blk.mlp.fc1 = fc1
    x = torch.randn(2, 5, 16)
    torch.manual_seed(0)
    plain = Block(16, 2)  # the same weights, unmodified
    assert not torch.allclose(blk(x), plain(x))  # the change changes the plain block's numbers
    blk.lean_blocks = True
    with pytest.raises(TypeError, match="turn lean_blocks off"):
        blk(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_lean_model_in_another_dtype_runs_under_autocast_as_the_plain_one(dtype):
    """A model cast whole to bf16 (or kept in fp64) under bf16 autocast: layer_norm's autocast policy casts bf16
    inputs and weights to fp32 and leaves fp64 alone; the lean blocks do the same, with the plain blocks'
    numbers and gradient dtypes (bf16: within the bf16 tolerance above; fp64: the same ops, fp32's bound)."""
    torch.manual_seed(0)
    blk = Block(32, 2).to(dtype)
    x = torch.randn(2, 9, 32, dtype=dtype)
    plain, lean = _block_run(blk, x, False, True, "cpu"), _block_run(blk, x, True, True, "cpu")
    for name in plain:
        assert lean[name].dtype == plain[name].dtype, name
        assert_close(lean[name], plain[name], *TOL[dtype == torch.bfloat16], name)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_norm_linear_gives_only_the_gradients_asked_for(amp, monkeypatch):
    """Frozen LayerNorm and input: the lean backward computes the linear layer's gradients only (none for the
    input or the LayerNorm's parameters, which do not require them)."""
    from fastmae.model import lean
    from fastmae.model.lean import norm_linear

    asked = []
    backward = lean._norm_linear_backward

    def spy(*args):
        asked.append(tuple(args[-1]))
        return backward(*args)

    monkeypatch.setattr(lean, "_norm_linear_backward", spy)
    torch.manual_seed(0)
    norm, lin = torch.nn.LayerNorm(32), torch.nn.Linear(32, 96)
    norm.requires_grad_(False)
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = norm_linear(x, norm, lin)
        ref = lin(norm(x))
    assert out.dtype == ref.dtype
    g, g_ref = torch.autograd.grad(out.float().sum(), lin.weight), torch.autograd.grad(ref.float().sum(), lin.weight)
    assert_close(g[0], g_ref[0], *TOL[amp], "dW")
    assert asked == [(False, False, False, True, True)]  # dx, dLN weight, dLN bias, dW, db
