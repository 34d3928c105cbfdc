"""Teacher–student two-layer non-overlapping CNN of paper 001, batched over random teachers.

Teacher ``f(Z) = sum_j a*_j relu(Z_j^T v*)`` with ``||v*|| = 1`` and ``k`` patches ``Z_j ~ N(0, I_p)``
drawn independently. The student ``h(Z) = sum_j a_j relu(Z_j^T u / ||u||)`` has
``u = 1/sqrt(p) + w`` with the skip-layer prior (paper 001, "Student Network") and ``u = w``
without it. Normalized GD (paper 001, "Gradient Descent with Normalization") keeps ``||u|| = 1``
after every step, so the two students differ only in where ``u`` starts: ``1/sqrt(p)`` (``w_0 = 0``)
with the prior, a uniformly random unit vector without it (Du et al.'s CNN setting, the one
paper 001 compares against).

Everything is a tensor with a leading batch dimension ``B`` (one row per teacher), so a whole
success-rate sweep is a few thousand small tensor operations instead of a Python loop per teacher.

Teacher distributions are named options (:data:`TEACHERS`, :func:`teacher_sampler`; the slides give
none for their experiment): what decides the prior's fate is the angle between ``v*`` and the
shortcut direction ``1/sqrt(p)`` where the prior starts the student. Below 90 degrees a long enough warm-up
leads to success (:func:`frozen_alignment`); at 90 degrees the prior's assumption ends.

Population loss in closed form (derivation, used by :func:`population_loss`): for unit ``u, v``
at angle ``theta``, ``E[relu(z^T u) relu(z^T v)] = (sin theta + (pi - theta) cos theta) / (2 pi)``
and ``E[relu(z^T u)] = 1 / sqrt(2 pi)``. Patches are independent, so with
``M(theta) = g(theta) I + (11^T - I) / (2 pi)``:

    L(a, u) = E_Z (f - h)^2 = a*^T M(0) a* - 2 a^T M(theta) a* + a^T M(0) a.

``M(0) = (11^T + (pi - 1) I) / (2 pi)`` and ``M(pi) = (11^T - I) / (2 pi)`` give the spurious
optimum of paper 001: ``v = -v*``, ``a = (11^T + (pi - 1) I)^{-1} (11^T - I) a*``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

TWO_PI = 2.0 * math.pi
FilterSampler = Callable[[int, int, torch.Generator], torch.Tensor]  # (n, p, generator) -> (n, p)


@dataclass
class Teachers:
    """A batch of teachers: ``a`` (B, k) output weights, ``v`` (B, p) unit filters."""

    a: torch.Tensor
    v: torch.Tensor

    @property
    def k(self) -> int:
        return self.a.shape[1]

    @property
    def p(self) -> int:
        return self.v.shape[1]


def ones_direction(p: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The shortcut direction ``1 / sqrt(p)`` (a unit vector)."""
    return torch.full((p,), 1.0 / math.sqrt(p), dtype=dtype)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _prior_sphere(n: int, p: int, generator: torch.Generator) -> torch.Tensor:
    """``v* = (1/sqrt(p) + w*) / ||.||`` with ``w*`` uniform on the unit sphere: paper 001's
    Assumption "Skip-Layer Prior" (``||w*|| <= 1``) at ``||w*|| = 1``. The angle to the shortcut
    direction is half the angle between ``1/sqrt(p)`` and ``w*``, so it stays well below 90 degrees
    except for the rare ``w*`` near ``-1/sqrt(p)``."""
    w_star = _unit(torch.randn(n, p, generator=generator, dtype=torch.float64))
    return _unit(ones_direction(p) + w_star)


def _prior_hemisphere(n: int, p: int, generator: torch.Generator) -> torch.Tensor:
    """``v*`` uniform over every unit filter the prior allows for the *normalized* student: some
    ``w*`` with ``||w*|| <= 1`` and ``1/sqrt(p) + w*`` a positive multiple of ``v*`` exists iff the
    angle between ``v*`` and ``1/sqrt(p)`` is below 90 degrees (the ray through ``v*`` comes within
    ``sin(angle)`` of ``1/sqrt(p)``; beyond 90 degrees never within 1). A uniform filter reflected
    into that half-sphere."""
    v = _unit(torch.randn(n, p, generator=generator, dtype=torch.float64))
    e = ones_direction(p)
    cos = (v @ e)[:, None]
    return torch.where(cos < 0, v - 2 * cos * e, v)


