"""The readings around the CIFAR-10 tables, written from the result files (no number typed by hand).

Every sentence here that quotes a number computes it from a result file (``cifar10_results``), and
every verdict word is chosen by a rule on those numbers: a paired gap is "resolved" only when its
mean is larger than what the seeds can resolve (:func:`cifar10_results.resolution`) and every seed
agrees in sign; two seeds say "no difference larger than about R points detected", never "equal".
``cifar10_report.py`` writes these texts between ``<!-- cifar10:NAME -->`` markers of README.md and
benchmarks/REPORT.md; ``tests/benchmarks/test_cifar10_report.py`` regenerates them and compares.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from cifar10_headline import PLANNED, REPORTED, RUN_GROUP, Plan, budget_group, command, pending
from cifar10_results import (
    LONGER_STEP,
    accs,
    arms,
    fidelity_means,
    longer_step_arm,
    mean_spread,
    paired_gaps,
    resolution,
)

from common import RESULTS

GOAL = 0.88          # the recipe's goal: cifar_resnet20 >= 88% validation accuracy
TRANSIENT = 0.005    # "inside ±0.5 points": the early-lead band of the 60-epoch GPU curves
Docs = Dict[str, Dict[str, Any]]


def pts(x: float, digits: int = 1) -> str:
    return f"{100 * x:+.{digits}f}"


def acc(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}"


@dataclass
class Gap:
    """Paired gaps of one arm against another, what the seeds resolve, and the verdict they allow."""

    gaps: List[float]
    res: float
    digits: int = 1

    @property
    def mean(self) -> float:
        return statistics.mean(self.gaps)

    @property
    def resolved(self) -> bool:
        return abs(self.mean) > self.res and (all(g > 0 for g in self.gaps) or all(g < 0 for g in self.gaps))

    def numbers(self) -> str:
        each = ", ".join(pts(g, self.digits) for g in self.gaps)
        if len(self.gaps) == 1:
            return f"{each} points (one seed)"
        half = 50 * (max(self.gaps) - min(self.gaps))
        return f"{each} points (paired by seed; mean {pts(self.mean, self.digits)} ± {half:.{self.digits}f})"

    def verdict(self) -> str:
        n = len(self.gaps)
        if self.resolved:
            every = {1: "in its one seed", 2: "in both seeds"}.get(n, "in every seed")
            noise = ("test-set noise of one seed (its seed-to-seed spread unknown)" if n == 1
                     else f"resolution of {n} seeds")
            return f"{'ahead' if self.mean > 0 else 'behind'} {every}, beyond the ≈{100 * self.res:.1f}-point {noise}"
        seeds = {1: "one seed detects", 2: "two seeds detect"}.get(n, f"{n} seeds detect")
        return f"{seeds} no difference larger than about {100 * self.res:.1f} points"

    def text(self) -> str:
        return f"{self.numbers()}: {self.verdict()}"


def gap(doc: Dict[str, Any], arm: str, base: str, digits: int = 1) -> Optional[Gap]:
    gaps = paired_gaps(doc, arm, base)
    return Gap(gaps, resolution(doc, arm, base), digits) if gaps else None


def cell(doc: Dict[str, Any], arm: str, digits: int = 1) -> str:
    return mean_spread(accs(arms(doc)[arm]), digits)


def loss(doc: Dict[str, Any], arm: str) -> float:
    return statistics.mean(r["final"]["train_loss"] for r in arms(doc)[arm])


def where(doc: Dict[str, Any], arm: str) -> str:
    """The machine and precision an arm's runs trained on, from their result rows."""
    runs = arms(doc)[arm]
    device = "; ".join(sorted({r.get("device_name", "?") for r in runs}))
    amp = {r["final"].get("amp") for r in runs}
    return f"{device}, {'bfloat16 autocast' if amp == {True} else 'fp32' if amp == {False} else 'precision mixed'}"


# -- the goal and the depth study ----------------------------------------------------------------

