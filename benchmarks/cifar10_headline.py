"""Paper 000's headline on CIFAR-10: NegNet vs ResNet vs plain, and DCA on plain networks.

Three experiments, each one command, all through the one training engine
(``dcanets.engine.train``) on the CIFAR-10 training tar, split 45k/5k with a fixed seed
(selection on validation only), pad-4 crop + flip, per-channel normalization:

* ``depth``: He et al. 2015 protocol at a short budget: cifar_{plainnet,resnet,negnet,actresnet}20
  and cifar_{plainnet,resnet,negnet,gradnet}56; momentum SGD lr 0.1, wd 5e-4, 1 warm-up epoch,
  cosine, 40 epochs, the same for every arm (REPORT.md says how close cifar_resnet20 comes to 88%).
* ``recipe``: the depth study's arms with the depth recipe plus label smoothing 0.1, the recipe for
  the >= 88% goal (cifar_resnet20) at a longer budget (``--epochs``, 60 in the report).
* ``resnet18``: the 3x3-stem 18-layer nets with the authors' recipe (lr 0.1, momentum 0.9,
  wd 5e-4, cosine, batch 128): cifar_negnet18 against both ResNet baselines (timm's
  post-activation cifar_resnet18 and the authors' act-before-add cifar_actresnet18).
* ``dca``: cifar_plainnet56 with dcacounter / dcaquasihalf / dcaquasineghalf against SGD on
  cifar_plainnet56 and cifar_resnet56 (``--dca-kwargs`` carries the searched rho/lam).
* ``claim``: "DCA on the plain net = SGD on the shortcut net" at one lr for every arm (the depth
  recipe's): eq. 19's step (dcacounter, rho 0) and SGD on cifar_plainnet56, each with momentum 0
  and 0.9, against SGD on cifar_resnet56 (momentum 0.9 and 0) and cifar_gradnet56; the plain-56
  arms record their direction fidelity (cosine of the step with the gradnet twin's gradient) every
  20 steps, plotted as ``cifar10_claim_fidelity.png``.

Every run checkpoints each epoch under ``--runs`` (git-ignored), so re-running the same command
resumes unfinished runs and skips finished ones. Each finished run writes its own result file,
``results/cifar10_runs/<group>/<run>.json`` (commit it as soon as it exists: runs span sessions
and machines), and ``--collect`` builds the experiment's JSON and PNG from whichever of those
files exist, listing the arms still missing; the JSON and PNG in benchmarks/results/ are also
rewritten after every experiment that trains (``--out results/_pilot.json`` writes
``results/cifar10_<experiment>_pilot.json`` + ``.png`` instead). The result file of the budget the
report tabulates (:data:`REPORTED`) is ``cifar10_<experiment>.json``; any other budget writes
``cifar10_<experiment>_e<epochs>[_n<limit>].json``, so it never overwrites it. ``--only NAME`` with
an arm's exact name runs one arm (one GPU job per arm), and ``--pending`` prints, for each arm and
seed of the budget with no result file yet, the command that runs it (:data:`PLANNED`: the arms
the report lists as not yet run). ``--quick`` (CI): 128 training
images, 2 epochs, one seed; without ``../shared/data/cifar10/train.tar`` (and no ``--data``) it
trains on a generated CIFAR-like stand-in.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from common import (
    RESULTS,
    benchmark_data,
    data_label,
    figure_path,
    is_stand_in,
    parse_args,
    progress,
    shared_data,
    write_result,
)

if TYPE_CHECKING:
    from dcanets.engine import TrainConfig

SGD = dict(opt="momentum", lr=0.1, momentum=0.9, sched="cosine", batch_size=128)
# depth and dca share one recipe (He et al.'s SGD at lr 0.1 with wd 5e-4, which suits a 40-epoch
# cosine budget better than their 1e-4 over 164 epochs, and one warm-up epoch so the 56-layer
# plain net can start at lr 0.1); resnet18 is the authors' recipe as published, without warm-up.
DEPTH = dict(SGD, weight_decay=5e-4, warmup_epochs=1)
# the candidate for the >= 88% goal: the depth recipe plus label smoothing 0.1, over more epochs (the
# depth recipe's ResNet-20 ends at 94.5% training accuracy after 40: short of fitting, not overfitting)
RECIPE = dict(DEPTH, label_smoothing=0.1)
RECIPES = {"depth": DEPTH, "resnet18": dict(SGD, weight_decay=5e-4), "dca": DEPTH, "claim": DEPTH, "recipe": RECIPE}
# folder of each experiment's runs: the dca experiment's SGD arms *are* the depth study's
# plain56/resnet56 runs (same recipe and budget), so they are trained once
RUN_GROUP = {"depth": "depth", "dca": "depth", "resnet18": "resnet18", "claim": "claim", "recipe": "recipe"}
# eq. 19's step on plain-56 is this many times SGD's at the same lr without momentum (‖a + βc‖/‖a‖,
# the "len" column of `dcanets fidelity --model cifar_plainnet56 --opt dcacounter --lr 0.1`, steps
# 0-60 on CIFAR-10: 1.20-1.26): the claim's last arm is SGD at that longer step, so that a gain of
# eq. 19 at momentum 0 cannot be a longer step in disguise
DCA_STEP_LENGTH = 1.22
FIDELITY_EVERY = 20
CLAIM_DCA_KWARGS = {"beta_policy": "clamp"}  # eq. 19 with rho = 0; beta > beta_max is clamped, not fatal
DCA_OPTS = ("dcacounter", "dcaquasihalf", "dcaquasineghalf")
# (epochs, limit) of the runs each experiment's result file cifar10_<experiment>.json tabulates
REPORTED = {"depth": (40, None), "recipe": (60, None), "claim": (3, None), "resnet18": (2, 10000), "dca": (3, 10000)}


@dataclass(frozen=True)
class Plan:
    """Runs the report lists until they exist: ``experiment`` at ``epochs`` over ``seeds``, why, and the
    device kind they are meant for (``"cuda"`` or ``"cpu"``: where their time is estimated)."""

    experiment: str
    epochs: int
    seeds: Tuple[int, ...]
    why: str
    device: str


# the arms that wait (REPORT.md and README.md list them, with these commands, until their result files exist)
PLANNED = [
    Plan("depth", 40, (0, 1), "the depth study's second seeds (the 56-layer arms ran one seed)", "cuda"),
    Plan("recipe", 60, (0, 1), "the depth study at the 60-epoch + label-smoothing recipe (one recipe for every arm)",
         "cuda"),
    Plan("claim", 40, (0, 1), "the DCA claim at the depth study's 40 epochs", "cuda"),
    Plan("claim", 3, (0, 1), "seed-1 runs of the claim's shortcut nets at the CPU budget", "cpu"),
]


@dataclass(frozen=True)
class Arm:
    """One arm of an experiment: ``model`` trained with the experiment's ``recipe``, ``opt`` in place
    of the recipe's optimizer (None: the recipe's own), and ``overrides`` on top (lr, momentum,
    opt_kwargs, fidelity_every).

    Both of its names are made here, from what it changes in the recipe (optimizer, lr, momentum):
    :attr:`name`, of its runs' folders and result files (``<name>-s<seed>``), and :attr:`label`, its
    name in the report's tables and in the legends. A result row gives its arm back
    (:meth:`of_run`), so the report groups rows by the same label.
    """

    model: str
    opt: Optional[str]
    overrides: Mapping[str, Any]
    recipe: Mapping[str, Any]

    @classmethod
    def of_run(cls, run: Mapping[str, Any], recipe: Mapping[str, Any]) -> "Arm":
        """The arm of a finished run: a result file's row (model, opt, lr and, in newer files, momentum)."""
        return cls(run["model"], run["opt"], {k: run[k] for k in ("lr", "momentum") if k in run}, recipe)

    @property
    def optimizer(self) -> str:
        return self.opt or self.recipe["opt"]

    def config(self) -> Dict[str, Any]:
        """The training fields of the arm's runs: the recipe, the optimizer, the overrides."""
        return {**self.recipe, "opt": self.optimizer, **self.overrides}

    def _changes(self) -> Tuple[Optional[float], Optional[float]]:
        """(lr, momentum), each None where the arm keeps the recipe's; another optimizer's lr is not
        shown (the DCA arms' lr is the experiment's budget, not part of their name)."""
        own = self.optimizer == self.recipe["opt"]
        lr = self.overrides.get("lr", self.recipe["lr"])
        momentum = self.overrides.get("momentum", self.recipe.get("momentum", 0.9))
        return (lr if own and lr != self.recipe["lr"] else None,
                momentum if momentum != self.recipe.get("momentum", 0.9) else None)

    @property
    def name(self) -> str:
        """``<model>-<optimizer>[-lr<lr>][-m<momentum>]``, e.g. ``cifar_plainnet56-momentum-lr0.122-m0``."""
        lr, momentum = self._changes()
        return (f"{self.model}-{self.optimizer}" + ("" if lr is None else f"-lr{lr:.3g}")
                + ("" if momentum is None else f"-m{momentum:g}"))

    @property
    def label(self) -> str:
        """The model for the recipe's SGD; + optimizer for another one; + lr for SGD at another lr (the
        control); + m<momentum> where the momentum is not the recipe's."""
        lr, momentum = self._changes()
        tag = "" if momentum is None else f" m{momentum:g}"
        if self.optimizer != self.recipe["opt"]:
            return f"{self.model} + {self.optimizer}{tag}"
        if lr is not None:
            return f"{self.model} + SGD lr {lr:.3g}{tag}"
        return f"{self.model} + SGD{tag}" if tag else self.model


