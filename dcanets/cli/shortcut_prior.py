"""``dcanets shortcut-prior <experiment>``: the small systems of papers 001 and 002 from the shell.

Experiments (each prints one JSON document):

* ``teacher-student``: success rate of normalized GD per k (paper 001), batched over teachers;
* ``relaxation``: vanilla against relaxed GD on a planted ReLU neuron (paper 002, eq. 8);
* ``deep-linear``: GD on deep linear nets against the closed-form optimum (paper 002, §2.1);
* ``multibranch``: non-convexity of multi-branch MLPs as the number of branches grows (§3.2).

``dcanets shortcut-prior teacher-student --k 2 8 32 --teachers 100``
"""
from __future__ import annotations

import argparse
import dataclasses
import json

EXPERIMENTS = ("teacher-student", "relaxation", "deep-linear", "multibranch")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=EXPERIMENTS, help="which experiment to run: " + ", ".join(EXPERIMENTS))
    parser.add_argument("--seed", type=int, default=0, help="seed of data, teachers and initialisation")
    parser.add_argument("--steps", type=int, default=None, help="GD / training steps (experiment default)")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 8, 32], help="teacher-student: patch counts")
    parser.add_argument("--p", type=int, default=8, help="teacher-student: patch size")
    parser.add_argument("--teachers", type=int, default=50, help="teacher-student: teachers per k")
    parser.add_argument("--tol", type=float, default=1e-2, help="teacher-student: success tolerance")
    parser.add_argument("--teacher", default="prior_sphere",
                        help="teacher-student: distribution of the teacher filter v*: prior_sphere, "
                             "prior_hemisphere, prior_boundary, generic or angle:<degrees> (docs/shortcut_prior.md)")
    parser.add_argument("--noise", type=float, default=0.0, help="relaxation / deep-linear: label noise")
    parser.add_argument("--init", default="random", choices=("random", "opposite"),
                        help="relaxation: random or opposite initialisation")
    parser.add_argument("--depth", type=int, nargs="+", default=[2, 5, 10], help="deep-linear: depths")
    parser.add_argument("--lr", type=float, default=0.02, help="deep-linear: step size")
    parser.add_argument("--branches", type=int, nargs="+", default=[1, 4, 16, 64],
                        help="multibranch: numbers of branches I (must divide --total-width)")
    parser.add_argument("--total-width", type=int, default=64, help="multibranch: total hidden width")


def _check(args: argparse.Namespace) -> None:
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if min(args.k) < 1 or args.p < 1 or args.teachers < 1:
        raise ValueError(f"--k, --p and --teachers must be >= 1, got --k {' '.join(map(str, args.k))} "
                         f"--p {args.p} --teachers {args.teachers}")
    if min(args.depth) < 1:
        raise ValueError(f"--depth values must be >= 1, got {' '.join(map(str, args.depth))}")
    for flag, value in (("--tol", args.tol), ("--lr", args.lr)):
        if not 0 < value < float("inf"):
            raise ValueError(f"{flag} must be a finite number > 0, got {value}")
    if not 0 <= args.noise < float("inf"):
        raise ValueError(f"--noise must be a finite number >= 0, got {args.noise}")
    from dcanets.papers.p001_teacher_student import teacher_sampler

    teacher_sampler(args.teacher)  # raises ValueError naming the choices
    if args.total_width < 1:
        raise ValueError(f"--total-width must be >= 1, got {args.total_width}")
    bad = [i for i in args.branches if i < 1 or args.total_width % i]
    if bad:
        raise ValueError(f"--branches {bad} do not divide --total-width {args.total_width}")


def _teacher_student(args: argparse.Namespace) -> dict:
    from dcanets.papers.p001_teacher_student import VARIANTS, success_rates

    steps = args.steps or VARIANTS["prior"].steps
    variants = {n: dataclasses.replace(c, steps=steps, warmup_steps=min(c.warmup_steps, steps // 3))
                for n, c in VARIANTS.items()}
    return success_rates(args.k, args.p, args.teachers, variants, seed=args.seed, tol=args.tol, teacher=args.teacher)


def _relaxation(args: argparse.Namespace) -> dict:
    from dcanets.papers.p002_relaxation import compare

    runs = compare(steps=args.steps or 500, noise=args.noise, seed=args.seed, init=args.init)
    return {k: {"original_loss": r.original[-1], "recovery_error": r.recovery[-1]} for k, r in runs.items()}


def _deep_linear(args: argparse.Namespace) -> dict:
    import torch

    from dcanets.papers.p002_deep_linear import SHORTCUTS, planted_problem, train

    x, y = planted_problem(10, 100, torch.Generator().manual_seed(args.seed), noise=args.noise or 0.1)
    out = {}
    for depth in args.depth:
        for shortcut in SHORTCUTS:
            res = train(x, y, depth, shortcut, args.steps or 1000, args.lr, seeds=4, seed=args.seed)
            out[f"depth{depth}_{shortcut}"] = {"median_excess_loss": res.final_excess.median().item(),
                                               "optimum_loss": res.optimum_loss}
    return out


def _multibranch(args: argparse.Namespace) -> dict:
    from dcanets.papers.p002_multibranch import measure

    reports = measure(args.branches, total_width=args.total_width, steps=args.steps or 300, seed=args.seed)
    return {str(r.num_branches): {"train_loss": r.train_loss, **r.hessian, **r.lines} for r in reports}


def run(args: argparse.Namespace) -> int:
    _check(args)
    fn = {"teacher-student": _teacher_student, "relaxation": _relaxation,
          "deep-linear": _deep_linear, "multibranch": _multibranch}[args.experiment]
    print(json.dumps(fn(args), indent=2, default=float))
    return 0