def goal(docs: Docs) -> str:
    """The >= 88% goal for cifar_resnet20 at both recipes, with where each ran (the comparison's confound)."""
    depth, recipe = docs.get("depth"), docs.get("recipe")
    if not depth or not recipe or "cifar_resnet20" not in arms(recipe):
        return "The goal, `cifar_resnet20` ≥ 88% validation: no result yet at both recipes."
    at40, at60 = accs(arms(depth)["cifar_resnet20"]), accs(arms(recipe)["cifar_resnet20"])
    met = all(a >= GOAL for a in at60)
    same = where(depth, "cifar_resnet20") == where(recipe, "cifar_resnet20")
    text = (f"The goal set for the depth recipe, `cifar_resnet20` ≥ {acc(GOAL, 0)}% validation, is "
            f"{'met' if all(a >= GOAL for a in at40) else 'missed'} at its {depth['budget']['epochs']} epochs "
            f"({mean_spread(at40)}; {where(depth, 'cifar_resnet20')}) and {'met' if met else 'missed'} by the same "
            f"recipe with label smoothing {recipe['budget']['recipe'].get('label_smoothing')} over "
            f"{recipe['budget']['epochs']} epochs ({mean_spread(at60)}, per seed "
            f"{', '.join(acc(a) for a in at60)}; {where(recipe, 'cifar_resnet20')}).")
    if not same:
        text += (" The two recipes ran on different machines at different precisions, so the difference between "
                 "them mixes the recipe (more epochs, label smoothing) with the machine and precision: it is "
                 "confounded, and only the goal itself (the 60-epoch runs' own accuracy) is measured cleanly; the "
                 "depth study's arms at the 60-epoch recipe on one machine (not yet run, below) would separate them.")
    return text


def depth_reading(doc: Dict[str, Any]) -> str:
    epochs, seeds = doc["budget"]["epochs"], ", ".join(str(s) for s in doc["budget"]["seeds"])
    out = [f"**Reading** ({epochs} epochs, full split, seeds {seeds} where the table shows them)."]
    deg = gap(doc, "cifar_plainnet56", "cifar_plainnet20")
    if deg:
        worse = deg.resolved and deg.mean < 0
        out.append(f"- **Plain-56 < plain-20 (He et al.'s degradation): {'reproduced' if worse else 'not resolved'}.** "
                   f"{cell(doc, 'cifar_plainnet56')} against {cell(doc, 'cifar_plainnet20')}; plain-56 − plain-20: "
                   f"{deg.text()}. Final training loss {loss(doc, 'cifar_plainnet56'):.2f} against "
                   f"{loss(doc, 'cifar_plainnet20'):.2f}: an optimisation failure, not over-fitting.")
    res = gap(doc, "cifar_resnet56", "cifar_resnet20")
    if res:
        better = res.resolved and res.mean > 0
        out.append(f"- **ResNet-56 > ResNet-20: {'consistent with He et al.' if better else 'not resolved'}** at this "
                   f"budget: {cell(doc, 'cifar_resnet56')} against {cell(doc, 'cifar_resnet20')}; ResNet-56 − "
                   f"ResNet-20: {res.text()}.")
    parts = [f"NegNet-{d} − ResNet-{d}: {g.text()}" for d in (20, 56)
             if (g := gap(doc, f"cifar_negnet{d}", f"cifar_resnet{d}"))]
    if parts:
        act = f"; the authors' act-before-add ResNet-20: {cell(doc, 'cifar_actresnet20')}" \
            if "cifar_actresnet20" in arms(doc) else ""
        out.append("- **NegNet against ResNet (paper 000):** " + "; ".join(parts) + act + ".")
    grad = gap(doc, "cifar_gradnet56", "cifar_plainnet56")
    if grad:
        out.append(f"- **The shortcut gradient alone (gradnet vs plain):** `cifar_gradnet56` (plain forward, ResNet "
                   f"backward) {cell(doc, 'cifar_gradnet56')} against plain SGD's {cell(doc, 'cifar_plainnet56')} "
                   f"(gradnet − plain: {grad.numbers()}), final training loss {loss(doc, 'cifar_gradnet56'):.2f}: the "
                   "shortcut network's gradient is a poor descent direction for the network actually evaluated, the "
                   "measured reason behind the deep-network question in "
                   "[docs/decompositions.md](../docs/decompositions.md).")
    return "\n".join(out)