def experiment_arms(experiment: str, dca_lr: Optional[float] = None,
                    dca_kwargs: Optional[Mapping[str, Any]] = None) -> List[Arm]:
    """The arms of ``experiment``, in table order. ``dca_lr`` (None: the recipe's) and ``dca_kwargs``
    are the searched lr and options of the dca experiment's DCA arms."""
    recipe = RECIPES[experiment]

    def arm(model: str, opt: Optional[str] = None, **overrides: Any) -> Arm:
        return Arm(model, opt, overrides, recipe)

    if experiment == "depth":
        return ([arm(f"cifar_{f}20") for f in ("plainnet", "resnet", "negnet", "actresnet")]
                + [arm(f"cifar_{f}56") for f in ("plainnet", "resnet", "negnet", "gradnet")])
    if experiment == "resnet18":
        return [arm("cifar_resnet18"), arm("cifar_actresnet18"), arm("cifar_negnet18")]
    if experiment == "recipe":  # the depth study's arms at the recipe of the 88% goal (cifar_resnet20)
        return ([arm(f"cifar_{f}20") for f in ("plainnet", "resnet", "negnet", "actresnet")]
                + [arm(f"cifar_{f}56") for f in ("plainnet", "resnet", "negnet", "gradnet")])
    if experiment == "dca":
        lr = {"lr": dca_lr} if dca_lr else {}
        arms = [arm("cifar_plainnet56"), arm("cifar_resnet56")]
        arms += [arm("cifar_plainnet56", opt, opt_kwargs=dict(dca_kwargs or {}), **lr) for opt in DCA_OPTS]
        if dca_lr and dca_lr != recipe["lr"]:  # (SGD at the recipe's lr is the plain arm itself)
            # the control a reviewer asks for: SGD on the plain net at the DCA arms' (searched) lr, so a
            # DCA gain cannot be a smaller learning rate in disguise
            arms.append(arm("cifar_plainnet56", **lr))
        return arms
    if experiment == "claim":
        # "DCA on the plain net = SGD on the shortcut net", tested at one lr (the recipe's) for every
        # arm: eq. 19's step (dcacounter) and SGD on cifar_plainnet56, each with momentum 0 (the paper's
        # plain iteration) and 0.9 (acting on d exactly as SGD's on the gradient), against SGD on the
        # two shortcut nets; the plain-56 arms record their direction fidelity every FIDELITY_EVERY steps
        def plain(opt: Optional[str] = None, **overrides: Any) -> Arm:
            if opt:
                overrides["opt_kwargs"] = dict(CLAIM_DCA_KWARGS)
            return arm("cifar_plainnet56", opt, fidelity_every=FIDELITY_EVERY, **overrides)

        return [plain(), plain(momentum=0.0), plain("dcacounter"), plain("dcacounter", momentum=0.0),
                arm("cifar_resnet56"), arm("cifar_gradnet56"), arm("cifar_resnet56", momentum=0.0),
                plain(momentum=0.0, lr=SGD["lr"] * DCA_STEP_LENGTH)]
    raise ValueError(f"unknown experiment '{experiment}'; known: {', '.join(sorted(RECIPES))}")


