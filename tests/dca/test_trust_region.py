"""Trust-region subproblem: exact solver, both DC decompositions of paper 000 §2, optimality conditions.

Tolerances (dimensionless, see trs_optimality): stationarity ≤ 1e-6, complementarity ≤ 1e-6,
psd (−λ_min(A+μI)/‖A‖) ≤ 1e-6, infeasibility ≤ 1e-12; objective gap to the exact optimum ≤ 1e-6
relative, i.e. (F_dca − F*)/max(1, |F*|).
"""
import numpy as np
import pytest

from dcanets.dca import exact_trs, minimize, project_ellipsoid, random_trs, trs_objective, trs_optimality, trs_problem

SIZES = [2, 5, 20, 50, 200]
KKT_TOL = 1e-6


def assert_global_conditions(A, b, r, x, mu=None):
    opt = trs_optimality(A, b, r, x, mu)
    assert opt["mu"] >= 0
    assert opt["stationarity"] <= KKT_TOL, opt
    assert opt["complementarity"] <= KKT_TOL, opt
    assert opt["psd"] <= KKT_TOL, opt
    assert opt["infeasibility"] <= 1e-12, opt


def rel_gap(f, fstar):
    return (f - fstar) / max(1.0, abs(fstar))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("hard", [False, True])
def test_exact_solver_satisfies_optimality_and_beats_sampling(n, hard):
    A, b, r = random_trs(n, seed=n, hard=hard)
    sol = exact_trs(A, b, r)
    assert sol.hard_case == hard
    assert_global_conditions(A, b, r, sol.x, sol.mu)
    pts = np.random.default_rng(0).standard_normal((2000, n))
    pts *= r / np.linalg.norm(pts, axis=1, keepdims=True)
    sampled = 0.5 * ((pts @ A) * pts).sum(axis=1) + pts @ b
    assert sol.fun <= sampled.min() + 1e-12 and sol.fun == pytest.approx(trs_objective(A, b, sol.x))


def test_exact_solver_interior_and_one_dimensional_cases():
    A = np.diag([2.0, 3.0])
    b = np.array([-0.2, 0.3])
    sol = exact_trs(A, b, 1.0)
    assert sol.mu == 0.0 and np.allclose(sol.x, -b / np.diag(A))
    assert exact_trs(np.array([[-1.0]]), np.array([0.0]), 2.0).fun == pytest.approx(-2.0)   # hard case, b = 0


@pytest.mark.parametrize("decomposition", ["projective", "proximal"])
@pytest.mark.parametrize("n", SIZES)
def test_dca_with_restarts_reaches_global_minimum(decomposition, n):
    A, b, r = random_trs(n, seed=100 + n)
    star = exact_trs(A, b, r)
    res = minimize(trs_problem(A, b, r, decomposition), np.zeros(n), n_restarts=3, seed=n)
    assert rel_gap(res.fun, star.fun) <= 1e-6
    assert_global_conditions(A, b, r, res.x)
    assert res.criticality < 1e-6
    h = np.asarray(res.history)
    assert np.all(np.diff(h) <= 1e-12 * (1 + np.abs(h[:-1])))


@pytest.mark.parametrize("decomposition", ["projective", "proximal"])
@pytest.mark.parametrize("n", [2, 5, 20])
def test_hard_case_needs_restarts_and_dca_finds_it(decomposition, n):
    A, b, r = random_trs(n, seed=7 + n, hard=True)
    star = exact_trs(A, b, r)
    assert star.hard_case
    prob = trs_problem(A, b, r, decomposition)
    # from 0, b ⟂ the λ_min eigenvector keeps every iterate in its complement: a non-global point
    single = minimize(prob, np.zeros(n))
    assert rel_gap(single.fun, star.fun) > 1e-3
    res = minimize(prob, np.zeros(n), n_restarts=3, seed=0, max_iter=20000)
    assert rel_gap(res.fun, star.fun) <= 1e-6
    assert_global_conditions(A, b, r, res.x)


def test_proximal_step_matches_papers_formula_and_projection_kkt():
    A, b, r = random_trs(6, seed=2)
    lam, Q = np.linalg.eigh(A)
    rho = -lam[0] + 0.3
    m = lam + rho
    w = np.random.default_rng(0).standard_normal(6) * 5
    z = project_ellipsoid(w, m, Q, r)
    Minv = (Q / m) @ Q.T
    assert z @ Minv @ z == pytest.approx(r * r, rel=1e-10)
    nu = np.mean((w - z) / (Minv @ z))                        # KKT: w − z = ν M^{-1} z, ν ≥ 0
    assert nu > 0 and np.allclose(w - z, nu * Minv @ z, atol=1e-8)
    # the proximal step solves min ½xᵀ(A+ρI)x + (b − ρx_k)ᵀx over the ball
    xk = np.random.default_rng(1).standard_normal(6) * 0.3
    x1 = trs_problem(A, b, r, "proximal", rho=rho).subproblem(rho * xk, xk)
    ref = exact_trs(A + rho * np.eye(6), b - rho * xk, r).x
    np.testing.assert_allclose(x1, ref, atol=1e-8)


def test_projective_step_is_projected_gradient():
    A, b, r = random_trs(8, seed=4)
    rho = np.linalg.eigvalsh(A)[-1]
    x = np.random.default_rng(0).standard_normal(8) * 0.2
    prob = trs_problem(A, b, r, "projective")
    g = x - (A @ x + b) / rho
    expected = g if np.linalg.norm(g) <= r else g * r / np.linalg.norm(g)
    np.testing.assert_allclose(prob.subproblem(prob.grad_H(x), x), expected, atol=1e-14)


@pytest.mark.parametrize("kwargs, match", [
    ({"decomposition": "prox"}, "unknown decomposition"),
    ({"decomposition": "projective", "rho": 0.1}, "rho must be >= lambda_max"),
    ({"decomposition": "proximal", "rho": -1.0}, "rho must be >= 0"),
])
def test_bad_trs_inputs_raise(kwargs, match):
    A, b, r = random_trs(4, seed=0)
    with pytest.raises(ValueError, match=match):
        trs_problem(A, b, r, **kwargs)
    with pytest.raises(ValueError, match="r .*> 0"):
        exact_trs(A, b, -1.0)
    with pytest.raises(ValueError, match="symmetric"):
        exact_trs(A + np.triu(np.ones((4, 4)), 1), b, 1.0)