def recipe_reading(docs: Docs) -> str:
    doc = docs["recipe"]
    groups = arms(doc)
    out = [f"**Reading.** {goal(docs)}"]
    if "cifar_resnet20" in groups:
        best = ", ".join(acc(r["final"]["best_val_acc"]) for r in groups["cifar_resnet20"])
        train = [r["final"]["train_acc"] for r in groups["cifar_resnet20"]]
        out.append(f"Best epochs of `cifar_resnet20`: {best}. The two changes (more epochs, label smoothing) were made "
                   f"together, so the report does not split their effects. Training accuracy ends at "
                   f"{acc(min(train))}–{acc(max(train))}%; the reported training loss includes the smoothing term, so "
                   "it is not comparable with the other tables'.")
    g = gap(doc, "cifar_negnet20", "cifar_resnet20")
    if g:
        out.append(f"\n**NegNet-20 at this recipe (paper 000's claim):** NegNet-20 − ResNet-20: {g.text()} "
                   f"(NegNet-20 {where(doc, 'cifar_negnet20')}; ResNet-20 {where(doc, 'cifar_resnet20')}).")
    return "\n".join(out)


def resnet18_reading(doc: Dict[str, Any]) -> str:
    b = doc["budget"]
    out = [f"**Reading.** The paper claims parity at the end of a full schedule (200 epochs); at {b['epochs']} "
           f"epochs over {b['limit']:,} images, NegNet18 against both ResNet18 baselines:"]
    for base, name in (("cifar_resnet18", "timm's post-activation ResNet18"),
                       ("cifar_actresnet18", "the authors' act-before-add ResNet18")):
        if (g := gap(doc, "cifar_negnet18", base)):
            out.append(f"- NegNet18 − {name}: {g.text()}; final training loss {loss(doc, 'cifar_negnet18'):.2f} "
                       f"against {loss(doc, base):.2f}.")
    if (g := gap(doc, "cifar_actresnet18", "cifar_resnet18")):
        part = ("a share of NegNet's early lead comes from where the activation sits" if g.resolved else
                "consistent with a share of NegNet's early lead coming from where the activation sits, not resolved")
        out.append(f"- act-before-add − post-activation ResNet18: {g.text()}: {part}.")
    bases = [b for b in ("cifar_resnet18", "cifar_actresnet18") if b in arms(doc)]
    if "cifar_negnet18" in arms(doc) and all(loss(doc, "cifar_negnet18") < loss(doc, b) for b in bases):
        out.append("NegNet18's training loss is lower too, so its lead is faster early training, not a validation "
                   "artefact.")
    out.append("What this budget can say is about the first epochs only; whether the nets meet at convergence is "
               "§3b's 60-epoch run.")
    return "\n".join(out)


# -- ResNet18 vs NegNet18 on the GPU -------------------------------------------------------------

ARM18 = {"cifar_resnet18": "timm's post-activation block", "cifar_actresnet18": "authors' act-before-add ResNet",
         "cifar_negnet18": "NegNet18"}


def inside_band_from(doc: Dict[str, Any], arm: str, base: str, band: float = TRANSIENT) -> Optional[int]:
    """The first epoch from which |arm − base| stays inside ``band`` in every seed (None: never)."""
    groups, last = arms(doc), 0
    base_hist = {r["seed"]: r["history"] for r in groups[base]}
    for r in groups[arm]:
        gaps = [h["val_acc"] - b["val_acc"] for h, b in zip(r["history"], base_hist[r["seed"]])]
        outside = [i + 1 for i, g in enumerate(gaps) if abs(g) > band + 1e-9]
        last = max(last, max(outside, default=0))
    n = min(len(r["history"]) for r in groups[arm])
    return last + 1 if last < n else None