def extra(p: argparse.ArgumentParser) -> None:
    from dcanets.validation import kv_argument

    p.add_argument("--experiment", choices=sorted(RECIPES), nargs="+", default=sorted(RECIPES))
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--collect", action="store_true",
                   help="train nothing: build the result file from the per-run result files of the command's "
                        "budget (arms run with fewer seeds appear with the seeds they have, absent arms as missing)")
    p.add_argument("--pending", action="store_true",
                   help="train nothing: print the command of every arm whose runs at this budget have no result file")
    p.add_argument("--only", nargs="+", default=["*"], metavar="PATTERN",
                   help="train only runs whose name (model-opt) matches, e.g. '*dcacounter' "
                        "(to split one experiment over processes; the result file is written by an unfiltered call)")
    p.add_argument("--limit", type=int, default=None, help="at most this many training images")
    p.add_argument("--val-limit", type=int, default=5000, help="validation images (the whole 5k by default)")
    p.add_argument("--data", default=None, help="image-folder tar/dir (default: ../shared/data/cifar10/train.tar)")
    p.add_argument("--eval-data", default=None, help="held-out image-folder tar/dir, evaluated at the end")
    p.add_argument("--runs", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "cifar10",
                   help="checkpoints, one folder per run (never committed)")
    p.add_argument("--dca-kwargs", type=kv_argument, default={"rho": 0.005},
                   help="opt_kwargs of the DCA arms, e.g. 'rho=0.004' (from dca_rho_lambda.yaml)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (an engine speed switch; results agree within float "
                        "tolerance)")
    p.add_argument("--dca-lr", type=float, default=None, help="lr (= 1/lambda) of the DCA arms (default: the recipe's)")


