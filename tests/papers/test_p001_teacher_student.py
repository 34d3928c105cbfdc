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


def test_teacher_distributions_place_v_star_where_their_names_say():
    e = ts.ones_direction(8)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    cos = {name: ts.sample_teachers(400, 3, 8, g(), name).v @ e for name in ts.TEACHERS}
    assert (cos["prior_sphere"] > 0).all() and (cos["prior_hemisphere"] >= 0).all()
    assert cos["prior_hemisphere"].min() < 0.05  # reaches the edge of the prior, unlike prior_sphere
    assert cos["prior_boundary"].abs().max() < 1e-12  # every teacher at 90 degrees
    assert (cos["generic"] < 0).any() and (cos["generic"] > 0).any()
    at = ts.sample_teachers(50, 3, 8, g(), "angle:120")
    assert torch.allclose(at.v.norm(dim=-1), torch.ones(50, dtype=torch.float64))
    assert torch.allclose(at.v @ e, torch.full((50,), math.cos(math.radians(120)), dtype=torch.float64))
    # the default is the earlier sampler: v* = (1/sqrt(p) + w*)/||.|| drawn before a*
    gen = g()
    w = torch.randn(400, 8, generator=gen, dtype=torch.float64)
    v = (e + w / w.norm(dim=-1, keepdim=True))
    assert torch.allclose(ts.sample_teachers(400, 3, 8, g()).v, v / v.norm(dim=-1, keepdim=True))
    for bad in ("sphere", "angle:200", "angle:x"):
        with pytest.raises(ValueError, match="unknown teacher distribution"):
            ts.sample_teachers(2, 3, 8, g(), bad)


def test_frozen_alignment_is_a_star_against_the_frozen_filter_minimiser():
    t = ts.sample_teachers(6, 5, 8, torch.Generator().manual_seed(8), "generic")
    u = ts.ones_direction(8).expand(6, 8)
    cos = (u * t.v).sum(-1)
    eye, ones = torch.eye(5, dtype=torch.float64), torch.ones(5, 5, dtype=torch.float64)
    m0 = (ones + (math.pi - 1) * eye) / (2 * math.pi)
    expected = []
    for i in range(6):
        m_theta = ts.pair_kernel(cos[i]) * eye + (ones - eye) / (2 * math.pi)
        a_theta = torch.linalg.solve(m0, m_theta @ t.a[i])
        ga, _ = ts.population_grads(a_theta[None], u[i:i + 1], ts.slice_teachers(t, i))
        assert ga.abs().max() < 1e-12  # it is the minimiser over a with u frozen
        expected.append(a_theta @ t.a[i])
    assert torch.allclose(ts.frozen_alignment(t, u), torch.stack(expected), atol=1e-12)


def test_warm_up_outcome_is_the_sign_of_the_frozen_alignment_at_the_edge_of_the_prior():
    # just past the edge of the prior, the prior alone and with warm-up both fail sometimes; with
    # warm-up the outcome is decided before u moves, by the sign of a(theta_0)^T a*
    t = ts.sample_teachers(64, 4, 8, torch.Generator().manual_seed(9), "angle:95")
    cfg = ts.GDConfig(steps=2500, prior=True, warmup_steps=1000)
    res = ts.normalized_gd(t, cfg, torch.Generator().manual_seed(0))
    predicted = ts.frozen_alignment(t, ts.ones_direction(8).expand(64, 8)) > 0
    assert 0 < predicted.sum() < 64
    assert torch.equal(res.success, predicted)
    assert torch.equal(res.spurious, ~predicted)


def test_wilson_interval_and_paired_difference():
    low, high = ts.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = ts.wilson_interval(50, 100)
    assert (low, high) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    base = torch.tensor([True] * 90 + [False] * 10)
    other = torch.tensor([True] * 88 + [False] * 2 + [True] * 10)  # gains 10, loses 2
    d = ts.paired_difference(base, other)
    assert (d["gained"], d["lost"], d["difference"]) == (10, 2, pytest.approx(0.08))
    assert d["p_value"] == pytest.approx(2 * sum(math.comb(12, i) for i in range(3)) / 2 ** 12)
    assert 0 < d["low"] < d["difference"] < d["high"] <= 12 / 100  # p = 0.039: excludes 0
    same = ts.paired_difference(base, base)
    assert (same["difference"], same["p_value"], same["low"], same["high"]) == (0.0, 1.0, 0.0, 0.0)
    five = ts.paired_difference(torch.zeros(20, dtype=torch.bool), torch.tensor([True] * 5 + [False] * 15))
    assert five["p_value"] == pytest.approx(0.0625) and five["low"] < 0  # 5 vs 0 is not significant
    six = ts.paired_difference(torch.zeros(20, dtype=torch.bool), torch.tensor([True] * 6 + [False] * 14))
    assert six["p_value"] == pytest.approx(0.03125) and six["low"] > 0  # 6 vs 0 is