def epoch_gaps(doc: Dict[str, Any], arm: str, base: str, epoch: int) -> str:
    groups = arms(doc)
    base_acc = {r["seed"]: r["history"][epoch - 1]["val_acc"] for r in groups[base]}
    return " / ".join(pts(r["history"][epoch - 1]["val_acc"] - base_acc[r["seed"]]) for r in groups[arm])


def gpu18(doc: Dict[str, Any]) -> str:
    """Set-up, table and reading of the 60-epoch GPU run (``cifar10_gpu_resnet18.json``)."""
    b, m = doc["budget"], doc["machine"]
    secs = statistics.median(h["epoch_seconds"] for r in doc["runs"] for h in r["history"])
    setup = (f"Run once on one {m['gpu']} lent for this check (torch {m['torch']}, Ray {m['ray']}): {doc['command']}; "
             f"the three arms as trials sharing the GPU ({b['sharing']}), {secs:.1f} s per epoch (median over every "
             f"run's epochs). Recipe: {b['recipe_text']}; {b['precision']}; {doc['data']}, "
             f"split seed {b['split_seed']}, "
             f"{b['epochs']} epochs. Result file and curves: `benchmarks/results/cifar10_gpu_resnet18.{{json,png}}`. "
             f"**Provenance:** {doc['provenance']}")
    seeds = " / ".join(f"seed {s}" for s in b["seeds"])
    rows = [f"| arm | final val acc %, {seeds} | mean ± half range | best epoch val acc % |", "|---|---|---:|---|"]
    groups = arms(doc)
    for name in [n for n in ARM18 if n in groups] + [n for n in groups if n not in ARM18]:
        runs = groups[name]
        rows.append(f"| {name} ({ARM18.get(name, '')}) | {' / '.join(acc(a, 2) for a in accs(runs))} | "
                    f"{mean_spread(accs(runs), 2)} | {' / '.join(acc(r['final']['best_val_acc'], 2) for r in runs)} |")
    out = [setup, "\n".join(rows)]
    res, act = gap(doc, "cifar_negnet18", "cifar_resnet18", 2), gap(doc, "cifar_negnet18", "cifar_actresnet18", 2)
    if res and act:
        band = inside_band_from(doc, "cifar_negnet18", "cifar_resnet18")
        share = 100 * b["epochs"] / 200
        out.append(f"**Reading ({b['epochs']} epochs, {len(res.gaps)} seeds).** NegNet18 − ResNet18: {res.text()}: "
                   f"consistent with paper 000's parity claim at {share:.0f}% of its 200-epoch budget, which is as "
                   f"far as two seeds go. NegNet18 − act-before-add ResNet18: {act.text()}. The early lead is "
                   f"transient: NegNet18 − ResNet18 is {epoch_gaps(doc, 'cifar_negnet18', 'cifar_resnet18', 1)} "
                   f"points after epoch 1 and {epoch_gaps(doc, 'cifar_negnet18', 'cifar_resnet18', 10)} at epoch 10 "
                   f"(seed {' / '.join(str(s) for s in b['seeds'])}), and "
                   + (f"inside ±{100 * TRANSIENT:.1f} points in every seed from epoch {band} on" if band else
                      f"never inside ±{100 * TRANSIENT:.1f} points for good")
                   + " (the figure).")
    return "\n\n".join(out)


# -- DCA on plain-56 ---------------------------------------------------------------------------

