"""Paper 003 §2 bounds, each checked against the loss Hessian at the equilibrium (autograd: gradient
descent with step δ is stable there only if δ < 2/λ_max, Lyapunov's indirect method) and by
simulating gradient descent at 0.9× and 1.1× the bound."""
import numpy as np
import pytest
import torch

from dcanets.analysis.stability import (
    matrix_product_safe_step,
    matrix_product_unstable_step,
    scalar_product_max_step,
    scalar_product_rate,
    scalar_product_safe_step,
    scalar_product_step_bound,
    simulate_matrix_product,
    simulate_scalar_product,
)

SCALAR_CASES = [(2.0, 5, 1.0), (0.5, 4, 2.0), (1.5, 10, 0.5), (-3.0, 3, 1.0)]


def hessian_step_bound(loss, w):
    """2/λ_max of the Hessian of ``loss`` (a torch function of a flat vector) at ``w``, by autograd."""
    H = torch.autograd.functional.hessian(loss, torch.as_tensor(np.ravel(w), dtype=torch.float64))
    return 2.0 / float(torch.linalg.eigvalsh(H).max())


def scalar_loss(lam, sigma=1.0):
    """Paper 003, eq. (1): ½σ(w_L⋯w_1 − λ)²."""
    return lambda w: 0.5 * sigma * (torch.prod(w) - lam) ** 2


def matrix_loss(R, L):
    """Paper 003, eq. (4) with Σ = I: ½‖W_L⋯W_1 − R‖², on the L factors flattened."""
    n, target = R.shape[0], torch.as_tensor(R)

    def loss(flat):
        product = torch.eye(n, dtype=torch.float64)
        for W in flat.view(L, n, n):
            product = W @ product
        return 0.5 * ((product - target) ** 2).sum()
    return loss


def side_changes(deviation):
    d = deviation[np.abs(deviation) > 1e-12]
    return bool(np.any(np.sign(d) != np.sign(d[0])))


@pytest.mark.parametrize("lam, L, sigma", SCALAR_CASES)
def test_prop1_max_step_separates_convergence_from_divergence(lam, L, sigma):
    bound = scalar_product_max_step(lam, L, sigma)
    balanced = np.full(L, abs(lam) ** (1 / L)) * np.r_[np.sign(lam), np.ones(L - 1)]
    assert bound == pytest.approx(hessian_step_bound(scalar_loss(lam, sigma), balanced), rel=1e-9)
    assert scalar_product_step_bound(balanced, sigma) == pytest.approx(bound, rel=1e-9)
    below = simulate_scalar_product(lam, L, 0.9 * bound, sigma, iters=1500)
    above = simulate_scalar_product(lam, L, 1.1 * bound, sigma, iters=1500)
    assert below.converged and below.final_loss < 1e-16
    assert not above.converged and above.final_loss > 1e-6


def test_prop1_unbalanced_equilibrium_has_smaller_bound_and_is_unstable_above_it():
    lam, L, kappa = 2.0, 3, 3.0
    w = np.array([kappa, kappa, kappa ** (1 - L)]) * lam ** (1 / L)     # Πw = λ, disproportionate
    bound = scalar_product_step_bound(w)
    assert bound == pytest.approx(hessian_step_bound(scalar_loss(lam), w), rel=1e-9)
    assert bound < scalar_product_max_step(lam, L) / 5
    assert simulate_scalar_product(lam, L, 0.9 * bound, w0=w * (1 + 1e-4), iters=3000).converged
    above = simulate_scalar_product(lam, L, 1.1 * bound, w0=w * (1 + 1e-4), iters=300)
    assert np.abs(above.trajectory[-1] - w).max() > 1e-2                # it leaves that equilibrium


