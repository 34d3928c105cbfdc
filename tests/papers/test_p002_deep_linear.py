"""Paper 002, §2.1: the truncated-SVD optimum of deep linear nets, and GD measured against it."""
import pytest
import torch

from dcanets.papers import p002_deep_linear as dl


def _problem(d=6, n=40):
    return dl.planted_problem(d, n, torch.Generator().manual_seed(0), noise=0.2)


def test_full_rank_optimum_is_least_squares():
    x, y = _problem()
    opt = dl.optimum(x, y)
    lstsq = torch.linalg.lstsq(x.T, y.T).solution.T
    assert torch.allclose(opt.w, lstsq, atol=1e-8)


def test_bottleneck_optimum_beats_random_rank_r_maps_and_factors_reproduce_it():
    x, y = _problem()
    opt = dl.optimum(x, y, widths=(2,))
    assert torch.linalg.matrix_rank(opt.w) == 2
    g = torch.Generator().manual_seed(1)
    for _ in range(50):  # perturbed rank-2 products are never better
        w = opt.w + 0.05 * torch.randn(6, 2, generator=g, dtype=torch.float64) @ torch.randn(
            2, 6, generator=g, dtype=torch.float64)
        assert 0.5 * ((y - w @ x) ** 2).sum() / x.shape[1] >= opt.loss - 1e-12
    layers = dl.optimal_layers(opt, (2, 3), d0=6)
    assert [tuple(w.shape) for w in layers] == [(2, 6), (3, 2), (6, 3)]
    assert torch.allclose(layers[2] @ layers[1] @ layers[0], opt.w, atol=1e-9)


def test_gd_with_identity_shortcut_reaches_the_oracle():
    x, y = _problem()
    res = dl.train(x, y, depth=3, shortcut="identity", steps=600, lr=0.05, seeds=3, record_every=100)
    assert res.excess[0] > 1.0 and res.final_excess.max() < 1e-3
    assert (res.final_excess > -1e-9).all()  # nothing beats the closed form


def test_negative_shortcut_even_depth_mirrors_identity():
    """(-I + W) = -(I - W): with an even depth and a symmetric init the two trajectories coincide."""
    x, y = _problem()
    a = dl.train(x, y, depth=2, shortcut="identity", steps=50, lr=0.05, seeds=2, init_std=0.0)
    b = dl.train(x, y, depth=2, shortcut="negative", steps=50, lr=0.05, seeds=2, init_std=0.0)
    assert a.excess == pytest.approx(b.excess, rel=1e-9)


def test_unknown_shortcut_is_rejected():
    x, y = _problem()
    with pytest.raises(ValueError, match="unknown shortcut"):
        dl.train(x, y, 2, "skip", 1, 0.1, 1)
