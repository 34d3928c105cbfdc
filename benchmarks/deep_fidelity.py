"""The deep-network question: can a counter-loss direction reach the shortcut network's gradient?

On ``cifar_plainnet<depth>`` and real CIFAR-10 batches, ``dcanets.analysis.deep_fidelity.measure``
builds the generalisations of paper 000's counter loss as directions (every single-block skip,
every skipped span, quasi-DC at every block, their rank-one-model Newton steps, and the one
counter loss that mixes every block at α = ½, L'^{all}_{½}, exact and linearised), the
least-squares upper bound of each family's span, and the split of the gradnet gradient by path
class, and gives each one's cosine with the gradient of ``cifar_gradnet<depth>`` (whole net and per
stage) and its step length ‖d‖/‖a‖. The exact (true-Hessian) Newton step of eq. 12 is measured by
conjugate gradients on a smaller batch, with ρ just above the one that makes G2 convex on it
(Lanczos). At initialisation and after a short SGD warm start; means ± half range over the batches.

    python benchmarks/deep_fidelity.py --full                 # cifar_plainnet20 and 56, batch 128, CIFAR-10
    python benchmarks/deep_fidelity.py --full --depths 56     # one depth, merged into the result file
    python benchmarks/deep_fidelity.py --quick                # cifar_plainnet20, batch 16 (CI)

The result file is written after every state of every depth (``complete: false`` until a depth has
all its states), so a long run leaves what it measured; ``--depths`` runs some depths and keeps the
others' results from the file when the budget is the same. Full mode writes
``results/deep_fidelity.json`` and the generated tables of docs/decompositions.md (between
``<!-- fidelity:deep -->`` markers) and the README's row; ``--render`` redoes them from the result
file without measuring.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (  # noqa: E402
    RESULTS,
    cifar_images,
    data_label,
    fill_block,
    parse_args,
    progress,
    seeded_batches,
    warm_start,
    write_result,
)

NAME = "deep_fidelity"
DOC = Path(__file__).resolve().parents[1] / "docs" / "decompositions.md"
README = Path(__file__).resolve().parents[1] / "README.md"
FULL = dict(depths=[20, 56], batch=128, counts={"init": 3, "warm": 2}, warm_steps=30, images=4096,
            cg=dict(batch=32, lanczos=12, iters=8, margin=1.1))
QUICK = dict(depths=[20], batch=16, counts={"init": 2, "warm": 1}, warm_steps=2, images=64,
             cg=dict(batch=8, lanczos=3, iters=2, margin=1.1))
WARM = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)   # the warm start of fidelity_table.py
RHOS = (0.0, 1.0)     # ridge ρ/(2κ) = r·‖a‖² for the rank-one-model steps
BOUNDS = {
    "best_single_whole": "(e) best in span{a, c_k}, one coefficient per vector",
    "best_single_stage": "(e) best in span{a, c_k}, coefficients per stage",
    "best_single_group": "(e) best in span{a, c_k}, coefficients per block",
    "best_span_whole": "(e) best in span{a, c_{k,m}}, one coefficient per vector",
    "best_span_stage": "(e) best in span{a, c_{k,m}}, coefficients per stage",
    "best_span_group": "(e) best in span{a, c_{k,m}}, coefficients per block",
    "transfer_single": "(e) span{a, c_k} coefficients fitted on another batch",
    "transfer_span": "(e) span{a, c_{k,m}} coefficients fitted on another batch",
}
CLASSES = {
    "skips_le_0": "paths skipping no block (= a)",
    "skips_le_1": "paths skipping ≤ 1 block (= a + Σ_k c_k)",
    "skips_le_2": "paths skipping ≤ 2 blocks",
    "skips_le_3": "paths skipping ≤ 3 blocks",
    "runs_le_1": "paths skipping ≤ 1 contiguous run (= a + Σ_{k,m} c_{k,m})",
}


def labels() -> Dict[str, Tuple[str, str]]:
    """Row key -> (what, DC status), in table order."""
    from dcanets.analysis.deep_fidelity import ALL_BLOCK, DIRECTIONS, RHO_DEPENDENT

    out: Dict[str, Tuple[str, str]] = {}
    for key, (what, status) in DIRECTIONS.items():
        out[key] = (what, status)
        if key in RHO_DEPENDENT:
            out[f"{key}@rho=1"] = (what.replace("ρ = 0", "ρ/(2κ) = ‖a‖²"), status)
    out.update(ALL_BLOCK)
    out["newton_cg"] = ("(d) exact Newton step of eq. 12's G2 (true Hessian, CG), ρ/2 = 1.1·(−λ_min)",
                        "G2 convex on this batch (Lanczos ρ); H2 not checked")
    out.update({k: (v, "upper bound: fitted to this batch's g_ref") for k, v in BOUNDS.items()
                if not k.startswith("transfer")})
    out.update({k: (v, "fixed coefficients: fitted to another batch's g_ref") for k, v in BOUNDS.items()
                if k.startswith("transfer")})
    out.update({k: (v, "path class of g_ref") for k, v in CLASSES.items()})
    return out


def measure_batch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[Dict[str, Any], Any]:
    from dcanets.analysis.deep_fidelity import measure

    t0 = time.perf_counter()
    m = measure(model, x, y, rhos=RHOS)
    row = dict(cosines=m.cosines, lengths=m.lengths, shares=m.shares, diagnostics=m.diagnostics,
               seconds=round(time.perf_counter() - t0, 1))
    return row, m


def transfers(measurements: List[Any]) -> List[Dict[str, Dict[str, float]]]:
    """Coefficients of batch i's projections applied to batch j's vectors, every ordered pair i ≠ j."""
    from dcanets.analysis.deep_fidelity import transfer

    out = []
    for i, mi in enumerate(measurements):
        for j, mj in enumerate(measurements):
            if i != j:
                singles = mj.grams.sub([0] + [1 + mj.spans.index((k, 1)) for k in range(int(mj.diagnostics["blocks"]))])
                out.append({"transfer_single": transfer(mi.coef["single"], singles),
                            "transfer_span": transfer(mi.coef["span"], mj.grams)})
    return out


def exact_newton(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Eq. 12's exact Newton step on (x, y) with ρ/2 = margin·(−λ_min(∇²G₀)) (Lanczos), and its cosines."""
    from dcanets.analysis.deep_fidelity import Grams, g2_operator, newton_cg
    from dcanets.analysis.paths import gradnet_vector, record
    from dcanets.hessian import lanczos

    t0 = time.perf_counter()
    chain = record(model, x, y)
    ref = gradnet_vector(chain)
    matvec = g2_operator(model, x, y, chain.layout)
    ritz, _ = lanczos(matvec, chain.layout.numel, steps=cfg["lanczos"])
    rho = 2 * cfg["margin"] * max(0.0, -float(ritz[0]))
    result = newton_cg(matvec, chain.a, rho, cfg["iters"])
    grams = Grams.of(torch.stack([chain.a, result.step]), ref, chain.layout)
    return dict(lam_min=float(ritz[0]), lam_max=float(ritz[-1]), rho=rho, iters=result.iters,
                negative_curvature=result.negative_curvature, batch=len(y),
                cosines={"newton_cg": grams.cosines(torch.tensor([0.0, 1.0], dtype=torch.float64)),
                         "sgd": grams.cosines(torch.tensor([1.0, 0.0], dtype=torch.float64))},
                seconds=round(time.perf_counter() - t0, 1))


