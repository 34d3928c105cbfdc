"""Tables and readings of the CIFAR-10 headline reproduction, generated from its result files.

Reads ``results/cifar10_{depth,recipe,resnet18,dca,claim}.json`` (written by ``cifar10_headline.py``),
``results/cifar10_claim_e40.json`` when the claim has run at 40 epochs, ``results/cifar10_gpu_resnet18.json``
and, if present, ``results/cifar10_dca_tune_trials.csv`` (the ``trials.csv`` of the
``tune_configs/dca_rho_lambda.yaml`` search), and rewrites the generated parts of
``benchmarks/REPORT.md`` and README.md (between ``<!-- cifar10:NAME -->`` markers): the tables, and
the readings around them with their verdicts (``cifar10_prose.py``), so every number in those parts
comes from a result file and none is typed by hand (``tests/benchmarks/test_cifar10_report.py``
regenerates them and compares). ``--collect`` first rebuilds each planned experiment's result file
from whichever per-run files exist (``cifar10_headline.py --collect``), so the tables show whatever
has finished. ``--quick`` reads the quick results and writes ``results/REPORT_quick.md`` instead.
``--repro FIRST SECOND`` compares every run of the runs folder SECOND (a re-run of some of the
same commands) with its namesake in FIRST and writes ``results/cifar10_repro.json`` first.
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List

import cifar10_headline
import cifar10_prose as prose
from cifar10_results import (
    LONGER_STEP,
    accs,
    arms,
    fidelity_means,
    gpu_resnet18,
    load,
    load_budget,
    longer_step_arm,
    mean_spread,
    paired_gaps,
)

from common import RESULTS, fill_block, parse_args, write_result

HERE = Path(__file__).resolve().parent
REPORT, README = HERE / "REPORT.md", HERE.parent / "README.md"
MIN_GAP = 0.02  # a "share of the gap closed" needs a gap well above validation noise (~0.7 points)
# gaps are measured against these
BASELINES = {"resnet18": "cifar_resnet18", "dca": "cifar_plainnet56", "recipe": "cifar_resnet20"}
# the claim's comparisons (arm, against): DCA against SGD on the same plain net, then against SGD on
# the shortcut nets, each at the same momentum; arms missing from the result file are left out.
CLAIM_PAIRS = [("cifar_plainnet56 + dcacounter m0", "cifar_plainnet56 + SGD m0"),
               ("cifar_plainnet56 + dcacounter m0", LONGER_STEP),
               ("cifar_plainnet56 + dcacounter", "cifar_plainnet56"),
               ("cifar_plainnet56 + dcacounter m0", "cifar_resnet56 + SGD m0"),
               ("cifar_plainnet56 + dcacounter", "cifar_resnet56"),
               ("cifar_plainnet56 + dcacounter", "cifar_gradnet56"),
               ("cifar_gradnet56", "cifar_plainnet56")]


def arm_table(doc: Dict[str, Any], baseline: str | None = None) -> str:
    """One row per arm; a "trained on" column when the table's runs come from more than one machine."""
    fid = any(r.get("fidelity") for r in doc["runs"])
    mixed = len({r.get("device_name") for r in doc["runs"]}) > 1
    fid_head, fid_rule = (" cos with gradnet grad: step / SGD grad (layer3: step) |", "---:|") if fid else ("", "")
    dev_head, dev_rule = (" trained on |", "---|") if mixed else ("", "")
    rows = ["| arm | params | val acc % per seed | val acc % (mean ± half range) | final train loss "
            "| images/s | data share | wall min/run |" + fid_head + dev_head,
            "|---|---:|---|---:|---:|---:|---:|---:|" + fid_rule + dev_rule]
    for name, runs in arms(doc).items():
        per_seed = ", ".join(f"s{r['seed']}: {100 * r['final']['val_acc']:.1f}" for r in runs)
        loss = statistics.mean(r["final"]["train_loss"] for r in runs)
        ips = statistics.mean(r["images_per_s"] for r in runs)
        share = statistics.mean(r["data_share"] for r in runs)
        wall = statistics.mean(r["wall_seconds"] for r in runs) / 60
        rows.append(f"| {name} | {runs[0]['final']['num_params'] / 1e6:.2f}M | {per_seed} | "
                    f"{mean_spread(accs(runs))} | {loss:.3f} | {ips:.0f} | {100 * share:.1f}% | {wall:.1f} |"
                    + (f" {fidelity_cell(runs)} |" if fid else "")
                    + (f" {prose.where(doc, name)} |" if mixed else ""))
    rows += [f"| {name} | | missing (not trained yet) | | | | | |" + (" |" if fid else "") + (" |" if mixed else "")
             for name in doc.get("missing", [])]
    table = "\n".join(rows)
    if baseline:
        table += "\n\n" + gap_lines(doc, baseline)
    return table


