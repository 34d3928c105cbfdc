"""Tables of the CIFAR-10 headline reproduction, generated from its result files.

Reads ``results/cifar10_{depth,recipe,resnet18,dca,claim}.json`` (written by ``cifar10_headline.py``) and, if
present, ``results/cifar10_dca_tune_trials.csv`` (the ``trials.csv`` of the
``tune_configs/dca_rho_lambda.yaml`` search), and rewrites the generated parts of
``benchmarks/REPORT.md`` and of the README's headline table (between ``<!-- cifar10:NAME -->``
markers), so every number in the report comes from a result file and none is typed by hand.
``--quick`` reads the quick results and writes ``results/REPORT_quick.md`` instead.
``--repro FIRST SECOND`` compares every run of the runs folder SECOND (a re-run of some of the
same commands) with its namesake in FIRST and writes ``results/cifar10_repro.json`` first.
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Sequence

from cifar10_headline import Arm

from common import RESULTS, fill_block, parse_args, write_result

HERE = Path(__file__).resolve().parent
REPORT, README = HERE / "REPORT.md", HERE.parent / "README.md"
MIN_GAP = 0.02  # a "share of the gap closed" needs a gap well above validation noise (~0.7 points)
# gaps are measured against these
BASELINES = {"resnet18": "cifar_resnet18", "dca": "cifar_plainnet56", "recipe": "cifar_resnet20"}
# the claim's comparisons (arm, against): DCA against SGD on the same plain net, then against SGD on
# the shortcut nets, each at the same momentum; arms missing from the result file are left out.
# LONGER_STEP stands for SGD without momentum at eq. 19's longer step, whose lr the experiment sets
LONGER_STEP = "plain-56 SGD m0 at eq. 19's step length"
CLAIM_PAIRS = [("cifar_plainnet56 + dcacounter m0", "cifar_plainnet56 + SGD m0"),
               ("cifar_plainnet56 + dcacounter m0", LONGER_STEP),
               ("cifar_plainnet56 + dcacounter", "cifar_plainnet56"),
               ("cifar_plainnet56 + dcacounter m0", "cifar_resnet56 + SGD m0"),
               ("cifar_plainnet56 + dcacounter", "cifar_resnet56"),
               ("cifar_plainnet56 + dcacounter", "cifar_gradnet56"),
               ("cifar_gradnet56", "cifar_plainnet56")]


def load(name: str, quick: bool) -> Dict[str, Any] | None:
    path = RESULTS / f"cifar10_{name}{'_quick' if quick else ''}.json"
    return json.loads(path.read_text()) if path.exists() else None


def arms(doc: Dict[str, Any]) -> Dict[str, List[Dict[str, Any]]]:
    """Runs grouped by arm (:attr:`cifar10_headline.Arm.label`), seeds in order."""
    out: Dict[str, List[Dict[str, Any]]] = {}
    for r in sorted(doc["runs"], key=lambda r: r["seed"]):
        out.setdefault(Arm.of_run(r, doc["budget"]["recipe"]).label, []).append(r)
    return out


def mean_spread(xs: Sequence[float]) -> str:
    """Mean and half range over seeds: with two seeds the half range is the honest spread."""
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f} (1 seed)"
    return f"{100 * statistics.mean(xs):.1f} ± {50 * (max(xs) - min(xs)):.1f}"


def accs(runs: List[Dict[str, Any]]) -> List[float]:
    return [r["final"]["val_acc"] for r in runs]


def fidelity_means(runs: List[Dict[str, Any]]) -> tuple[float, float, float] | None:
    """Means over every measured step (and seed) of cos(Δw, −∇ gradnet), of SGD's gradient's cosine at
    the same weights, and of cos(Δw, −∇ gradnet) on layer3 (the stage of the block eq. 19 skips)."""
    pts = [m for r in runs for m in r.get("fidelity", []) if m["cos"] is not None]
    if not pts:
        return None
    return (statistics.mean(m["cos"] for m in pts), statistics.mean(m["sgd_cos"] for m in pts),
            statistics.mean(m["stages"]["layer3"] for m in pts))


def arm_table(doc: Dict[str, Any], baseline: str | None = None) -> str:
    fid = any(r.get("fidelity") for r in doc["runs"])
    fid_head, fid_rule = (" cos with gradnet grad: step / SGD grad (layer3: step) |", "---:|") if fid else ("", "")
    rows = ["| arm | params | val acc % per seed | val acc % (mean ± half range) | final train loss "
            "| images/s | data share | wall min/run |" + fid_head, "|---|---:|---|---:|---:|---:|---:|---:|" + fid_rule]
    for name, runs in arms(doc).items():
        per_seed = ", ".join(f"s{r['seed']}: {100 * r['final']['val_acc']:.1f}" for r in runs)
        loss = statistics.mean(r["final"]["train_loss"] for r in runs)
        ips = statistics.mean(r["images_per_s"] for r in runs)
        share = statistics.mean(r["data_share"] for r in runs)
        wall = statistics.mean(r["wall_seconds"] for r in runs) / 60
        rows.append(f"| {name} | {runs[0]['final']['num_params'] / 1e6:.2f}M | {per_seed} | "
                    f"{mean_spread(accs(runs))} | {loss:.3f} | {ips:.0f} | {100 * share:.1f}% | {wall:.1f} |"
                    + (f" {fidelity_cell(runs)} |" if fid else ""))
    rows += [f"| {name} | | missing (not trained yet) | | | | | |" + (" |" if fid else "")
             for name in doc.get("missing", [])]
    table = "\n".join(rows)
    if baseline:
        table += "\n\n" + gap_lines(doc, baseline)
    return table


def fidelity_cell(runs: List[Dict[str, Any]]) -> str:
    means = fidelity_means(runs)
    return "–" if means is None else f"{means[0]:.3f} / {means[1]:.3f} ({means[2]:.3f})"


def longer_step_arm(groups: Dict[str, List[Dict[str, Any]]]) -> str:
    """The arm name of :data:`LONGER_STEP` (plain-56, SGD at another lr, momentum 0), or LONGER_STEP
    itself when the result file has no such arm."""
    found = [n for n in groups if n.startswith("cifar_plainnet56 + SGD lr ") and n.endswith(" m0")]
    return found[0] if found else LONGER_STEP


def claim_lines(doc: Dict[str, Any]) -> str:
    """The claim's paired comparisons (:data:`CLAIM_PAIRS`), those whose two arms both finished."""
    groups, lines = arms(doc), []
    named = {LONGER_STEP: longer_step_arm(groups)}
    for arm, against in ((a, named.get(b, b)) for a, b in CLAIM_PAIRS):
        gaps = paired_gaps(doc, arm, against)
        if arm in groups and against in groups and gaps:
            each = ", ".join(f"{100 * g:+.1f}" for g in gaps)
            lines.append(f"- {arm} − {against}: {100 * statistics.mean(gaps):+.1f} points (per seed: {each})")
    return "\n".join(lines)


