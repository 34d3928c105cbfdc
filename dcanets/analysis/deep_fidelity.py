"""The deep-network question: which counter-loss directions reach the shortcut network's gradient?

Paper 000's one-block identity ("DCA + vanilla = SGD + shortcut", eqs. 10, 17, 19) leaves open
what the counter loss can do in a deep net, whose shortcut gradient g_ref is a sum over paths that
skip any subset of blocks (``dcanets.analysis.paths``: the chain of blocks, the vectors a and
c_{k,m}, the path classes). This module measures how much of that sum the generalisations of the
counter loss can reach, as *directions* (vectors in parameter space), without making them
optimizers.

Directions are represented by coefficients over the family's rows (:class:`Family`), so every
cosine, whole net and per stage, comes from per-group Gram matrices (:class:`Grams`): the
least-squares projection of g_ref onto the span (:func:`best_in_span`) is the upper bound of
what any linear combination of the family's vectors can reach, and the rank-one-curvature Newton
steps of the multi-block decompositions (:func:`model_newton`, :func:`quasi_newton`) are inside
that span. :func:`newton_cg` is the exact (true-Hessian) Newton step of eq. 12's G2 by conjugate
gradients. :func:`all_block` is the one counter loss that mixes every block at α = ½
(L'^{all}_{½}, eq. 23's G₃ over the whole chain), exact and linearised: a direction outside the
family's span. docs/decompositions.md, "The deep-network question", has the measurements.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcanets.analysis.paths import (
    Chain,
    Layout,
    Span,
    by_runs,
    by_skips,
    gradnet_vector,
    last_same_shape,
    plain_blocks,
    record,
    skip_vector,
    spans,
)
from dcanets.hessian import FrozenBuffers, hvp
from dcanets.layers.shortcut import ShortcutBlock
from dcanets.optim.rho import LossFn

# -- a family of vectors and its Gram matrices --------------------------------------------------

@dataclass
class Family:
    """Row 0 is a; row 1 + j is c of ``spans[j]``: the vectors every direction below combines."""

    rows: torch.Tensor               # (1 + len(spans), numel), the parameters' dtype
    spans: List[Span]

    def index(self, span: Span) -> int:
        return 1 + self.spans.index(span)

    def singles(self) -> List[int]:
        """Rows of a and of the single-block c_k, in block order."""
        return [0] + [self.index((k, 1)) for k in range(self.depth)]

    @property
    def depth(self) -> int:
        return max(k + m for k, m in self.spans)


def family(chain: Chain, max_len: Optional[int] = None) -> Family:
    """a and c_{k,m} for every span of length ≤ max_len (``max_len=1``: the single blocks only)."""
    all_spans = spans(chain.depth, max_len)
    rows = torch.stack([chain.a] + [skip_vector(chain, k, m) for k, m in all_spans])
    return Family(rows, all_spans)


@dataclass
class Grams:
    """Per group (stem, each block, head), in float64: K_g = V_g V_gᵀ, b_g = V_g r_g and ‖r_g‖² for
    the rows V of a family and a reference r. Whole-net and per-stage quantities are sums over
    groups, so a direction given as coefficients t over the rows has every cosine without
    forming the vector."""

    K: torch.Tensor          # (G, n, n)
    b: torch.Tensor          # (G, n)
    rr: torch.Tensor         # (G,)
    stages: List[str]        # stage of each group

    @staticmethod
    def of(rows: torch.Tensor, ref: torch.Tensor, layout: Layout) -> "Grams":
        K, b, rr = [], [], []
        for g in layout.groups:
            V, r = rows[:, g.start:g.stop].double(), ref[g.start:g.stop].double()
            K.append(V @ V.T)
            b.append(V @ r)
            rr.append(r @ r)
        return Grams(torch.stack(K), torch.stack(b), torch.stack(rr), [g.stage for g in layout.groups])

    def sub(self, rows: Sequence[int]) -> "Grams":
        """The Gram matrices of a subset of the rows."""
        idx = torch.as_tensor(list(rows))
        return Grams(self.K[:, idx][:, :, idx], self.b[:, idx], self.rr, self.stages)

    def pick(self, stage: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K, b, ‖r‖²) summed over the whole net (None) or one stage."""
        mask = torch.tensor([stage is None or s == stage for s in self.stages])
        return self.K[mask].sum(0), self.b[mask].sum(0), self.rr[mask].sum()

    def cosines(self, t: torch.Tensor) -> Dict[str, float]:
        """cos(Σ t_i v_i, r) for the whole net (key ``"whole"``) and each stage."""
        out = {}
        for stage in [None] + list(dict.fromkeys(self.stages)):
            K, b, rr = self.pick(stage)
            out["whole" if stage is None else stage] = _cos(float(t @ b), float(t @ K @ t), float(rr))
        return out


