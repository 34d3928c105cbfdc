"""Curvature estimates against quadratics with known spectra, and the advice built on them."""
import argparse

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dcanets.analysis.curvature import advise
from dcanets.hessian import extreme_eigenvalues, hvp, lanczos, loss_hessian_operator, power_iteration


def _sym(eigs):
    eigs = torch.as_tensor(eigs, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), dtype=torch.float64))
    return q @ torch.diag(eigs) @ q.T


def test_hvp_of_a_quadratic_is_the_matrix_product():
    A = _sym(torch.linspace(-2, 3, 6))
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, dtype=torch.float64)
    (out,) = hvp(lambda: 0.5 * w @ A @ w + w.sum() ** 3 * 0, [w], [v])
    assert torch.allclose(out, A @ v, atol=1e-10)


@pytest.mark.parametrize("dim", [5, 40, 200])
def test_lanczos_finds_both_ends_of_a_known_spectrum(dim):
    eigs = torch.linspace(-1.5, 4.0, dim)
    A = _sym(eigs)
    values, weights = lanczos(lambda v: A @ v, dim, steps=40, seed=1, dtype=torch.float64)
    tol = 1e-6 if dim <= 40 else 5e-3   # 40 steps on a dense uniform spectrum of 200
    assert values[0].item() == pytest.approx(-1.5, abs=tol)
    assert values[-1].item() == pytest.approx(4.0, abs=tol)
    assert torch.all(values[1:] >= values[:-1])
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-8)


def test_lanczos_quadrature_recovers_spectral_moments():
    eigs = torch.cat([torch.full((30,), -1.0), torch.full((70,), 2.0)])
    A = _sym(eigs)
    est = 0.0
    for seed in range(20):   # stochastic Lanczos quadrature: E[Σ w_i θ_i] = tr(A)/n
        values, weights = lanczos(lambda v: A @ v, 100, steps=5, seed=seed, dtype=torch.float64)
        est += float((weights * values).sum()) / 20
    assert est == pytest.approx(eigs.mean().item(), abs=0.2)


def test_power_iteration_gives_the_largest_magnitude():
    A = _sym([0.1, -0.5, 1.0, 3.0])
    assert power_iteration(lambda v: A @ v, 4, iters=200, dtype=torch.float64) == pytest.approx(3.0, abs=1e-6)


def test_loss_hessian_of_least_squares_is_xtx():
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randn(32, 1)
    model = nn.Linear(5, 1, bias=False)
    matvec, dim = loss_hessian_operator(model, lambda out, t: 0.5 * ((out - t) ** 2).sum(), x, y)
    assert dim == 5
    exact = torch.linalg.eigvalsh((x.T @ x).double())
    lo, hi = extreme_eigenvalues(model, lambda out, t: 0.5 * ((out - t) ** 2).sum(), x, y, steps=5)
    assert lo == pytest.approx(exact[0].item(), rel=1e-4)
    assert hi == pytest.approx(exact[-1].item(), rel=1e-4)


def test_network_hessian_matches_autograd_and_keeps_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    params = list(model.parameters())

    def flat_loss(w):
        chunks = torch.split(w, [p.numel() for p in params])
        named = {n: c.view(p.shape) for (n, p), c in zip(model.named_parameters(), chunks)}
        return F.cross_entropy(torch.func.functional_call(model, named, (x,)), y)

    w0 = torch.cat([p.detach().reshape(-1) for p in params])
    with torch.no_grad():
        saved = [b.clone() for b in model.buffers()]
    H = torch.autograd.functional.hessian(flat_loss, w0)
    with torch.no_grad():
        for b, s in zip(model.buffers(), saved):
            b.copy_(s)
    before = [b.clone() for b in model.buffers()]
    matvec, dim = loss_hessian_operator(model, F.cross_entropy, x, y)
    v = torch.randn(dim)
    assert torch.allclose(matvec(v), H @ v, atol=1e-5)
    lo, hi = extreme_eigenvalues(model, F.cross_entropy, x, y, steps=dim)
    exact = torch.linalg.eigvalsh(H.double())
    assert lo == pytest.approx(exact[0].item(), abs=1e-4) and hi == pytest.approx(exact[-1].item(), abs=1e-4)
    for b, b0 in zip(model.buffers(), before):
        assert torch.equal(b, b0)


def test_advice_from_curvature():
    adv = advise(-0.2, 4.0)
    assert adv["lr_projective"] == pytest.approx(0.25)     # lr <= 1/λ_max
    assert adv["lr_lyapunov"] == pytest.approx(0.5)        # lr < 2/λ_max
    assert adv["rho_min"] == pytest.approx(0.2)            # ρ >= −λ_min
    assert advise(0.5, 1.0)["rho_min"] == 0.0
    assert advise(-2.0, -1.0)["lr_lyapunov"] == float("inf")
    with pytest.raises(ValueError, match="lam_min <= lam_max"):
        advise(2.0, 1.0)


def test_gradient_descent_below_the_lyapunov_bound_converges_and_above_diverges():
    A = _sym([0.5, 1.0, 4.0])
    values, _ = lanczos(lambda v: A @ v, 3, steps=3, dtype=torch.float64)
    bound = advise(values[0].item(), values[-1].item())["lr_lyapunov"]
    for scale, converges in ((0.9, True), (1.1, False)):
        w = torch.ones(3, dtype=torch.float64)
        for _ in range(300):
            w = w - scale * bound * (A @ w)
        assert (w.norm().item() < 1e-3) is converges


def test_cli_on_a_tiny_model(capsys):
    args = argparse.Namespace(model="cifar_plainnet20", data="synthetic:16", batch=2, steps=2, seed=0,
                              eval_mode=False, json=True)
    import dcanets  # noqa: F401
    from dcanets.cli import curvature as curvature_cli

    assert curvature_cli.run(args) == 0
    out = capsys.readouterr().out
    assert '"lam_max"' in out and '"rho_min"' in out
    with pytest.raises(ValueError, match="unknown model"):
        curvature_cli.run(argparse.Namespace(**{**vars(args), "model": "nosuchnet"}))


def test_graph_and_gradient_difference_operators_of_a_quadratic():
    """One kept graph (exact products) and central differences of gradients (exact for a
    quadratic up to rounding) both give A·v; the weights come back bit-identical."""
    from dcanets.hessian import directional_curvature, gradient_difference_operator, graph_hessian_operator

    A = _sym(torch.linspace(-2, 3, 5))
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    unused = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    w0 = w.detach().clone()

    def loss():
        return 0.5 * w @ A @ w + w.sum()

    v = torch.randn(7, dtype=torch.float64)
    want = torch.cat([A @ v[:5], torch.zeros(2, dtype=torch.float64)])   # the unused parameter: zeros
    matvec, dim = graph_hessian_operator(loss(), [w, unused])
    assert dim == 7 and torch.allclose(matvec(v), want, atol=1e-12)
    assert torch.allclose(matvec(v), want, atol=1e-12)                    # the graph is kept

    def grad_at():
        return list(torch.autograd.grad(loss(), [w]))

    fd, _ = gradient_difference_operator(grad_at, [w], eps=1e-3)
    assert torch.allclose(fd(v[:5]), A @ v[:5], atol=1e-8) and torch.equal(w.detach(), w0)
    u = v[:5]
    assert directional_curvature(grad_at, [w], [u], eps=1e-3) == pytest.approx(float(u @ A @ u / (u @ u)), rel=1e-8)
    assert directional_curvature(grad_at, [w], [None], eps=1e-3) == 0.0