def paired_gaps(doc: Dict[str, Any], arm: str, baseline: str) -> List[float]:
    """Accuracy gaps arm − baseline, paired by seed (same split, same initial RNG state)."""
    groups = arms(doc)
    base = {r["seed"]: r["final"]["val_acc"] for r in groups.get(baseline, [])}
    return [r["final"]["val_acc"] - base[r["seed"]] for r in groups.get(arm, []) if r["seed"] in base]


def gap_lines(doc: Dict[str, Any], baseline: str) -> str:
    lines = []
    for name in arms(doc):
        gaps = paired_gaps(doc, name, baseline)
        if name != baseline and gaps:
            each = ", ".join(f"{100 * g:+.1f}" for g in gaps)
            lines.append(f"- {name} − {baseline}: {100 * statistics.mean(gaps):+.1f} points "
                         f"(per seed: {each})")
    return "\n".join(lines)


def gap_closed(doc: Dict[str, Any]) -> str:
    """Share of the plain56 → resnet56 gap that each DCA arm closes, per seed then averaged."""
    groups = arms(doc)
    plain = {r["seed"]: r["final"]["val_acc"] for r in groups.get("cifar_plainnet56", [])}
    res = {r["seed"]: r["final"]["val_acc"] for r in groups.get("cifar_resnet56", [])}
    lines = []
    for name, runs in groups.items():
        if name in ("cifar_plainnet56", "cifar_resnet56"):
            continue
        seeds = [r for r in runs if r["seed"] in plain and r["seed"] in res]
        if any(res[r["seed"]] - plain[r["seed"]] < MIN_GAP for r in seeds):
            lines.append(f"- {name}: the plain-56 → ResNet-56 gap is under {100 * MIN_GAP:.0f} points "
                         "for some seed, too small to divide by")
            continue
        shares = [(r["final"]["val_acc"] - plain[r["seed"]]) / (res[r["seed"]] - plain[r["seed"]]) for r in seeds]
        if shares:
            lines.append(f"- {name}: closes {100 * statistics.mean(shares):.0f}% of the plain-56 → "
                         f"ResNet-56 gap (per seed: {', '.join(f'{100 * x:.0f}%' for x in shares)})")
    return "\n".join(lines)