def dca_reading(docs: Docs) -> str:
    doc = docs["dca"]
    b, groups = doc["budget"], arms(doc)
    control = next((n for n in groups if "SGD lr" in n), None)
    folder = budget_group("dca", b["epochs"], b["limit"])
    shared = [e for e, g in RUN_GROUP.items() if g == RUN_GROUP["dca"] and e != "dca"]
    out = [f"The SGD arms `cifar_plainnet56` and `cifar_resnet56` are the runs of the folder `{folder}`, which "
           f"the dca experiment shares with the {' and '.join(shared)} experiment at the same budget "
           f"({b['epochs']} epochs over {b['limit']:,} images, the recipe of this table's budget line), trained "
           f"once for both; they are not the {REPORTED['depth'][0]}-epoch runs of §2. The DCA arms use "
           + (f"the searched lr = 1/λ = {b['dca_lr']:.3g}" if b.get("dca_lr") else
              f"the recipe's lr = 1/λ = {b['recipe']['lr']:.3g} (no searched lr was given)")
           + f" and ρ = {(b.get('dca_kwargs') or {}).get('rho', 0):.2g}"
           + ("; some arms ran one seed (the table says which)." if any(len(r) == 1 for r in groups.values()) else ".")
           + (" The last arm is the control: momentum SGD on the same plain net at the DCA arms' lr."
              if control else "")]
    if control and "cifar_plainnet56 + dcacounter" in groups:
        g = gap(doc, "cifar_plainnet56 + dcacounter", control)
        quasi = {n.split(" + ")[1]: q for n in groups if n.startswith("cifar_plainnet56 + dcaquasi")
                 and (q := gap(doc, n, control))}
        others = [f"`{n}` {q.numbers()}" for n, q in quasi.items()]
        inside = g is not None and all(abs(q.mean) < g.res for q in quasi.values())
        reach = gap(doc, "cifar_plainnet56 + dcacounter", "cifar_resnet56")
        cost = (statistics.mean(r["wall_seconds"] for r in groups["cifar_plainnet56 + dcacounter"])
                / statistics.mean(r["wall_seconds"] for r in groups[control]))
        if g:
            out.append(f"\n**Reading.** At equal epochs `dcacounter` lifts plain-56 off chance (final training loss "
                       f"{loss(doc, 'cifar_plainnet56 + dcacounter'):.2f} against "
                       f"{loss(doc, 'cifar_plainnet56'):.2f}), and so does SGD on the same net at the same lr: "
                       f"dcacounter − control {g.text()}.")
        out.append(f"The quasi-DC variants against the control: {'; '.join(others)}: "
                   + ("inside what dcacounter's own paired gaps resolve, so no decomposition is distinguished from "
                      "SGD here. " if inside else "outside what dcacounter's own paired gaps resolve. ")
                   +
                   f"Against SGD on ResNet-56: dcacounter − ResNet-56 {reach.numbers() if reach else 'not paired'}. "
                   "The claim \"DCA + vanilla network = SGD + shortcut network\" is therefore **not** supported at "
                   f"this budget. A dcacounter run (then `c=\"skip\"`, the closure path) took {cost:.1f}× the "
                   f"control's wall time; {step_cost()}. Three epochs may be too few for a second-order effect of "
                   "the decomposition to show, and the search itself could not separate its trials (above).")
    return "\n".join(out)


def step_ratio() -> str:
    """‖a + βc‖/‖a‖ of eq. 19 (ρ = 0) on plain-56 as the deep-fidelity study measured it, per state."""
    import json

    path = RESULTS / "deep_fidelity.json"
    study = json.loads(path.read_text()).get("studies", {}).get("56") if path.exists() else None
    if not study:
        return ""
    parts = [f"{statistics.mean(b['lengths']['dcacounter'] for b in s['batches']):.2f} {s['state']}"
             for s in study["states"] if all("lengths" in b for b in s["batches"])]
    return f"; the deep-fidelity study measured {' and '.join(parts)} on its batches" if parts else ""


def step_cost() -> str:
    import json

    path = RESULTS / "dca_step_cost.json"
    if not path.exists():
        return "the step cost is measured by `benchmarks/dca_step_cost.py`"
    ratio = json.loads(path.read_text())["ratio_vs_sgd"]["dcacounter eq. 19 (plain loop)"]
    return f"eq. 19's exact step costs {ratio:.2f}× an SGD step in a plain loop (`benchmarks/dca_step_cost.py`)"


