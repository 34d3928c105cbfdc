"""timm's layout (train/ and val/ as the splits), sizes (never squashed to the first image, strays
skipped, a pixel limit) and bad input, in both data modes (issue 22)."""
import tarfile
import warnings

import pytest
import torch
from PIL import Image

from dcanets.engine import TrainConfig, data, train
from dcanets.engine.data import cache, layout, loaders


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    """Every test starts without listings or decoded sets from another test."""
    monkeypatch.setattr(cache, "_MEMORY", {})
    monkeypatch.setattr(layout, "_READERS", {})
    monkeypatch.setattr(layout, "_WARNED", set())


def timm_root(tmp_path, n_train=30, n_val=12, classes=3, val_name="val"):
    root = tmp_path / "imagenet-like"
    data.write_jpeg_folder(root / "train", n_train, classes, sizes=(20, 36), seed=0)
    data.write_jpeg_folder(root / val_name, n_val, classes, sizes=(20, 36), seed=1)
    return root


def run_cfg(root, **kw):
    base = dict(model="cifar_resnet20", data=str(root), img_size=16, batch_size=8, epochs=1, workers=0,
                device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("mode", ["cached", "stream"])
def test_timm_layout_trains_on_train_and_validates_on_val(tmp_path, mode):
    """The issue's silent bug: a train/ + val/ root used to train on val/ alone (timm's default split)."""
    root = timm_root(tmp_path)
    final = train(run_cfg(root, data_mode=mode, val_fraction=0.5))  # val_fraction: unused with the data's own splits
    assert (final["train_images"], final["val_images"], final["data_mode"]) == (30, 12, mode)
    quick = train(run_cfg(root, data_mode=mode, limit=10))  # the validation split shrinks in proportion
    assert (quick["train_images"], quick["val_images"]) == (10, 4)


def test_timm_layout_splits_inside_a_tar_and_by_synonym(tmp_path):
    root = timm_root(tmp_path, val_name="validation")
    train_set, val_set = data.load_split(str(root), progress=False)
    assert (len(train_set), len(val_set)) == (30, 12) and train_set.classes == val_set.classes
    with tarfile.open(tmp_path / "set.tar", "w") as tf:
        tf.add(root / "train", arcname="train")
        tf.add(root / "validation", arcname="val")
    train_set, val_set = data.load_split(str(tmp_path / "set.tar"), progress=False)
    assert (len(train_set), len(val_set)) == (30, 12)
    assert train_set.classes == ["class000", "class001", "class002"]


def test_class_folders_only_keep_the_fixed_seed_split(tmp_path):
    root = data.write_jpeg_folder(tmp_path / "flat", 40, 4, sizes=(20, 20))
    train_set, val_set = data.load_split(str(root), val_fraction=0.25, progress=False)
    assert (len(train_set), len(val_set)) == (30, 10)
    lone = tmp_path / "lone"
    data.write_jpeg_folder(lone / "train", 40, 4, sizes=(20, 20))  # train/ alone: a prefix above the classes
    train_set, val_set = data.load_split(str(lone), val_fraction=0.25, progress=False)
    assert (len(train_set), len(val_set)) == (30, 10) and train_set.num_classes == 4


def test_ambiguous_or_empty_layouts_are_refused_in_one_line(tmp_path):
    root = timm_root(tmp_path)
    (root / "validation" / "class000").mkdir(parents=True)  # val/ and validation/
    with pytest.raises(ValueError, match=r"has val/ and validation/: pick one with val_split"):
        data.load_split(str(root), progress=False)
    assert len(data.load_split(str(root), val_split="val", progress=False)[1]) == 12
    with pytest.raises(ValueError, match=r"validation split '.*validation' has no images"):
        data.load_split(str(root), val_split="validation", progress=False)
    with pytest.raises(ValueError, match=r"train_split='trn': no folder 'trn'"):
        data.load_split(str(root), train_split="trn", val_split="val", progress=False)
    (root / "validation" / "class000").rmdir()
    (root / "validation").rmdir()
    (root / "cats").mkdir()
    with pytest.raises(ValueError, match=r"mixes split folders \(train/, val/\) with other folders \(cats/\)"):
        data.load_split(str(root), progress=False)
    (root / "cats").rmdir()
    data.write_jpeg_folder(root / "val", 4, 4, sizes=(20, 20), seed=3)  # adds class003, unknown to train/
    with pytest.raises(ValueError, match=r"class folders the training split lacks: class003"):
        train(run_cfg(root, data_mode="stream"))
    only_val = tmp_path / "only-val"
    data.write_jpeg_folder(only_val / "val", 4, 2, sizes=(20, 20))
    with pytest.raises(ValueError, match=r"has a validation folder 'val/' but no training folder"):
        data.load_split(str(only_val), progress=False)


def test_compressed_and_misnamed_tars_get_a_clear_message(tmp_path):
    src = data.write_jpeg_folder(tmp_path / "set", 4, 2, sizes=(20, 20))
    with tarfile.open(tmp_path / "set.tar.gz", "w:gz") as tf:
        tf.add(src, arcname="set")
    with pytest.raises(ValueError, match=r"is a compressed tar: .* decompress it first"):
        data.load(str(tmp_path / "set.tar.gz"))
    with pytest.raises(ValueError, match=r"timm's wds/ datasets are not read by dcanets"):
        data.load("wds/imagenet")
    with tarfile.open(tmp_path / "set.data", "w") as tf:
        tf.add(src, arcname="set")
    with pytest.raises(ValueError, match=r"tar archive without the .tar suffix"):
        data.load(str(tmp_path / "set.data"))


def _png(path, w, h, colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path)


def test_mixed_sizes_go_through_the_transform_and_a_stray_1x1_is_skipped(tmp_path):
    """A 1x1 image sorting first no longer sets the size of the set; a wide image is centre-cropped,
    not squashed."""
    root = tmp_path / "mixed"
    _png(root / "a" / "000.png", 1, 1)
    for i in range(5):
        _png(root / "a" / f"{i + 1:03d}.png", 12, 12)
        _png(root / "b" / f"{i:03d}.png", 12, 12, (10, 10, 200))
    wide = Image.new("RGB", (36, 12), (200, 10, 10))  # red | green | red: the centre third is what fits
    wide.paste((10, 200, 10), (12, 0, 24, 12))
    wide.save(root / "b" / "wide.png")
    with pytest.warns(data.DataWarning, match=r"skipped 1 image.*mixed/a/000\.png \(1x1 pixels, far smaller"):
        d = data.load(str(root), progress=False)
    assert d.images.shape == (11, 3, 12, 12)
    cropped = d.images[int((d.origin == 11).nonzero())]  # 'b/wide.png' sorts last
    assert cropped[1].min() > 150 and cropped[0].max() < 60  # all green: squashing would keep the red thirds


def test_a_stray_image_in_stream_mode_is_skipped_and_named(tmp_path):
    root = tmp_path / "set"
    data.write_jpeg_folder(root, 24, 2, sizes=(20, 30))
    _png(root / "class000" / "stray.png", 1, 1)
    cfg = run_cfg(root, data_mode="stream", val_fraction=0.0, max_bad_fraction=0.2, batch_size=5)  # no batch dropped
    with pytest.warns(data.DataWarning, match=r"skipped 1 of 25 images .* in epoch 1 .*stray\.png \(1x1 pixels"):
        final = train(cfg)
    assert final["train_images"] == 25  # listed, one skipped per epoch


@pytest.mark.parametrize("limit, size", [(300, "20x20 pixels"), (100, "400 pixels")])  # PIL refuses 2x in the header
def test_decode_pixel_limit(tmp_path, monkeypatch, limit, size):
    root = tmp_path / "set"
    for i in range(4):
        _png(root / "a" / f"{i}.png", 8, 8)
        _png(root / "b" / f"{i}.png", 8, 8, (0, 0, 200))
    _png(root / "b" / "huge.png", 20, 20)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)  # PIL's own knob: 20x20 is over it
    with pytest.warns(data.DataWarning, match=rf"huge\.png \({size}, over the decode limit of {limit}"):
        d = data.load(str(root), progress=False)
    assert len(d) == 8


