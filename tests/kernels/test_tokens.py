"""The fused token kernels (`fastmae.kernels.tokens`) against the reference path, forward and backward.

Tolerances:
- `gather_patches` and the gradient to x of both token ops move values without arithmetic: they must
  equal the reference bit for bit (same dtype in and out).
- Values that involve arithmetic (one addition of the position embedding; the class-token and mask-token
  gradients, which are sums) follow the suite's one rule, `tests.utils.assert_error_within_plain`: error
  against an fp32 reference <= 2 x the plain same-dtype reference path's error + a floor per dtype.
- bf16 runs on the CPU too: the kernels convert after every load and before every store, which the
  interpreter handles, except that its fp32 -> bf16 conversion truncates where the GPU rounds to nearest
  (up to one bf16 ulp instead of half). So on the CPU, for bf16, the "plain path's error" in the rule is the
  larger of the plain path's own and that of truncating the fp32 reference to bf16 (`plain_for_rule`).

Masks are built as the model builds them: noise -> argsort -> ids_shuffle, ids_restore, ids_keep.
Shapes pair patch counts with widths (4/32, 64/48, 196/96, 256/32) rather than taking the full product, to
keep the interpreter run short.
"""
from __future__ import annotations

import pytest
import torch

from fastmae.ops import reference
from tests.utils import (DEVICES, assert_error_within_plain, kept_ids, launched_kernels, plain_for_rule,
                         seeded_randn, skip_unless_serves)

