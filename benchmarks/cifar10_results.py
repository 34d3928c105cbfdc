"""Reading the CIFAR-10 headline's result files: arms, accuracies, paired gaps, what seeds can resolve.

One home for the numbers that both the tables (``cifar10_report.py``) and the readings around them
(``cifar10_prose.py``) quote, so a table and its sentence cannot read a result file differently.
``results/cifar10_<experiment>.json`` come from ``cifar10_headline.py`` (its ``--collect`` builds
them from the per-run files in ``results/cifar10_runs/``); ``results/cifar10_gpu_resnet18.json`` is
the one file assembled by hand from a GPU machine's printed logs (its ``provenance`` says so) and is
read here into the same shape (:func:`gpu_resnet18`).
"""
from __future__ import annotations

import json
import math
import statistics
from typing import Any, Dict, List, Sequence

from cifar10_headline import RECIPES, Arm, result_name

from common import RESULTS

# LONGER_STEP stands for SGD without momentum at eq. 19's longer step, whose lr the claim experiment sets
LONGER_STEP = "plain-56 SGD m0 at eq. 19's step length"


def load(name: str, quick: bool) -> Dict[str, Any] | None:
    path = RESULTS / f"cifar10_{name}{'_quick' if quick else ''}.json"
    return json.loads(path.read_text()) if path.exists() else None


def load_budget(experiment: str, epochs: int, limit: int | None = None) -> Dict[str, Any] | None:
    """The result file of ``experiment`` at a budget other than the reported one (e.g. the claim at 40 epochs)."""
    path = RESULTS / f"{result_name(experiment, epochs, limit)}.json"
    return json.loads(path.read_text()) if path.exists() else None


def arms(doc: Dict[str, Any]) -> Dict[str, List[Dict[str, Any]]]:
    """Runs grouped by arm (:attr:`cifar10_headline.Arm.label`), seeds in order."""
    out: Dict[str, List[Dict[str, Any]]] = {}
    for r in sorted(doc["runs"], key=lambda r: r["seed"]):
        out.setdefault(Arm.of_run(r, doc["budget"]["recipe"]).label, []).append(r)
    return out


def accs(runs: List[Dict[str, Any]]) -> List[float]:
    return [r["final"]["val_acc"] for r in runs]


def mean_spread(xs: Sequence[float], digits: int = 1) -> str:
    """Mean and half range over seeds: with two seeds the half range is the honest spread."""
    if len(xs) == 1:
        return f"{100 * xs[0]:.{digits}f} (1 seed)"
    return f"{100 * statistics.mean(xs):.{digits}f} ± {50 * (max(xs) - min(xs)):.{digits}f}"


def paired_gaps(doc: Dict[str, Any], arm: str, baseline: str) -> List[float]:
    """Accuracy gaps arm − baseline, paired by seed (same split, same initial RNG state)."""
    groups = arms(doc)
    base = {r["seed"]: r["final"]["val_acc"] for r in groups.get(baseline, [])}
    return [r["final"]["val_acc"] - base[r["seed"]] for r in groups.get(arm, []) if r["seed"] in base]


def val_images(doc: Dict[str, Any]) -> int:
    b = doc["budget"]
    return int(b.get("val_limit") or b.get("val_images") or 5000)


def resolution(doc: Dict[str, Any], arm: str, baseline: str) -> float:
    """The smallest mean paired gap (as a fraction) the seeds of these two arms resolve, the larger of
    - test-set noise: twice the binomial standard error of the mean of n paired differences of two
      accuracies p on N validation images, 2·sqrt(2p(1 − p)/(N·n));
    - seed noise: twice the standard error of the mean gap from the gaps' own spread, 2·s/√n (with two
      seeds, twice their half range; one seed has no estimate of it)."""
    groups = arms(doc)
    p = statistics.mean(accs(groups[arm]) + accs(groups[baseline]))
    gaps = paired_gaps(doc, arm, baseline)
    n = max(1, len(gaps))
    seeds = 2 * statistics.stdev(gaps) / math.sqrt(n) if n > 1 else 0.0
    return max(2 * math.sqrt(2 * p * (1 - p) / (val_images(doc) * n)), seeds)


def fidelity_means(runs: List[Dict[str, Any]]) -> tuple[float, float, float] | None:
    """Means over every measured step (and seed) of cos(Δw, −∇ gradnet), of SGD's gradient's cosine at
    the same weights, and of cos(Δw, −∇ gradnet) on layer3 (the stage of the block eq. 19 skips)."""
    pts = [m for r in runs for m in r.get("fidelity", []) if m["cos"] is not None]
    if not pts:
        return None
    return (statistics.mean(m["cos"] for m in pts), statistics.mean(m["sgd_cos"] for m in pts),
            statistics.mean(m["stages"]["layer3"] for m in pts))


def longer_step_arm(groups: Dict[str, List[Dict[str, Any]]]) -> str:
    """The arm name of :data:`LONGER_STEP` (plain-56, SGD at another lr, momentum 0), or LONGER_STEP
    itself when the result file has no such arm."""
    found = [n for n in groups if n.startswith("cifar_plainnet56 + SGD lr ") and n.endswith(" m0")]
    return found[0] if found else LONGER_STEP


def gpu_resnet18() -> Dict[str, Any] | None:
    """``cifar10_gpu_resnet18.json`` in the shape of a headline result file (runs with ``final.val_acc``,
    the resnet18 experiment's recipe), plus what only that file has (``history``, ``provenance``)."""
    path = RESULTS / "cifar10_gpu_resnet18.json"
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    recipe = RECIPES["resnet18"]
    runs = [{"model": r["model"], "opt": recipe["opt"], "lr": recipe["lr"], "momentum": recipe["momentum"],
             "seed": r["seed"], "history": r["history"],
             "final": {"val_acc": r["final_val_acc"], "best_val_acc": r["best_val_acc"]}} for r in raw["runs"]]
    budget = dict(raw["budget"], recipe=recipe, recipe_text=raw["budget"]["recipe"], limit=None,
                  val_limit=raw["budget"]["val_images"])
    return dict(raw, budget=budget, runs=runs)
