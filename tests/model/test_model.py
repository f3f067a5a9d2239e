"""The model against an independent oracle, backends against each other, masking and shapes."""
import pytest
import torch

import fastmae
from tests.model.oracle import mae_forward, patch_vectors
from tests.utils import OpRecorder, assert_close

# fp32, same weights and noise: the model and the loop-by-loop oracle differ only by summation order
ATOL, RTOL = 2e-5, 1e-4


def small_model(**kw):
    torch.manual_seed(0)
    kw = {"img_size": 16, "patch_size": 4, "in_chans": 3, "embed_dim": 32, "depth": 2, "num_heads": 2,
          "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2, "mlp_ratio": 2.0, **kw}
    return fastmae.MaskedAutoencoderViT(**kw)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_model_matches_oracle(backend, norm_pix, mask_ratio):
    model = small_model(norm_pix_loss=norm_pix, backend=backend)
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    with torch.no_grad():
        o_loss, o_pred, o_mask = mae_forward(model, imgs, mask_ratio, noise, norm_pix)
    assert torch.equal(mask, o_mask)
    assert_close(pred, o_pred, ATOL, RTOL, "pred")
    assert_close(loss, o_loss, ATOL, RTOL, "loss")


def test_patchify_order_and_inverse():
    model = small_model(in_chans=1)
    imgs = torch.randn(1, 1, 16, 16)
    assert torch.equal(model.patchify(imgs)[0], patch_vectors(imgs[0], 4))
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)
    model3 = small_model()
    imgs3 = torch.randn(2, 3, 16, 16)
    assert torch.equal(model3.patchify(imgs3)[1], patch_vectors(imgs3[1], 4))
    assert torch.equal(model3.unpatchify(model3.patchify(imgs3)), imgs3)


def test_random_masking_official_semantics():
    model = small_model()
    x = torch.randn(3, 16, 8)
    noise = torch.rand(3, 16)
    x_masked, mask, ids_restore = model.random_masking(x, 0.75, noise=noise)
    keep = torch.argsort(noise, dim=1)[:, :4]
    assert torch.equal(x_masked, torch.stack([x[i, keep[i]] for i in range(3)]))
    assert mask.sum().item() == 3 * 12
    for i in range(3):
        assert set(torch.nonzero(mask[i] == 0).flatten().tolist()) == set(keep[i].tolist())
    assert torch.equal(torch.argsort(torch.argsort(noise, 1), 1), ids_restore)


