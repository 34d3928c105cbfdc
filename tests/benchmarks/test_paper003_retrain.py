"""``paper003_mnist.py --retrain-best --eval-data TEST``: the recorded search's best configuration,
retrained and evaluated once on a held-out set given by path (MNIST's official test split is not in
this repository; here a generated image folder stands in for it)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def digit_folder(root: Path, per_class: int = 2) -> Path:
    """An image folder of 28x28 grayscale PNGs, ``<class>/<n>.png``, as MNIST's test split is laid
    out, with the class names of the benchmark's generated training stand-in."""
    rng = np.random.default_rng(0)
    for label in range(10):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for n in range(per_class):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(folder / f"{n}.png")
    return root


@pytest.mark.slow
def test_retrain_best_evaluates_the_given_held_out_set_once(tmp_path: Path) -> None:
    test = digit_folder(tmp_path / "test")
    out = tmp_path / "result.json"
    env = dict(os.environ, DCANETS_SHARED_DATA=str(tmp_path / "no-shared"))  # the generated training stand-in
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paper003_mnist.py"), "--quick", "--retrain-best",
                           "--seed", "0", "--eval-data", str(test), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    final, budget = result["final"], result["budget"]
    assert final["eval_images"] == budget["eval_images"] == 20  # every held-out image, once
    assert 0.0 <= final["eval_acc"] <= 1.0 and budget["config"]["eval_data"] == str(test)
    best = json.loads((ROOT / "benchmarks" / "results" / "paper003_mnist.json").read_text())["best_trial"]["params"]
    assert budget["config"]["lr"] == pytest.approx(best["lr"])  # the search's best trial, not the defaults
    assert f"held-out eval_acc {final['eval_acc']:.4f} on 20 images" in proc.stdout


def test_retrain_best_without_a_held_out_set_is_refused_in_one_line() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paper003_mnist.py"), "--quick", "--retrain-best"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("--retrain-best needs --eval-data PATH"), proc.stderr