def run_config(args: argparse.Namespace, experiment: str, arm: Arm, seed: int) -> TrainConfig:
    from dcanets.engine import TrainConfig

    return TrainConfig(model=arm.model, data=args.data, eval_data=args.eval_data, val_fraction=0.1, split_seed=0,
                       limit=args.limit, val_limit=args.val_limit, epochs=args.epochs, seed=seed,
                       compile=args.compile, output=str(args.runs / group(args, experiment) / f"{arm.name}-s{seed}"),
                       **arm.config())


def group(args: argparse.Namespace, experiment: str) -> str:
    """Runs of one group and budget share a folder (checkpoints and result files alike)."""
    return budget_group(experiment, args.epochs, args.limit)


def budget_group(experiment: str, epochs: int, limit: Optional[int]) -> str:
    return f"{RUN_GROUP[experiment]}-e{epochs}" + (f"-n{limit}" if limit else "")


def result_name(experiment: str, epochs: int, limit: Optional[int]) -> str:
    """``cifar10_<experiment>`` for the budget the report tabulates (:data:`REPORTED`), else with the budget."""
    if REPORTED.get(experiment) == (epochs, limit):
        return f"cifar10_{experiment}"
    return f"cifar10_{experiment}_e{epochs}" + (f"_n{limit}" if limit else "")


def run_file(experiment: str, epochs: int, limit: Optional[int], run: str, quick: bool = False) -> Path:
    """A run's own result file: one folder per experiment group and budget, one file per run."""
    folder = RESULTS / f"cifar10_runs{'_quick' if quick else ''}"
    return folder / budget_group(experiment, epochs, limit) / f"{run}.json"


def pending(plan: Plan, quick: bool = False) -> List[Tuple[Arm, List[int]]]:
    """The arms of ``plan`` with the seeds that have no result file yet."""
    out = []
    for arm in experiment_arms(plan.experiment):
        seeds = [s for s in plan.seeds if not run_file(plan.experiment, plan.epochs, None, f"{arm.name}-s{s}",
                                                       quick).exists()]
        if seeds:
            out.append((arm, seeds))
    return out


def command(plan: Plan, arm: Arm, seeds: List[int]) -> str:
    """The command that trains ``arm`` at the plan's budget for ``seeds`` (one process; resumable)."""
    return (f"python benchmarks/cifar10_headline.py --experiment {plan.experiment} --epochs {plan.epochs} "
            f"--seeds {' '.join(map(str, seeds))} --only {arm.name}")


def finished(cfg: TrainConfig) -> bool:
    record = Path(cfg.output) / "metrics.json"
    return record.exists() and json.loads(record.read_text())["final"]["epoch"] >= cfg.epochs


