"""The decode cache can be trusted (issue 24, item 4 and two of item 10): keyed on what was decoded,
checksummed, hashed names; each test checks what is on disk afterwards."""
import hashlib
import io
import os
import tarfile

import pytest
import torch
from PIL import Image

from dcanets.engine import data
from dcanets.engine.data import cache, layout


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(cache, "_MEMORY", {})
    monkeypatch.setattr(layout, "_READERS", {})
    monkeypatch.setattr(layout, "_WARNED", set())


def cache_files():
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in data.cache_dir().glob("*.pt")}


def png(path, value, size=12, compress=6):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, 255 - value, 40)).save(path, compress_level=compress)


def new_process():
    """What a later run finds: only the disk cache (no decoded sets, no folder listings in memory)."""
    data.forget_decoded()


def test_images_added_under_a_symlinked_class_folder_give_a_new_key(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "b"
    for i in range(3):
        png(tmp_path / "set" / "a" / f"{i}.png", 10 * i)
        png(elsewhere / f"{i}.png", 100 + 10 * i)
    os.symlink(elsewhere, tmp_path / "set" / "b")  # timm's reader walks it (followlinks=True)
    assert len(data.load(str(tmp_path / "set"), progress=False)) == 6
    before = cache_files()
    png(elsewhere / "3.png", 200)
    new_process()
    d = data.load(str(tmp_path / "set"), progress=False)
    assert len(d) == 7 and not d.from_cache
    after = cache_files()
    assert len(after) == 2 and all(after[name] == digest for name, digest in before.items())  # old file untouched
    png(elsewhere / "4.png", 220)  # in the same process too: the class folder's mtime changed
    assert len(data.load(str(tmp_path / "set"), progress=False)) == 8


def test_a_tar_rebuilt_with_one_more_image_at_the_same_size_and_mtime_gives_a_new_key(tmp_path):
    src = tmp_path / "src"
    for i in range(4):
        png(src / "a" / f"{i}.png", 10 * i)
        png(src / "b" / f"{i}.png", 100 + 10 * i)
    tar = tmp_path / "set.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(src, arcname="train")
    st = tar.stat()
    assert len(data.load(str(tar), progress=False)) == 8
    before = cache_files()
    png(src / "b" / "4.png", 200)
    with tarfile.open(tmp_path / "rebuilt.tar", "w") as tf:
        tf.add(src, arcname="train")
    os.replace(tmp_path / "rebuilt.tar", tar)
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p / rsync -a keep it
    assert tar.stat().st_size == st.st_size and tar.stat().st_mtime_ns == st.st_mtime_ns  # padded to one record
    new_process()
    assert len(data.load(str(tar), progress=False)) == 9
    after = cache_files()
    assert len(after) == 2 and all(after[name] == digest for name, digest in before.items())


def test_a_same_size_edit_with_the_mtime_kept_gives_a_new_key(tmp_path):
    for i in range(3):
        png(tmp_path / "set" / "a" / f"{i}.png", 10 * i, compress=0)  # uncompressed: the size is the image's shape
        png(tmp_path / "set" / "b" / f"{i}.png", 100 + 10 * i, compress=0)
    edited = tmp_path / "set" / "a" / "0.png"
    first = data.load(str(tmp_path / "set"), progress=False)
    st = edited.stat()
    png(edited, 250, compress=0)
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert edited.stat().st_size == st.st_size and edited.stat().st_mtime_ns == st.st_mtime_ns
    new_process()
    second = data.load(str(tmp_path / "set"), progress=False)
    assert not second.from_cache
    assert int(first.images[0, 0, 0, 0]) == 0 and int(second.images[0, 0, 0, 0]) == 250


def test_a_cache_file_with_altered_labels_is_rebuilt_never_used(tmp_path):
    data.write_image_folder(data.synthetic(20, num_classes=2, size=8, seed=0), tmp_path / "set")
    data.write_image_folder(data.synthetic(10, num_classes=2, size=8, seed=1), tmp_path / "other")
    truth = data.load(str(tmp_path / "set"), progress=False)
    data.load(str(tmp_path / "other"), progress=False)
    before = cache_files()
    name = next(n for n in before if n.startswith("set-"))
    file = data.cache_dir() / name
    blob = torch.load(file, weights_only=True)
    blob["labels"] = 1 - blob["labels"]  # every label flipped; key and checksum left as they were
    torch.save(blob, file)
    new_process()
    with pytest.warns(data.DataWarning, match=r"decode cache file '.*set-.*\.pt' does not match its checksum"):
        again = data.load(str(tmp_path / "set"), progress=False)
    assert torch.equal(again.labels, truth.labels) and not again.from_cache
    assert cache_files() == before  # rebuilt byte for byte; the other set's file untouched
    new_process()
    assert data.load(str(tmp_path / "set"), progress=False).from_cache  # and trusted again


def test_tar_members_with_parent_or_absolute_names_are_ignored(tmp_path):
    tar = tmp_path / "set.tar"
    with tarfile.open(tar, "w") as tf:
        for name, value in [("train/a/0.png", 10), ("train/a/1.png", 20), ("train/b/0.png", 200),
                            ("train/b/1.png", 210), ("../evil/0.png", 90), ("/abs/a/0.png", 99)]:
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (value, value, value)).save(buf, "PNG")
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.warns(data.DataWarning, match=r"ignored 2 member\(s\) with an absolute or '\.\./' name "
                                              r"\(e\.g\. '(\.\./evil|/abs/a)/0\.png'\)"):
        d = data.load(str(tar), progress=False)
    assert d.classes == ["a", "b"] and len(d) == 4  # 'evil' is no class; '/abs/a' adds no image to 'a'
    assert sorted(int(v) for v in d.images[:, 0, 0, 0]) == [10, 20, 200, 210]


def test_a_240_character_data_path_works(tmp_path):
    long_dir = tmp_path / ("d" * 240)
    data.write_image_folder(data.synthetic(12, num_classes=2, size=8), long_dir)
    d = data.load(str(long_dir), progress=False)
    assert len(d) == 12
    (name,) = cache_files()
    assert name.startswith("d" * 32 + "-") and len(name) == 32 + 1 + 24 + 3  # name cut, hash kept
    new_process()
    assert data.load(str(long_dir), progress=False).from_cache
