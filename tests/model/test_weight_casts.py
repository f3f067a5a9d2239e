"""`group_weight_casts`: under autocast the blocks' linear weights are cast by one multi-tensor copy per few
blocks, and their gradients cast back the same way (fastmae/model/layers.py, `cast_block_weights`).

These are the casts autocast makes, one kernel per weight and per gradient, done in fewer launches: the loss,
the prediction and every gradient must be the same. On a CPU they are equal bit for bit (asserted); on CUDA
within bf16 autocast's tolerance, atol 1e-2 / rtol 1e-2 on values of order one (the same inputs to every
matmul, so a difference could only come from the library choosing another algorithm). The launches saved are
counted as ATen operator calls, which a CPU counts as a GPU would launch them.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import fastmae
from fastmae.model import layers
from tests.utils import DEVICES, OpRecorder, assert_close


def _model(device, **kwargs):
    torch.manual_seed(0)
    return fastmae.create_model("mae_vit_cifar_small_patch4", norm_pix_loss=True, **kwargs).to(device)


def _step(model, device, group, grad=True, steps=1, count=False):
    """Loss, pred and gradients of `steps` forward+backward passes under bf16 autocast (gradients accumulate),
    and the operator calls of the last one."""
    model.group_weight_casts = group
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(1)
    imgs = torch.randn(4, 3, 32, 32, generator=gen).to(device)
    noise = torch.rand(4, 64, generator=gen).to(device)
    counter = OpRecorder()
    for _ in range(steps):
        with torch.set_grad_enabled(grad), (counter if count else contextlib.nullcontext()):
            with torch.autocast(device, dtype=torch.bfloat16):
                loss, pred, _ = model(imgs, 0.75, noise=noise)
            if grad:
                loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float(), pred.detach().float(), grads, counter.calls


def _groups(model) -> int:
    """How many grouped copies each way a step makes: BLOCKS_PER_CAST blocks per copy, per stack."""
    return sum(-(-len(stack) // layers.BLOCKS_PER_CAST) for stack in (model.blocks, model.decoder_blocks))


def _assert_same(a, b, device, grads=True):
    (la, pa, ga), (lb, pb, gb) = a[:3], b[:3]
    assert ga.keys() == gb.keys() and (len(ga) > 0) == grads
    pairs = [("loss", la, lb), ("pred", pa, pb)] + [(n, ga[n], gb[n]) for n in ga]
    for name, x, y in pairs:
        assert x.dtype == y.dtype, name
        if device == "cpu":
            assert torch.equal(x, y), name
        else:
            assert_close(x, y, 1e-2, 1e-2, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
@pytest.mark.parametrize("per_cast", [1, 2, 4])
def test_grouped_casts_give_the_same_numbers(device, backend, per_cast, monkeypatch):
    """Loss, prediction and every gradient, with the casts grouped 1, 2 (3 encoder blocks: a group of two and
    one of one) and 4 blocks at a time, against autocast's own casts; two accumulated steps."""
    if backend == "triton" and device == "cpu":
        pytest.skip("the model's triton path is the sdpa case's on a CPU (its kernels run on CUDA)")
    monkeypatch.setattr(layers, "BLOCKS_PER_CAST", per_cast)
    model = _model(device, backend=backend)
    plain = _step(model, device, False, steps=2)
    grouped = _step(copy.deepcopy(model), device, True, steps=2)
    _assert_same(grouped, plain, device)


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_casts_launch_fewer_kernels(device):
    """Each block's 8 weight casts and 8 gradient casts become one multi-tensor copy each way per group of
    BLOCKS_PER_CAST blocks (3 encoder blocks and 1 decoder block here: one group each)."""
    model = _model(device, backend="sdpa")
    plain = _step(model, device, False, count=True)[3]
    grouped = _step(copy.deepcopy(model), device, True, count=True)[3]
    blocks = len(model.blocks) + len(model.decoder_blocks)
    assert plain["_foreach_copy_"] == 0
    assert grouped["_foreach_copy_"] == 2 * _groups(model)
    assert plain["_to_copy"] - grouped["_to_copy"] == 16 * blocks


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_casts_without_grad(device):
    """Inference (no autograd): one copy per group, the same outputs."""
    model = _model(device, backend="sdpa")
    plain = _step(model, device, False, grad=False, count=True)
    grouped = _step(copy.deepcopy(model), device, True, grad=False, count=True)
    assert grouped[3]["_foreach_copy_"] == 2 and plain[3]["_foreach_copy_"] == 0
    _assert_same(grouped, plain, device, grads=False)


