"""Does ρ change the DCA step? ``dcacounter``'s β and step across the ρ range of
``tune_configs/dca_rho_lambda.yaml``, on real CIFAR-10 batches (paper 000, eqs. 12, 19, footnote 2).

ρ is a Hessian eigenvalue (the ρ/2·L2 of eq. 12); eq. 19 in gradient units reads
β = ‖a‖²/(2‖c‖² + ρ/(2κ)), κ the rank-one curvature factor (docs/decompositions.md). So ρ matters
once it is comparable with ρ_½ = 4κ‖c‖², where β halves. At a few points of a short training run
with the config's budget (``dcacounter``, ρ = 0, the config's lr in the middle of its range,
momentum, weight decay and warm-up), this script measures on the next batch ‖a‖, ‖c‖, κ (the
Gauss–Newton curvature along a over ‖a‖²), ρ_½, and what ``rho="auto"`` measures (λ_min of G2 and
H2 by Lanczos, the ρ that makes both convex); then it takes one real optimizer step (plain loop,
lr 1, no momentum) from the same state for each ρ of a grid spanning the config's range and
reports β, the step's length and the cosine between the steps at the two ends of the range.
The config's old reading of ρ (squared-gradient units, ρ/4 next to 2‖c‖²) is kappa=2.

    python benchmarks/dca_rho_effect.py --full    # cifar_plainnet56, batch 128, CPU, 1 thread
    python benchmarks/dca_rho_effect.py --quick   # cifar_plainnet20, batch 32 (CI)
"""
from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import benchmark_data, data_label, load_images, parse_args, progress, write_result  # noqa: E402
from dcanets import safe_yaml  # noqa: E402

NAME = "dca_rho_effect"
CONFIG = Path(__file__).resolve().parents[1] / "tune_configs" / "dca_rho_lambda.yaml"
FULL = dict(model="cifar_plainnet56", batch=128, points=(0, 28, 56), lanczos=12, grid=6)
QUICK = dict(model="cifar_plainnet20", batch=32, points=(0, 4), lanczos=3, grid=4)
DECADES = [10.0 ** k for k in range(-3, 5)]      # a fixed reference grid of ρ, beside the config's


def config_ranges(path: Path = CONFIG) -> Dict[str, Any]:
    """The searched lr range and the ρ range it implies (``over: lr``: ρ = sample / lr)."""
    doc = safe_yaml.load(path.read_text())
    lr, rho, train = doc["space"]["lr"], doc["space"]["opt_kwargs.rho"], doc["train"]
    lr_lo, lr_hi = float(lr["low"]), float(lr["high"])
    lo, hi = float(rho["low"]), float(rho["high"])
    if rho.get("over") == "lr":
        lo, hi = lo / lr_hi, hi / lr_lo
    return {"lr": (lr_lo, lr_hi), "rho": (lo, hi), "rho_spec": rho, "momentum": float(train["momentum"]),
            "weight_decay": float(train["weight_decay"]), "batch_size": int(train["batch_size"]),
            "limit": int(train["limit"]), "warmup_epochs": float(train.get("warmup_epochs", 0.0)),
            "opt_kwargs": dict(train.get("opt_kwargs") or {})}


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def _backward(model, x, y) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


def _optimizer(model, lr: float, **kwargs):
    import timm.optim

    from dcanets.optim import prepare

    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=lr, **kwargs)
    assert prepare(opt, model) is False   # every arm here runs in the plain loop
    return opt


def _probe_step(model, x, y, **kwargs):
    """One real plain-loop step on a copy (lr 1, no momentum or decay): the optimizer, the copy
    (``p.grad`` = a) and the loss."""
    from dcanets.optim import remember_batch

    probe = copy.deepcopy(model)
    opt = _optimizer(probe, 1.0, momentum=0.0, weight_decay=0.0, rho_every=1, beta_policy="clamp",
                     beta_max=float("inf"), **kwargs)
    loss = _backward(probe, x, y)
    remember_batch(opt, x, y)
    opt.step()
    return opt, probe, float(loss)


def measure_curvature(model, x, y, lanczos: int) -> Dict[str, float]:
    """‖a‖², ‖c‖², κ (measured with ρ = 1), and λ_min of G2 and H2 with rho="auto"'s ρ."""
    t0 = time.perf_counter()
    opt, probe, loss = _probe_step(model, x, y, rho=1.0)
    kappa, ratio = opt.diagnostics["kappa"], opt.diagnostics["c_over_a"]
    a2 = float(sum(float(p.grad.double().square().sum()) for p in probe.parameters() if p.grad is not None))
    t1 = time.perf_counter()
    auto, _, _ = _probe_step(model, x, y, rho="auto", rho_lanczos=lanczos, kappa=kappa)
    entry = auto.rho_history[0]
    c2 = a2 * ratio ** 2
    return {"loss": loss, "a2": a2, "c2": c2, "kappa": kappa, "lam_min_G": entry["lam_min_G"],
            "lam_min_H": entry["lam_min_H"], "rho_auto": entry["rho"], "rho_half": 4 * kappa * c2,
            "seconds_kappa": t1 - t0, "seconds_lanczos": time.perf_counter() - t1}