def _generic(n: int, p: int, generator: torch.Generator) -> torch.Tensor:
    """``v*`` uniform on the unit sphere: the teacher of the "Teacher Network" slide with no prior
    assumption (half of these teachers violate it)."""
    return _unit(torch.randn(n, p, generator=generator, dtype=torch.float64))


def _at_angle(degrees: float) -> FilterSampler:
    """``v* = cos(phi) 1/sqrt(p) + sin(phi) xi``, ``xi`` uniform among unit vectors orthogonal to
    ``1/sqrt(p)``: every teacher at the same angle ``phi`` from where the prior starts the student.
    ``phi < 90`` satisfies the prior (see :func:`_prior_hemisphere`), ``phi = 90`` is its edge."""
    phi = math.radians(degrees)

    def sample(n: int, p: int, generator: torch.Generator) -> torch.Tensor:
        if p < 2:
            raise ValueError(f"a teacher at a given angle needs p >= 2, got p={p}")
        e = ones_direction(p)
        xi = torch.randn(n, p, generator=generator, dtype=torch.float64)
        xi = _unit(xi - (xi @ e)[:, None] * e)
        return math.cos(phi) * e + math.sin(phi) * xi

    return sample


# named teacher distributions (of v*; a* ~ N(0, I_k) in all). The slides give no experiment
# distribution, so these span the prior: well inside it, all of it, its edge, and without it.
TEACHERS: Dict[str, FilterSampler] = {
    "prior_sphere": _prior_sphere,
    "prior_hemisphere": _prior_hemisphere,
    "prior_boundary": _at_angle(90.0),
    "generic": _generic,
}


def teacher_sampler(name: str) -> FilterSampler:
    """The sampler of ``v*`` called ``name``: a key of :data:`TEACHERS` or ``"angle:<degrees>"``
    (every teacher at that angle from the shortcut direction, ``0 <= degrees <= 180``)."""
    if name in TEACHERS:
        return TEACHERS[name]
    if name.startswith("angle:"):
        try:
            degrees = float(name.split(":", 1)[1])
        except ValueError:
            degrees = math.nan
        if 0.0 <= degrees <= 180.0:
            return _at_angle(degrees)
    raise ValueError(f"unknown teacher distribution {name!r}: use one of {sorted(TEACHERS)} "
                     "or 'angle:<degrees>' with 0 <= degrees <= 180")


def sample_teachers(n: int, k: int, p: int, generator: torch.Generator,
                    teacher: str = "prior_sphere") -> Teachers:
    """``n`` random teachers: unit filters ``v*`` from the distribution ``teacher`` (see
    :func:`teacher_sampler`; the default keeps the prior well satisfied) and ``a* ~ N(0, I_k)``,
    drawn in that order from ``generator``."""
    v_star = teacher_sampler(teacher)(n, p, generator)
    a_star = torch.randn(n, k, generator=generator, dtype=torch.float64)
    return Teachers(a_star, v_star)


def pair_kernel(cos: torch.Tensor) -> torch.Tensor:
    """``g = E[relu(z^T u) relu(z^T v)]`` for unit u, v with ``u^T v = cos`` (arc-cosine kernel)."""
    cos = cos.clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    return (torch.sqrt(1.0 - cos * cos) + (math.pi - theta) * cos) / TWO_PI