def fidelity_cell(runs: List[Dict[str, Any]]) -> str:
    means = fidelity_means(runs)
    return "–" if means is None else f"{means[0]:.3f} / {means[1]:.3f} ({means[2]:.3f})"


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
            "recipe": ["cifar_plainnet20", "cifar_plainnet56", "cifar_resnet20", "cifar_resnet56",
                       "cifar_negnet20", "cifar_negnet56", "cifar_actresnet20", "cifar_gradnet56"],
            "resnet18": ["cifar_resnet18", "cifar_actresnet18", "cifar_negnet18"],
            "dca": ["cifar_plainnet56 + dcacounter", "cifar_plainnet56 + dcaquasihalf",
                    "cifar_plainnet56 + dcaquasineghalf"]}
    control = [n for n in arms(docs["dca"]) if "SGD lr" in n] if "dca" in docs else []
    want["dca"] += control
    longer = longer_step_arm(arms(docs["claim"])) if "claim" in docs else LONGER_STEP
    want["claim"] = ["cifar_plainnet56 + dcacounter m0", "cifar_plainnet56 + SGD m0", longer, "cifar_resnet56 + SGD m0",
                     "cifar_plainnet56 + dcacounter", "cifar_plainnet56", "cifar_resnet56", "cifar_gradnet56"]
    claims = {"depth": "plain-56 < plain-20; ResNet-56 > ResNet-20; NegNet?",
              "recipe": "the depth study at the 60-epoch + label-smoothing recipe (goal: ResNet-20 ≥ 88%)",
              "resnet18": "NegNet18 on par with ResNet18 (paper 000's claim)",
              "dca": "DCA + plain net = SGD + shortcut net",
              "claim": "DCA + plain net = SGD + shortcut net, one lr for every arm (eq. 19, momentum 0 / 0.9)"}
    for exp, names in want.items():
        doc = docs.get(exp)
        if exp == "resnet18" and (gpu := gpu_row()):
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


def gpu_row() -> str | None:
    """The 18-layer row from the GPU run of ``tune_configs/negnet18_cifar10_gpu.yaml`` (the larger budget)."""
    doc = gpu_resnet18()
    if doc is None:
        return None
    cells = "; ".join(f"{m.replace('cifar_', '')} {mean_spread(accs(runs))}" for m, runs in arms(doc).items())
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
    """Every generated part: the tables (by experiment), the readings and verdicts, the pending arms."""
    out: Dict[str, str] = {}
    for exp, doc in docs.items():
        body = budget_line(doc) + "\n\n" + arm_table(doc, BASELINES.get(exp))
        if exp.startswith("claim"):
            body += "\n\n" + claim_lines(doc)
        if exp == "dca":
            body += "\n" + gap_closed(doc)
            for control in (n for n in arms(doc) if "SGD lr" in n):
                body += "\n\nAgainst the control (SGD on the plain net at the DCA lr):\n" + gap_lines(doc, control)
        out[exp] = body
    out["tune"] = tune_table(RESULTS / f"cifar10_dca_tune_trials{'_quick' if quick else ''}.csv")
    out["headline"] = headline(docs)
    out["repro"] = repro_block(quick)
    out.update(readings(docs, quick))
    return out


# the experiment whose result file each reading needs
READINGS = {"depth_reading": "depth", "recipe_reading": "recipe", "resnet18_reading": "resnet18",
            "dca_reading": "dca", "claim_reading": "claim", "claim_missing": "claim", "goal": "recipe"}


def readings(docs: Dict[str, Dict[str, Any]], quick: bool) -> Dict[str, str]:
    """The prose parts (``cifar10_prose``) whose result files exist; the README's verdicts and GPU section,
    the 40-epoch claim's table or its absence, and the arms not yet run."""
    make = {"depth_reading": lambda: prose.depth_reading(docs["depth"]),
            "recipe_reading": lambda: prose.recipe_reading(docs),
            "resnet18_reading": lambda: prose.resnet18_reading(docs["resnet18"]),
            "dca_reading": lambda: prose.dca_reading(docs),
            "claim_reading": lambda: prose.claim_reading(docs["claim"]),
            "claim_missing": lambda: prose.missing_note(docs["claim"]), "goal": lambda: prose.goal(docs)}
    out = {name: fn() for name, fn in make.items() if READINGS[name] in docs}
    if quick:
        return out
    gpu = gpu_resnet18()
    if gpu:
        out["gpu18"] = prose.gpu18(gpu)
    out["verdicts"] = prose.verdicts(docs, gpu)
    if "claim_e40" not in docs:
        out["claim_e40"] = "Not run yet: the commands are under \"Arms not yet run\" below."
    out["pending"] = prose.pending_block()
    return out


def extra(p) -> None:
    p.add_argument("--repro", nargs=2, type=Path, metavar=("FIRST", "SECOND"),
                   help="runs folders of a result and of its re-run, compared epoch by epoch")
    p.add_argument("--collect", action="store_true",
                   help="first rebuild each planned experiment's result file from its per-run files "
                        "(cifar10_headline.py --collect), so the tables show whatever has finished")


def collect_all() -> None:
    """``cifar10_headline.py --collect`` for every reported and planned budget that has per-run files."""
    budgets = {(e, ep) for e, (ep, limit) in cifar10_headline.REPORTED.items() if limit is None}
    budgets |= {(p.experiment, p.epochs) for p in cifar10_headline.PLANNED}
    for exp, epochs in sorted(budgets):
        if cifar10_headline.run_file(exp, epochs, None, "x").parent.is_dir():
            cifar10_headline.main(["--collect", "--experiment", exp, "--epochs", str(epochs)])


def load_docs(quick: bool) -> Dict[str, Dict[str, Any]]:
    """The result files the report tabulates, by table name (``claim_e40``: the claim at 40 epochs)."""
    docs = {exp: d for exp in ("depth", "recipe", "resnet18", "dca", "claim") if (d := load(exp, quick))}
    if not quick and (e40 := load_budget("claim", 40)):
        docs["claim_e40"] = e40
    return docs


def write_pages(parts: Dict[str, str]) -> None:
    """Fill every marker each page has (README.md: the headline, verdicts, GPU section, pending arms)."""
    for path in (REPORT, README):
        text = path.read_text()
        for name, body in parts.items():
            if f"<!-- cifar10:{name} -->" in text:
                text = fill(text, name, body)
        path.write_text(text)
        print(f"wrote {path}")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra)
    if args.repro:
        write_result("cifar10_repro", args.quick, compare_runs(*args.repro))
    if args.collect and not args.quick:
        collect_all()
    docs = load_docs(args.quick)
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
    write_pages(parts)


if __name__ == "__main__":
    main()