def claim_reading(doc: Dict[str, Any]) -> str:
    groups = arms(doc)
    b = doc["budget"]
    plain, dca, dca0 = "cifar_plainnet56", "cifar_plainnet56 + dcacounter", "cifar_plainnet56 + dcacounter m0"
    longer = longer_step_arm(groups)
    out = [f"**Reading ({b['epochs']} epochs; {where(doc, dca)}).** Eq. 19's formula here runs at ρ = 0, where G₂ "
           "is not convex: the arm tests the paper's step, not a DCA iteration with its guarantees."]
    pairs = ((dca0, "cifar_resnet56 + SGD m0", "momentum 0"), (dca, "cifar_resnet56", "momentum 0.9"))
    shortcut = [f"at {m}, eq. 19 − ResNet-56 {g.numbers()}" for a, r, m in pairs if (g := gap(doc, a, r))]
    if shortcut:
        out.append("- **Against SGD on the shortcut net: not reproduced.** At the same lr and momentum, plain-56 with "
                   "eq. 19 ends far below ResNet-56 trained with SGD: " + "; ".join(shortcut) + ".")
    g0, gl, g9 = gap(doc, dca0, "cifar_plainnet56 + SGD m0"), gap(doc, dca0, longer), gap(doc, dca, plain)
    if g0 and gl and longer != LONGER_STEP:
        ratio = groups[longer][0]["lr"] / b["recipe"]["lr"]
        head = ("no gain from the decomposition detected" if not gl.resolved else "a gain beyond the step length")
        out.append(f"- **Against SGD on the same plain net: {head}.** At momentum 0, eq. 19 − SGD at the same lr: "
                   f"{g0.text()}; but eq. 19's step is longer than SGD's (the control runs SGD at {ratio:.2f}× the lr, "
                   f"the ratio ‖a + βc‖/‖a‖ of eq. 19's step to SGD's at the start of training{step_ratio()}), and "
                   f"eq. 19 − SGD at that step length: {gl.text()}"
                   + (": consistent with the gain being the longer step." if not gl.resolved else ".")
                   + (f" At momentum 0.9: eq. 19 − SGD {g9.text()}." if g9 else ""))
    fid = [(n, fidelity_means(groups[n])) for n in (dca0, dca, "cifar_plainnet56 + SGD m0", plain) if n in groups]
    fid = [(n, f) for n, f in fid if f]
    if fid:
        cells = "; ".join(f"{n.replace('cifar_plainnet56', 'plain-56')}: step {f[0]:.3f}, SGD's gradient at the same "
                          f"weights {f[1]:.3f}, layer3 step {f[2]:.3f}" for n, f in fid)
        out.append(f"- **Fidelity curve** (cosine with the gradnet gradient, mean over the measured steps and seeds): "
                   f"{cells}. The one-block counter loss pulls the step toward the shortcut gradient on the skipped "
                   "block's stage (`layer3`) and not on the whole net.")
    if (g := gap(doc, "cifar_gradnet56", plain)):
        out.append(f"- The shortcut gradient on the plain forward (`cifar_gradnet56`, SGD momentum 0.9) against plain "
                   f"SGD: {g.numbers()}, as at 40 epochs in §2.")
    return "\n".join(out)


def missing_note(doc: Dict[str, Any]) -> str:
    """Why the claim table has missing rows, with the seed-0 gaps that make them affordable to skip."""
    if not doc.get("missing"):
        return ""
    gaps = [g.mean for a, r in (("cifar_plainnet56 + dcacounter m0", "cifar_resnet56 + SGD m0"),
                                ("cifar_plainnet56 + dcacounter", "cifar_resnet56"))
            if (g := gap(doc, a, r))]
    size = f" (their seed-0 gaps to eq. 19's arms: {', '.join(pts(g) for g in gaps)} points)" if gaps else ""
    return (f"The missing seed-1 runs of the shortcut nets were left out to fit the session{size}; they are listed "
            "with their commands under \"Arms not yet run\".")


# -- the arms not yet run -----------------------------------------------------------------------

