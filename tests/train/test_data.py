"""Data without torchvision: the transforms against direct computations, image folders with corrupt files,
clear errors for missing or empty folders, and the built-in dataset's determinism."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.train.data import (IMAGENET_MEAN, IMAGENET_STD, DataError, EpochSampler, EvalDataset, EvalTransform,
                                ImageFolder, PretrainDataset, PretrainTransform, RandomResizedCrop, denormalize,
                                open_dataset, pretrain_loader, to_rgb, to_tensor_normalized)
from fastmae.train.synthetic import CLASSES, SyntheticShapes


def _image(seed, w=40, h=30):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_normalize_matches_direct_formula_and_inverts():
    img = _image(0)
    x = to_tensor_normalized(img)
    arr = torch.from_numpy(np.array(img)).float().permute(2, 0, 1) / 255
    expect = (arr - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert x.shape == (3, 30, 40) and x.dtype == torch.float32
    torch.testing.assert_close(x, expect, atol=1e-6, rtol=0)
    torch.testing.assert_close(denormalize(x), arr, atol=1e-6, rtol=0)


def test_random_resized_crop_box_rules():
    crop = RandomResizedCrop(16, scale=(0.2, 1.0))
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = crop.box(40, 30, rng)
        assert 0 <= left and left + w <= 40 and 0 <= top and top + h <= 30
        area = w * h / (40 * 30)
        assert 0.15 <= area <= 1.0 + 1e-9  # 0.2 up to rounding
        assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
    # scale (1, 1) and ratio (1, 1) on a square image: the whole image, resized bicubically
    img = _image(1, 24, 24)
    full = RandomResizedCrop(12, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert full.box(24, 24, rng) == (0, 0, 24, 24)
    out = full(img, rng)
    assert np.array_equal(np.asarray(out), np.asarray(img.resize((12, 12), Image.BICUBIC)))


def test_pretrain_transform_is_a_function_of_the_generator():
    img = _image(2)
    t = PretrainTransform(16)
    a = t(img, np.random.default_rng([0, 1, 5]))
    b = t(img, np.random.default_rng([0, 1, 5]))
    c = t(img, np.random.default_rng([0, 2, 5]))
    assert a.shape == (3, 16, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # over many draws about half are flipped: compare against the unflipped/flipped crops of the same box
    flipped = 0
    for e in range(40):
        rng = np.random.default_rng([0, e, 5])
        left, top, w, h = t.crop.box(img.width, img.height, rng)
        plain = to_tensor_normalized(img.resize((16, 16), Image.BICUBIC, box=(left, top, left + w, top + h)))
        x = t(img, np.random.default_rng([0, e, 5]))
        if torch.equal(x, plain.flip(-1)) and not torch.equal(x, plain):
            flipped += 1
        else:
            assert torch.equal(x, plain)
    assert 8 <= flipped <= 32


def test_eval_transform_resize_and_centre_crop():
    img = _image(3, 64, 48)
    x = EvalTransform(32)(img)
    assert x.shape == (3, 32, 32)
    # shorter side 48 -> round(32 / 0.875) = 37, longer side scaled alike, then the centre 32 x 32
    resized = img.resize((49, 37), Image.BICUBIC)
    expect = to_tensor_normalized(resized.crop((8, 2, 40, 34)))
    torch.testing.assert_close(x, expect, atol=0, rtol=0)


def test_builtin_dataset_is_deterministic_balanced_and_labelled():
    a, b = SyntheticShapes(40, 32, seed=3), SyntheticShapes(40, 32, seed=3)
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, SyntheticShapes(40, 32, seed=4).images)
    assert not np.array_equal(a.images[:10], SyntheticShapes(10, 32, seed=3, split="val").images)
    assert a.classes == list(CLASSES) and len(CLASSES) == 10
    assert np.bincount(a.targets).tolist() == [4] * 10
    img, label, skipped = a.load(13)
    assert img.size == (32, 32) and img.mode == "RGB" and label == 3 and skipped == 0
    # images of one class differ (random colours and positions) and are not constant
    assert not np.array_equal(a.images[0], a.images[10])
    assert all(a.images[i].std() > 5 for i in range(40))


def test_open_dataset_builtin_names():
    for name in (None, "", "builtin"):
        ds = open_dataset(name, input_size=16, builtin_size=20)
        assert isinstance(ds, SyntheticShapes) and len(ds) == 20
    assert len(open_dataset("builtin", input_size=16, split="val", builtin_size=20)) == 4


def _write_folder(root, corrupt=True):
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            _image(10 * len(cls) + i).save(root / cls / f"{i}.png")
    if corrupt:
        (root / "cat" / "3_garbage.jpg").write_bytes(b"this is not an image")
        good = (root / "dog" / "0.png").read_bytes()
        (root / "dog" / "3_truncated.png").write_bytes(good[: len(good) // 3])
    (root / "dog" / "notes.txt").write_text("not an image")


def test_image_folder_classes_and_corrupt_files_are_skipped(tmp_path):
    _write_folder(tmp_path)
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["cat", "dog"] and len(ds) == 8  # .txt ignored, the corrupt ones listed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [ds.load(i) for i in range(len(ds))]  # never raises
    assert len(ds.bad_paths) == 2
    assert sum("skipping unreadable image" in str(w.message) for w in caught) == 2
    assert sum(r[2] for r in results) == 2  # two samples were produced by skipping one file each
    assert all(r[0].size == (40, 30) for r in results)
    # the garbage file is replaced by the next readable file (wrapping around the index)
    bad_index = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("3_garbage.jpg")][0]
    img, label, skipped = ds.load(bad_index)
    nxt_img, nxt_label, _ = ds.load((bad_index + 1) % len(ds))
    assert skipped == 1 and label == nxt_label and np.array_equal(np.asarray(img), np.asarray(nxt_img))
    # a pretraining loader over it runs a whole epoch and counts the substitutions
    data = PretrainDataset(ds, 16, num_patches=16)
    loader, sampler = pretrain_loader(data, 4, seed=0)
    sampler.set_epoch(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert len(batches) == 2 and sum(int(b[3].sum()) for b in batches) == 2
    assert batches[0][0].shape == (4, 3, 16, 16) and batches[0][2].shape == (4, 16)


def test_image_folder_verify_drops_unreadable_files_at_start(tmp_path):
    _write_folder(tmp_path)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        ds = ImageFolder(tmp_path, verify=True)
    assert len(ds) == 6  # PIL's verify catches both the garbage file and the truncated PNG (CRC)
    assert len(ds.bad_paths) == 2 and all(ds.load(i)[2] == 0 for i in range(len(ds)))


def test_an_evaluation_set_names_an_unreadable_image_instead_of_replacing_it(tmp_path):
    """Pretraining replaces an unreadable file by the next readable one; an evaluation (linear probe, pictures)
    scores every image it lists, so there it is an error naming the file (another image in its place, maybe
    one of the other split, would change the score)."""
    _write_folder(tmp_path)
    ds = ImageFolder(tmp_path)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("3_garbage.jpg")][0]
    ev = EvalDataset(ds, 16)
    with pytest.raises(DataError, match=r"cannot read .*3_garbage\.jpg \(UnidentifiedImageError: .*\); an "
                                        r"evaluation scores every image it lists"):
        ev[bad]
    assert ev[bad + 1][0].shape == (3, 16, 16)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path, mode):
    """PIL's own RGB conversion clips 16-bit and float images to 0..255 (a 16-bit photograph turns white, a float
    one black); they are scaled: 16-bit by 65535 -> 255, float from [0, 1]. A dark and a bright image stay apart."""
    levels = np.array([[0, 0.25], [0.5, 1.0]])
    if mode == "F":
        img = Image.fromarray(levels.astype(np.float32), "F")
    else:  # 64 and 128 times 257
        img = Image.fromarray(np.array([[0, 16448], [32896, 65535]], np.uint16 if mode == "I;16" else np.int32))
    path = tmp_path / ("x.png" if mode == "I;16" else "x.tiff")
    img.save(path)
    with Image.open(path) as im:
        assert im.mode == mode
        rgb = to_rgb(im)
    assert rgb.mode == "RGB"
    got = np.asarray(rgb)
    assert np.array_equal(got[..., 0], got[..., 2]) and got[..., 0].tolist() == [[0, 64], [128, 255]]
    assert to_rgb(Image.fromarray((levels * 2).astype(np.float32), "F")).getpixel((1, 1)) == (2, 2, 2)  # 0..255


def test_flat_folder_and_train_subfolder(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        _image(i).save(flat / f"{i}.jpg")
    ds = ImageFolder(flat)
    assert len(ds) == 3 and ds.classes == ["flat"] and set(ds.targets) == {0}
    root = tmp_path / "imagenet"
    _write_folder(root / "train", corrupt=False)
    ds = open_dataset(str(root), input_size=16)  # the official layout: data_path/train/<class>/...
    assert ds.root.endswith("train") and len(ds) == 6
    # a flat train/ split alone is a split too; a class called "train" beside other classes is a class
    alone = tmp_path / "alone"
    (alone / "train").mkdir(parents=True)
    for i in range(2):
        _image(i).save(alone / "train" / f"{i}.jpg")
    assert open_dataset(str(alone), input_size=16).root.endswith("train")
    classes = tmp_path / "classes"
    for name in ("bus", "tractor", "train"):
        (classes / name).mkdir(parents=True)
        for i in range(2):
            _image(i).save(classes / name / f"{i}.jpg")
    ds = open_dataset(str(classes), input_size=16)
    assert ds.classes == ["bus", "tractor", "train"] and len(ds) == 6
    from fastmae.train.linprobe import probe_datasets
    assert probe_datasets(str(classes), 16)[2] == ["bus", "tractor", "train"]


def test_missing_or_empty_folder_fails_clearly(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        ImageFolder(tmp_path / "empty")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "a.png").write_bytes(b"no")
    with pytest.raises(DataError, match="can be read"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ImageFolder(garbage, verify=True)
    with pytest.raises(DataError, match=r"none of the 1 image file\(s\) in .* can be read"):  # not "64 in a row"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ImageFolder(garbage).load(0)
    for i in range(1, 70):  # more files than the run of unreadable ones it tries
        (garbage / f"{i}.png").write_bytes(b"no")
    with pytest.raises(DataError, match="64 consecutive unreadable images from index 3"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ImageFolder(garbage).load(3)


def test_samples_are_a_function_of_seed_epoch_and_index():
    base = SyntheticShapes(32, 16)
    data = PretrainDataset(base, 16, num_patches=16, seed=7)
    x1, y1, n1, _ = data[(2, 5)]
    x2, y2, n2, _ = data[(2, 5)]
    x3, _, n3, _ = data[(3, 5)]
    assert torch.equal(x1, x2) and torch.equal(n1, n2) and y1 == y2 == 5
    assert not torch.equal(n1, n3)
    assert n1.dtype == torch.float32 and bool(((n1 >= 0) & (n1 < 1)).all())


def test_two_ranks_together_see_the_one_process_batches():
    """DistributedSampler + EpochSampler: the union of the ranks' batch k is the 1-process batch k."""
    data = PretrainDataset(SyntheticShapes(48, 16), 16, num_patches=16, seed=1)
    one, s1 = pretrain_loader(data, 8, world_size=1, rank=0, seed=1)
    r0, s2 = pretrain_loader(data, 4, world_size=2, rank=0, seed=1)
    r1, s3 = pretrain_loader(data, 4, world_size=2, rank=1, seed=1)
    for s in (s1, s2, s3):
        s.set_epoch(3)
    keys = lambda sampler: list(iter(sampler))
    k1, k2, k3 = keys(s1), keys(s2), keys(s3)
    for b in range(len(k1) // 8):
        assert sorted(k1[8 * b: 8 * b + 8]) == sorted(k2[4 * b: 4 * b + 4] + k3[4 * b: 4 * b + 4])
    # skipping (resume mid-epoch) drops whole batches from the front
    s1.set_epoch(3, skip=16)
    assert keys(s1) == k1[16:] and len(s1) == len(k1) - 16
    assert isinstance(s1, EpochSampler)


def test_too_few_images_for_a_batch_fails_clearly():
    data = PretrainDataset(SyntheticShapes(6, 16), 16, num_patches=16)
    with pytest.raises(DataError, match="fewer than one batch"):
        pretrain_loader(data, 8)


def test_drawing_a_large_builtin_set_shows_progress_when_asked(monkeypatch, capsys):
    import fastmae.train.synthetic as synthetic
    SyntheticShapes(20, 32, progress=True)
    assert "drawing" not in capsys.readouterr().err  # below the size where drawing takes seconds
    monkeypatch.setattr(synthetic, "PROGRESS_PIXELS", 1)
    a = SyntheticShapes(20, 32, progress=True)
    assert "drawing the built-in train images" in capsys.readouterr().err
    assert np.array_equal(a.images, SyntheticShapes(20, 32).images)  # the same images either way
    SyntheticShapes(20, 32)
    assert "drawing" not in capsys.readouterr().err
