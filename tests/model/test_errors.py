"""Bad input gets a clear, documented error."""
import pickle

import pytest
import torch

import fastmae


@pytest.fixture(scope="module")
def model():
    return fastmae.mae_vit_tiny_patch4()


@pytest.mark.parametrize("imgs,exc,match", [
    (torch.randn(2, 3, 32, 48), ValueError, "square"),
    (torch.randn(2, 3, 30, 30), ValueError, "divisible by the patch size"),
    (torch.randn(2, 1, 32, 32), ValueError, "3-channel"),
    (torch.randn(2, 3, 64, 64), ValueError, "built for 32x32"),
    (torch.randn(3, 32, 32), ValueError, r"\[N, C, H, W\]"),
    (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), TypeError, "float32, float16 or bfloat16"),
    (torch.randn(2, 3, 32, 32, dtype=torch.float16), TypeError, r"float16 and the model's weights torch.float32"),
    (torch.randn(2, 3, 32, 32, dtype=torch.float64), TypeError, r"imgs.to\(torch.float32\)"),
])
def test_bad_images(model, imgs, exc, match):
    with pytest.raises(exc, match=match):
        model(imgs)


def test_images_of_another_dtype_run_under_autocast_or_in_a_model_of_their_dtype():
    model, imgs = fastmae.mae_vit_tiny_patch4(), torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(imgs.bfloat16())[0].isfinite()
    assert model.double()(imgs.double())[0].dtype == torch.float64


@pytest.mark.parametrize("ratio,match", [(1.0, r"\[0, 1\)"), (-0.1, r"\[0, 1\)"), (0.999, "keeps no patch")])
def test_bad_mask_ratio(model, ratio, match):
    with pytest.raises(ValueError, match=match):
        model(torch.randn(1, 3, 32, 32), mask_ratio=ratio)


def test_bad_noise_shape(model):
    with pytest.raises(ValueError, match=r"noise must be \[N, L\] = \[2, 64\]"):
        model(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 63))


def test_unknown_model_backend_and_mask_strategy():
    with pytest.raises(ValueError, match="unknown model"):
        fastmae.create_model("mae_vit_gigantic")
    with pytest.raises(ValueError, match="mask_strategy"):
        fastmae.mae_vit_tiny_patch4(mask_strategy="block")
    with pytest.raises(ValueError, match="unknown backend 'flash'"):  # when set, not at the first forward
        fastmae.mae_vit_tiny_patch4(backend="flash")
    m = fastmae.mae_vit_tiny_patch4(backend="attention=sdpa,gather_tokens=reference")  # the text form
    assert m.backend == {"attention": "sdpa", "gather_tokens": "reference"}
    for bad, match in [("attn=sdpa", "unknown op 'attn'"), ("attention=", "unknown backend ''"),
                       ("attention=reference,attention=sdpa", "'attention' is given twice"),
                       ({"attention": "flash"}, "unknown backend 'flash'"), ({"attn": "sdpa"}, "unknown op")]:
        with pytest.raises(ValueError, match=match):
            m.backend = bad
    with pytest.raises(TypeError, match="a backend is a name"):
        m.backend = 3
    with pytest.raises(TypeError, match="a backend name is a string"):
        m.backend = {"attention": 3}
    assert m.backend == {"attention": "sdpa", "gather_tokens": "reference"}  # unchanged by the refusals


def test_empty_batch():
    with pytest.raises(ValueError, match="at least one image, got an empty batch"):
        fastmae.mae_vit_tiny_patch4()(torch.randn(0, 3, 32, 32))


def test_use_backend_takes_the_text_form():
    """`use_backend` takes what --backend and FASTMAE_BACKEND take, with the same checks."""
    with fastmae.ops.use_backend("attention=reference, gather_tokens=sdpa"):
        assert fastmae.ops.requested("attention") == "reference"
        assert fastmae.ops.requested("gather_tokens") == "sdpa"
        assert fastmae.ops.requested("masked_mse_loss") == "auto"
    with pytest.raises(ValueError, match="given twice"):
        with fastmae.ops.use_backend("attention=reference,attention=sdpa"):
            pass


def test_unavailable_backend_raises_with_reasons(model):
    model.backend = "xformers"
    try:
        with pytest.raises(fastmae.BackendUnavailable, match="xformers.*(not installed|cuda)"):
            model(torch.randn(1, 3, 32, 32))
    finally:
        model.backend = None


def test_a_mapping_may_leave_an_op_to_the_other_choices():
    """None for an op in a mapping: no choice for that op there; the context, environment or automatic order
    decides it."""
    m = fastmae.mae_vit_tiny_patch4(backend={"attention": "reference", "gather_tokens": None})
    with fastmae.ops.use_backend("gather_tokens=sdpa"), fastmae.ops.record_choices() as served:
        m(torch.randn(1, 3, 32, 32))
    assert served["attention"] == "reference" and served["gather_tokens"] == "sdpa"


def test_op_calls_take_the_text_form_too():
    q = torch.randn(1, 2, 8, 16)
    with fastmae.ops.record_choices() as served:
        fastmae.ops.attention(q, q, q, backend="attention=reference,gather_tokens=sdpa")
    assert served == {"attention": "reference"}
    with pytest.raises(ValueError, match="unknown op 'attn'"):
        fastmae.ops.attention(q, q, q, backend="attn=reference")


def test_a_model_pickled_before_backend_was_a_property_keeps_its_choice():
    m = fastmae.mae_vit_tiny_patch4()
    del m.__dict__["_backend"]
    m.__dict__["backend"] = "sdpa"  # what such a pickle holds
    restored = pickle.loads(pickle.dumps(m))
    assert restored.backend == "sdpa" and "backend" not in restored.__dict__
    m.__dict__["backend"] = "attn=sdpa"  # checked as a new value is
    with pytest.raises(ValueError, match="unknown op 'attn'"):
        pickle.loads(pickle.dumps(m))
    del m.__dict__["backend"]  # older still: no backend at all
    assert pickle.loads(pickle.dumps(m)).backend is None
    assert pickle.loads(pickle.dumps(fastmae.mae_vit_tiny_patch4(backend="reference"))).backend == "reference"