def _quad(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``x^T M y`` with ``M = g I + (11^T - I) / (2 pi)``, batched (g has shape (B,))."""
    dot = (x * y).sum(-1)
    return g * dot + (x.sum(-1) * y.sum(-1) - dot) / TWO_PI


def population_loss(a: torch.Tensor, u: torch.Tensor, teachers: Teachers) -> torch.Tensor:
    """``E_Z (f - h)^2`` per teacher, in closed form; ``u`` need not be normalized."""
    cos = (_unit(u) * teachers.v).sum(-1)
    g0 = torch.full_like(cos, 0.5)  # g(0) = 1/2 = E[relu(x)^2]
    return (_quad(teachers.a, teachers.a, g0) - 2 * _quad(a, teachers.a, pair_kernel(cos))
            + _quad(a, a, g0))


def population_grads(a: torch.Tensor, u: torch.Tensor, teachers: Teachers) -> tuple:
    """Analytic ``(dL/da, dL/du)``; ``dg/dcos = (pi - theta) / (2 pi)`` keeps them finite at ±1."""
    norm = u.norm(dim=-1, keepdim=True)
    v = u / norm
    cos = (v * teachers.v).sum(-1).clamp(-1.0, 1.0)
    g = pair_kernel(cos)
    a_star = teachers.a
    # dL/da = 2 M(0) a - 2 M(theta) a*
    m0a = 0.5 * a + (a.sum(-1, keepdim=True) - a) / TWO_PI
    mta = g[:, None] * a_star + (a_star.sum(-1, keepdim=True) - a_star) / TWO_PI
    grad_a = 2 * (m0a - mta)
    # dL/dcos = -2 a^T a* dg/dcos;  dcos/du = (I - v v^T) v* / ||u||
    dl_dcos = -2 * (a * a_star).sum(-1) * (math.pi - torch.arccos(cos)) / TWO_PI
    tangent = teachers.v - cos[:, None] * v
    return grad_a, dl_dcos[:, None] * tangent / norm


def spurious_optimum(teachers: Teachers) -> tuple:
    """``(a_bar, v_bar)`` of paper 001: ``v_bar = -v*``, ``a_bar = (11^T+(pi-1)I)^{-1}(11^T-I) a*``."""
    k = teachers.k
    eye = torch.eye(k, dtype=teachers.a.dtype)
    ones = torch.ones(k, k, dtype=teachers.a.dtype)
    a_bar = torch.linalg.solve(ones + (math.pi - 1) * eye, ((ones - eye) @ teachers.a.T)).T
    return a_bar, -teachers.v


def frozen_alignment(teachers: Teachers, u: torch.Tensor) -> torch.Tensor:
    """``a(theta)^T a*`` per teacher, with ``a(theta) = M(0)^{-1} M(theta) a*`` the minimiser over
    ``a`` while the filter stays at ``u`` (angle ``theta`` to ``v*``).

    Why: a step-size warm-up nearly freezes ``u`` while ``a`` converges, so afterwards ``u`` turns
    towards ``v*`` iff this is positive (``dL/dcos = -2 a^T a* dg/dcos``). On the all-ones
    direction and orthogonal to it the two matrices share eigenvectors, so with
    ``c = 2 pi g(theta) - 1`` it is ``c_par (1^T a*)^2 / k + c_perp ||a*_perp||^2`` with
    ``c_par = (c + k) / (k + pi - 1)`` and ``c_perp = c / (pi - 1)``: positive for every ``a*``
    when ``theta < 90`` degrees (``c > 0``), mostly negative beyond it for zero-mean ``a*``.
    """
    k = teachers.k
    c = TWO_PI * pair_kernel((_unit(u) * teachers.v).sum(-1)) - 1.0
    par2 = teachers.a.sum(-1) ** 2 / k
    perp2 = (teachers.a * teachers.a).sum(-1) - par2
    return (c + k) / (k + math.pi - 1) * par2 + c / (math.pi - 1) * perp2


def monte_carlo_loss(a: torch.Tensor, u: torch.Tensor, teachers: Teachers, samples: int,
                     generator: torch.Generator) -> torch.Tensor:
    """``mean (f - h)^2`` over Gaussian patch samples (a check on :func:`population_loss`)."""
    z = torch.randn(samples, teachers.a.shape[0], teachers.k, teachers.p,
                    generator=generator, dtype=torch.float64)
    f = (teachers.a * torch.relu(torch.einsum("sbkp,bp->sbk", z, teachers.v))).sum(-1)
    h = (a * torch.relu(torch.einsum("sbkp,bp->sbk", z, _unit(u)))).sum(-1)
    return ((f - h) ** 2).mean(0)


@dataclass
class GDConfig:
    """Normalized GD of paper 001 with optional step-size warm-up (Theorem 1 then Theorem 2).

    ``eta_a = lr_scale * pi / (k + pi - 1)``, i.e. ``lr_scale`` over the largest eigenvalue
    ``(k + pi - 1) / pi`` of the a-Hessian ``2 M(0)``. ``eta_w = lr_scale * min(eta_a, 1/||a*||^2)``
    after warm-up: the loss along the sphere has curvature ``a^T a* ~ ||a*||^2`` at the optimum
    (``g''(0) = -1/2``), so a larger step oscillates for ever; paper 001's Theorem 1 scales
    ``eta_w`` with ``||a*||^2`` too. During the first ``warmup_steps`` it is ``warmup_factor``
    times that (paper 001, Remark "Step Size Warm Up": ``eta_w^1 < eta_w^2``).
    """

    steps: int = 3000
    lr_scale: float = 1.0
    prior: bool = True
    warmup_steps: int = 0
    warmup_factor: float = 0.01

    def eta_a(self, k: int) -> float:
        return self.lr_scale * math.pi / (k + math.pi - 1)

    def eta_w(self, teachers: "Teachers") -> torch.Tensor:
        """Per-teacher step for ``u``, shape (B, 1)."""
        inv = 1.0 / (teachers.a * teachers.a).sum(-1, keepdim=True)
        return self.lr_scale * inv.clamp(max=math.pi / (teachers.k + math.pi - 1))


VARIANTS: Dict[str, GDConfig] = {
    "no_prior": GDConfig(prior=False),
    "prior": GDConfig(prior=True),
    "prior_warmup": GDConfig(prior=True, warmup_steps=1000),
}


def init_students(teachers: Teachers, prior: bool, generator: torch.Generator) -> tuple:
    """Paper 001's initialization: ``a_0`` uniform in the ball of radius ``|1^T a*| / sqrt(k)``;
    ``w_0 = 0`` (so ``u_0 = 1/sqrt(p)``) with the prior, ``u_0`` uniform on the sphere without."""
    n, k, p = teachers.a.shape[0], teachers.k, teachers.p
    radius = teachers.a.sum(-1).abs() / math.sqrt(k)
    direction = _unit(torch.randn(n, k, generator=generator, dtype=torch.float64))
    r = radius * torch.rand(n, generator=generator, dtype=torch.float64) ** (1.0 / k)
    a0 = direction * r[:, None]
    if prior:
        u0 = ones_direction(p).expand(n, p).clone()
    else:
        u0 = _unit(torch.randn(n, p, generator=generator, dtype=torch.float64))
    return a0, u0


@dataclass
class GDResult:
    """Final student, outcome flags and the loss history (every ``record_every`` steps)."""

    a: torch.Tensor
    v: torch.Tensor
    loss: torch.Tensor
    success: torch.Tensor
    spurious: torch.Tensor
    history: List[torch.Tensor] = field(default_factory=list)


def outcome(a: torch.Tensor, v: torch.Tensor, teachers: Teachers, tol: float) -> tuple:
    """(success, spurious) masks: within ``tol`` of the global optimum ``(a*, v*)`` or of the
    spurious one, in ``||v - v_opt||`` and in ``||a - a_opt|| / ||a*||``."""
    scale = teachers.a.norm(dim=-1)
    success = ((v - teachers.v).norm(dim=-1) <= tol) & ((a - teachers.a).norm(dim=-1) <= tol * scale)
    a_bar, v_bar = spurious_optimum(teachers)
    spurious = ((v - v_bar).norm(dim=-1) <= tol) & ((a - a_bar).norm(dim=-1) <= tol * scale)
    return success, spurious


def normalized_gd(teachers: Teachers, cfg: GDConfig, generator: torch.Generator, tol: float = 1e-2,
                  record_every: int = 0, init: Optional[tuple] = None) -> GDResult:
    """Run normalized GD for every teacher of the batch at once (paper 001's update rule).

    ``u <- (u - eta_w dL/du) / ||.||`` (for the prior student, the same as
    ``w <- (1/sqrt(p) + w~)/||.|| - 1/sqrt(p)``) and ``a <- a - eta_a dL/da``, both from the
    gradients at the current iterate.
    """
    a, u = init if init is not None else init_students(teachers, cfg.prior, generator)
    eta_a, eta_w2 = cfg.eta_a(teachers.k), cfg.eta_w(teachers)
    history = []
    for t in range(cfg.steps):
        eta_w = eta_w2 * (cfg.warmup_factor if t < cfg.warmup_steps else 1.0)
        grad_a, grad_u = population_grads(a, u, teachers)
        a = a - eta_a * grad_a
        u = _unit(u - eta_w * grad_u)
        if record_every and t % record_every == 0:
            history.append(population_loss(a, u, teachers))
    success, spurious = outcome(a, u, teachers, tol)
    return GDResult(a, u, population_loss(a, u, teachers), success, spurious, history)


@dataclass
class SweepCell:
    """One k of a sweep: the teachers and every variant's result on them."""

    teachers: Teachers
    results: Dict[str, GDResult]


def run_sweep(k_values: Sequence[int], p: int, n_teachers: int, variants: Dict[str, GDConfig],
              seed: int = 0, tol: float = 1e-2, teacher: str = "prior_sphere") -> Dict[int, SweepCell]:
    """Every variant on the same ``n_teachers`` teachers and the same ``a_0`` per k, so variants
    can be compared teacher by teacher (:func:`paired_difference`)."""
    out: Dict[int, SweepCell] = {}
    for k in k_values:
        teachers = sample_teachers(n_teachers, k, p, torch.Generator().manual_seed(seed + k), teacher)
        out[k] = SweepCell(teachers, {
            name: normalized_gd(teachers, cfg, torch.Generator().manual_seed(seed + 1000 + k), tol)
            for name, cfg in variants.items()})
    return out


def wilson_interval(successes: int, n: int, z: float = 1.96) -> Tuple[float, float]:
    """Wilson score interval of a binomial rate (95 % for z = 1.96); unlike the Wald interval it
    stays inside [0, 1] and is not empty at 0 or n successes, which is where these rates sit."""
    if n <= 0:
        raise ValueError(f"n must be >= 1, got {n}")
    rate, z2 = successes / n, z * z
    centre = (rate + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # the interval contains the rate; min/max only undo rounding at 0 and n successes
    return max(0.0, min(centre - half, rate)), min(1.0, max(centre + half, rate))


def summarize(res: GDResult) -> Dict[str, float]:
    """Success and spurious rates of one run with the success rate's Wilson 95 % interval."""
    n, wins = res.success.numel(), int(res.success.sum())
    low, high = wilson_interval(wins, n)
    return {"success": wins / n, "success_low": low, "success_high": high,
            "spurious": res.spurious.double().mean().item(), "median_loss": res.loss.median().item(),
            "teachers": n}


def paired_difference(base: torch.Tensor, other: torch.Tensor, confidence: float = 0.95) -> Dict[str, float]:
    """``rate(other) - rate(base)`` over the same teachers: a paired comparison, far tighter than
    two separate intervals when both rates are near 1. Only the teachers one variant solved and
    the other did not (``gained`` by ``other``, ``lost``) carry information: the exact McNemar test
    is a binomial test of ``gained`` out of ``gained + lost`` at 1/2, and the interval is its
    Clopper-Pearson interval mapped to the difference, so it excludes 0 exactly when the test
    rejects at ``1 - confidence`` (a Wald interval would not, with a handful of discordant pairs)."""
    from scipy.stats import binomtest

    n = base.numel()
    gained, lost = int((other & ~base).sum()), int((base & ~other).sum())
    m = gained + lost
    out = {"difference": (gained - lost) / n, "low": 0.0, "high": 0.0, "gained": gained, "lost": lost,
           "p_value": 1.0}
    if m:
        test = binomtest(gained, m, 0.5)
        ci = test.proportion_ci(confidence, method="exact")
        out.update(low=m / n * (2 * ci.low - 1), high=m / n * (2 * ci.high - 1), p_value=float(test.pvalue))
    return out


def success_rates(k_values: Sequence[int], p: int, n_teachers: int, variants: Dict[str, GDConfig],
                  seed: int = 0, tol: float = 1e-2,
                  teacher: str = "prior_sphere") -> Dict[str, Dict[int, Dict[str, float]]]:
    """Success and spurious rates (with Wilson intervals) per variant and k; every variant sees
    the same teachers, drawn from the distribution ``teacher``."""
    sweep = run_sweep(k_values, p, n_teachers, variants, seed, tol, teacher)
    return {name: {k: summarize(sweep[k].results[name]) for k in k_values} for name in variants}


def slice_teachers(teachers: Teachers, idx: int) -> Teachers:
    """Teacher ``idx`` as a batch of one (for the per-teacher baseline)."""
    return Teachers(teachers.a[idx:idx + 1], teachers.v[idx:idx + 1])


__all__ = [
    "Teachers", "GDConfig", "GDResult", "VARIANTS", "sample_teachers", "pair_kernel",
    "population_loss", "population_grads", "spurious_optimum", "frozen_alignment", "monte_carlo_loss",
    "init_students", "normalized_gd", "outcome", "success_rates", "slice_teachers", "ones_direction",
    "TEACHERS", "teacher_sampler", "SweepCell", "run_sweep", "summarize", "wilson_interval", "paired_difference",
]