def budget_line(doc: Dict[str, Any]) -> str:
    b = doc["budget"]
    limit = "all 45,000" if b["limit"] is None else f"{b['limit']:,}"
    val = "all 5,000" if b.get("val_limit") in (None, 5000) else f"{b['val_limit']:,}"
    rec = b["recipe"]
    extra = f", DCA lr {b.get('dca_lr')}, {b['dca_kwargs']}" if doc["benchmark"].endswith("dca") else ""
    return (f"Budget: {b['epochs']} epochs over {limit} training images, validation on {val} held-out "
            f"images (split seed {b.get('split_seed', 'per run')}), seeds {b['seeds']}; {rec['opt']} lr {rec['lr']}, "
            f"momentum {rec['momentum']}, wd {rec['weight_decay']}, {rec['sched']}, warm-up "
            f"{rec.get('warmup_epochs', 0)} epochs, batch {rec['batch_size']}"
            f"{f', label smoothing {smoothing}' if (smoothing := rec.get('label_smoothing')) else ''}{extra}. "
            f"{_machines(doc)}")


def _machines(doc: Dict[str, Any]) -> str:
    """Where the runs trained: each run's own device (runs of one table may come from several machines)."""
    devices = doc["budget"].get("devices")
    if devices:
        amp = {r["final"].get("amp") for r in doc["runs"]}
        return f"Trained on: {'; '.join(devices)}" + (" (bfloat16 autocast)." if True in amp else ".")
    m = doc["machine"]
    return f"Machine: {m['cores']} cores, torch threads {m['torch_threads']}, CUDA {m['cuda']}, torch {m['torch']}."


def tune_table(path: Path) -> str:
    """The search's trials.csv (``dcanets tune`` output): sampled point, best metric, epochs run."""
    if not path.exists():
        return f"(no search result: copy the search's trials.csv to results/{path.name})"
    with path.open() as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in rows[0] if k not in ("trial_id", "status", "epochs", "best", "node_id")] if rows else []
    rows.sort(key=lambda r: float(r["best"]) if r["best"] not in ("", "nan") else float("inf"))
    out = ["| trial | " + " | ".join(keys) + " | best metric | epochs | status |",
           "|---|" + "---:|" * (len(keys) + 2) + "---|"]
    for r in rows:
        best = "no report" if r["best"] in ("", "nan") else f"{float(r['best']):.4g}"
        out.append(f"| {r['trial_id']} | " + " | ".join(f"{float(r[k]):.3g}" for k in keys)
                   + f" | {best} | {r['epochs']} | {r['status']} |")
    return "\n".join(out)


def headline(docs: Dict[str, Dict[str, Any]]) -> str:
    """The README's one table: each claim, our number, the paper's."""
    out = ["| claim (paper 000 / He et al.) | our measurement (val acc %, mean ± half range over seeds) | budget |",
           "|---|---|---|"]
    want = {"depth": ["cifar_plainnet20", "cifar_plainnet56", "cifar_resnet20", "cifar_resnet56",
                      "cifar_negnet20", "cifar_negnet56", "cifar_gradnet56"],
            "recipe": ["cifar_resnet20", "cifar_negnet20"],
            "resnet18": ["cifar_resnet18", "cifar_actresnet18", "cifar_negnet18"],
            "dca": ["cifar_plainnet56 + dcacounter", "cifar_plainnet56 + dcaquasihalf",
                    "cifar_plainnet56 + dcaquasineghalf"]}
    control = [n for n in arms(docs["dca"]) if "SGD lr" in n] if "dca" in docs else []
    want["dca"] += control
    longer = longer_step_arm(arms(docs["claim"])) if "claim" in docs else LONGER_STEP
    want["claim"] = ["cifar_plainnet56 + dcacounter m0", "cifar_plainnet56 + SGD m0", longer, "cifar_resnet56 + SGD m0",
                     "cifar_plainnet56 + dcacounter", "cifar_plainnet56", "cifar_resnet56", "cifar_gradnet56"]
    claims = {"depth": "plain-56 < plain-20; ResNet-56 > ResNet-20; NegNet?",
              "recipe": "NegNet-20 on par with ResNet-20 at the ≥ 88% recipe",
              "resnet18": "NegNet18 on par with ResNet18", "dca": "DCA + plain net = SGD + shortcut net",
              "claim": "DCA + plain net = SGD + shortcut net, one lr for every arm (eq. 19, momentum 0 / 0.9)"}
    for exp, names in want.items():
        doc = docs.get(exp)
        if exp == "resnet18" and (gpu := gpu_resnet18()):
            out.append(f"| {claims[exp]} | {gpu} |")
            continue
        if not doc:
            continue
        groups = arms(doc)
        cells = "; ".join(f"{n.replace('cifar_', '')} {mean_spread(accs(groups[n]))}" for n in names if n in groups)
        b = doc["budget"]
        where = "; ".join(b.get("devices", [])) or "CPU"
        out.append(f"| {claims[exp]} | {cells} | {b['epochs']} ep × {b['limit'] or 45000:,} img, "
                   f"seeds {b['seeds']}, {where} |")
    return "\n".join(out)