@pytest.mark.parametrize("fraction, fails", [(0.2, False), (0.01, True)])
def test_a_corrupt_file_in_stream_mode_is_skipped_or_fails_above_the_fraction(tmp_path, fraction, fails):
    root = tmp_path / "set"
    data.write_jpeg_folder(root, 24, 2, sizes=(20, 30))
    (root / "class001" / "broken.jpg").write_bytes(b"not a jpeg at all" * 10)
    cfg = run_cfg(root, data_mode="stream", val_fraction=0.0, max_bad_fraction=fraction, batch_size=5)
    if fails:
        with pytest.raises(ValueError, match=r"1 of 25 images of '.*set' could not be used in epoch 1, more than "
                                             r"max_bad_fraction=0.01 \(first: '.*class001/broken\.jpg': not an image"):
            train(cfg)
    else:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            train(cfg)
        lines = [str(w.message) for w in seen if issubclass(w.category, data.DataWarning)]
        assert len(lines) == 1 and "skipped 1 of 25 images" in lines[0] and "broken.jpg" in lines[0]


def test_auto_mode_chooses_by_decoded_size_and_says_why(tmp_path, monkeypatch, capsys):
    root = timm_root(tmp_path)
    cfg = run_cfg(root)
    assert loaders.choose_mode(cfg)[0] == "cached"
    need = loaders.estimate(cfg)[0]
    assert need == 42 * 3 * 16 * 16  # train + val images at img_size
    monkeypatch.setattr(loaders, "available_memory", lambda: 3 * need)  # over 25% of it: stream
    mode, reason = loaders.choose_mode(cfg)
    assert mode == "stream" and "42 images of 3x16x16" in reason and "over 25%" in reason
    assert train(cfg)["data_mode"] == "stream"
    assert "data_mode auto chose stream: 42 images" in capsys.readouterr().err
    assert loaders.choose_mode(run_cfg(root, aa="rand-m9-mstd0.5"))[0] == "stream"  # per-image transforms
    monkeypatch.setattr(loaders, "available_memory", lambda: need)  # would not fit: cached refused
    with pytest.raises(ValueError, match=r"data_mode=cached: 42 images of 3x16x16 decode to .*more than 80%"):
        loaders.choose_mode(run_cfg(root, data_mode="cached"))


