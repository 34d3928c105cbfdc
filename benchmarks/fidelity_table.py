"""Direction fidelity of every registered decomposition at depths 20/56/110 on CIFAR-10 batches.

For each plain net ``cifar_plainnet<depth>``, seed and state (at initialisation, and after a short
SGD warm start), one step of every registered DC decomposition (and plain SGD, the reference) is
taken from the same weights on the same real batch, and its cosine with the gradient of the
shortcut twin ``cifar_gradnet<depth>`` (same forward, shortcut backward) is measured, whole net
and per stage, by ``dcanets.analysis.fidelity.compare_steps`` (the measurement of
``dcanets fidelity``, one reference pass shared by all optimizers). Every optimizer steps with
momentum 0 and weight decay 0, so Δw is the decomposition's direction itself. Means ± half range
over the seeds; each seed has its own initialisation, batch and warm-start batches.

    python benchmarks/fidelity_table.py --full    # depths 20/56/110, 3 seeds, batch 128, CIFAR-10
    python benchmarks/fidelity_table.py --quick   # depth 20, 1 seed, batch 16 (CI)

Full mode writes ``results/fidelity_table.{json,png}`` and the generated table of
docs/decompositions.md (between ``<!-- fidelity:table -->`` markers) and the README's row.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (  # noqa: E402
    RESULTS,
    cifar_images,
    data_label,
    figure_path,
    fill_block,
    parse_args,
    progress,
    seeded_batches,
    warm_start,
    write_result,
)

NAME = "fidelity_table"
DOC = Path(__file__).resolve().parents[1] / "docs" / "decompositions.md"
README = Path(__file__).resolve().parents[1] / "README.md"
FULL = dict(depths=(20, 56, 110), seeds=(0, 1, 2), batch=128, warm_steps=30, images=4096)
QUICK = dict(depths=(20,), seeds=(0,), batch=16, warm_steps=2, images=64)
LR = 0.05                       # the step's length does not change a fixed direction's cosine
WARM = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
# label -> (timm name, options): every registered decomposition with its defaults, except that
# dcacounter clamps eq. 19's β at beta_max instead of refusing the step (reported in the JSON)
OPTIMIZERS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "sgd": ("sgd", {}),
    "dcal2": ("dcal2", {}),
    "dcaprox": ("dcaprox", {}),
    "dcacounter": ("dcacounter", {"beta_policy": "clamp"}),
    "dcacounter c=skip": ("dcacounter", {"c": "skip", "beta_policy": "clamp"}),
    "dcaquasihalf": ("dcaquasihalf", {}),
    "dcaquasineghalf": ("dcaquasineghalf", {}),
}
STATES = ("init", "warm")


def factories() -> Dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]]:
    from dcanets.engine.loop import create_optimizer

    return {label: (lambda m, n=name, kw=kw: create_optimizer(m, n, LR, 0.0, 0.0, kw))
            for label, (name, kw) in OPTIMIZERS.items()}


def record(report: Any) -> Dict[str, Any]:
    """The JSON row of one optimizer's measurement (or its refusal message)."""
    if isinstance(report, str):
        return {"error": report}
    return {"cos": report.cosine, "sgd_cos": report.baseline_cosine, "loss": report.loss,
            "stages": {k: v.cosine for k, v in report.stages.items()},
            "diagnostics": report.extra.get("diagnostics", {})}


def measure_depth(depth: int, seeds: Sequence[int], budget: Dict[str, Any], x: torch.Tensor,
                  y: torch.Tensor) -> List[Dict[str, Any]]:
    import timm

    from dcanets.analysis.fidelity import compare_steps

    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = timm.create_model(f"cifar_plainnet{depth}", num_classes=10)
        data = seeded_batches(x, y, budget["batch"], seed)
        for state in STATES:
            warm_loss = warm_start(model, data, budget["warm_steps"], WARM) if state == "warm" else None
            bx, by = next(data)
            t0 = time.perf_counter()
            reports = compare_steps(model, factories(), bx, by)
            progress(f"{NAME}: plainnet{depth} seed {seed} {state}: {time.perf_counter() - t0:.0f} s")
            rows.append(dict(depth=depth, seed=seed, state=state, warm_loss=warm_loss,
                             seconds=round(time.perf_counter() - t0, 1),
                             steps={k: record(r) for k, r in reports.items()}))
    return rows


# -- summaries ----------------------------------------------------------------------------------

def values(rows: List[Dict[str, Any]], depth: int, state: str, label: str, stage: str | None = None) -> List[float]:
    out = []
    for r in rows:
        step = r["steps"][label]
        if r["depth"] == depth and r["state"] == state and "cos" in step:
            v = step["cos"] if stage is None else step["stages"].get(stage)
            if v is not None and v == v:       # NaN: a zero or overflowing vector, no cosine
                out.append(v)
    return out


def mean_spread(xs: Sequence[float]) -> str:
    """mean ± half range (the project's convention for seeds); "–" when no seed gave a cosine."""
    if not xs:
        return "–"
    half = (max(xs) - min(xs)) / 2
    return f"{statistics.fmean(xs):.3f} ± {half:.3f}"