def _cos(dot: float, sq1: float, sq2: float) -> float:
    return dot / (sq1 * sq2) ** 0.5 if sq1 > 0 and sq2 > 0 else float("nan")


def _pinv_solve(A: torch.Tensor, b: torch.Tensor, rcond: float = 1e-10) -> torch.Tensor:
    """Least-squares solution of A t = b (float64), singular values below rcond·σ_max dropped: the
    family's vectors are strongly correlated (neighbouring blocks' c), so K is ill-conditioned."""
    return torch.linalg.pinv(A, rtol=rcond) @ b


# -- directions ---------------------------------------------------------------------------------

def eq19(grams: Grams, ridge: float = 0.0) -> torch.Tensor:
    """Eq. 19 on rows [a, c]: a + ‖a‖²/(2‖c‖² + ridge)·c, as coefficients. ``ridge`` is ρ/(2κ), the
    term ``dcacounter`` adds next to 2‖c‖² (ρ a Hessian eigenvalue, κ the rank-one curvature
    factor; the paper prints ρ/4 because its a, c are ours times √(κ/2), docs/decompositions.md);
    at ridge = 0 it is ``dcacounter``'s step at ρ = 0."""
    K, _, _ = grams.pick(None)
    beta = float(K[0, 0]) / (2 * float(K[1, 1]) + ridge)
    return torch.tensor([1.0, beta], dtype=torch.float64)


def combine(coef: torch.Tensor, n: int, rows: Sequence[int]) -> torch.Tensor:
    """Coefficients over a sub-family's rows written as coefficients over all n rows."""
    out = torch.zeros(n, dtype=torch.float64)
    out[torch.as_tensor(list(rows))] = coef
    return out