def run_state(model: torch.nn.Module, data: Iterator[Tuple[torch.Tensor, torch.Tensor]], count: int,
              budget: Dict[str, Any], state: str) -> Dict[str, Any]:
    rows, kept = [], []
    for b in range(count):
        x, y = next(data)
        row, m = measure_batch(model, x, y)
        progress(f"{NAME}: {state} batch {b}: whole-net best in span {row['cosines']['best_span_whole']['whole']:.3f}"
                 f" ({row['seconds']:.0f} s)")
        rows.append(row)
        kept.append(m)
        if b == 0:
            cg = exact_newton(model, x[:budget["cg"]["batch"]], y[:budget["cg"]["batch"]], budget["cg"])
            progress(f"{NAME}: {state} exact Newton: rho {cg['rho']:.3g}, cos {cg['cosines']['newton_cg']['whole']:.3f}"
                     f" ({cg['seconds']:.0f} s)")
    return dict(state=state, batches=rows, transfer=transfers(kept), newton_cg=cg)


# -- tables -------------------------------------------------------------------------------------

def stage_values(state: Dict[str, Any], key: str) -> Dict[str, List[float]]:
    """stage -> the values over batches (or transfer pairs, or the CG batch) of one row."""
    if key == "newton_cg":
        sources = [state["newton_cg"]["cosines"]["newton_cg"]]
    elif key.startswith("transfer_"):
        sources = [t[key] for t in state["transfer"]]
    else:
        sources = [b["cosines"][key] for b in state["batches"] if key in b["cosines"]]
    out: Dict[str, List[float]] = {}
    for src in sources:
        for stage, v in src.items():
            if v is not None and v == v:
                out.setdefault(stage, []).append(v)
    return out