def test_stream_options_are_refused_where_they_cannot_apply(tmp_path):
    root = timm_root(tmp_path)
    with pytest.raises(ValueError, match=r"aa='rand-m9' is a per-image transform of data_mode=stream"):
        loaders.choose_mode(run_cfg(root, data_mode="cached", aa="rand-m9"))
    with pytest.raises(ValueError, match=r"data_mode=stream needs an image folder or tar, but 'digits'"):
        loaders.choose_mode(run_cfg("digits", data_mode="stream"))
    with pytest.raises(ValueError, match=r"timm cannot build the transform \(aa='nonsense'.*Unknown AA policy"):
        train(run_cfg(root, data_mode="stream", aa="nonsense"))


def test_cached_channel_stats_are_exact_and_chunked():
    d = data.synthetic(600, num_classes=3, size=8, seed=2)
    mean, std = data.channel_stats(d)
    x = d.images.double() / 255
    assert mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(x.std(dim=(0, 2, 3)).tolist(), abs=1e-12)
    view = d.subset(torch.arange(100, 400))
    assert data.channel_stats(view, max_images=200) == data.channel_stats(d.images[100:300])


def test_split_views_share_the_decoded_storage(tmp_path):
    path = str(data.write_image_tar(data.synthetic(60, num_classes=3, size=12, seed=1), tmp_path / "set.tar"))
    train_set, val_set = data.load_split(path, val_fraction=0.2, progress=False)
    assert train_set.storage.data_ptr() == val_set.storage.data_ptr()  # no subset copies
    assert train_set.nbytes == 48 * 3 * 12 * 12 and len(train_set.storage) == 60