def gpu_resnet18() -> str | None:
    """The 18-layer row from the GPU run of ``tune_configs/negnet18_cifar10_gpu.yaml`` (the larger budget)."""
    path = RESULTS / "cifar10_gpu_resnet18.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    by: Dict[str, List[float]] = {}
    for r in sorted(doc["runs"], key=lambda r: r["seed"]):
        by.setdefault(r["model"], []).append(r["final_val_acc"])
    cells = "; ".join(f"{m.replace('cifar_', '')} {mean_spread(v)}" for m, v in by.items())
    b = doc["budget"]
    return (f"{cells} | {b['epochs']} ep × {b['train_images']:,} img, seeds {b['seeds']}, "
            f"{doc['machine']['gpu']}")


METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")


def compare_runs(first: Path, second: Path) -> Dict[str, Any]:
    """Largest per-epoch difference of each metric between a run and its re-run."""
    runs = {}
    for again in sorted(second.rglob("metrics.json")):
        rel = again.relative_to(second)
        a, b = (json.loads(p.read_text())["history"] for p in (first / rel, again))
        if len(a) != len(b):
            raise SystemExit(f"{rel}: {len(a)} vs {len(b)} epochs; compare finished runs only")
        runs[str(rel.parent)] = {k: max(abs(x[k] - y[k]) for x, y in zip(a, b)) for k in METRICS}
    if not runs:
        raise SystemExit(f"no metrics.json under {second}")
    return {"first": str(first), "second": str(second), "max_abs_difference": runs}


def repro_block(quick: bool) -> str:
    path = RESULTS / f"cifar10_repro{'_quick' if quick else ''}.json"
    if not path.exists():
        return "(no re-run recorded: run cifar10_report.py --repro FIRST_RUNS SECOND_RUNS)"
    doc = json.loads(path.read_text())
    rows = ["| run | " + " | ".join(f"max abs Δ {k}" for k in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name, diffs in doc["max_abs_difference"].items():
        cells = (f"{diffs[k]:.1e}" if diffs[k] else "0 (bitwise)" for k in METRICS)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def fill(text: str, name: str, body: str) -> str:
    """Replace the block between ``<!-- cifar10:name -->`` and ``<!-- /cifar10:name -->``."""
    return fill_block(text, f"cifar10:{name}", body)


def blocks(docs: Dict[str, Dict[str, Any]], quick: bool) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for exp, doc in docs.items():
        body = budget_line(doc) + "\n\n" + arm_table(doc, BASELINES.get(exp))
        if exp == "claim":
            body += "\n\n" + claim_lines(doc)
        if exp == "dca":
            body += "\n" + gap_closed(doc)
            for control in (n for n in arms(doc) if "SGD lr" in n):
                body += "\n\nAgainst the control (SGD on the plain net at the DCA lr):\n" + gap_lines(doc, control)
        out[exp] = body
    out["tune"] = tune_table(RESULTS / f"cifar10_dca_tune_trials{'_quick' if quick else ''}.csv")
    out["headline"] = headline(docs)
    out["repro"] = repro_block(quick)
    return out


def extra(p) -> None:
    p.add_argument("--repro", nargs=2, type=Path, metavar=("FIRST", "SECOND"),
                   help="runs folders of a result and of its re-run, compared epoch by epoch")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra)
    if args.repro:
        write_result("cifar10_repro", args.quick, compare_runs(*args.repro))
    docs = {exp: d for exp in ("depth", "recipe", "resnet18", "dca", "claim") if (d := load(exp, args.quick))}
    if not docs:
        raise SystemExit("no cifar10_*.json results yet: run cifar10_headline.py first")
    parts = blocks(docs, args.quick)
    if args.quick:
        out = RESULTS / "REPORT_quick.md"
        stand_in = sorted({s for d in docs.values() for s in d.get("stand_in_data", [])})
        note = [f"Quick runs on generated stand-in data ({'; '.join(stand_in)}), not CIFAR-10."] if stand_in else []
        out.write_text("\n\n".join(note + [f"## {k}\n\n{v}" for k, v in parts.items()]) + "\n")
        print(out.read_text())
        return
    for path, names in ((REPORT, list(parts)), (README, ["headline"])):
        text = path.read_text()
        for name in names:
            text = fill(text, name, parts[name])
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