def whole_table(rows: List[Dict[str, Any]], depths: Sequence[int]) -> str:
    head = "| step | " + " | ".join(f"plain{d} {s}" for d in depths for s in STATES) + " |"
    lines = [head, "|---|" + "---:|" * (len(depths) * len(STATES))]
    for label in OPTIMIZERS:
        cells = [mean_spread(values(rows, d, s, label)) for d in depths for s in STATES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_table(rows: List[Dict[str, Any]], depth: int) -> str:
    stages = list(next(r for r in rows if r["depth"] == depth)["steps"]["sgd"]["stages"])
    lines = ["| step | state | " + " | ".join(stages) + " |", "|---|---|" + "---:|" * len(stages)]
    for label in OPTIMIZERS:
        for state in STATES:
            cells = [mean_spread(values(rows, depth, state, label, s)) for s in stages]
            lines.append(f"| {label} | {state} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_line(doc: Dict[str, Any]) -> str:
    b = doc["budget"]
    data = "generated stand-in images" if doc.get("stand_in_data") else "CIFAR-10 training images"
    return (f"`python benchmarks/fidelity_table.py --full`: {data} ({b['images']} drawn at random, "
            f"normalised per channel), batch {b['batch']}, seeds {list(b['seeds'])} (each its own "
            f"initialisation and batches), warm start {b['warm_steps']} SGD steps (lr {WARM['lr']}, momentum "
            f"{WARM['momentum']}, weight decay {WARM['weight_decay']}); every step lr {LR}, momentum 0, weight "
            f"decay 0; cos(Δw, −∇ gradnet), mean ± half range over the seeds; {doc['seconds']:.0f} s on "
            f"{doc['machine']['cores']} shared CPU cores, 1 thread.")


def doc_block(doc: Dict[str, Any]) -> str:
    depths = doc["budget"]["depths"]
    parts = [budget_line(doc), whole_table(doc["rows"], depths)]
    for d in depths[1:]:
        parts += [f"Per stage, cifar_plainnet{d}:", stage_table(doc["rows"], d)]
    return "\n\n".join(parts + ["![cosine of each step with the gradnet gradient]"
                                 "(../benchmarks/results/fidelity_table.png)"])


def readme_cell(doc: Dict[str, Any]) -> str:
    rows, depths = doc["rows"], doc["budget"]["depths"]
    def mean(d: int, label: str) -> float:
        xs = values(rows, d, "init", label)
        return statistics.fmean(xs) if xs else float("nan")

    parts = []
    for d in depths:
        others = [k for k in OPTIMIZERS if k not in ("sgd", "dcacounter") and values(rows, d, "init", k)]
        means = [mean(d, k) for k in others]
        spread = max((max(xs) - min(xs)) / 2 for k in OPTIMIZERS if (xs := values(rows, d, "init", k)))
        resolved = max(abs(m - mean(d, "sgd")) for m in means) > 2 * spread
        parts.append(f"plain{d}: SGD {mean(d, 'sgd'):.2f}, dcacounter {mean(d, 'dcacounter'):.2f}, the other "
                     f"decompositions {min(means):.2f} to {max(means):.2f} (seed half range up to {spread:.2f}: "
                     + ("some differ from SGD beyond it)" if resolved else "no ranking resolved)"))
    return "cos with the gradnet gradient at init: " + "; ".join(parts)


def plot(doc: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, depths = doc["rows"], doc["budget"]["depths"]
    fig, axes = plt.subplots(1, len(STATES), figsize=(11, 4), sharey=True)
    width = 0.8 / len(depths)
    for ax, state in zip(axes, STATES):
        for j, d in enumerate(depths):
            vals = [values(rows, d, state, k) for k in OPTIMIZERS]
            means = [statistics.fmean(v) if v else float("nan") for v in vals]
            err = [(max(v) - min(v)) / 2 if v else 0.0 for v in vals]
            ax.bar([i + j * width for i in range(len(OPTIMIZERS))], means, width, yerr=err, label=f"plain{d}")
        ax.set_xticks([i + width * (len(depths) - 1) / 2 for i in range(len(OPTIMIZERS))])
        ax.set_xticklabels(list(OPTIMIZERS), rotation=30, ha="right", fontsize=8)
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_title(f"{state}: cos(Δw, −∇ gradnet)", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def extra(parser: Any) -> None:
    parser.add_argument("--data", default=None, help="CIFAR-10 training tar (default: the shared copy)")
    parser.add_argument("--render", action="store_true",
                        help="only redo the page's table, the README row and the PNG from results/fidelity_table.json")


def render(path: Path) -> None:
    """The PNG, the generated block of docs/decompositions.md and the README's row from a full result."""
    doc = json.loads(path.read_text())
    plot(doc, figure_path(NAME, False))
    DOC.write_text(fill_block(DOC.read_text(), "fidelity:table", doc_block(doc)))
    README.write_text(fill_block(README.read_text(), "fidelity:readme", readme_cell(doc), inline=True))
    print(whole_table(doc["rows"], doc["budget"]["depths"]))
    print(f"wrote {DOC} and {README}")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra)
    if args.render:
        render(RESULTS / f"{NAME}.json")
        return
    import dcanets  # noqa: F401  (registers the models and decompositions)

    budget = QUICK if args.quick else FULL
    data, x, y = cifar_images(args, budget["images"])
    seeds = [args.seed + s for s in budget["seeds"]]
    t0 = time.perf_counter()
    rows = [r for d in budget["depths"] for r in measure_depth(d, seeds, budget, x, y)]
    payload = dict(budget={**budget, "seeds": seeds}, data=data_label(data), lr=LR, warm=WARM,
                   optimizers={k: {"name": n, "kwargs": kw} for k, (n, kw) in OPTIMIZERS.items()},
                   seconds=round(time.perf_counter() - t0, 1), rows=rows)
    path = write_result(NAME, args.quick, payload, args.out)
    if args.quick:
        plot(json.loads(path.read_text()), figure_path(NAME, True))
        print(whole_table(rows, budget["depths"]))
    else:
        render(path)


if __name__ == "__main__":
    main()
