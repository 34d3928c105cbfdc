"""Stream mode: the epoch sampler, per-sample seeds, timm's transforms on tensors, the recipe pieces
(aa, random erasing) and exact resume (issue 22)."""
import os
import random

import pytest
import torch
from engine_runs import interrupted_then_resumed, numbers
from PIL import Image

from dcanets.engine import TrainConfig, data, train
from dcanets.engine.data import cache, layout, transforms
from dcanets.engine.data.loaders import build_loaders
from dcanets.engine.data.stream import EpochSampler, StreamDataset


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(cache, "_MEMORY", {})
    monkeypatch.setattr(layout, "_READERS", {})


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return data.write_jpeg_folder(tmp_path_factory.mktemp("stream") / "set", 40, 4, sizes=(24, 40), seed=0)


def cfg_of(root, **kw):
    base = dict(model="cifar_resnet20", data=str(root), data_mode="stream", img_size=16, batch_size=8, epochs=1,
                workers=0, device="cpu", val_fraction=0.2)
    return TrainConfig(**{**base, **kw})


def first_batch(cfg, epoch=0):
    loaders = build_loaders(cfg, torch.device("cpu"), progress=False)
    loaders.train.set_epoch(epoch)
    try:
        return next(iter(loaders.train))
    finally:
        loaders.close()


def test_sampler_is_seeded_by_epoch_and_shards_as_slices_of_each_global_batch():
    a = list(EpochSampler(10, True, seed=3))
    assert a == list(EpochSampler(10, True, seed=3)) and sorted(i for i, _ in a) == list(range(10))
    later = EpochSampler(10, True, seed=3)
    later.set_epoch(1)
    assert [i for i, _ in later] != [i for i, _ in a]
    shards = [list(EpochSampler(10, True, seed=3, rank=r, world_size=2, batch_size=2)) for r in range(2)]
    assert [len(s) for s in shards] == [5, 5]
    # global batch k of 4 = rank 0's k-th pair, then rank 1's: the same images with the same sample seeds
    merged = [p for k in range(3) for s in shards for p in s[2 * k:2 * k + 2]]
    assert merged == a
    evaluation = [list(EpochSampler(10, False, seed=3, rank=r, world_size=3, batch_size=4)) for r in range(3)]
    assert sum(evaluation, []) == list(EpochSampler(10, False, seed=3))  # every image once, in order
    with pytest.raises(ValueError, match="rank must be in"):
        EpochSampler(10, True, seed=0, rank=3, world_size=3)


def test_two_ranks_stream_batches_concatenated_are_the_one_process_batches(jpegs):
    """Stream mode under data parallelism: rank r's k-th batch of 4 is part r of the one-process k-th
    batch of 8, decoded and augmented identically (the sample seeds travel with the images); the
    validation parts together are the whole validation split."""
    def loaders(world, rank=0):
        made = build_loaders(cfg_of(jpegs, batch_size=8 // world, epochs=1), torch.device("cpu"), progress=False,
                             rank=rank, world_size=world)
        made.train.set_epoch(1)
        try:
            return list(made.train), list(made.val)
        finally:
            made.close()

    one_train, one_val = loaders(1)
    ranks = [loaders(2, r) for r in range(2)]
    assert len(one_train) == len(ranks[0][0]) == len(ranks[1][0]) > 1
    for k, (x, y) in enumerate(one_train):
        assert torch.equal(torch.cat([ranks[0][0][k][0], ranks[1][0][k][0]]), x)
        assert torch.equal(torch.cat([ranks[0][0][k][1], ranks[1][0][k][1]]), y)
    val_y = torch.cat([y for r in ranks for _, y in r[1]])
    assert torch.equal(val_y, torch.cat([y for _, y in one_val]))


def test_a_sample_is_a_function_of_its_seed_and_leaves_the_training_rng_alone(jpegs):
    cfg = cfg_of(jpegs)
    ds = build_loaders(cfg, torch.device("cpu"), progress=False).train_data
    state = (random.getstate(), torch.get_rng_state())
    x1, y1 = ds[(0, 123)]
    x2, _ = ds[(0, 123)]
    x3, _ = ds[(0, 124)]
    assert (random.getstate(), torch.get_rng_state().tolist()) == (state[0], state[1].tolist())
    assert x1.dtype == torch.uint8 and x1.shape == (3, 16, 16) and isinstance(y1, int)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)  # RandomResizedCrop draws from the sample's seed


def test_the_same_batches_with_any_number_of_workers(jpegs):
    x0, y0 = first_batch(cfg_of(jpegs, workers=0))
    x2, y2 = first_batch(cfg_of(jpegs, workers=2))
    assert torch.equal(x0, x2) and torch.equal(y0, y2)
    x_next, _ = first_batch(cfg_of(jpegs, workers=0), epoch=1)
    assert not torch.equal(x0, x_next)