def result_path(args: argparse.Namespace, experiment: str, cfg: TrainConfig) -> Path:
    """The run's own result file (:func:`run_file`)."""
    return run_file(experiment, args.epochs, args.limit, Path(cfg.output).name, args.quick)


def one_run(cfg: TrainConfig, result: Path, quick: bool) -> Dict[str, Any]:
    """Train (or resume, or just read) one run, then write its result file."""
    out = Path(cfg.output)
    record = out / "metrics.json"
    if record.exists():
        _same_budget(json.loads(record.read_text()).get("config", {}), cfg)
    if finished(cfg):
        progress(f"done already: {out.name}")
    else:
        from dcanets.engine import train

        progress(f"training {out.name}: {cfg.epochs} epochs")
        train(cfg, resume=out / "last.pt" if (out / "last.pt").exists() else None, progress=False)
    row = summarize(cfg, json.loads(record.read_text()))
    write_result(result.stem, quick, row, result)
    return row


def summarize(cfg: TrainConfig, doc: Dict[str, Any]) -> Dict[str, Any]:
    """The row of one finished run: final metrics, speed, curves and the run's whole TrainConfig (data
    paths as ``cifar10/train.tar``-style labels, the output folder left out), so the committed file
    says how the run was made even after its run folder is gone (its metrics.json is the record)."""
    hist = doc["history"]
    config = {k: v for k, v in cfg.to_dict().items() if k != "output"}
    config.update(data=data_label(cfg.data), eval_data=data_label(cfg.eval_data) if cfg.eval_data else None)
    data_share = sum(h["data_seconds"] for h in hist) / sum(h["train_seconds"] for h in hist)
    return {"model": cfg.model, "opt": cfg.opt, "lr": cfg.lr, "seed": cfg.seed, "opt_kwargs": cfg.opt_kwargs,
            "final": {k: doc["final"].get(k) for k in ("val_acc", "best_val_acc", "train_loss", "train_acc",
                                                       "eval_acc", "num_params", "diverged", "device", "amp")},
            "images_per_s": sum(h["images_per_s"] for h in hist) / len(hist), "data_share": data_share,
            "wall_seconds": sum(h["epoch_seconds"] for h in hist), "device_name": _device_name(doc),
            "momentum": cfg.momentum, "curves": {k: [h[k] for h in hist] for k in ("train_loss", "val_acc")},
            "fidelity": [m for h in hist for m in h.get("fidelity", [])], "config": config}


def _device_name(doc: Dict[str, Any]) -> str:
    import torch

    if str(doc["final"].get("device", "cpu")).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} torch thread(s)"


def collected(result: Path) -> Dict[str, Any] | None:
    """A finished run's row from its result file, with the machine it ran on."""
    if not result.exists():
        return None
    doc = json.loads(result.read_text())
    return {k: v for k, v in doc.items() if k not in ("benchmark", "mode", "peak_rss_mb")}


def _same_budget(saved: Dict[str, Any], cfg: TrainConfig) -> None:
    """A run folder belongs to one config: reusing it under another budget would mix results."""
    wanted = cfg.to_dict()
    diff = [k for k in saved if k not in ("output", "eval_data", "data") and saved[k] != wanted.get(k)]
    if diff:
        raise SystemExit(f"{cfg.output} was trained with a different config ({', '.join(diff)}); "
                         "pass another --runs directory for this budget")


def run_label(r: Dict[str, Any], recipe: Mapping[str, Any]) -> str:
    """A run in a legend: its arm, named as the report's tables name it, and its seed."""
    return f"{Arm.of_run(r, recipe).label} s{r['seed']}"