def step_for(model, x, y, rho: float, kappa: float) -> Tuple[torch.Tensor, float]:
    """d of one real plain-loop step (lr 1, no momentum or decay) with this ρ and κ, and its β."""
    twin = copy.deepcopy(model)
    opt = _optimizer(twin, 1.0, momentum=0.0, weight_decay=0.0, rho=rho, kappa=kappa,
                     beta_policy="clamp", beta_max=float("inf"))
    w0 = _flat(twin.parameters())
    _backward(twin, x, y)
    opt.step()
    return w0 - _flat(twin.parameters()), opt.diagnostics["beta"]


def rho_grid(lo: float, hi: float, n: int) -> List[float]:
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def effect_at(model, x, y, curv: Dict[str, float], grid: List[float]) -> Dict[str, Any]:
    """β, ‖d‖/‖a‖ and cosines of the steps over ρ = 0, the config's grid and the reference
    decades, measured by stepping; the ends are the config's range."""
    steps = {rho: step_for(model, x, y, rho, curv["kappa"]) for rho in sorted({0.0, *grid, *DECADES})}
    lo, hi = grid[0], grid[-1]
    cos = lambda u, v: float(u @ v / (u.norm() * v.norm()))  # noqa: E731
    a_norm = math.sqrt(curv["a2"])
    rows = [{"rho": rho, "in_config_grid": rho in grid, "beta": beta,
             "beta_kappa2": curv["a2"] / (2 * curv["c2"] + rho / 4), "step_over_a": float(d.norm()) / a_norm,
             "cos_to_rho0": cos(d, steps[0.0][0])}
            for rho, (d, beta) in steps.items()]
    return {"rows": rows, "cos_ends": cos(steps[lo][0], steps[hi][0]), "beta_ends": [steps[lo][1], steps[hi][1]],
            "step_ratio_ends": float(steps[hi][0].norm() / steps[lo][0].norm())}


def train_to_points(model, batches, points, lr: float, cfg: Dict[str, Any]):
    """The config's training (dcacounter ρ = 0, momentum, decay, linear warm-up) up to each point;
    yields (step, the batch after it)."""
    steps_per_epoch = max(1, int(cfg["limit"] * 0.9) // cfg["batch_size"])
    warm = max(1, int(cfg["warmup_epochs"] * steps_per_epoch))
    opt = _optimizer(model, lr, momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                     beta_policy="clamp", beta_max=float("inf"))
    step = 0
    for target in points:
        while step < target:
            x, y = batches[step]
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / warm)
            _backward(model, x, y)
            opt.step()
            step += 1
        yield step, batches[step]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--data", default=None, help="CIFAR-10 training tar (default: the shared copy)"))
    import timm

    import dcanets  # noqa: F401

    torch.set_num_threads(1)
    budget = QUICK if args.quick else FULL
    cfg = config_ranges()
    lr = math.sqrt(cfg["lr"][0] * cfg["lr"][1])
    grid = rho_grid(*cfg["rho"], budget["grid"])
    spec = benchmark_data("cifar10/train.tar", args.data, args.quick, images=512)
    n = max(budget["points"]) + 1
    x_all, y_all = load_images(spec, n * budget["batch"], args.seed)
    bs = budget["batch"]
    batches = [(x_all[i * bs:(i + 1) * bs], y_all[i * bs:(i + 1) * bs]) for i in range(n)]
    torch.manual_seed(args.seed)
    model = timm.create_model(budget["model"])
    progress(f"{NAME}: {budget['model']}, batch {bs}, points {budget['points']}, "
             f"rho grid {grid[0]:.3g}..{grid[-1]:.3g}")
    results = []
    for step, (x, y) in train_to_points(model, batches, budget["points"], lr, cfg):
        curv = measure_curvature(model, x, y, budget["lanczos"])
        effect = effect_at(model, x, y, curv, grid)
        results.append({"step": step, **curv, **effect})
        progress(f"step {step}: loss {curv['loss']:.3f}  |a|^2 {curv['a2']:.3g}  |c|^2 {curv['c2']:.3g}  "
                 f"kappa {curv['kappa']:.3g}  rho_half {curv['rho_half']:.3g}  rho_auto {curv['rho_auto']:.3g}  "
                 f"beta {effect['beta_ends'][0]:.3g} -> {effect['beta_ends'][1]:.3g}  "
                 f"cos(ends) {effect['cos_ends']:.4f}")
    write_result(NAME, args.quick, {
        "budget": {**budget, "lr": lr, "config": str(CONFIG.name),
                   "rho_spec": cfg["rho_spec"], "rho_range": list(cfg["rho"]), "rho_grid": grid,
                   "data": data_label(spec), "threads": 1, "device": "cpu", "seed": args.seed,
                   "training": "dcacounter rho=0, the config's momentum, weight decay and warm-up, no augmentation"},
        "points": results,
        "summary": {"min_cos_ends": min(r["cos_ends"] for r in results),
                    "max_cos_ends": max(r["cos_ends"] for r in results),
                    "beta_ranges": [r["beta_ends"] for r in results]},
    }, args.out)


if __name__ == "__main__":
    main()