@pytest.mark.slow
def test_stream_resume_is_bit_exact(jpegs, tmp_path):
    """Sampler order, sample seeds (crop, flip, RandAugment) and the main process's RNG (random erasing)
    after a resume are those of the uninterrupted run: the histories and the weights match exactly."""
    kw = dict(epochs=3, workers=1, aa="rand-m9-mstd0.5", reprob=0.5, limit=24)
    full = train(cfg_of(jpegs, output=str(tmp_path / "full"), **kw))
    resumed = interrupted_then_resumed(cfg_of(jpegs, output=str(tmp_path / "run"), **kw))
    assert numbers(resumed["history"]) == numbers(full["history"])
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_randaugment_and_random_erasing_change_the_batch(jpegs):
    plain, _ = first_batch(cfg_of(jpegs))
    aa, _ = first_batch(cfg_of(jpegs, aa="rand-m9-mstd0.5"))
    assert not torch.equal(plain, aa)  # the same crops, then the policy
    erased, _ = first_batch(cfg_of(jpegs, reprob=1.0, remode="const"))
    assert plain.shape == erased.shape and not torch.equal(plain, erased)
    zeros = (erased == 0).all(dim=1)  # const mode writes zeros into the normalized batch
    assert zeros.flatten(1).any(dim=1).all() and not (plain == 0).all(dim=1).any()


def test_cached_mode_erases_on_batches_too():
    cfg = TrainConfig(data="synthetic:64", batch_size=16, reprob=1.0, remode="const", device="cpu")
    batch, _ = first_batch(cfg)
    plain, _ = first_batch(TrainConfig(data="synthetic:64", batch_size=16, device="cpu"))
    assert (batch == 0).all(dim=1).flatten(1).any(dim=1).all()
    assert not (plain == 0).all(dim=1).flatten(1).any(dim=1).any()


def test_evaluation_resizes_to_img_size_over_crop_pct_and_crops_the_centre(tmp_path):
    """timm's eval transform: shorter side to img_size / crop_pct, then the centre img_size square."""
    root = tmp_path / "bands"
    for c in ("a", "b"):
        for i in range(3):
            im = Image.new("RGB", (80, 40), (200, 0, 0))  # red | green centre 20 px | red
            im.paste((0, 200, 0), (30, 0, 50, 40))
            (root / c).mkdir(parents=True, exist_ok=True)
            im.save(root / c / f"{i}.png")
    dc = transforms.data_config("cifar_resnet20", None, 16, 0.5)
    tf = transforms.build(dc, training=False, augment=False)
    r = layout.reader(layout.Part(root))
    x, _ = StreamDataset(layout.Part(root), r, tf, 3, 2)[(0, 0)]
    assert x.shape == (3, 16, 16)
    # 80x40 -> 64x32 (shorter side 32 = 16 / 0.5); the centre 16 columns are the green band's 16
    assert x[1].float().mean() > 190 and x[0].float().mean() < 10


def test_tensor_and_pil_paths_agree(jpegs):
    """The engine's tensor path does what timm's PIL path does (evaluation: no randomness)."""
    dc = transforms.data_config("cifar_resnet20", None, 16, 0.875)
    part = layout.Part(jpegs)
    r = layout.reader(part)
    out = {}
    for path in transforms.PATHS:
        ds = StreamDataset(part, r, transforms.build(dc, False, False, path=path), 3, 2, path=path)
        out[path] = torch.stack([ds[(k, 0)][0] for k in range(8)]).float()
    assert (out["tensor"] - out["pil"]).abs().mean() < 3  # of 255: resampling kernels differ slightly


def test_held_out_data_streams_with_the_evaluation_transform(jpegs, tmp_path):
    held = data.write_jpeg_folder(tmp_path / "held", 12, 4, sizes=(24, 40), seed=5)
    final = train(cfg_of(jpegs, eval_data=str(held)))
    assert final["eval_images"] == 12 and 0 <= final["eval_acc"] <= 1


def test_workers_reopen_a_tar_the_training_process_had_open(tmp_path):
    """A tar read in the training process (auto mode's size sample does) is open in timm's reader;
    forked workers sharing that file offset would read each other's bytes."""
    tar = data.write_image_tar(data.synthetic(64, num_classes=4, size=24, seed=3), tmp_path / "set.tar")
    part = layout.Part(tar)
    r = layout.reader(part)
    data.cached.size_policy(part, r, None)  # reads headers through the reader: the tar is now open here
    inherited = r.tar_state.tf
    assert inherited is not None
    cfg = cfg_of(tar, val_fraction=0.0, batch_size=16)
    x2, y2 = first_batch(cfg_of(tar, val_fraction=0.0, batch_size=16, workers=2))
    x0, y0 = first_batch(cfg)
    assert torch.equal(x0, x2) and torch.equal(y0, y2)
    ds = StreamDataset(part, r, transforms.build(transforms.data_config("cifar_resnet20", None, 16, None), False,
                                                 False), 3, 2)
    ds.pid = -1  # as a forked worker sees it
    ds[(0, 0)]
    assert r.tar_state.tf is not inherited and ds.pid == os.getpid()
