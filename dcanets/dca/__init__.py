"""DC programs and the DCA loop (paper 000, §2), numpy only.

``DCProblem`` states F = G − H; ``minimize`` runs DCA (with restarts and the boosted line search)
and returns a ``DCAResult``. Classic problems with known answers: the trust-region subproblem in
both decompositions of paper 000 (``trs_problem``, exact ``exact_trs``), ``abs_quadratic`` and
``max_distance_box``. The torch optimizers built from network-loss decompositions live in
``dcanets.optim`` and are not imported here (so this package never imports torch).
"""
from .classic import abs_quadratic, abs_quadratic_critical_points, max_distance_box
from .problem import DCProblem, SubproblemError
from .solver import DCAResult, minimize
from .trust_region import (
                           TRSSolution,
                           exact_trs,
                           project_ball,
                           project_ellipsoid,
                           random_trs,
                           trs_multiplier,
                           trs_objective,
                           trs_optimality,
                           trs_problem,
)

__all__ = [
    "DCProblem", "DCAResult", "SubproblemError", "minimize",
    "TRSSolution", "exact_trs", "trs_problem", "trs_objective", "trs_optimality", "trs_multiplier",
    "project_ball", "project_ellipsoid", "random_trs",
    "abs_quadratic", "abs_quadratic_critical_points", "max_distance_box",
]