def estimate_minutes(plan: Plan, arm_name: str, model: str, device: str) -> Optional[float]:
    """Wall minutes of one run of ``arm_name`` at the plan's budget on ``device`` ("cuda"/"cpu"), scaled
    from finished runs: the same arm on that device, else the model's SGD run there times the arm's cost
    over SGD's measured on the other device."""
    import json

    def walls(name: str, on: str) -> List[float]:
        found = []
        for path in (RESULTS / "cifar10_runs").glob(f"*/{name}-s*.json"):
            r = json.loads(path.read_text())
            if str(r["final"].get("device", "cpu")).startswith(on):
                epochs = len(r["curves"]["val_acc"])
                found.append(r["wall_seconds"] / epochs * plan.epochs / 60)
        return found

    own = walls(arm_name, device)
    if own:
        return statistics.mean(own)
    sgd = walls(f"{model}-momentum", device)
    other = "cpu" if device == "cuda" else "cuda"
    ratio_num, ratio_den = walls(arm_name, other), walls(f"{model}-momentum", other)
    if sgd and ratio_num and ratio_den:
        return statistics.mean(sgd) * statistics.mean(ratio_num) / statistics.mean(ratio_den)
    return None


def pending_block() -> str:
    """Every planned arm (``cifar10_headline.PLANNED``) without its result files, with its command."""
    out = []
    for plan in PLANNED:
        todo = pending(plan)
        if not todo:
            continue
        device = plan.device
        lines = []
        for arm, seeds in todo:
            mins = estimate_minutes(plan, arm.name, arm.model, device)
            on = "the H100 of the depth study" if device == "cuda" else "the CPU"
            est = f"  # ~{mins:.0f} min per run on {on}" if mins else ""
            lines.append(command(plan, arm, seeds) + est)
        n = sum(len(s) for _, s in todo)
        out.append(f"- {plan.why}: {n} run{'s' if n > 1 else ''} ({'GPU' if device == 'cuda' else 'CPU'}; estimates "
                   "scaled from the finished runs' wall times)\n\n<!-- docs-test: skip: trains CIFAR-10 runs of "
                   "minutes to hours (GPU or the CIFAR-10 tar) -->\n```bash\n" + "\n".join(lines) + "\n```")
    if not out:
        return "Every planned arm has its result file."
    return ("**Arms not yet run** (generated from the planned budgets and the per-run result files under "
            "`benchmarks/results/cifar10_runs/`): each command trains one arm, resumes if interrupted and "
            "writes each run's result file as soon as the run ends; `python benchmarks/cifar10_report.py "
            "--collect` then builds the tables from whatever has finished.\n\n" + "\n\n".join(out))


# -- the README's verdicts ------------------------------------------------------------------------

def _pair(doc: Optional[Dict[str, Any]], arm: str, base: str, digits: int = 1) -> Optional[Gap]:
    return gap(doc, arm, base, digits) if doc and arm in arms(doc) and base in arms(doc) else None