tokens = pytest.importorskip("fastmae.kernels.tokens", reason="the Triton kernels need triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (patches L, width D, kept K): ratios 0.5, 0.75, 0.9, a single kept patch, none removed, and more kept patches
# than the official-order backward compares at once (GATHER_BWD_BLOCK_K = 64: two steps, the second partial)
TOKEN_CASES = [(4, 32, 2), (64, 48, 16), (196, 96, 19), (256, 32, 1), (16, 40, 16), (130, 32, 97)]


def _run(fn, grads_of, *args):
    """Forward, then backward with a fixed upstream gradient; returns (out, [grads of `grads_of`])."""
    out = fn(*args)
    gen = torch.Generator().manual_seed(99)
    go = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
    grads = torch.autograd.grad(out, grads_of, go)
    return out, list(grads)


def check(fast: torch.Tensor, plain: torch.Tensor, ref32: torch.Tensor, name: str) -> None:
    assert_error_within_plain(fast, plain_for_rule(plain, ref32), ref32, name)


def _leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


# --- gather_patches ------------------------------------------------------------------------------

# (N, C, p, grid h, grid w, kept K): L = 4, 64, 196, 256, one non-square image, a single kept patch, none removed
PATCH_CASES = [(2, 1, 4, 2, 2, 2), (2, 3, 4, 8, 8, 16), (1, 3, 16, 14, 14, 49), (1, 1, 4, 16, 16, 25),
               (2, 3, 5, 2, 3, 3), (2, 2, 8, 4, 4, 1), (2, 3, 4, 4, 4, 16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PATCH_CASES)
def test_gather_patches_matches_reference(device, dtype, case):
    n, c, p, gh, gw, K = case
    imgs = seeded_randn(n, c, gh * p, gw * p, dtype=dtype, device=device, seed=1)
    skip_unless_serves("gather_patches", "triton", device, dtype, imgs=imgs)
    ids_keep, _ = kept_ids(n, gh * gw, K, device)
    out = tokens.gather_patches(imgs, ids_keep, p)
    assert out.dtype == dtype
    assert torch.equal(out, reference.gather_patches(imgs, ids_keep, p))


@pytest.mark.parametrize("device", DEVICES)
def test_gather_patches_strided_image(device):
    """A channels-last image (a strided view) is read in place (the kernel is given the image itself, not a copy)
    and gives the same patches."""
    imgs = seeded_randn(2, 3, 32, 32, dtype=torch.float32, device=device, seed=2).to(memory_format=torch.channels_last)
    skip_unless_serves("gather_patches", "triton", device, torch.float32, imgs=imgs)
    assert not imgs.is_contiguous()
    ids_keep, _ = kept_ids(2, 64, 16, device)
    with launched_kernels() as launched:
        out = tokens.gather_patches(imgs, ids_keep, 4)
    assert len(launched) == 1 and any(a is imgs for a in launched[0].args)
    assert torch.equal(out, reference.gather_patches(imgs, ids_keep, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_gather_patches_refuses_imgs_requiring_grad(device):
    imgs = torch.randn(1, 3, 8, 8, device=device, requires_grad=True)
    skip_unless_serves("gather_patches", "triton", device, torch.float32)
    with pytest.raises(ValueError, match="no gradient to imgs"):
        tokens.gather_patches(imgs, torch.zeros(1, 1, dtype=torch.int64, device=device), 4)


# --- gather_tokens ------------------------------------------------------------------------------

def _gather_tokens_case(device, dtype, L, D, K, gathered, with_cls, n=2):
    ids_keep, _ = kept_ids(n, L, K, device, seed=L + K)
    x32 = seeded_randn(n, K if gathered else L, D, dtype=torch.float32, device=device, seed=3)
    pos = seeded_randn(1, L + 1, D, dtype=torch.float32, device=device, seed=4)
    cls32 = seeded_randn(1, 1, D, dtype=torch.float32, device=device, seed=5) if with_cls else None
    return ids_keep, x32, pos, cls32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gathered,with_cls", [(False, True), (True, True), (False, False), (True, False)])
@pytest.mark.parametrize("L,D,K", TOKEN_CASES)
def test_gather_tokens_matches_reference(device, dtype, gathered, with_cls, L, D, K):
    skip_unless_serves("gather_tokens", "triton", device, dtype)
    ids_keep, x32, pos32, cls32 = _gather_tokens_case(device, dtype, L, D, K, gathered, with_cls)

    def run(fn, t):
        x = _leaf(x32, t)
        cls = None if cls32 is None else _leaf(cls32, t)
        leaves = [x] + ([cls] if cls is not None else [])
        return _run(lambda *a: fn(*a, gathered=gathered), leaves, x, ids_keep, pos32.to(t), cls)

    out, grads = run(tokens.gather_tokens, dtype)
    plain, plain_grads = run(reference.gather_tokens, dtype)
    ref32, ref_grads = run(reference.gather_tokens, torch.float32)
    assert out.shape == (2, K + int(with_cls), D) and out.dtype == dtype
    check(out, plain, ref32, "gather_tokens out")
    assert grads[0].dtype == dtype and torch.equal(grads[0], plain_grads[0]), "grad x must route grad_out exactly"
    if with_cls:
        check(grads[1], plain_grads[1], ref_grads[1], "gather_tokens grad cls_token")


@pytest.mark.parametrize("device", DEVICES)
def test_gather_tokens_mixed_precision_promotes_like_reference(device):
    """x fp16 with fp32 parameters: the output is fp32 (type promotion, as the reference), grads per input dtype."""
    skip_unless_serves("gather_tokens", "triton", device, torch.float16)
    ids_keep, x32, pos, cls32 = _gather_tokens_case(device, torch.float16, 64, 48, 16, False, True)
    x, cls = _leaf(x32, torch.float16), _leaf(cls32)
    out, (gx, gc) = _run(tokens.gather_tokens, [x, cls], x, ids_keep, pos, cls)
    x_r, cls_r = _leaf(x32, torch.float16), _leaf(cls32)
    ref, (gx_r, gc_r) = _run(reference.gather_tokens, [x_r, cls_r], x_r, ids_keep, pos, cls_r)
    assert out.dtype == ref.dtype == torch.float32 and gx.dtype == torch.float16 and gc.dtype == torch.float32
    assert torch.equal(out, ref)
    assert torch.equal(gx, gx_r)
    assert_error_within_plain(gc, gc_r, gc_r, "grad cls_token")


@pytest.mark.parametrize("device", DEVICES)
def test_gather_tokens_refuses_pos_embed_requiring_grad(device):
    skip_unless_serves("gather_tokens", "triton", device, torch.float32)
    x = torch.randn(1, 4, 32, device=device)
    pos = torch.randn(1, 5, 32, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="no gradient to pos_embed"):
        tokens.gather_tokens(x, torch.zeros(1, 2, dtype=torch.int64, device=device), pos)


@pytest.mark.parametrize("device", DEVICES)
def test_token_ops_refuse_what_their_kernels_cannot_take(device):
    """Secondary tensors in float64 (read in fp32, answered in float64 with fp32 precision) are for the plain paths;
    an unshuffle input without its class-token row (the kernels read and write row 0) is an error, not a read or
    write outside x."""
    skip_unless_serves("gather_tokens", "triton", device, torch.float32)
    from fastmae import ops
    ids_keep, ids_restore = kept_ids(2, 4, 2, device)
    x, pos = torch.randn(2, 4, 8, device=device), torch.randn(1, 5, 8, device=device)
    with pytest.raises(ops.BackendUnavailable, match="takes pos_embed in float32, float16 or bfloat16"):
        ops.gather_tokens(x, ids_keep, pos.double(), backend="triton")
    with pytest.raises(ops.BackendUnavailable, match="takes cls_token in float32"):
        ops.gather_tokens(x, ids_keep, pos, torch.zeros(1, 1, 8, device=device, dtype=torch.float64), backend="triton")
    with pytest.raises(ops.BackendUnavailable, match="takes mask_token in float32"):
        ops.unshuffle_tokens(x[:, :3], ids_restore, torch.zeros(1, 1, 8, device=device, dtype=torch.float64), pos,
                             backend="triton")
    for op in (ops.unshuffle_tokens, tokens.unshuffle_tokens):
        with pytest.raises(ValueError, match=r"x must be \[N, K\+1, Dd\]"):
            op(x[:, :0], ids_restore, torch.zeros(1, 1, 8, device=device), pos)
        with pytest.raises(ValueError, match=r"x must be \[N, K\+1, Dd\]"):
            op(torch.randn(2, 6, 8, device=device), ids_restore, torch.zeros(1, 1, 8, device=device), pos)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,with_cls", [(2, False), (1, True), (2, True)])
def test_gathered_leaf_x_grad_is_its_own_memory(device, n, with_cls):
    """gathered=True routes grad_out's kept rows to x as they are; where x is a leaf they become x.grad, which
    must not share memory with the caller's upstream gradient: a second backward (gradient accumulation) adds
    into x.grad in place and would change the caller's tensor."""
    skip_unless_serves("gather_tokens", "triton", device, torch.float32)
    ids_keep, x32, pos, cls32 = _gather_tokens_case(device, torch.float32, 16, 8, 4, True, with_cls, n=n)
    x = x32.clone().requires_grad_(True)
    out = tokens.gather_tokens(x, ids_keep, pos, cls32, gathered=True)
    upstream = torch.ones_like(out)
    out.backward(upstream, retain_graph=True)
    assert x.grad.untyped_storage().data_ptr() != upstream.untyped_storage().data_ptr()
    out.backward(upstream)
    assert torch.equal(upstream, torch.ones_like(out)) and torch.equal(x.grad, torch.full_like(x, 2.0))


@pytest.mark.parametrize("device", DEVICES)
def test_token_kernels_refuse_a_per_sample_position_table(device):
    """The kernels read pos_embed as one table for the batch: [N, L+1, D] would give every sample the first
    sample's rows, so their own entry points refuse it (not only fastmae.ops)."""
    skip_unless_serves("gather_tokens", "triton", device, torch.float32)
    ids_keep, ids_restore = kept_ids(2, 8, 3, device)
    with pytest.raises(ValueError, match="one table for the batch"):
        tokens.gather_tokens(torch.randn(2, 8, 16, device=device), ids_keep, torch.randn(2, 9, 16, device=device))
    with pytest.raises(ValueError, match="one table for the batch"):
        tokens.unshuffle_tokens(torch.randn(2, 4, 16, device=device), ids_restore, torch.randn(1, 1, 16, device=device),
                                torch.randn(2, 9, 16, device=device))


# --- unshuffle_tokens --------------------------------------------------------------------------

def _unshuffle_inputs(device, L, D, K, n=2):
    _, ids_restore = kept_ids(n, L, K, device, seed=L + 7 * K)
    x32 = seeded_randn(n, K + 1, D, dtype=torch.float32, device=device, seed=6)
    mtok32 = seeded_randn(1, 1, D, dtype=torch.float32, device=device, seed=7)
    pos32 = seeded_randn(1, L + 1, D, dtype=torch.float32, device=device, seed=8)
    return ids_restore, x32, mtok32, pos32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,D,K", TOKEN_CASES)
def test_unshuffle_tokens_matches_reference(device, dtype, L, D, K):
    skip_unless_serves("unshuffle_tokens", "triton", device, dtype)
    ids_restore, x32, mtok32, pos32 = _unshuffle_inputs(device, L, D, K)

    def run(fn, t):
        x, mtok = _leaf(x32, t), _leaf(mtok32, t)
        return _run(fn, [x, mtok], x, ids_restore, mtok, pos32.to(t))

    out, (gx, gm) = run(tokens.unshuffle_tokens, dtype)
    plain, (gx_p, gm_p) = run(reference.unshuffle_tokens, dtype)
    ref32, (gx_r, gm_r) = run(reference.unshuffle_tokens, torch.float32)
    assert out.shape == (2, L + 1, D) and out.dtype == dtype
    check(out, plain, ref32, "unshuffle out")
    assert gx.dtype == dtype and torch.equal(gx, gx_p), "grad x must route grad_out exactly"
    assert gm.shape == (1, 1, D) and gm.dtype == dtype
    check(gm, gm_p, gm_r, "unshuffle grad mask_token")
    if K == L:
        assert not gm.any(), "no removed patch: the mask token gets no gradient"


@pytest.mark.parametrize("device", DEVICES)
def test_unshuffle_mixed_precision_promotes_like_reference(device):
    skip_unless_serves("unshuffle_tokens", "triton", device, torch.float16)
    ids_restore, x32, mtok32, pos32 = _unshuffle_inputs(device, 64, 48, 16)
    x, m = _leaf(x32, torch.float16), _leaf(mtok32)
    out, (gx, gm) = _run(tokens.unshuffle_tokens, [x, m], x, ids_restore, m, pos32)
    x_r, m_r = _leaf(x32, torch.float16), _leaf(mtok32)
    ref, (gx_r, gm_r) = _run(reference.unshuffle_tokens, [x_r, m_r], x_r, ids_restore, m_r, pos32)
    assert out.dtype == ref.dtype == torch.float32 and gx.dtype == torch.float16 and gm.dtype == torch.float32
    assert torch.equal(out, ref)
    assert torch.equal(gx, gx_r)
    assert_error_within_plain(gm, gm_r, gm_r, "grad mask_token")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,L,D,K", [(2, 196, 48, 49), (24, 16, 64, 4)])
def test_unshuffle_mask_token_grad_is_deterministic(device, n, L, D, K):
    """Two runs give the same bits: per-program partial sums then a fixed-order column sum, no atomics.
    The first shape splits each sample's rows over several programs, the second sums many samples."""
    skip_unless_serves("unshuffle_tokens", "triton", device, torch.float32)
    ids_restore, x32, mtok32, pos32 = _unshuffle_inputs(device, L, D, K, n=n)
    _, rows_per_prog, chunks = tokens._unshuffle_bwd_split(n, L, D)
    assert chunks > 1 or n > 16, "the shape should exercise the two-stage reduction"
    go = seeded_randn(n, L + 1, D, dtype=torch.float32, device=device, seed=9) * 100
    grads = []
    for _ in range(2):
        x, m = _leaf(x32), _leaf(mtok32)
        out = tokens.unshuffle_tokens(x, ids_restore, m, pos32)
        grads.append(torch.autograd.grad(out, [m], go)[0])
    assert torch.equal(grads[0], grads[1])
    # against the reference path: fp32 is the plain path, fp64 the ground truth
    plain = torch.autograd.grad(reference.unshuffle_tokens(_leaf(x32), ids_restore, m := _leaf(mtok32), pos32),
                                [m], go)[0]
    truth = torch.autograd.grad(reference.unshuffle_tokens(_leaf(x32.double()), ids_restore,
                                                           m64 := _leaf(mtok32.double()), pos32.double()),
                                [m64], go.double())[0]
    assert_error_within_plain(grads[0], plain, truth, "mask token grad")


@pytest.mark.parametrize("device", DEVICES)
def test_gather_tokens_cls_grad_is_deterministic(device):
    skip_unless_serves("gather_tokens", "triton", device, torch.float32)
    ids_keep, x32, pos, cls32 = _gather_tokens_case(device, torch.float32, 16, 64, 4, False, True, n=40)
    go = seeded_randn(40, 5, 64, dtype=torch.float32, device=device, seed=10) * 100
    grads = []
    for _ in range(2):
        x, c = _leaf(x32), _leaf(cls32)
        grads.append(torch.autograd.grad(tokens.gather_tokens(x, ids_keep, pos, c), [c], go)[0])
    assert torch.equal(grads[0], grads[1])
    # against the reference path: fp32 is the plain path, fp64 the ground truth
    plain = torch.autograd.grad(reference.gather_tokens(_leaf(x32), ids_keep, pos, c := _leaf(cls32)), [c], go)[0]
    truth = torch.autograd.grad(reference.gather_tokens(_leaf(x32.double()), ids_keep, pos.double(),
                                                        c64 := _leaf(cls32.double())), [c64], go.double())[0]
    assert_error_within_plain(grads[0], plain, truth, "cls grad")


def test_launchers_run_on_the_gpu_of_their_tensors(monkeypatch):
    """Triton launches on the current device: every attention, token and loss launcher makes its main
    tensor's GPU current for the launch when another one is (a fake two-GPU machine; the wrapper is what is
    tested), and leaves the device alone when it is already current or the tensor is on the CPU. The tensor
    may be passed by position or by keyword."""
    from fastmae.kernels import loss as loss_mod
    from fastmae.kernels.utils import launches_on_device_of

    current, entered = [0], []

    class FakeDevice:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            entered.append(self.index)
            self.before, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.before

    class FakeCudaTensor:
        is_cuda = True

        def __init__(self, index):
            self.device = torch.device("cuda", index)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)

    @launches_on_device_of("t")
    def launcher(first, t, *args):
        return current[0]

    assert launcher(None, FakeCudaTensor(1)) == 1 and entered == [1] and current[0] == 0
    assert launcher(None, FakeCudaTensor(0)) == 0 and entered == [1]  # already current: no switch
    assert launcher(None, torch.zeros(1)) == 0 and entered == [1]
    assert launcher(None, t=FakeCudaTensor(1)) == 1 and entered == [1, 1] and current[0] == 0  # by keyword
    from fastmae.kernels import attention as attention_mod

    for fn in (tokens.gather_patches_forward, tokens.gather_tokens_forward, tokens.gather_tokens_backward,
               tokens.unshuffle_tokens_forward, tokens.unshuffle_tokens_backward,
               loss_mod.masked_mse_loss_forward, loss_mod.masked_mse_loss_backward,
               attention_mod.attention_forward, attention_mod.attention_backward):
        assert fn.__code__ is launcher.__code__, fn.__name__  # wrapped by the same guard
