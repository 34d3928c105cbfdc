"""The generic DCA loop: stop reasons, monotonicity, restarts, boosting, the classic checks."""
import numpy as np
import pytest

from dcanets.dca import (
    DCProblem,
    abs_quadratic,
    abs_quadratic_critical_points,
    max_distance_box,
    minimize,
    random_trs,
    trs_problem,
)


def assert_monotone(history, rtol=1e-12):
    h = np.asarray(history)
    h = h[np.isfinite(h)]
    assert np.all(np.diff(h) <= rtol * (1.0 + np.abs(h[:-1]))), "F(x_k) increased"


def test_abs_quadratic_reaches_known_critical_point():
    res = minimize(abs_quadratic(0.5, 0.5), [-0.5])
    assert res.x[0] == pytest.approx(-1.5)
    assert res.x[0] in abs_quadratic_critical_points(0.5, 0.5)
    np.testing.assert_allclose(abs_quadratic_critical_points(0.5, 0.5), [-1.5, 0.0, 2.5])
    assert res.success and res.status == "xtol" and res.criticality == 0.0
    assert_monotone(res.history)


def test_abs_quadratic_restarts_find_global_minimum():
    res = minimize(abs_quadratic(0.5, 0.5), [-0.5], n_restarts=10, seed=1)
    assert res.x[0] == pytest.approx(2.5) and res.fun == pytest.approx(-1.5)
    assert len(res.runs) == 11 and min(r["fun"] for r in res.runs) == res.fun


@pytest.mark.parametrize("boosted", [False, True])
def test_max_distance_on_unit_box(boosted):
    res = minimize(max_distance_box(2), [0.2, 0.3, 0.6, 0.1], boosted=boosted)
    assert -res.fun == pytest.approx(np.sqrt(2))
    assert set(np.round(res.x, 12)) <= {0.0, 1.0}
    assert_monotone(res.history)


def quadratic_with_inner_solver():
    """F = ½‖x‖² + ¼‖x‖⁴ − ¾‖x − c‖²: no closed-form step, so the inner L-BFGS-B solver runs."""
    c = np.array([1.0, -2.0, 0.5])
    return DCProblem(G=lambda x: 0.5 * x @ x + 0.25 * (x @ x) ** 2, grad_G=lambda x: x + (x @ x) * x,
                     H=lambda x: 0.75 * (x - c) @ (x - c), grad_H=lambda x: 1.5 * (x - c), name="inner")


def test_inner_iterative_solver_is_monotone_and_critical():
    prob = quadratic_with_inner_solver()
    res = minimize(prob, np.zeros(3), xtol=1e-9)
    assert res.success
    assert_monotone(res.history)
    # DC-critical: ∇G(x) = ∇H(x) for smooth G
    np.testing.assert_allclose(prob.grad_G(res.x), prob.grad_H(res.x), atol=1e-6)
    assert res.criticality < 1e-6


def test_iteration_cap_and_callback_stop_reasons():
    A, b, r = random_trs(20, seed=3)
    prob = trs_problem(A, b, r, "projective")
    assert minimize(prob, np.zeros(20), max_iter=2).status == "max_iter"
    res = minimize(prob, np.zeros(20), callback=lambda x, f: True)
    assert res.status == "callback" and res.nit == 1


def test_subproblem_failure_is_reported_and_last_point_kept():
    calls = {"n": 0}

    def bad_step(y, xk):
        calls["n"] += 1
        return xk - 1.0 if calls["n"] < 3 else np.full_like(xk, np.nan)

    prob = DCProblem(G=lambda x: float(x @ x), H=lambda x: 0.0, grad_H=lambda x: 0 * x, solve_subproblem=bad_step)
    res = minimize(prob, np.array([5.0]))
    assert res.status == "subproblem_failed" and not res.success
    assert res.x[0] == pytest.approx(3.0)           # two good steps, then failure
    # a "solver" that increases F is also a failure (F must never increase)
    up = DCProblem(G=lambda x: float(x @ x), H=lambda x: 0.0, grad_H=lambda x: 0 * x,
                   solve_subproblem=lambda y, xk: xk + 1.0)
    res = minimize(up, np.array([1.0]))
    assert res.status == "subproblem_failed" and res.x[0] == 1.0 and res.nit == 0


@pytest.mark.parametrize("kw", [{"xtol": -1}, {"max_iter": 0}, {"n_restarts": -1}, {"boost_beta": 1.5}])
def test_bad_options_raise_value_error_naming_them(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        minimize(abs_quadratic(), [0.1], **kw)


def test_restarts_without_sampler_and_problem_without_solver_raise():
    prob = DCProblem(G=lambda x: 0.0, H=lambda x: 0.0, grad_H=lambda x: x, solve_subproblem=lambda y, x: x)
    with pytest.raises(ValueError, match="sampler"):
        minimize(prob, [0.0], n_restarts=2)
    with pytest.raises(ValueError, match="grad_G"):
        DCProblem(G=lambda x: 0.0, H=lambda x: 0.0, grad_H=lambda x: x)
    with pytest.raises(ValueError, match="a must be > 0"):
        abs_quadratic(a=0.0)


def test_boosted_dca_is_monotone_and_takes_accepted_steps():
    A, b, r = random_trs(30, seed=1, hard=True)
    plain = minimize(trs_problem(A, b, r), np.full(30, 0.01), max_iter=3000)
    boost = minimize(trs_problem(A, b, r), np.full(30, 0.01), max_iter=3000, boosted=True)
    assert_monotone(boost.history)
    assert any(t > 0 for t in boost.boost_steps)
    assert boost.fun <= plain.fun + 1e-10
    assert boost.nit < plain.nit                     # on this slow (hard-case) instance boosting helps
