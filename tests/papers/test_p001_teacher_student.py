"""Paper 001's teacher-student maths: closed-form population loss, gradients, optima, GD."""
import math

import pytest
import timm
import torch

import dcanets  # noqa: F401  (registers the students)
from dcanets.papers import p001_teacher_student as ts


def _teachers(n=3, k=4, p=5, seed=0):
    return ts.sample_teachers(n, k, p, torch.Generator().manual_seed(seed))


def test_pair_kernel_matches_monte_carlo_and_limits():
    g = torch.Generator().manual_seed(1)
    u = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    for theta in (0.3, 1.5, 2.8):
        v = torch.tensor([math.cos(theta), math.sin(theta), 0.0], dtype=torch.float64)
        z = torch.randn(400_000, 3, generator=g, dtype=torch.float64)
        mc = (torch.relu(z @ u) * torch.relu(z @ v)).mean()
        closed = ts.pair_kernel(torch.tensor(math.cos(theta), dtype=torch.float64))
        assert abs(mc - closed) < 4e-3
    assert ts.pair_kernel(torch.tensor(1.0)).item() == pytest.approx(0.5)  # E[relu(x)^2]
    assert ts.pair_kernel(torch.tensor(-1.0)).item() == pytest.approx(0.0, abs=1e-7)


def test_population_loss_matches_monte_carlo():
    t = _teachers()
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 4, generator=g, dtype=torch.float64)
    u = torch.randn(3, 5, generator=g, dtype=torch.float64)
    closed = ts.population_loss(a, u, t)
    mc = ts.monte_carlo_loss(a, u, t, 200_000, g)
    assert torch.allclose(closed, mc, rtol=0.03)


def test_analytic_gradients_match_autograd():
    t = _teachers()
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ga, gu = torch.autograd.grad(ts.population_loss(a, u, t).sum(), (a, u))
    ha, hu = ts.population_grads(a.detach(), u.detach(), t)
    assert torch.allclose(ga, ha, atol=1e-10) and torch.allclose(gu, hu, atol=1e-10)


def test_global_and_spurious_optima_are_stationary():
    t = _teachers(k=6)
    assert ts.population_loss(t.a, t.v, t).abs().max() < 1e-12
    a_bar, v_bar = ts.spurious_optimum(t)
    ga, gu = ts.population_grads(a_bar, v_bar, t)
    assert ga.abs().max() < 1e-10 and gu.abs().max() < 1e-10
    assert (ts.population_loss(a_bar, v_bar, t) > 1e-3).all()  # a bad stationary point


def test_teachers_satisfy_the_skip_prior_and_init_ball():
    t = _teachers(n=200, k=8, p=8)
    assert torch.allclose(t.v.norm(dim=-1), torch.ones(200, dtype=torch.float64))
    assert ((t.v @ ts.ones_direction(8)) > 0).all()  # v* = (1/sqrt(p) + w*)/||.||, ||w*|| = 1
    a0, u0 = ts.init_students(t, True, torch.Generator().manual_seed(0))
    assert (a0.norm(dim=-1) <= t.a.sum(-1).abs() / math.sqrt(8) + 1e-12).all()
    assert torch.allclose(u0, ts.ones_direction(8).expand(200, 8))  # w_0 = 0


def test_prior_gd_reaches_global_optimum_and_batching_is_exact():
    t = _teachers(n=16, k=4, p=8, seed=5)
    cfg = ts.GDConfig(steps=1500, prior=True)
    res = ts.normalized_gd(t, cfg, torch.Generator().manual_seed(0))
    assert res.success.float().mean() >= 0.9
    a0, u0 = ts.init_students(t, True, torch.Generator().manual_seed(0))
    single = ts.normalized_gd(ts.slice_teachers(t, 3), cfg, None, init=(a0[3:4], u0[3:4]))
    assert torch.allclose(single.a, res.a[3:4], atol=1e-9)


def test_no_prior_gd_gets_trapped_sometimes():
    t = _teachers(n=100, k=16, p=8, seed=6)
    res = ts.normalized_gd(t, ts.GDConfig(steps=1500, prior=False), torch.Generator().manual_seed(0))
    assert 0.05 < res.spurious.float().mean() < 0.9
    assert not (res.success & res.spurious).any()


def test_student_models_build_through_timm():
    m = timm.create_model("teacher_student_resnet", num_patches=3, patch_size=4)
    assert torch.allclose(m.filter(), torch.full((4,), 0.5))  # w_0 = 0: u = 1/sqrt(p)
    assert m(torch.randn(5, 12)).shape == (5, 1)
    assert not timm.create_model("teacher_student_cnn").skip_prior