def model_newton(grams: Grams, U: torch.Tensor, weights: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """Newton step of a counter-loss decomposition under the paper's rank-one curvature model.

    ½∂²G ≈ Σ_j weights_j u_j u_jᵀ + ridge·I with u_j = U[:, j] (coefficients over the rows): eq. 16
    for G2 = L + ½L'_{−1} is U = [a, 2c − a], weights (1, ½), and with a ⊥ c this gives eq. 19. The
    step solves ½∂²G·Δ = a for Δ = U t, i.e. (diag(weights)·UᵀKU + ridge) t = e_1 when U's first
    column is a (no orthogonality assumed); ridge = ρ/(2κ) as in :func:`eq19`. Returns coefficients
    over the rows."""
    K, _, _ = grams.pick(None)
    KU = U.T @ K @ U
    rhs = torch.zeros(U.shape[1], dtype=torch.float64)
    rhs[0] = 1.0
    t = _pinv_solve(torch.diag(weights) @ KU + ridge * torch.eye(U.shape[1], dtype=torch.float64), rhs)
    return U @ t


def counter_newton(grams: Grams, rows: Sequence[int], n: int, ridge: float = 0.0) -> torch.Tensor:
    """G = L + ½Σ_j L'_{−1,j} + ρ/2·L2 over the counter losses of ``rows[1:]`` (rows[0] = a):
    U = [a, 2c_j − a …], weights (1, ½, …) (eqs. 12, 16 with one counter loss per row)."""
    m = len(rows)
    U = torch.zeros(n, m, dtype=torch.float64)
    U[rows[0], 0] = 1.0
    for j, r in enumerate(rows[1:], start=1):
        U[r, j], U[rows[0], j] = 2.0, -1.0
    weights = torch.tensor([1.0] + [0.5] * (m - 1), dtype=torch.float64)
    return model_newton(grams, U, weights, ridge)


def quasi_newton(grams: Grams, rows: Sequence[int], n: int, ridge: float = 0.0) -> torch.Tensor:
    """Quasi-DC G = (1/J)Σ_j L'_{1/2,j} + ρ/2·L2 (eq. 23 at every counter loss), H = G − L.

    Model ½∂²G ≈ (1/J)Σ_j v_j v_jᵀ + ridge with v_j = ½(a + c_j) (eq. 25 for each j, in eq. 16's
    units; ridge = ρ/(2κ) as in :func:`eq19`).
    As the paper goes along a + c for one block, the step is Newton's restricted to span{v_j}:
    Δ = V t minimising −aᵀΔ + ½Δᵀ∂²GΔ, i.e. Vᵀ∂²GV t = Vᵀa. Returns coefficients over the rows."""
    K, _, _ = grams.pick(None)
    J = len(rows) - 1
    V = torch.zeros(n, J, dtype=torch.float64)
    for j, r in enumerate(rows[1:]):
        V[rows[0], j], V[r, j] = 0.5, 0.5
    KV = V.T @ K @ V
    curv = 2 * (KV @ KV / J + ridge * KV)       # Vᵀ∂²G V
    t = _pinv_solve(curv, V.T @ K[:, rows[0]])
    return V @ t


def _coefficient_sets(grams: Grams, per: str) -> List[List[int]]:
    """The groups that share one set of coefficients: all of them, those of one stage, or each alone."""
    n = len(grams.stages)
    if per == "whole":
        return [list(range(n))]
    if per == "stage":
        return [[g for g in range(n) if grams.stages[g] == s] for s in dict.fromkeys(grams.stages)]
    if per == "group":
        return [[g] for g in range(n)]
    raise ValueError(f"per must be 'whole', 'stage' or 'group'; got {per!r}")


def best_in_span(grams: Grams, per: str = "whole") -> Dict[str, float]:
    """The upper bound: cos of the least-squares projection of r onto the span of the rows, with one
    set of coefficients for the whole net (``per="whole"``), one per stage (``"stage"``) or one per
    group (``"group"``: stem, each block, head). Returns the whole-net and per-stage cosines of that
    projection; no direction built from these rows with such coefficients has a larger cosine."""
    acc: Dict[str, List[float]] = {}   # stage -> [t·b, tᵀKt, ‖r‖²] of the projection's parts
    for members in _coefficient_sets(grams, per):
        t = _pinv_solve(grams.K[members].sum(0), grams.b[members].sum(0))
        for g in members:
            row = acc.setdefault(grams.stages[g], [0.0, 0.0, 0.0])
            row[0] += float(t @ grams.b[g])
            row[1] += float(t @ grams.K[g] @ t)
            row[2] += float(grams.rr[g])
    total = [sum(v[i] for v in acc.values()) for i in range(3)]
    return {"whole": _cos(*total), **{s: _cos(*v) for s, v in acc.items()}}


def projection_coef(grams: Grams) -> torch.Tensor:
    """Whole-net least-squares coefficients of r on the rows (to carry to another batch)."""
    K, b, _ = grams.pick(None)
    return _pinv_solve(K, b)


# -- the exact Newton step of eq. 12 (true Hessian, conjugate gradients) ------------------------

@contextmanager
def mixed(block: nn.Module, alpha: float) -> Iterator[None]:
    """Within the block, ``block`` outputs α·out + (1 − α)·in: the counter loss L'_α of eq. 10."""
    handle = block.register_forward_hook(lambda m, i, o: alpha * o + (1 - alpha) * i[0])
    try:
        yield
    finally:
        handle.remove()


def g2_operator(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, layout: Layout,
                loss_fn: LossFn = F.cross_entropy) -> Callable[[torch.Tensor], torch.Tensor]:
    """v ↦ ∇²(L + ½L'_{−1})·v on flat vectors (the layout's order): eq. 12's G2 without its ρ term, at the
    last same-shape block, in train mode with the running statistics restored after each product
    (two forwards and a double backward each)."""
    block = cast(nn.Module, last_same_shape(model))
    params, slices = layout.params, layout.slices()

    def closure() -> torch.Tensor:
        with mixed(block, -1.0):
            counter = loss_fn(model(inputs), targets)
        return loss_fn(model(inputs), targets) + 0.5 * counter

    def matvec(v: torch.Tensor) -> torch.Tensor:
        vec = [v[slices[i]].view_as(p) for i, p in enumerate(params)]
        model.train()
        with FrozenBuffers(model):
            out = hvp(closure, params, vec)
        return layout.flatten(dict(enumerate(out)))

    return matvec


@dataclass
class NewtonCG:
    """Result of :func:`newton_cg`: the step (flat), the CG steps taken and whether CG stopped at a
    direction of non-positive curvature (the quadratic model not convex along it)."""

    step: torch.Tensor
    iters: int
    negative_curvature: bool


def newton_cg(matvec: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, rho: float,
              iters: int = 10) -> NewtonCG:
    """Eq. 14 with the true Hessian: (∇²G₀ + ρ/2)·Δ = a (``matvec``: v ↦ ∇²G₀·v, e.g. :func:`g2_operator`)
    by ``iters`` conjugate-gradient steps from 0. CG stops early at a direction p with
    pᵀ(∇²G₀ + ρ/2)p ≤ 0 (G not convex there: ρ too small), returning the iterate so far (``rhs``
    itself when that happens at the first step)."""
    x, r = torch.zeros_like(rhs), rhs.clone()
    p, rr = r.clone(), float(r @ r)
    for it in range(iters):
        Ap = matvec(p) + rho / 2 * p
        curv = float(p @ Ap)
        if curv <= 0:
            return NewtonCG(x if it else rhs.clone(), it, True)
        step = rr / curv
        x, r = x + step * p, r - step * Ap
        rr_new = float(r @ r)
        p, rr = r + (rr_new / rr) * p, rr_new
    return NewtonCG(x, iters, False)


# -- the all-block counter loss at α = ½ (eq. 10 at every block; eq. 23's G₃ with L'^{all}_{½}) --

ALL_BLOCK_ALPHA = 0.5
ALL_BLOCK: Dict[str, Tuple[str, str]] = {
    # key: (what it is, the decomposition behind it): directions outside the family's span
    "allhalf_exact": ("(f) ∇L'^{all}_{½}: every block ½·out + ½·S(in), gradient at that net's own forward",
                      "quasi-DC: G₃ = L'^{all}_{½} + ρ/2·L2 (eq. 23 at every block), its gradient"),
    "allhalf_exact_rescaled": ("(f) the same, block l's part × 2^{B−l+1} (stem × 2^B)",
                               "no G: ∇L'^{all}_{½} with a per-block step size"),
    "allhalf_linear": ("(f) ∇L'^{all}_{½} linearised at the plain forward: ½(J + S) at every block",
                       "quasi-DC (eq. 23 at every block), linearised"),
    "allhalf_linear_rescaled": ("(f) the linearised one, block l's part × 2^{B−l+1}: g_ref by construction",
                                "check: cos 1 by the identity"),
}


@contextmanager
def all_mixed(model: nn.Module, alpha: float = ALL_BLOCK_ALPHA, linearised: bool = False) -> Iterator[None]:
    """Within the block every block of the plain chain outputs α·out + (1 − α)·S(in), S its shortcut
    (the identity, or the zero-padding map at a stage transition, as g_ref's): the loss is then
    L'^{all}_α, eq. 10's counter loss at every block at once, the loss of an α-scaled residual net on
    the same weights. ``linearised=True`` keeps the plain forward (the value is ``out`` exactly) and
    gives the backward of the mixed net, α·J + (1 − α)·S per block (the ``s − s.detach()`` trick of
    the gradnet): the gradient of L'^{all}_α linearised at the plain network's activations."""
    def hook(block: nn.Module, inputs: Tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        down = cast(ShortcutBlock, block).downsample
        mix = alpha * out + (1 - alpha) * (inputs[0] if down is None else down(inputs[0]))
        return out.detach() + (mix - mix.detach()) if linearised else mix

    handles = [cast(nn.Module, b).register_forward_hook(hook) for _, b in plain_blocks(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def block_rescale(vec: torch.Tensor, layout: Layout, alpha: float = ALL_BLOCK_ALPHA) -> torch.Tensor:
    """Each group's part of ``vec`` times (1/α)^{blocks above it}: block l (0-based, of B) × (1/α)^{B−l},
    the stem × (1/α)^B, the head × 1 — the factors the mixed backward puts on a path through every
    block, undone (a per-block step size an optimizer built on it would use)."""
    depth, out = len(layout.groups) - 2, vec.clone()
    for j, g in enumerate(layout.groups[:-1]):          # j = 0: the stem, j = l + 1: block l
        out[g.start:g.stop] *= (1 / alpha) ** (depth - max(j - 1, 0))
    return out


def all_block(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, layout: Layout,
              alpha: float = ALL_BLOCK_ALPHA, loss_fn: LossFn = F.cross_entropy) -> Dict[str, torch.Tensor]:
    """The directions of :data:`ALL_BLOCK` (flat, the layout's order): ∇L'^{all}_α exact and linearised,
    each also block-rescaled (:func:`block_rescale`). Train mode, running statistics restored."""
    out: Dict[str, torch.Tensor] = {}
    for key, linearised in (("exact", False), ("linear", True)):
        model.train()
        with FrozenBuffers(model), all_mixed(model, alpha, linearised), torch.enable_grad():
            loss = loss_fn(model(inputs), targets)
            grads = torch.autograd.grad(loss, layout.params, allow_unused=True)
        vec = layout.flatten(dict(enumerate(grads)))
        out[f"allhalf_{key}"], out[f"allhalf_{key}_rescaled"] = vec, block_rescale(vec, layout, alpha)
    return out


# -- one measurement: every direction, bound and path class on one batch ------------------------

DIRECTIONS: Dict[str, Tuple[str, str]] = {
    # key: (what it is, the decomposition behind it and whether it is DC)
    "sgd": ("a = ∇L (SGD, eq. 9)", "DC (eq. 9) for λ ≥ λ_max"),
    "dcacounter": ("eq. 19 at the last same-shape block: a + βc (ρ = 0)", "DC (eq. 12) for ρ large enough"),
    "single_sum": ("(a) a + Σ_k c_k: every single-block skip, summed",
                   "no G: eq. 25's a + c with every c_k added (the first-order term of g_ref)"),
    "single_eq19": ("(a) eq. 19 with c = Σ_k c_k (ρ = 0)", "no G: eq. 19's formula with the summed c"),
    "single_newton": ("(a) Newton step of G = L + ½Σ_k L'_{−1,k} (rank-one model, ρ = 0)",
                      "DC for ρ large enough, as eq. 12"),
    "span_sum": ("(b) a + Σ_{k,m} c_{k,m}: every skipped span, summed", "no G: the spans' shortcut terms added"),
    "span_top": ("(b) a + Σ_k c_{k,B−k}: each span from block k to the top", "no G: those shortcut terms added"),
    "span_newton": ("(b) Newton step of G = L + ½Σ_{k,m} L'_{−1,k,m} (rank-one model, ρ = 0)",
                    "DC for ρ large enough, as eq. 12"),
    "quasi_sum": ("(c) Σ_k (a + c_k): eq. 25 at every block", "quasi-DC: G = Σ_k L'_{1/2,k} convex, H = G − L not"),
    "quasi_newton": ("(c) Newton step of G = mean_k L'_{1/2,k} in span{a + c_k} (ρ = 0)", "quasi-DC"),
}


@dataclass
class DeepMeasurement:
    """Cosines with g_ref (``{"whole": …, stage: …}``) of every direction (:data:`DIRECTIONS`,
    :data:`ALL_BLOCK`) and, in ``lengths``, its step-length ratio ‖d‖/‖a‖ (SGD's step at the same lr
    is 1), of the span bounds (``best_single_<per>``, ``best_span_<per>``) and of the path classes
    (``skips_le_<n>``, ``runs_le_1``); ``shares``: ‖class‖/‖g_ref‖; the Gram matrices and the
    whole-net projection coefficients, to carry to another batch (:func:`transfer`); g_ref (flat) and
    the layout, for directions computed outside the family (:func:`newton_cg`)."""

    cosines: Dict[str, Dict[str, float]]
    lengths: Dict[str, float]
    shares: Dict[str, float]
    grams: Grams
    coef: Dict[str, torch.Tensor]
    diagnostics: Dict[str, float]
    spans: List[Span]
    ref: torch.Tensor
    layout: Layout


def indicator(n: int, rows: Sequence[int]) -> torch.Tensor:
    """Coefficient 1 on ``rows``, 0 elsewhere: the plain sum of those vectors."""
    return combine(torch.ones(len(rows), dtype=torch.float64), n, rows)


def _directions(grams: Grams, fam: Family, last: int, ridge: float) -> Dict[str, torch.Tensor]:
    """Coefficients over the family's rows of every entry of :data:`DIRECTIONS` (``last``: the block
    ``dcacounter`` skips; ``ridge`` = ρ/(2κ), see :func:`eq19`)."""
    n, singles = fam.rows.shape[0], fam.singles()
    a = indicator(n, [0])
    c_sum = indicator(n, singles[1:])
    K, _, _ = grams.pick(None)
    beta = float(K[0, 0]) / (2 * float(c_sum @ K @ c_sum) + ridge)    # eq. 19 with c = Σ_k c_k
    one_block = [0, fam.index((last, 1))]
    return {
        "sgd": a,
        "dcacounter": combine(eq19(grams.sub(one_block), ridge), n, one_block),
        "single_sum": a + c_sum,
        "single_eq19": a + beta * c_sum,
        "single_newton": counter_newton(grams, singles, n, ridge),
        "span_sum": indicator(n, range(n)),
        "span_top": indicator(n, [0] + [fam.index((k, fam.depth - k)) for k in range(fam.depth)]),
        "span_newton": counter_newton(grams, list(range(n)), n, ridge),
        "quasi_sum": fam.depth * a + c_sum,
        "quasi_newton": quasi_newton(grams, singles, n, ridge),
    }


RHO_DEPENDENT = ("dcacounter", "single_eq19", "single_newton", "span_newton", "quasi_newton")


def _all_directions(grams: Grams, fam: Family, last: int, rhos: Sequence[float]) -> Dict[str, torch.Tensor]:
    """:func:`_directions` at ridge ρ/(2κ) = r·‖a‖² for each r in ``rhos`` (relative to the gradient's
    scale, so one setting means the same at every depth); keys of r ≠ 0 get the suffix ``@rho=<r>``."""
    K, _, _ = grams.pick(None)
    out: Dict[str, torch.Tensor] = {}
    for r in rhos:
        for key, t in _directions(grams, fam, last, r * float(K[0, 0])).items():
            if r == 0:
                out[key] = t
            elif key in RHO_DEPENDENT:
                out[f"{key}@rho={r:g}"] = t
    return out


def _class_cosines(classes: torch.Tensor, ref: torch.Tensor, layout: Layout,
                   prefix: str) -> Tuple[Dict[str, Dict[str, float]], Dict[str, float]]:
    """Cosines of the cumulative path classes (rows 0 … n: ``<prefix>_le_<i>``) and each class's
    share ‖class_i‖/‖g_ref‖ (``<prefix>_<i>``)."""
    grams = Grams.of(classes, ref, layout)
    K, _, rr = grams.pick(None)
    n = classes.shape[0]
    cos = {f"{prefix}_le_{i}": grams.cosines(indicator(n, range(i + 1))) for i in range(n - 1)}
    shares = {f"{prefix}_{i}": (float(K[i, i]) / float(rr)) ** 0.5 for i in range(n)}
    return cos, shares


def measure(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, max_len: Optional[int] = None,
            rhos: Sequence[float] = (0.0,), skips_cap: int = 4, loss_fn: LossFn = F.cross_entropy) -> DeepMeasurement:
    """Every direction of :data:`DIRECTIONS`, the span bounds and the path classes on one batch, at the
    model's current weights (train mode, running statistics untouched); ``rhos``: ridges ρ/(2κ) in
    units of ‖a‖² (see :func:`_all_directions`); the directions of :data:`ALL_BLOCK` beside them. Cost:
    one forward, about B³/6 single-block products for the spans (B = blocks; ``max_len=1`` keeps the
    single blocks: about B²/2), (``skips_cap`` + 4) backward passes for the path classes and two
    forward-backward passes for the all-block counter loss."""
    chain = record(model, inputs, targets, loss_fn)
    ref = gradnet_vector(chain)
    fam = family(chain, max_len)
    grams = Grams.of(fam.rows, ref, chain.layout)
    last = chain.blocks.index(last_same_shape(model))
    coefs = _all_directions(grams, fam, last, rhos)
    cosines = {k: grams.cosines(t) for k, t in coefs.items()}
    K, _, rr = grams.pick(None)
    lengths = {k: (float(t @ K @ t) / float(K[0, 0])) ** 0.5 for k, t in coefs.items()}
    mixed_all = all_block(model, inputs, targets, chain.layout, loss_fn=loss_fn)
    extra = Grams.of(torch.stack([chain.a] + list(mixed_all.values())), ref, chain.layout)
    Ke, _, _ = extra.pick(None)
    for i, key in enumerate(mixed_all, start=1):
        cosines[key] = extra.cosines(indicator(len(mixed_all) + 1, [i]))
        lengths[key] = (float(Ke[i, i]) / float(Ke[0, 0])) ** 0.5
    singles = grams.sub(fam.singles())
    for per in ("whole", "stage", "group"):
        cosines[f"best_single_{per}"] = best_in_span(singles, per)
        cosines[f"best_span_{per}"] = best_in_span(grams, per)
    skips, skip_shares = _class_cosines(by_skips(chain, skips_cap), ref, chain.layout, "skips")
    runs, run_shares = _class_cosines(by_runs(chain, 2), ref, chain.layout, "runs")
    diagnostics = {"loss": float(chain.loss.detach()), "ref_norm": float(rr) ** 0.5, "a_norm": float(K[0, 0]) ** 0.5,
                   "blocks": chain.depth, "vectors": fam.rows.shape[0],
                   **{f"ref_share_{s}": (float(grams.pick(s)[2]) / float(rr)) ** 0.5 for s in chain.layout.stages()}}
    return DeepMeasurement({**cosines, **skips, **runs}, lengths, {**skip_shares, **run_shares}, grams,
                           {"single": projection_coef(singles), "span": projection_coef(grams)},
                           diagnostics, fam.spans, ref, chain.layout)


def transfer(coef: torch.Tensor, grams: Grams) -> Dict[str, float]:
    """Cosines on another batch of the direction with coefficients fitted on one batch: whether a
    fixed combination of the family's vectors (one that does not look at g_ref) keeps its cosine."""
    return grams.cosines(coef)


__all__ = ["Family", "family", "Grams", "eq19", "combine", "model_newton", "counter_newton", "quasi_newton",
           "best_in_span", "projection_coef", "mixed", "g2_operator", "NewtonCG", "newton_cg", "DIRECTIONS",
           "ALL_BLOCK", "ALL_BLOCK_ALPHA", "all_mixed", "block_rescale", "all_block",
           "RHO_DEPENDENT", "DeepMeasurement", "indicator", "measure", "transfer"]