def cell(xs: Sequence[float]) -> str:
    if not xs:
        return "–"
    return f"{statistics.fmean(xs):.3f}" + (f" ± {(max(xs) - min(xs)) / 2:.3f}" if len(xs) > 1 else "")


def length_values(state: Dict[str, Any], key: str) -> List[float]:
    """‖d‖/‖a‖ of one row over the batches (rows measured before lengths were recorded: none)."""
    return [b["lengths"][key] for b in state["batches"] if key in b.get("lengths", {})]


def cosine_table(study: Dict[str, Any]) -> str:
    """One depth's table: whole-net cosines per state, per-stage cosines at init, step lengths per state."""
    states = study["states"]
    stages = ["stem", "layer1", "layer2", "layer3"]
    head = ("| direction | DC? | " + " | ".join(f"whole ({s['state']})" for s in states) + " | "
            + " | ".join(f"{st} (init)" for st in stages) + " | "
            + " | ".join(f"‖d‖/‖a‖ ({s['state']})" for s in states) + " |")
    lines = [head, "|---|---|" + "---:|" * (2 * len(states) + len(stages))]
    for key, (what, status) in labels().items():
        per_state = [stage_values(s, key) for s in states]
        if not any(per_state):
            continue
        cells = ([cell(v.get("whole", [])) for v in per_state] + [cell(per_state[0].get(st, [])) for st in stages]
                 + [cell(length_values(s, key)) for s in states])
        lines.append(f"| {what} | {status} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def share_table(study: Dict[str, Any]) -> str:
    keys = list(study["states"][0]["batches"][0]["shares"])
    lines = ["| state | " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for s in study["states"]:
        cells = [cell([b["shares"][k] for b in s["batches"]]) for k in keys]
        lines.append(f"| {s['state']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def norm_line(study: Dict[str, Any]) -> str:
    parts = []
    for s in study["states"]:
        d = [b["diagnostics"] for b in s["batches"]]
        ratio = statistics.fmean(x["ref_norm"] / x["a_norm"] for x in d)
        stages = ", ".join(f"{k[len('ref_share_'):]} {statistics.fmean(x[k] for x in d):.2f}"
                           for k in d[0] if k.startswith("ref_share_"))
        parts.append(f"{s['state']}: ‖g_ref‖/‖a‖ = {ratio:.3g}; share of ‖g_ref‖ per stage {stages}")
    return "; ".join(parts)


def newton_line(study: Dict[str, Any]) -> str:
    out = []
    for s in study["states"]:
        n = s["newton_cg"]
        out.append(f"{s['state']}: batch {n['batch']}, Ritz values of ∇²G₀ (G₀ = L + ½L'_{{−1}}) in "
                   f"[{n['lam_min']:.3g}, {n['lam_max']:.3g}], ρ = {n['rho']:.3g}, {n['iters']} CG steps"
                   f"{' (stopped at negative curvature)' if n['negative_curvature'] else ''}, cos "
                   f"{n['cosines']['newton_cg']['whole']:.3f} against SGD's {n['cosines']['sgd']['whole']:.3f} on the "
                   f"same batch")
    return "; ".join(out)


def stage_sizes(depth: int) -> Dict[str, int]:
    """Parameters per stage of cifar_plainnet<depth> (built, not run)."""
    import timm

    import dcanets  # noqa: F401  (registers the models)
    from dcanets.engine.fidelity import stage_names

    model = timm.create_model(f"cifar_plainnet{depth}", num_classes=10)
    stage_of, sizes = stage_names(model), {}
    for name, p in model.named_parameters():
        sizes[stage_of[name]] = sizes.get(stage_of[name], 0) + p.numel()
    return sizes


def chance_line(study: Dict[str, Any]) -> str:
    """sqrt(min(n, D)/D): the cosine of a vector's projection onto n random directions in D dimensions,
    the level a span of n vectors reaches in a stage of D parameters by counting alone."""
    n = int(study["states"][0]["batches"][0]["diagnostics"]["vectors"])
    sizes = stage_sizes(study["depth"])
    return ", ".join(f"{s} ({d:,} parameters) {min(1.0, n / d) ** 0.5:.2f}" for s, d in sizes.items()
                     if s != "head")


# the directions built from single-span counter losses (DIRECTIONS of dcanets.analysis.deep_fidelity)
SINGLE_SPAN = ["sgd", "dcacounter", "single_sum", "single_eq19", "single_newton", "span_sum", "span_top",
               "span_newton", "quasi_sum", "quasi_newton"]
ALL_BLOCK_BAR = 0.5   # the whole-net cosine at depth 56 that would make L'^{all}_{1/2} worth a training arm


def whole_mean(state: Dict[str, Any], key: str) -> float:
    return statistics.fmean(stage_values(state, key).get("whole", [float("nan")]))


def all_block_verdict(doc: Dict[str, Any]) -> Dict[str, Any]:
    """The all-block rows against the bar, per depth and state: the better exact form's whole-net cosine,
    the best single-span counter-loss direction beside it, and whether the deepest study clears the bar."""
    out: Dict[str, Any] = {"bar": ALL_BLOCK_BAR, "depths": {}}
    for depth, study in sorted(doc["studies"].items(), key=lambda kv: int(kv[0])):
        rows = {}
        for s in study["states"]:
            exact = {k: whole_mean(s, k) for k in ("allhalf_exact", "allhalf_exact_rescaled")}
            single = {k: whole_mean(s, k) for k in SINGLE_SPAN + [f"{k}@rho=1" for k in SINGLE_SPAN]
                      if stage_values(s, k)}
            best = max(single, key=lambda k: single[k])
            rows[s["state"]] = dict(exact=exact, best_single_span=best, best_single_span_cos=single[best])
        out["depths"][depth] = rows
    deepest = max(doc["studies"], key=int)
    out["clears_at_depth"] = deepest
    out["clears"] = bool(out["depths"][deepest]) and all(
        max(r["exact"].values()) >= ALL_BLOCK_BAR for r in out["depths"][deepest].values())
    return out


def readme_cell(doc: Dict[str, Any]) -> str:
    deepest = max(doc["studies"], key=int)
    init = doc["studies"][deepest]["states"][0]
    best = max(SINGLE_SPAN, key=lambda k: whole_mean(init, k))
    bound = stage_values(init, "best_span_group")
    deep = {s: statistics.fmean(bound[s]) for s in ("layer2", "layer3")}
    verdict = ("no counter-loss combination reaches 0.9 there" if max(deep.values()) < 0.9
               else "the family's span reaches 0.9 in every stage")
    cell_text = (f"plain{deepest} at init: best single-span counter-loss direction cos {whole_mean(init, best):.2f}; "
                 f"span bound {statistics.fmean(bound['whole']):.2f} whole net (stem-dominated) but "
                 f"{deep['layer2']:.2f} in layer2 and {deep['layer3']:.2f} in layer3: {verdict}")
    if stage_values(init, "allhalf_exact"):
        v = all_block_verdict(doc)
        exact = v["depths"][deepest]["init"]["exact"]
        cell_text += (f"; the all-block counter loss L'^{{all}}_{{1/2}}: cos {exact['allhalf_exact']:.2f} "
                      f"(block-rescaled {exact['allhalf_exact_rescaled']:.2f}), "
                      + ("clears" if v["clears"] else "below") + f" the {ALL_BLOCK_BAR} bar")
    return cell_text


def study_block(doc: Dict[str, Any], study: Dict[str, Any]) -> str:
    b = doc["budget"]
    data = "generated stand-in images" if doc.get("stand_in_data") else "CIFAR-10 training images"
    counts = ", ".join(f"{k} {v}" for k, v in b["counts"].items())
    first = study["states"][0]["batches"][0]["diagnostics"]
    done = "" if study.get("complete", True) else " (incomplete: the states below are those measured so far)"
    budget = (f"**cifar_plainnet{study['depth']}**{done}: {first['blocks']} blocks, {first['vectors']} vectors "
              f"a, c_{{k,m}}, seed {doc['seed']}, {data}, "
              f"batch {b['batch']}, batches per state: {counts} (warm: after {b['warm_steps']} SGD steps); "
              f"mean ± half range over the batches (transfer: over ordered pairs of batches); "
              f"{study['seconds']:.0f} s on 1 thread.")
    return "\n\n".join([budget, cosine_table(study),
                        "Share ‖class‖/‖g_ref‖ of the gradnet gradient's path classes (skips n: paths skipping "
                        "exactly n blocks, the last column n or more; runs r: exactly r contiguous skipped runs, "
                        "the last column r or more):", share_table(study),
                        "Scale: " + norm_line(study) + ".",
                        f"Chance level of a span of {first['vectors']} vectors, sqrt(min(n, D)/D) per stage: "
                        + chance_line(study) + ".",
                        "Exact Newton step: " + newton_line(study) + "."])


def verdict_line(doc: Dict[str, Any]) -> str:
    """The all-block rows against the bar, in words generated from the result file."""
    v = all_block_verdict(doc)
    parts = []
    for depth, rows in v["depths"].items():
        for state, r in rows.items():
            parts.append(f"depth {depth} {state}: exact {r['exact']['allhalf_exact']:.3f}, block-rescaled "
                         f"{r['exact']['allhalf_exact_rescaled']:.3f} (best single-span direction "
                         f"{r['best_single_span_cos']:.3f})")
    outcome = ("clears" if v["clears"] else "does not clear")
    return (f"All-block counter loss L'^{{all}}_{{½}}, whole-net cosine with g_ref: {'; '.join(parts)}. At depth "
            f"{v['clears_at_depth']} it {outcome} the bar of {v['bar']} set for a training arm (in every state, "
            f"the better of the two exact forms).")


def doc_block(doc: Dict[str, Any]) -> str:
    cmd = "`python benchmarks/deep_fidelity.py --full`"
    studies = sorted(doc["studies"].values(), key=lambda st: -int(st["depth"]))
    blocks = [study_block(doc, st) for st in studies]
    head = [cmd + ": " + ", ".join(f"cifar_plainnet{st['depth']}" for st in studies) + "."]
    if any(stage_values(st["states"][0], "allhalf_exact") for st in studies):
        head.append(verdict_line(doc))
    return "\n\n".join(head + blocks)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra)
    if args.render:
        render(RESULTS / f"{NAME}.json")
        return
    import dcanets  # noqa: F401  (registers the models)

    mode = QUICK if args.quick else FULL
    budget = {k: v for k, v in mode.items() if k != "depths"}
    depths = args.depths or mode["depths"]
    data_path, x, y = cifar_images(args, budget["images"])
    path = args.out or RESULTS / f"{NAME}{'_quick' if args.quick else ''}.json"
    head = dict(budget=budget, data=data_label(data_path), seed=args.seed, rhos=RHOS)
    studies = kept_studies(path, head, depths)

    def save(study: Dict[str, Any]) -> None:
        studies[str(study["depth"])] = study
        write_result(NAME, args.quick, dict(head, studies=studies), path)

    for depth in depths:
        run_depth(depth, x, y, budget, args.seed, save)
    if args.quick:
        for study in studies.values():
            print(cosine_table(study))
    else:
        render(path)


def kept_studies(path: Path, head: Dict[str, Any], depths: Sequence[int]) -> Dict[str, Any]:
    """The other depths' studies of an existing result file with the same budget, data, seed and ρ
    (a file of another budget is never mixed in: it stops with one line)."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    if "studies" not in old:
        return {}
    if any(old.get(k) != v for k, v in json.loads(json.dumps(head)).items()):
        raise SystemExit(f"{path} holds another budget; pass --out for this one, or remove the file")
    return {d: st for d, st in old["studies"].items() if int(d) not in depths}


def run_depth(depth: int, x: torch.Tensor, y: torch.Tensor, budget: Dict[str, Any], seed: int,
              save: Callable[[Dict[str, Any]], None]) -> None:
    """One depth's states on a fresh seeded model and batch stream; ``save`` gets the study after every
    state (``complete`` once all are measured)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(f"cifar_plainnet{depth}", num_classes=10)
    data = seeded_batches(x, y, budget["batch"], seed)
    t0 = time.perf_counter()
    states: List[Dict[str, Any]] = []
    for state, count in budget["counts"].items():
        if state == "warm":
            warm_start(model, data, budget["warm_steps"], WARM)
        states.append(run_state(model, data, count, budget, state))
        save(dict(depth=depth, states=states, seconds=round(time.perf_counter() - t0, 1),
                  complete=len(states) == len(budget["counts"])))


def extra(parser: Any) -> None:
    parser.add_argument("--data", default=None, help="CIFAR-10 training tar (default: the shared copy)")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the page's tables from results/deep_fidelity.json")
    parser.add_argument("--depths", type=int, nargs="+", default=None,
                        help="cifar_plainnet depths to measure (default: the mode's; others kept from the file)")


def render(path: Path) -> None:
    """The generated block of docs/decompositions.md from a full result file."""
    doc = json.loads(path.read_text())
    DOC.write_text(fill_block(DOC.read_text(), "fidelity:deep", doc_block(doc)))
    README.write_text(fill_block(README.read_text(), "fidelity:deep", readme_cell(doc), inline=True))
    print(f"wrote {DOC} and {README}")


if __name__ == "__main__":
    main()