@pytest.mark.parametrize("lam, L, sigma", [c for c in SCALAR_CASES if c[0] > 0])
def test_prop2_rate_below_and_overshoot_above_safe_step(lam, L, sigma):
    dc, target = scalar_product_safe_step(lam, L, sigma), lam ** (1 / L)
    run = simulate_scalar_product(lam, L, 0.9 * dc, sigma, w0=np.ones(L), iters=400)
    dev = run.trajectory[:, 0] - target
    rho = scalar_product_rate(lam, L, 0.9 * dc, sigma)
    assert 0 <= rho < 1 and run.converged
    assert np.all(np.abs(dev) <= rho ** np.arange(len(dev)) * abs(1 - target) * (1 + 1e-9) + 1e-14)
    assert not side_changes(dev)                                          # monotone, as the proof says
    over = simulate_scalar_product(lam, L, 1.1 * dc, sigma, w0=np.ones(L), iters=400)
    assert side_changes(over.trajectory[:, 0] - target)                  # the guarantee is lost (overshoot)


def symmetric(eigs, seed=0):
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigs), len(eigs))))
    return (Q * eigs) @ Q.T, Q


def test_thm1_no_stable_equilibrium_above_bound():
    eigs, L = np.array([0.3, 0.8, 1.5, 2.5]), 4
    R, Q = symmetric(eigs)
    bound = matrix_product_unstable_step(R, L)
    equilibrium = np.stack([(Q * eigs ** (1 / L)) @ Q.T] * L)
    assert bound == pytest.approx(hessian_step_bound(matrix_loss(R, L), equilibrium), rel=1e-9)
    assert matrix_product_unstable_step(2.5, L) == pytest.approx(bound)
    below = simulate_matrix_product(R, L, 0.9 * bound, W0=equilibrium, perturb=1e-3, iters=500)
    above = simulate_matrix_product(R, L, 1.1 * bound, W0=equilibrium, perturb=1e-3, iters=500)
    assert below.converged and not above.converged and above.final_loss > 1e-6


def test_thm2_identity_init_converges_below_bound_and_loses_monotonicity_above():
    eigs, L = np.array([0.5, 1.2, 2.0]), 3
    R, Q = symmetric(eigs, seed=1)
    safe = matrix_product_safe_step(R, L)
    assert safe == pytest.approx(min(1, 2.0 ** (-2 * (L - 1) / L)) / L)
    top = Q[:, -1]
    for factor, overshoot in [(0.9, False), (1.1, True)]:
        run = simulate_matrix_product(R, L, factor * safe, iters=400)
        assert run.converged                                  # Thm. 2 is sufficient, not necessary
        dev = np.array([top @ W[0] @ top for W in run.trajectory]) - 2.0 ** (1 / L)
        assert side_changes(dev) == overshoot
        np.testing.assert_allclose(run.trajectory[-1][0], (Q * eigs ** (1 / L)) @ Q.T, atol=1e-8)


@pytest.mark.parametrize("call, match", [
    (lambda: scalar_product_max_step(0.0, 3), "lam must be finite and nonzero"),
    (lambda: scalar_product_max_step(1.0, 0), "L .*integer >= 1"),
    (lambda: scalar_product_max_step(1.0, 2.5), "L .*integer >= 1"),
    (lambda: scalar_product_max_step(1.0, 3, sigma=-1), "sigma must be finite and > 0"),
    (lambda: scalar_product_safe_step(-1.0, 3), "lam must be finite and > 0"),
    (lambda: scalar_product_step_bound([]), "w must be"),
    (lambda: matrix_product_unstable_step(-2.0, 3), "lam_R must be finite and > 0"),
    (lambda: matrix_product_safe_step(np.diag([1.0, -2.0]), 3), "every eigenvalue of R > 0"),
    (lambda: matrix_product_safe_step(np.array([[0.0, -1.0], [1.0, 0.0]]), 3), "real eigenvalues"),
    (lambda: simulate_scalar_product(1.0, 3, step=0.0), "step must be finite and > 0"),
    (lambda: simulate_scalar_product(1.0, 3, step=0.1, w0=[1.0]), r"w0 must have shape \(3,\)"),
])
def test_input_errors_name_parameter_and_range(call, match):
    with pytest.raises(ValueError, match=match):
        call()