def verdicts(docs: Docs, gpu: Optional[Dict[str, Any]]) -> str:
    """The README's verdict list, each a paired comparison with what its seeds can resolve."""
    depth, recipe, claim, dca = (docs.get(k) for k in ("depth", "recipe", "claim", "dca"))
    out = ["Verdicts (validation accuracy on the 5,000 held-out images; a gap is \"resolved\" when every seed agrees "
           "in sign and its mean exceeds the larger of twice its binomial standard error (test-set noise) and twice "
           "its standard error from the seeds' own spread; details in the report):"]
    if depth:
        deg = _pair(depth, "cifar_plainnet56", "cifar_plainnet20")
        res = _pair(depth, "cifar_resnet56", "cifar_resnet20")
        said = {"plain-56 − plain-20": (deg, "the degradation problem is reproduced" if deg and deg.resolved
                                        and deg.mean < 0 else "not resolved"),
                "ResNet-56 − ResNet-20": (res, "consistent with He et al." if res and res.resolved and res.mean > 0
                                          else "not resolved")}
        out.append("- **Depth (He et al.):** " + "; ".join(f"{name}: {g.text()} ({word})"
                                                          for name, (g, word) in said.items() if g) + ".")
    parity = [(f"{d} layers, {depth['budget']['epochs']} epochs", _pair(depth, f"cifar_negnet{d}", f"cifar_resnet{d}"))
              for d in (20, 56)] if depth else []
    if recipe:
        parity.append((f"20 layers at the {recipe['budget']['epochs']}-epoch recipe",
                       _pair(recipe, "cifar_negnet20", "cifar_resnet20")))
    if gpu:
        parity.append((f"18 layers, {gpu['budget']['epochs']} epochs on the GPU",
                       _pair(gpu, "cifar_negnet18", "cifar_resnet18", 2)))
        parity.append(("18 layers against the act-before-add ResNet18",
                       _pair(gpu, "cifar_negnet18", "cifar_actresnet18", 2)))
    found = [(n, g) for n, g in parity if g]
    if found:
        resolved = [n for n, g in found if g.resolved]
        tail = (f" Resolved differences: {', '.join(resolved)}." if resolved else
                " No difference resolved: consistent with paper 000's parity at these budgets, as far as these "
                "seeds go.")
        out.append("- **NegNet − ResNet (paper 000):** " + "; ".join(f"{n}: {g.text()}" for n, g in found) + "." + tail)
    if depth and (g := _pair(depth, "cifar_gradnet56", "cifar_plainnet56")):
        out.append(f"- **The shortcut gradient alone:** `cifar_gradnet56` {cell(depth, 'cifar_gradnet56')} against "
                   f"plain SGD's {cell(depth, 'cifar_plainnet56')} (gradnet − plain: {g.numbers()}).")
    if claim:
        out.append("- **DCA on plain-56** (" + claim_summary(claim) + ")" + dca_summary(dca) + ".")
    out.append(f"- **The ≥ {acc(GOAL, 0)}% goal:** {goal(docs)}")
    return "\n".join(out)


def claim_summary(doc: Dict[str, Any]) -> str:
    groups, b = arms(doc), doc["budget"]
    dca, dca0 = "cifar_plainnet56 + dcacounter", "cifar_plainnet56 + dcacounter m0"
    images = "all training" if b["limit"] is None else f"{b['limit']:,}"
    parts = [f"eq. 19 at ρ = 0, not a DCA step since G₂ is then not convex; {b['epochs']} epochs over {images} "
             f"images, {where(doc, dca)}): "]
    items = [("at momentum 0, eq. 19 − SGD at the same lr", _pair(doc, dca0, "cifar_plainnet56 + SGD m0")),
             ("− SGD at eq. 19's longer step", _pair(doc, dca0, longer_step_arm(groups))),
             ("at momentum 0.9, eq. 19 − SGD", _pair(doc, dca, "cifar_plainnet56"))]
    parts.append("; ".join(f"{n} {g.text()}" for n, g in items if g))
    reach = [(m, g) for a, r, m in ((dca0, "cifar_resnet56 + SGD m0", "momentum 0"), (dca, "cifar_resnet56", "0.9"))
             if (g := _pair(doc, a, r))]
    if reach:
        parts.append("; against SGD on ResNet-56 " + " and ".join(f"{g.numbers()} ({m})" for m, g in reach)
                     + ": \"DCA + vanilla = SGD + shortcut\" is **not** supported at this budget, and the gain over "
                       "SGD on the plain net is consistent with eq. 19's longer step")
    return "".join(parts)


def dca_summary(doc: Optional[Dict[str, Any]]) -> str:
    if not doc:
        return ""
    control = next((n for n in arms(doc) if "SGD lr" in n), None)
    g = _pair(doc, "cifar_plainnet56 + dcacounter", control) if control else None
    if not g:
        return ""
    b = doc["budget"]
    return (f"; at its searched lr ({b['epochs']} epochs over {b['limit']:,} images), dcacounter − SGD at the same "
            f"lr {g.text()}")
