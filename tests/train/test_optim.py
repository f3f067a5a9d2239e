"""The official optimiser set-up: weight-decay groups, the lr scaling rule and the per-iteration schedule."""
import math

import pytest
import torch

import fastmae
from fastmae.train.optim import (ADAMW_IMPLS, absolute_lr, adamw_impl, adjust_learning_rate, build_optimizer,
                                 fused_adamw_supported, load_optimizer_state, lr_at, param_groups_weight_decay)


def test_weight_decay_groups_follow_the_official_rule():
    model = fastmae.create_model("mae_vit_tiny_patch4")
    groups = param_groups_weight_decay(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]  # official order: no-decay first
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[0]["params"]}
    decay = {names[id(p)] for p in groups[1]["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert no_decay | decay == trainable and not no_decay & decay
    # the fixed sine-cosine position embeddings are frozen: in no group
    assert "pos_embed" not in trainable and "decoder_pos_embed" not in trainable
    for n, p in model.named_parameters():
        if n in trainable:
            expect_no_decay = p.ndim <= 1 or n.endswith(".bias")
            assert (n in no_decay) == expect_no_decay, n
    assert "blocks.0.norm1.weight" in no_decay and "blocks.0.attn.qkv.bias" in no_decay
    assert "blocks.0.attn.qkv.weight" in decay and "patch_embed.proj.weight" in decay
    # the official script passes no skip list: the [1, 1, D] tokens are decayed, unless skipped by name
    assert {"cls_token", "mask_token"} <= decay
    skipped = param_groups_weight_decay(model, 0.05, skip_list=("cls_token",))
    assert any(p is model.cls_token for p in skipped[0]["params"])


def test_adamw_settings():
    model = fastmae.create_model("mae_vit_tiny_patch4")
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)


def _trained(impl: str, steps: int = 3, state_from: str | None = None):
    """The tiny model after `steps` AdamW steps on fixed gradients with implementation `impl`; with
    `state_from`, the first step is taken by that implementation and its state dict loaded into `impl`'s."""
    torch.manual_seed(0)
    model = fastmae.create_model("mae_vit_tiny_patch4")
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]
    first = build_optimizer(model, lr=1e-2, weight_decay=0.05, impl=state_from or impl)
    opt = first
    for i, g in enumerate(grads):
        for p, gi in zip(params, g):
            p.grad = gi.clone()
        opt.step()
        if i == 0 and state_from is not None:
            opt = build_optimizer(model, lr=1e-2, weight_decay=0.05, impl=impl)
            load_optimizer_state(opt, first.state_dict())
    return model, opt


def test_adamw_implementations_agree_and_auto_takes_the_fused_kernel():
    """Every implementation gives the same weights after three steps (fp32; measured differences are a few
    ulps, bound 1e-6 relative + 1e-7 absolute); `auto` is fused where torch has the kernel (the CPU here)."""
    model = fastmae.create_model("mae_vit_tiny_patch4")
    assert fused_adamw_supported(model.parameters())
    assert not fused_adamw_supported([torch.zeros(2, dtype=torch.int64)])
    assert adamw_impl(build_optimizer(model, 1e-3, 0.05)) == "fused"
    assert adamw_impl(build_optimizer(model, 1e-3, 0.05, impl="default")) == "for-loop"  # torch's own, on a CPU
    baseline, _ = _trained("for-loop")
    ref = [p.detach().clone() for p in baseline.parameters()]
    for impl in ("fused", "foreach", "auto", "default"):
        model, opt = _trained(impl)
        assert adamw_impl(opt) == {"auto": "fused", "default": "for-loop"}.get(impl, impl)
        for a, b in zip(model.parameters(), ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="unknown AdamW implementation"):
        build_optimizer(model, 1e-3, 0.05, impl="lamb")
    assert set(ADAMW_IMPLS) >= {"auto", "fused", "foreach", "for-loop", "default"}


@pytest.mark.parametrize("saved,resumed", [("default", "fused"), ("fused", "foreach"), ("foreach", "fused")])
def test_a_loaded_state_keeps_the_optimizers_implementation(saved, resumed):
    """torch's load_state_dict would take the saved groups' `fused`/`foreach` flags; load_optimizer_state keeps
    the loading optimizer's, with its step counters where that implementation keeps them, and the steps after
    the load give the same weights as a run without the switch (bound as above)."""
    model, opt = _trained(resumed, state_from=saved)
    assert adamw_impl(opt) == resumed
    for p, st in opt.state.items():
        assert st["step"].item() == 3
        assert st["step"].device == p.device and st["step"].dtype == torch.float32
    straight, _ = _trained(resumed)
    for a, b in zip(model.parameters(), straight.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lr_scaling_rule():
    assert absolute_lr(None, 1.5e-4, 64, 1, 1) == pytest.approx(1.5e-4 * 64 / 256)
    assert absolute_lr(None, 1.5e-4, 128, 4, 8) == pytest.approx(1.5e-4 * 4096 / 256)  # the paper's batch 4096
    assert absolute_lr(2e-3, 1.5e-4, 64, 4, 8) == 2e-3  # --lr wins


def test_schedule_warmup_then_half_cosine():
    lr, min_lr, warm, epochs = 1e-3, 1e-5, 4, 20
    assert lr_at(0, lr, min_lr, warm, epochs) == 0.0
    assert lr_at(1, lr, min_lr, warm, epochs) == pytest.approx(lr / 4)
    assert lr_at(2.5, lr, min_lr, warm, epochs) == pytest.approx(lr * 2.5 / 4)
    assert lr_at(warm, lr, min_lr, warm, epochs) == pytest.approx(lr)
    assert lr_at(12, lr, min_lr, warm, epochs) == pytest.approx(min_lr + (lr - min_lr) * 0.5)
    assert lr_at(epochs, lr, min_lr, warm, epochs) == pytest.approx(min_lr)
    mid = 4 + 16 / 3
    assert lr_at(mid, lr, min_lr, warm, epochs) == pytest.approx(
        min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi / 3)))
    xs = [warm + i * 0.5 for i in range(33)]
    ys = [lr_at(x, lr, min_lr, warm, epochs) for x in xs]
    assert all(a >= b for a, b in zip(ys, ys[1:])), "cosine phase must not increase"


def test_adjust_learning_rate_sets_every_group():
    model = fastmae.create_model("mae_vit_tiny_patch4")
    opt = build_optimizer(model, lr=1.0, weight_decay=0.05)
    opt.param_groups[1]["lr_scale"] = 0.5
    value = adjust_learning_rate(opt, 3 / 10 + 1, 1e-3, 0.0, 2, 10)  # iteration 3 of 10 in epoch 1
    assert value == pytest.approx(1e-3 * 1.3 / 2)
    assert opt.param_groups[0]["lr"] == pytest.approx(value)
    assert opt.param_groups[1]["lr"] == pytest.approx(value * 0.5)


def test_an_old_checkpoints_plain_number_steps_load_into_the_fused_optimizer():
    """Checkpoints written by old torch versions (the official MAE ones among them) hold each `step` as a plain
    number and no `fused`/`foreach` flags; they load into the fused optimizer, which steps on from there."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    old = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer(torch.randn(2, 4)).sum().backward()
    old.step()
    state = old.state_dict()
    for st in state["state"].values():
        st["step"] = 1
    for g in state["param_groups"]:
        for k in ("fused", "foreach", "capturable", "differentiable"):
            g.pop(k, None)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, fused=True)
    load_optimizer_state(opt, state)
    assert adamw_impl(opt) == "fused"
    layer(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert all(st["step"].item() == 2 for st in opt.state.values())
