"""The shipped ImageNet recipe (tune_configs/imagenet_negnet50.yaml), its quick variant run for real:
the same file with the data path pointed at a generated folder in timm's layout and a tiny budget."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

SHIPPED = Path(__file__).resolve().parents[2] / "tune_configs" / "imagenet_negnet50.yaml"
TINY_BUDGET = {"img_size": 32, "epochs": 1, "warmup_epochs": 0.5, "batch_size": 8, "workers": 1, "device": "cpu",
               "amp": False}


@pytest.mark.slow
def test_imagenet_recipe_quick_variant_runs_both_arms_on_streamed_data(ray_local, tmp_path, monkeypatch):
    from dcanets.cli import main
    from dcanets.engine import data

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "imagenet-like"
    data.write_jpeg_folder(root / "train", 16, 2, sizes=(40, 64), seed=0)
    data.write_jpeg_folder(root / "val", 8, 2, sizes=(40, 64), seed=1)
    doc = yaml.safe_load(SHIPPED.read_text())
    recipe = dict(doc["train"])
    doc["train"].update(data=str(root), **TINY_BUDGET)
    doc["resources"] = {"cpu": 1, "gpu": 0}
    cfg = tmp_path / "quick.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))

    assert main(["tune", str(cfg), "--output", str(tmp_path / "out")]) == 0
    (search,) = (tmp_path / "out").glob("imagenet-negnet50-*")
    rows = list(csv.DictReader((search / "trials.csv").open()))
    assert sorted(r["model"] for r in rows) == ["negnet50", "resnet50"]
    assert all(r["status"] == "TERMINATED" and r["epochs"] == "1" and 0 <= float(r["best"]) <= 1 for r in rows)
    (ckpt,) = list((tmp_path / "out").rglob("last.pt"))[:1]
    saved = torch.load(ckpt, weights_only=True)["config"]
    for key in ("data_mode", "aa", "reprob", "remode", "crop_pct", "scale", "ratio", "train_split", "val_split",
                "label_smoothing", "warmup_lr"):  # the recipe's keys reached the trial unchanged
        assert saved[key] == pytest.approx(recipe[key]) if isinstance(recipe[key], float) else saved[key] == recipe[key]
    assert saved["data_mode"] == "stream" and saved["aa"].startswith("rand-")
