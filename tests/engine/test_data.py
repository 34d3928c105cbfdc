"""Data sources, splits, the decode-once cache and batch augmentation."""

import pytest
import torch
from engine_runs import CodeRunningPayload

from dcanets.engine import data


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test gets its own empty disk and memory cache."""
    monkeypatch.setenv("DCANETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data.cache, "_MEMORY", {})
    monkeypatch.setattr(data.layout, "_READERS", {})


@pytest.fixture
def small():
    return data.synthetic(60, num_classes=3, size=12, channels=3, seed=1)


def test_digits_is_the_embedded_default():
    d = data.load("digits")
    assert (len(d), d.in_chans, d.image_size, d.num_classes) == (1797, 1, (8, 8), 10)
    assert d.images.dtype == torch.uint8 and int(d.images.max()) == 255


def test_synthetic_is_seeded():
    a, b = data.load("synthetic:64"), data.load("synthetic:64")
    assert torch.equal(a.images, b.images) and a.images.shape == (64, 3, 32, 32)
    assert not torch.equal(a.images, data.synthetic(64, seed=1).images)


@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_image_folder_roundtrip(tmp_path, small, kind):
    if kind == "dir":
        path = data.write_image_folder(small, tmp_path / "folder")
    else:
        path = data.write_image_tar(small, tmp_path / "set.tar")
    d = data.load(str(path), progress=False)
    assert d.classes == small.classes and d.in_chans == 3 and d.image_size == (12, 12)
    # the same multiset of (image, label) pairs: PNG is lossless
    key = lambda x: sorted(zip(x.labels.tolist(), x.images.flatten(1).sum(1).tolist()))  # noqa: E731
    assert key(d) == key(small)


def test_grayscale_folder_keeps_one_channel(tmp_path):
    gray = data.synthetic(20, num_classes=2, size=10, channels=1)
    d = data.load(str(data.write_image_tar(gray, tmp_path / "g.tar")), progress=False)
    assert d.in_chans == 1 and len(d) == 20


def test_mixed_sizes_are_resized_to_the_first(tmp_path):
    from PIL import Image

    for name, size in (("a/0.png", 10), ("b/1.png", 16)):
        (tmp_path / "set" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size), (200, 10, 10)).save(tmp_path / "set" / name)
    d = data.load(str(tmp_path / "set"), progress=False)
    assert d.images.shape == (2, 3, 10, 10) and d.labels.tolist() == [0, 1]
    assert int(d.images[1, 0].min()) == 200  # a flat image stays flat when resized


def test_split_sizes_fixed_seed_and_limit(tmp_path, small):
    path = str(data.write_image_tar(small, tmp_path / "set.tar"))
    train, val = data.load_split(path, val_fraction=0.2, seed=0, progress=False)
    assert (len(train), len(val)) == (48, 12)
    train2, val2 = data.load_split(path, val_fraction=0.2, seed=0, progress=False)
    assert torch.equal(train.images, train2.images) and torch.equal(val.labels, val2.labels)
    t_idx, v_idx = data.split_indices(60, 0.2, seed=0)
    assert set(t_idx.tolist()).isdisjoint(v_idx.tolist())
    lt, lv = data.split_indices(60, 0.2, seed=0, limit=8)
    assert len(lt) == 8 and len(lv) == 2 and set(lv.tolist()) <= set(v_idx.tolist())
    data.forget_decoded()
    ltrain, lval = data.load_split(path, val_fraction=0.2, seed=0, limit=8, progress=False)
    assert (len(ltrain), len(lval)) == (8, 2)
    assert torch.equal(ltrain.images, train.images[:8])  # a prefix of the full split


def test_digits_split():
    train, val = data.load_split("digits", val_fraction=0.1, seed=0)
    assert len(train) + len(val) == 1797 and len(val) == 180


def test_second_load_hits_the_cache(tmp_path, small, monkeypatch):
    path = str(data.write_image_tar(small, tmp_path / "set.tar"))
    first = data.load(path, progress=False)
    assert not first.from_cache
    files = list((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 1
    data.forget_decoded()  # a new process: only the disk cache is left
    monkeypatch.setattr(data.cached, "decode_part", lambda *a, **k: pytest.fail("decoded twice"))
    second = data.load(path, progress=False)
    assert second.from_cache and torch.equal(first.images, second.images)
    part = data.load(path, indices=[3, 1], progress=False)  # a subset is sliced from the full cache
    assert torch.equal(part.images, first.images[[3, 1]])
    train, _ = data.load_split(path, 0.2, limit=5, progress=False)
    assert len(train) == 5


def test_cache_invalidated_when_file_changes(tmp_path, small):
    path = tmp_path / "set.tar"
    data.write_image_tar(small, path)
    data.load(str(path), progress=False)
    data.write_image_tar(data.synthetic(30, num_classes=3, size=12), path)
    assert len(data.load(str(path), progress=False)) == 30


def test_missing_path_is_one_clear_error():
    with pytest.raises(FileNotFoundError, match="does not exist.*image-folder"):
        data.load("/no/such/dir")


def test_malformed_paths(tmp_path):
    bad = tmp_path / "notatar.tar"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not a tar archive"):
        data.load(str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="image folder|no images"):
        data.load(str(empty))
    with pytest.raises(ValueError, match="synthetic"):
        data.load("synthetic:many")


def test_torchvision_cifar_directory(tmp_path):
    import pickle

    import numpy as np

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for i in range(1, 6):
        batch = {b"data": np.full((4, 3072), i, dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        (base / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b", b"c", b"d"]}))
    d = data.load(str(tmp_path))
    assert len(d) == 20 and d.images.shape[1:] == (3, 32, 32) and d.classes == ["a", "b", "c", "d"]


def test_torchvision_mnist_directory(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28]) + bytes(range(256)) * 6 + bytes(32)
    (raw / "train-images-idx3-ubyte").write_bytes(imgs)
    (raw / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 3]))
    d = data.load(str(tmp_path))
    assert d.images.shape == (2, 1, 28, 28) and d.labels.tolist() == [7, 3]


def test_crop_flip_shapes_and_determinism():
    x = data.synthetic(16, size=32).images
    a = data.random_crop_flip(x, torch.Generator().manual_seed(3))
    b = data.random_crop_flip(x, torch.Generator().manual_seed(3))
    c = data.random_crop_flip(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_flip_is_a_shifted_window():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    out = data.random_crop_flip(x, torch.Generator().manual_seed(0), pad=2, flip=False)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):  # each output is some 6x6 window of the padded image
        windows = padded[i, 0].unfold(0, 6, 1).unfold(1, 6, 1).reshape(-1, 6, 6)
        assert any(torch.equal(out[i, 0], w) for w in windows)


def test_batch_loader_normalizes_and_reshuffles_per_epoch():
    d = data.synthetic(50, size=8)
    mean, std = data.channel_stats(d.images)
    loader = data.BatchLoader(d, 16, mean, std, shuffle=True, augment=True, seed=0)
    batches = list(loader)
    assert len(loader) == 4 and [len(y) for _, y in batches] == [16, 16, 16, 2]
    plain = torch.cat([x for x, _ in data.BatchLoader(d, 16, mean, std)])
    assert plain.dtype == torch.float32 and abs(float(plain.mean())) < 1e-4
    assert abs(float(plain.std()) - 1) < 0.05
    again = list(loader)
    assert torch.equal(batches[0][0], again[0][0])  # same epoch, same batches
    loader.set_epoch(1)
    assert not torch.equal(batches[0][1], next(iter(loader))[1])
    assert loader.data_seconds > 0


def test_a_crafted_cifar_batch_cannot_run_code(tmp_path):
    import pickle

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    marker = tmp_path / "pwned"
    for i in range(1, 6):
        (base / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": CodeRunningPayload(marker), b"labels": [0]}))
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]}))
    with pytest.raises(ValueError, match="cannot read CIFAR batch .*refusing posix.system"):
        data.load(str(tmp_path))
    assert not marker.exists()