def _fallback_cases():
    def hook_on_qkv(model, seen):
        model.blocks[1].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.shape))

    def hook_on_mlp(model, seen):
        model.decoder_blocks[0].mlp.register_forward_pre_hook(lambda m, i: seen.append(i[0].shape))

    def subclassed_linear(model, seen):
        class Logged(torch.nn.Linear):
            def forward(self, x):
                seen.append(x.shape)
                return super().forward(x)
        old = model.blocks[0].mlp.fc2
        new = Logged(old.in_features, old.out_features)
        new.load_state_dict(old.state_dict())
        model.blocks[0].mlp.fc2 = new

    def partly_frozen(model, seen):
        model.blocks[0].attn.qkv.weight.requires_grad_(False)

    return {"hook_on_qkv": hook_on_qkv, "hook_on_mlp": hook_on_mlp, "subclassed_linear": subclassed_linear,
            "partly_frozen": partly_frozen}


@pytest.mark.parametrize("case", list(_fallback_cases()))
def test_blocks_that_are_not_plain_run_as_before(case):
    """Where calling the weights would skip something (a hook, a subclass's forward) or only some weights need
    gradients, the encoder's blocks call their modules as without the option: hooks fire, the numbers are
    autocast's own, nothing is grouped in that stack."""
    seen_plain, seen_grouped = [], []
    model = _model("cpu", backend="sdpa")
    other = copy.deepcopy(model)
    make = _fallback_cases()[case]
    make(model, seen_plain)
    make(other, seen_grouped)
    plain = _step(model, "cpu", False, count=True)
    grouped = _step(other, "cpu", True, count=True)
    assert seen_grouped == seen_plain
    if case in ("hook_on_qkv", "subclassed_linear"):
        assert len(seen_grouped) == 1
    _assert_same(grouped, plain, "cpu")
    # the stack with the odd block falls back whole; the other one (decoder, or encoder for hook_on_mlp) still
    # makes its one grouped copy each way
    assert grouped[3]["_foreach_copy_"] == 2
    assert plain[3]["_foreach_copy_"] == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lean", ["all", "one block"])
def test_lean_blocks_take_the_grouped_casts(device, lean):
    """Lean blocks (fastmae.model.lean) run their functions on the grouped casts' weights: the same numbers as
    lean blocks with autocast's casts, and per block the 16 casts of the plain blocks fewer, plus the 3 weight
    casts lean's backward makes again (qkv, fc1, fc2), where a plain block's backward reuses the forward's."""
    model = _model(device, backend="sdpa")
    blocks = list(model.blocks) + list(model.decoder_blocks)
    for blk in (blocks if lean == "all" else blocks[2:3]):
        blk.lean_blocks = True
    steps, leans = 2, len(blocks) if lean == "all" else 1
    plain = _step(model, device, False, steps=steps, count=True)  # the operator calls of both steps
    grouped = _step(copy.deepcopy(model), device, True, steps=steps, count=True)
    _assert_same(grouped, plain, device)
    assert plain[3]["_foreach_copy_"] == 0 and grouped[3]["_foreach_copy_"] == steps * 2 * _groups(model)
    assert plain[3]["_to_copy"] - grouped[3]["_to_copy"] == steps * (16 * len(blocks) + 3 * leans)


def test_grouped_casts_need_autocast():
    """Without autocast nothing is cast: the option changes nothing (fp32 throughout)."""
    model = _model("cpu", backend="sdpa")
    model.group_weight_casts = True
    counter = OpRecorder()
    with counter:
        model(torch.randn(2, 3, 32, 32), 0.75)[0].backward()
    assert counter.calls["_foreach_copy_"] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_default_groups_on_cuda_on_the_fast_path_only(device):
    """None (the default): grouped on CUDA when the token ops are fastmae's; never on a CPU, and never on the
    official path (backend reference), which keeps the official code's kernels."""
    for backend, expected in (("sdpa", device == "cuda"), ("reference", False)):
        model = _model(device, backend=backend)
        assert model.group_weight_casts is None
        calls = _step(model, device, None, count=True)[3]
        assert (calls["_foreach_copy_"] > 0) == expected, backend