def plot(rows: List[Dict[str, Any]], recipe: Mapping[str, Any], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        label = run_label(r, recipe)
        ax1.plot(range(1, len(r["curves"]["train_loss"]) + 1), r["curves"]["train_loss"], label=label)
        ax2.plot(range(1, len(r["curves"]["val_acc"]) + 1), r["curves"]["val_acc"], label=label)
    ax1.set(xlabel="epoch", ylabel="training loss", yscale="log", title=title)
    ax2.set(xlabel="epoch", ylabel="validation accuracy")
    ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fidelity(rows: List[Dict[str, Any]], recipe: Mapping[str, Any], path: Path, title: str) -> None:
    """The fidelity curve of the runs that measured it: cos(Δw, −∇ gradnet twin) over training steps
    (solid), and at the same weights the cosine of plain SGD's gradient (dotted), whole net and layer3
    (the stage holding the block that eq. 19's counter loss skips)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in (r for r in rows if r.get("fidelity")):
        pts = [m for m in r["fidelity"] if m["cos"] is not None]
        steps, label = [m["step"] for m in pts], run_label(r, recipe)
        line, = axes[0].plot(steps, [m["cos"] for m in pts], label=label)
        axes[0].plot(steps, [m["sgd_cos"] for m in pts], ":", color=line.get_color())
        axes[1].plot(steps, [m["stages"].get("layer3") for m in pts], color=line.get_color(), label=label)
    axes[0].set(xlabel="training step", ylabel="cosine with the gradnet gradient", title=f"{title}: whole net")
    axes[1].set(xlabel="training step", title="layer3")
    axes[0].axhline(0, color="grey", lw=0.5)
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[0].legend(fontsize=6, title="solid: the run's step; dotted: SGD's gradient", title_fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(__doc__.splitlines()[0], extra, argv)
    if args.pending:
        for experiment in args.experiment:
            plan = Plan(experiment, args.epochs, tuple(args.seeds), "", "")
            for arm, seeds in pending(plan, args.quick):
                print(command(plan, arm, seeds))
        return
    if args.quick:
        args.limit, args.val_limit, args.epochs, args.seeds = 128, 64, 2, [0]  # 2: past the warm-up epoch
        args.runs = args.runs.parent / "cifar10_quick"
    if args.collect and args.data is None:  # trains nothing, so the data need not be here
        args.data = shared_data("cifar10/train.tar")
    else:  # 640 stand-in images: the 10% validation part holds the 64 quick validation images
        args.data = benchmark_data("cifar10/train.tar", args.data, args.quick, images=640)
    if is_stand_in(args.data):  # runs on generated data never mix with runs on the real set
        args.runs = args.runs.with_name(args.runs.name + "_standin")
    for experiment in args.experiment:
        rows, missing = [], []
        recipe = RECIPES[experiment]
        for arm in experiment_arms(experiment, args.dca_lr, args.dca_kwargs):
            if not any(fnmatch.fnmatch(arm.name, p) for p in args.only):
                continue
            for seed in args.seeds:
                cfg = run_config(args, experiment, arm, seed)
                result = result_path(args, experiment, cfg)
                row = collected(result) if args.collect else one_run(cfg, result, args.quick)
                if row is None:
                    missing.append(Path(cfg.output).name)
                    progress(f"not finished, shown as missing: {missing[-1]}")
                    continue
                rows.append(row)
                print(f"{experiment:9s} {arm.model:18s} {row['opt']:16s} seed {seed}: val_acc "
                      f"{row['final']['val_acc']:.4f}  {row['images_per_s']:.0f} img/s  "
                      f"data {100 * row['data_share']:.1f}%  ({row['device_name']})", flush=True)
        if args.only != ["*"] and not args.collect:
            continue  # a part of the experiment: its runs' own files are written, the whole is --collect's
        budget = {"epochs": args.epochs, "seeds": args.seeds, "limit": args.limit, "val_limit": args.val_limit,
                  "split_seed": 0, "dca_lr": args.dca_lr, "data": Path(args.data).name,
                  "recipe": recipe, "dca_kwargs": args.dca_kwargs,
                  "devices": sorted({r["device_name"] for r in rows})}
        name = f"cifar10_{experiment}" if args.quick else result_name(experiment, args.epochs, args.limit)
        out = None if args.out is None else args.out.with_name(f"{name}{args.out.stem}.json")
        plot(rows, recipe, out.with_suffix(".png") if out else figure_path(name, args.quick),
             f"CIFAR-10 {experiment}, {args.epochs} epochs")
        if any(r.get("fidelity") for r in rows):
            plot_fidelity(rows, recipe, out.with_name(f"{out.stem}_fidelity.png") if out
                          else figure_path(f"{name}_fidelity", args.quick), f"CIFAR-10 {experiment}")
        write_result(name, args.quick, {"budget": budget, "runs": rows, "missing": missing}, out)


if __name__ == "__main__":
    main()