def test_noise_makes_runs_reproducible_and_default_draws():
    model = small_model()
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    a = model(imgs, noise=noise)
    b = model(imgs, noise=noise)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    torch.manual_seed(1)
    c = model(imgs)
    torch.manual_seed(1)
    d = model(imgs)
    assert torch.equal(c[2], d[2]) and c[2].sum() == 2 * 12


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reference_and_sdpa_agree_with_gradients(norm_pix):
    model = small_model(norm_pix_loss=norm_pix)
    imgs = torch.randn(3, 3, 16, 16)
    noise = torch.rand(3, 16)
    results = {}
    for backend in ("reference", "sdpa"):
        model.zero_grad()
        model.backend = backend
        loss, pred, _ = model(imgs, noise=noise)
        loss.backward()
        results[backend] = (loss.detach(), pred.detach(),
                            {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    (l1, p1, g1), (l2, p2, g2) = results["reference"], results["sdpa"]
    assert_close(l2, l1, 1e-6, 1e-5, "loss")
    assert_close(p2, p1, 1e-5, 1e-5, "pred")
    assert g1.keys() == g2.keys() and len(g1) > 10
    for k in g1:
        assert_close(g2[k], g1[k], 1e-5, 1e-4, f"grad {k}")


@pytest.mark.parametrize("strategy", ["random", "grid"])
def test_fast_masking_ids_are_the_official_ones(strategy):
    """Off the official order (`official=False`, fastmae's path) the masking builds ids_restore by one scatter
    and the mask by one gather: the same tensors, bit for bit and dtype, as the official argsort and gather, for
    tied noise, ratio 0, one patch kept, grid masking and a float64 default dtype; and `removed_ids` is the
    argsort it replaces."""
    model = small_model(mask_strategy=strategy)  # 16 patches
    L = model.num_patches
    ratios = [0.75] if strategy == "grid" else [0.0, 0.5, 0.75, 0.9375]  # 0.9375 keeps one of 16
    for n in (1, 3):
        noise = torch.rand(n, L)
        noise[:, ::3] = 0.5  # ties: a stable sort keeps them in index order
        for ratio in ratios:
            official = model.masking_ids(n, ratio, noise)
            fast = model.masking_ids(n, ratio, noise, official=False)
            assert official[2] == fast[2]
            for a, b in zip(official[:2] + official[3:], fast[:2] + fast[3:]):
                assert a.dtype == b.dtype and torch.equal(a, b)
            ids_restore, len_keep = fast[1], fast[2]
            assert torch.equal(model.removed_ids(ids_restore, len_keep), torch.argsort(ids_restore, 1)[:, len_keep:])
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        noise = torch.rand(2, L)
        official, fast = model.masking_ids(2, 0.75, noise)[3], model.masking_ids(2, 0.75, noise, official=False)[3]
        assert official.dtype == fast.dtype == torch.float64 and torch.equal(official, fast)
    finally:
        torch.set_default_dtype(before)


def test_fast_masking_runs_fewer_operators_and_survives_inference_mode():
    """fastmae's masking runs one sort, one scatter and one gather where the official steps run two sorts, a
    fill, a slice fill and a gather; its cached rows, first made under inference mode, serve a training step."""
    model = small_model(backend="sdpa", img_size=24)  # a patch count no other test makes first: 36
    with torch.inference_mode():
        model(torch.randn(2, 3, 24, 24))  # the cached rows are made here
    imgs, noise = torch.randn(2, 3, 24, 24), torch.rand(2, 36)
    model(imgs, noise=noise)[0].backward()  # and read in a step with gradients
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    counts = {}
    for official in (True, False):
        with OpRecorder() as mode:
            model.masking_ids(2, 0.75, noise, official=official)
        counts[official] = [n for n in mode.names
                            if n not in ("expand", "slice", "empty_like", "empty", "lift_fresh", "detach", "alias")]
    assert sorted(counts[False]) == ["gather", "scatter_", "sort"], counts
    assert counts[True].count("sort") == 2 and len(counts[True]) > len(counts[False]), counts


def test_masking_rows_are_not_made_inside_a_cuda_graph_capture(monkeypatch):
    """A cached row made inside a CUDA graph's capture would live in the graph's memory pool and go with it: while
    a capture runs, a row not cached yet is not made, and the masking takes the official steps (same tensors); a
    row cached before the capture serves it."""
    from fastmae.model import mae

    made = []
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert mae._cached_row(("test row", 1), cuda, lambda: made.append(1)) is None and not made
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    row = mae._cached_row(("test row", 1), cuda, lambda: torch.zeros(1))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert mae._cached_row(("test row", 1), cuda, lambda: made.append(1)) is row and not made
    mae._ROWS.pop(("test row", 1))
    # the masking without its rows: the official steps, the same tensors
    model = small_model()
    noise = torch.rand(2, model.num_patches)
    monkeypatch.setattr(mae, "_removed_row", lambda *a: None)
    monkeypatch.setattr(mae, "_positions", lambda *a: None)
    fallback = model.masking_ids(2, 0.75, noise, official=False)
    official = model.masking_ids(2, 0.75, noise)
    assert all(torch.equal(a, b) for a, b in zip(fallback[:2] + fallback[3:], official[:2] + official[3:]))
    assert torch.equal(model.removed_ids(official[1], 4), torch.argsort(official[1], 1)[:, 4:])


def test_grid_masking_keeps_one_patch_per_cell():
    model = small_model(mask_strategy="grid")
    _, _, mask = model(torch.randn(2, 3, 16, 16))
    grid = mask.reshape(2, 4, 4)
    for i in range(0, 4, 2):
        for j in range(0, 4, 2):
            assert (grid[:, i:i + 2, j:j + 2] == 0).sum(dim=(1, 2)).tolist() == [1, 1]
    with pytest.raises(ValueError, match="2x2"):
        model(torch.randn(2, 3, 16, 16), mask_ratio=0.5)


def test_pred_masked_only_matches_full_prediction():
    model = small_model()
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    loss, pred, mask = model(imgs, noise=noise)
    model.pred_masked_only = True
    loss_m, pred_m, mask_m = model(imgs, noise=noise)
    removed = torch.argsort(noise, dim=1)[:, 4:]
    assert pred_m.shape == (2, 12, 48)
    assert_close(pred_m, torch.stack([pred[i, removed[i]] for i in range(2)]), 1e-6, 1e-5, "pred")
    assert_close(loss_m, loss, 1e-6, 1e-5, "loss")
    assert torch.equal(mask, mask_m)
    # the removed patches' indices are found once per forward, for the decoder's head and the loss both
    from fastmae.model import mae
    calls = []
    inverse = mae.inverse_permutation
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mae, "inverse_permutation", lambda ids: calls.append(ids) or inverse(ids))
        model(imgs, noise=noise)
        after_masking = len(calls)
        model.pred_masked_only = False
        model(imgs, noise=noise)
    assert after_masking - (len(calls) - after_masking) == 1, calls


def test_mask_ratio_zero_gives_zero_loss_and_single_patch_works():
    model = small_model()
    loss, pred, mask = model(torch.randn(1, 3, 16, 16), mask_ratio=0.0)
    assert mask.sum() == 0 and loss.item() == 0.0
    loss, pred, mask = model(torch.randn(1, 3, 16, 16), mask_ratio=15 / 16)
    assert mask.sum() == 15 and torch.isfinite(loss)
    # predicting removed patches only, with nothing removed: 0, no warning from an empty variance, a gradient
    model = small_model(norm_pix_loss=True, pred_masked_only=True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, pred, mask = model(torch.randn(1, 3, 16, 16), mask_ratio=0.0)
    loss.backward()
    assert pred.shape == (1, 0, 48) and loss.item() == 0.0 and model.decoder_pred.weight.grad is not None


def test_context_manager_env_and_per_call_choice(monkeypatch):
    model = small_model()
    imgs = torch.randn(1, 3, 16, 16)
    with fastmae.ops.record_choices() as rec, fastmae.use_backend("reference"):
        model(imgs)
    assert set(rec.values()) == {"reference"}
    monkeypatch.setenv("FASTMAE_BACKEND", "attention=reference")
    with fastmae.ops.record_choices() as rec:
        model(imgs)
    assert rec["attention"] == "reference" and rec["gather_tokens"] == "sdpa"
    model.backend = "sdpa"  # the model's choice beats the environment
    with fastmae.ops.record_choices() as rec:
        model(imgs)
    assert set(rec.values()) == {"sdpa"}


def test_each_stack_asks_the_registry_for_attention_once_per_forward(monkeypatch):
    """The blocks of a stack share one `ops.AttentionPlan` per forward: two attention choices per forward (encoder
    and decoder) whatever the depth, each seen by `record_choices`, with the numbers of one choice per block."""
    model = fastmae.MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                                         decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, mlp_ratio=2)
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    asked = []
    resolve = fastmae.ops.resolve

    def counting(op, inputs, backend=None):
        asked.append(op)
        return resolve(op, inputs, backend)

    monkeypatch.setattr(fastmae.ops, "resolve", counting)
    with fastmae.ops.record_choices() as rec:
        loss, pred, _ = model(imgs, noise=noise)
    assert asked.count("attention") == 2 and rec["attention"] == "sdpa"
    monkeypatch.setattr(type(model), "_attention_plan", lambda self: self.backend)  # one choice per block
    asked.clear()
    loss_b, pred_b, _ = model(imgs, noise=noise)
    assert asked.count("attention") == 5 and torch.equal(loss, loss_b) and torch.equal(pred, pred_b)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_torch_compile_traces_the_model_without_graph_breaks(backend):
    model = small_model(backend=backend)
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: a graph break is an error
    loss_c, pred_c, _ = compiled(imgs, noise=noise)
    loss, pred, _ = model(imgs, noise=noise)
    assert_close(loss_c, loss, 1e-6, 1e-5, "loss")
    assert_close(pred_c, pred, 1e-5, 1e-5, "pred")


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_torch_compile_traces_models_of_other_sizes_in_turn_without_graph_breaks(backend):
    """After a first compile, Dynamo traces the sizes that differ in the next one (batch, image side, patch count,
    head dim) as symbols; the backend choice, made while tracing from constants only, must still not break the graph.
    (Under the first version of this choice, the second model's compile failed with 'sort with non-constant
    keys'.)"""
    torch._dynamo.reset()
    try:
        for batch, side, embed_dim in ((4, 32, 64), (2, 16, 32), (3, 24, 48)):
            model = small_model(backend=backend, img_size=side, embed_dim=embed_dim)
            L = (side // 4) ** 2
            imgs, noise = torch.randn(batch, 3, side, side), torch.rand(batch, L)
            compiled = torch.compile(model, fullgraph=True, backend="eager")
            loss_c, _, _ = compiled(imgs, noise=noise)
            assert_close(loss_c, model(imgs, noise=noise)[0], 1e-6, 1e-5, f"loss at side {side}")
    finally:
        torch._dynamo.reset()


def test_random_masking_sizes_by_its_input_as_officially():
    """The official `random_masking` takes L from x, not from the model: any token count works."""
    model = small_model()  # 16 patches
    for L in (10, 25):
        x = torch.randn(2, L, 8)
        noise = torch.rand(2, L)
        x_masked, mask, ids_restore = model.random_masking(x, 0.75, noise=noise)
        keep = torch.argsort(noise, dim=1)[:, :int(L * 0.25)]
        assert torch.equal(x_masked, torch.stack([x[i, keep[i]] for i in range(2)]))
        assert mask.shape == ids_restore.shape == (2, L) and mask.sum().item() == 2 * (L - keep.shape[1])
    with pytest.raises(ValueError, match="noise must be"):
        model.random_masking(torch.randn(2, 10, 8), 0.75, noise=torch.rand(2, 16))


def test_patchify_takes_any_square_divisible_image_and_timm_size_pairs():
    """The official patchify asserts only a square side the patch divides; timm's layers take (h, w) pairs."""
    model = small_model()  # built for 16 x 16
    big = torch.randn(1, 3, 24, 24)
    assert torch.equal(model.patchify(big)[0], patch_vectors(big[0], 4))
    pixels = torch.randint(0, 255, (1, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(model.patchify(pixels)[0], patch_vectors(pixels[0], 4))
    with pytest.raises(ValueError, match="square"):
        model.patchify(torch.randn(1, 3, 16, 24))
    with pytest.raises(ValueError, match="built for 16x16"):
        model(big)  # the forward pass still needs the size of the position embeddings
    pair = small_model(img_size=(16, 16), patch_size=(4, 4))
    assert pair.patch_embed.img_size == (16, 16) and pair.num_patches == 16
    with pytest.raises(ValueError, match="square"):
        small_model(img_size=(16, 32))


def test_grid_masking_checks_the_shape_of_noise_it_does_not_use():
    model = small_model(mask_strategy="grid")
    with pytest.raises(ValueError, match="noise must be"):
        model(torch.randn(2, 3, 16, 16), mask_ratio=0.75, noise=torch.rand(2, 5))
    a = model(torch.ones(2, 3, 16, 16), mask_ratio=0.75, noise=torch.rand(2, 16))[2]
    b = model(torch.ones(2, 3, 16, 16), mask_ratio=0.75)[2]
    assert torch.equal(a, b)


def test_float64_and_other_devices_take_the_plain_pytorch_paths():
    """reference and sdpa are plain PyTorch: float64 runs (as the official model does), and a device with no
    measured order (here meta) gets sdpa, then reference."""
    model = small_model()
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    loss32 = model(imgs, noise=noise)[0]
    with fastmae.ops.record_choices() as served:
        loss64, pred64, _ = model.double()(imgs.double(), noise=noise.double())
    assert pred64.dtype == torch.float64 and set(served.values()) == {"sdpa"}
    assert loss64.dtype == torch.float64  # as the official model's loss (summed in fp64, not in fp32)
    torch.testing.assert_close(loss64, loss32.double(), atol=1e-5, rtol=1e-5)
    # the loss is exact enough in fp64 for gradcheck (it failed while the sum was taken in fp32)
    pred = 0.5 * torch.randn(2, 16, 48, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(2, 16) > 0.5).double()
    for backend in ("reference", "sdpa"):
        for norm_pix in (False, True):
            assert torch.autograd.gradcheck(lambda p: fastmae.ops.masked_mse_loss(
                p, imgs.double(), mask, 4, norm_pix, backend=backend), (pred,)), (backend, norm_pix)
    ids = torch.argsort(torch.rand(2, 16), dim=1)[:, 8:]
    assert torch.autograd.gradcheck(lambda p: fastmae.ops.masked_mse_loss(
        p, imgs.double(), mask, 4, True, pred_ids=ids, backend="reference"), (pred[:, :8].detach().requires_grad_(),))
    meta = small_model().to("meta")
    with fastmae.ops.record_choices() as served:
        loss, pred, mask = meta(torch.randn(2, 3, 16, 16, device="meta"))
    assert pred.device.type == "meta" and pred.shape == (2, 16, 48) and set(served.values()) == {"sdpa"}
    assert fastmae.ops.priority("attention", "mps") == ["sdpa", "reference"]


def test_reference_attention_scales_after_the_product_as_timm():
    """The official (timm 0.3.2) order is (q @ k^T) * scale; at head dim 32 (scale not a power of two) it is
    not bit for bit (q * scale) @ k^T in bf16."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 32, dtype=torch.bfloat16) for _ in range(3))
    scale = 32 ** -0.5
    expected = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1) @ v
    assert torch.equal(fastmae.ops.reference.attention(q, k, v, scale), expected)
