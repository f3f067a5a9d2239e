"""The reference ops against their definitions (loops over MISSION.md's formulas) on odd shapes, and the
sdpa backend's ops against the reference, forward and backward."""
import pytest
import torch

from fastmae import ops
from fastmae.ops import reference
from tests.model.oracle import patch_vectors
from tests.utils import assert_close, masking

# (batch, channels, grid side, patch): batch 1, 1 and 3 channels, non-power-of-two patch counts
SHAPES = [(1, 3, 3, 4), (2, 1, 5, 2), (3, 3, 7, 2), (1, 1, 2, 3)]


@pytest.mark.parametrize("n,c,g,p", SHAPES)
def test_patchify_and_gather_patches(n, c, g, p):
    imgs = torch.randn(n, c, g * p, g * p)
    x = reference.patchify(imgs, p)
    assert torch.equal(x, torch.stack([patch_vectors(imgs[i], p) for i in range(n)]))
    assert torch.equal(reference.unpatchify(x, p, c), imgs)
    ids_keep = masking(n, g * g, max(1, g * g // 3))[0][:, :max(1, g * g // 3)]
    pix = reference.gather_patches(imgs, ids_keep, p)
    for i in range(n):
        for j, patch in enumerate(ids_keep[i].tolist()):
            a, b = divmod(patch, g)
            assert torch.equal(pix[i, j], imgs[i, :, a * p:(a + 1) * p, b * p:(b + 1) * p].reshape(-1))  # (c, p, q)


@pytest.mark.parametrize("n,L,d,keep", [(1, 9, 5, 3), (2, 25, 8, 1), (3, 49, 6, 49)])
def test_gather_and_unshuffle_definitions(n, L, d, keep):
    x = torch.randn(n, L, d)
    pos = torch.randn(1, L + 1, d)
    cls = torch.randn(1, 1, d)
    ids_shuffle, ids_restore, mask = masking(n, L, keep)
    ids_keep = ids_shuffle[:, :keep]
    out = reference.gather_tokens(x, ids_keep, pos, cls)
    for i in range(n):
        assert torch.allclose(out[i, 0], cls[0, 0] + pos[0, 0])
        for j, t in enumerate(ids_keep[i].tolist()):
            assert torch.allclose(out[i, 1 + j], x[i, t] + pos[0, 1 + t])
    gathered = torch.stack([x[i, ids_keep[i]] for i in range(n)])
    assert_close(reference.gather_tokens(gathered, ids_keep, pos, cls, gathered=True), out, 1e-6, 0, "gathered")
    assert_close(reference.gather_tokens(x, ids_keep, pos), out[:, 1:], 1e-6, 0, "no cls")

    y = torch.randn(n, keep + 1, d)
    mt = torch.randn(1, 1, d)
    dec = reference.unshuffle_tokens(y, ids_restore, mt, pos)
    for i in range(n):
        assert torch.allclose(dec[i, 0], y[i, 0] + pos[0, 0])
        for l in range(L):
            r = int(ids_restore[i, l])
            want = (y[i, 1 + r] if r < keep else mt[0, 0]) + pos[0, 1 + l]
            assert torch.allclose(dec[i, 1 + l], want)
            assert (r < keep) == (mask[i, l] == 0)


@pytest.mark.parametrize("n,c,g,p", SHAPES)
@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_loss_definition(n, c, g, p, norm_pix):
    imgs = torch.randn(n, c, g * p, g * p)
    L, P = g * g, p * p * c
    _, ids_restore, mask = masking(n, L, max(1, L // 4))
    pred = torch.randn(n, L, P)
    num = den = 0.0
    for i in range(n):
        t = patch_vectors(imgs[i], p)
        if norm_pix:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        for l in range(L):
            if mask[i, l]:
                num += float(((pred[i, l] - t[l]) ** 2).mean())
                den += 1
    got = reference.masked_mse_loss(pred, imgs, mask, p, norm_pix)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(float(got) - num / den) < 1e-5 * max(1.0, num / den)
    # removed patches only: pred_ids rows
    ids_removed = torch.argsort(ids_restore, 1)[:, max(1, L // 4):]
    pred_m = torch.stack([pred[i, ids_removed[i]] for i in range(n)])
    assert_close(reference.masked_mse_loss(pred_m, imgs, mask, p, norm_pix, pred_ids=ids_removed), got, 1e-6, 1e-5)


def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*tensors)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) if out.dim() else None)
    return out.detach(), [t.grad for t in tensors if t.is_floating_point()]


@pytest.mark.parametrize("n,L,d,keep", [(1, 9, 5, 3), (2, 64, 32, 16), (3, 49, 6, 48)])
def test_sdpa_token_ops_match_reference(n, L, d, keep):
    x, pos, cls, mt = torch.randn(n, L, d), torch.randn(1, L + 1, d), torch.randn(1, 1, d), torch.randn(1, 1, d)
    ids_shuffle, ids_restore, mask = masking(n, L, keep)
    ids_keep = ids_shuffle[:, :keep]
    for gathered in (False, True):
        xin = x[:, :keep] if gathered else x
        for b in ("reference", "sdpa"):
            out, grads = _grads(lambda a, c: ops.gather_tokens(a, ids_keep, pos, c, gathered=gathered, backend=b),
                                xin, cls)
            if b == "reference":
                ref = (out, grads)
        assert_close(out, ref[0], 1e-6, 1e-6, "gather_tokens")
        for g, r in zip(grads, ref[1]):
            assert_close(g, r, 1e-5, 1e-6, "gather_tokens grad")
    y = torch.randn(n, keep + 1, d)
    outs = {b: _grads(lambda a, m: ops.unshuffle_tokens(a, ids_restore, m, pos, backend=b), y, mt)
            for b in ("reference", "sdpa")}
    assert_close(outs["sdpa"][0], outs["reference"][0], 1e-6, 1e-6, "unshuffle")
    for g, r in zip(outs["sdpa"][1], outs["reference"][1]):
        assert_close(g, r, 1e-5, 1e-6, "unshuffle grad")


@pytest.mark.parametrize("n,c,g,p", SHAPES)
def test_sdpa_gather_patches_matches_reference(n, c, g, p):
    imgs = torch.randn(n, c, g * p, g * p)
    ids_keep = masking(n, g * g, max(1, g * g // 2))[0][:, :max(1, g * g // 2)]
    assert torch.equal(ops.gather_patches(imgs, ids_keep, p, backend="sdpa"),
                       reference.gather_patches(imgs, ids_keep, p))


@pytest.mark.parametrize("shape", [(1, 1, 1, 16), (2, 3, 7, 32), (1, 2, 50, 64), (2, 2, 65, 80)])
@pytest.mark.parametrize("strided", [False, True])
def test_sdpa_attention_matches_reference(shape, strided):
    b, h, n, d = shape
    if strided:  # views of one packed qkv projection, as the model passes them
        q, k, v = torch.randn(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (torch.randn(shape) for _ in range(3))
    out_r, g_r = _grads(lambda *a: ops.attention(*a, backend="reference"), q, k, v)
    out_s, g_s = _grads(lambda *a: ops.attention(*a, backend="sdpa"), q, k, v)
    assert_close(out_s, out_r, 1e-5, 1e-5, "attention")
    for name, gs, gr in zip("qkv", g_s, g_r):
        assert_close(gs, gr, 1e-5, 1e-4, f"d{name}")
    out_scaled = ops.attention(q, k, v, scale=0.3, backend="sdpa")
    assert_close(out_scaled, reference.attention(q, k, v, scale=0.3), 1e-5, 1e-5, "scale")


def test_token_ops_take_one_position_embedding_for_the_batch():
    """pos_embed is [1, L+1, D]: a per-sample [N, L+1, D] one is refused (the kernels read one table for the
    whole batch, and would silently give every sample the first sample's)."""
    x, ids = torch.randn(2, 8, 4), torch.stack([torch.randperm(8)[:3] for _ in range(2)])
    with pytest.raises(ValueError, match=r"pos_embed must be \[1, L\+1, D\]"):
        ops.gather_tokens(x, ids, torch.randn(2, 9, 4), torch.randn(1, 1, 4))
    ids_restore = torch.stack([torch.randperm(8) for _ in range(2)])
    with pytest.raises(ValueError, match=r"pos_embed must be \[1, 9, 4\]"):
        ops.unshuffle_tokens(torch.randn(2, 4, 4), ids_restore, torch.randn(1, 1, 4), torch.randn(2, 9, 4))
