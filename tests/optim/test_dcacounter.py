"""dcacounter (paper 000, eqs. 10, 12, 17, 19) and the counter loss L'_α it is built on."""
import copy

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from dca_nets import Net, batch, closure_of, eq17_c, flat_grad, shortcut_c, sqnorm

import dcanets  # noqa: F401  (registers the decompositions into timm)
from dcanets.optim import DcaCounter, prepare
from dcanets.optim.counter import CounterLoss


def test_counter_loss_is_the_mixed_output():
    torch.manual_seed(0)
    model, (x, y) = Net(), batch()
    counter = CounterLoss(model)
    model(x)
    counter.observe()
    for alpha in (-1.0, -0.5, 0.0, 0.5):
        with counter.mixing(alpha):
            got = F.cross_entropy(model(x), y)
        want = F.cross_entropy(model(x, mix=alpha), y)   # paper 000, eq. 10
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(F.cross_entropy(model(x), y), F.cross_entropy(model(x, mix=1.0), y))


def test_c_is_the_skipped_block_gradient():
    torch.manual_seed(0)
    model, (x, y) = Net(), batch()
    opt = DcaCounter(model.parameters(), lr=0.1, c="skip")
    prepare(opt, model)
    closure = closure_of(model, opt, x, y)
    closure()
    opt.counter.observe()
    c = opt.loss_gradients(closure, 0.0)
    want = flat_grad(F.cross_entropy(model(x, skip=(1,)), y), model)
    for name_p, ci, wi in zip(model.named_parameters(), c, want):
        ci = torch.zeros_like(wi) if ci is None else ci
        assert torch.allclose(ci, wi, atol=1e-6), name_p[0]
    assert all(ci is None or ci.abs().max() == 0 for ci in c[-4:-2])  # the skipped block's own weights
    # finite differences on one stem weight
    w, eps = model.stem.weight, 1e-3
    with torch.no_grad():
        w[0, 0] += eps
        up = F.cross_entropy(model(x, skip=(1,)), y)
        w[0, 0] -= 2 * eps
        down = F.cross_entropy(model(x, skip=(1,)), y)
        w[0, 0] += eps
    assert abs((up - down).item() / (2 * eps) - c[0][0, 0].item()) < 1e-3


def test_counterloss_where_all_skips_every_same_shape_block():
    """CounterLoss(where="all") is the network with every same-shape block removed (α = 0)."""
    torch.manual_seed(0)
    model, (x, y) = Net(), batch()
    counter = CounterLoss(model, where="all")
    model(x)
    counter.observe()
    with counter.mixing(0.0):
        got = F.cross_entropy(model(x), y)
    assert torch.allclose(got, F.cross_entropy(model(x, skip=(0, 1)), y), atol=1e-6)

def test_skip_counter_newton_step_is_eq19_with_c_the_skipped_net_gradient():
    torch.manual_seed(0)
    model, (x, y) = Net(), batch()
    rho, lr, kappa = 0.3, 0.1, 0.7
    ref = copy.deepcopy(model)
    a = flat_grad(F.cross_entropy(ref(x), y), ref)
    c = flat_grad(F.cross_entropy(ref(x, skip=(1,)), y), ref)
    beta = sqnorm(a) / (2 * sqnorm(c) + rho / (2 * kappa))              # paper 000, eq. 19 (ρ in Hessian units)
    assert sqnorm(c[-2:]) > 0       # c = ∇L'_0 has a head gradient (at the features h^{L−1})
    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=lr, rho=rho, momentum=0.0, c="skip", kappa=kappa)
    assert prepare(opt, model)
    loss = opt.step(closure_of(model, opt, x, y))
    assert torch.isclose(loss, F.cross_entropy(ref(x), y))
    assert opt.diagnostics["beta"] == pytest.approx(beta, rel=1e-6)
    for p, p0, ai, ci in zip(model.parameters(), ref.parameters(), a, c):
        assert torch.allclose(p, p0 - lr * (ai + beta * ci), atol=1e-6)
    for p, ai in zip(model.parameters(), a):                      # p.grad left as ∇L(w_k)
        assert torch.allclose(p.grad, ai, atol=1e-6)

def test_counter_inner_solver_decreases_the_subproblem():
    torch.manual_seed(0)
    model, (x, y) = Net(), batch()
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    o1 = timm.optim.create_optimizer_v2(m1, "dcacounter", lr=0.1, solver="inner", inner_steps=1, momentum=0.0)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    prepare(o1, m1)
    o1.step(closure_of(m1, o1, x, y))
    closure_of(m2, o2, x, y)()
    o2.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p, q, atol=1e-6)          # K = 1: the first inner step is SGD

def test_shortcut_counter_step_and_reused_beta():
    torch.manual_seed(0)
    model, (x, y) = Net(), batch()
    rho, lr, kappa = 0.1, 0.05, 0.5
    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=lr, rho=rho, momentum=0.0,
                                         c="shortcut", beta_every=2, kappa=kappa)
    prepare(opt, model)
    closure = closure_of(model, opt, x, y)
    sq = sqnorm
    flags = []
    beta = None
    for k in range(3):
        ref = copy.deepcopy(model)
        a = flat_grad(F.cross_entropy(ref(x), y), ref)
        c = shortcut_c(ref, x, y)
        if k != 1:  # beta_every=2: β is computed at steps 0 and 2; step 1 reuses step 0's β
            beta = sq(a) / (2 * sq(c) + rho / (2 * kappa))
        assert beta is not None
        opt.step(closure)
        flags.append(opt.diagnostics["refreshed"])
        assert opt.diagnostics["s_c"] == pytest.approx(beta, rel=1e-5)
        for p, p0, ai, ci in zip(model.parameters(), ref.parameters(), a, c):
            assert torch.allclose(p, p0 - lr * (ai + beta * ci), atol=1e-6)
            # p.grad: ∇L(w_k) on the steps that compute β, the direction d on the fused ones
            want = ai if k != 1 else ai + beta * ci
            assert torch.allclose(p.grad, want, atol=1e-6)
    assert flags == [True, False, True]


def test_shortcut_mode_input_errors():
    with pytest.raises(ValueError, match="c must be one of shortcut, skip"):
        DcaCounter(Net().parameters(), lr=0.1, c="resnet")
    with pytest.raises(ValueError, match="beta_every"):
        DcaCounter(Net().parameters(), lr=0.1, c="shortcut", beta_every=0)
    with pytest.raises(ValueError, match="beta_every > 1 reuses the coefficients of c='shortcut'"):
        DcaCounter(Net().parameters(), lr=0.1, c="skip", beta_every=2)

def test_default_dcacounter_c_is_eq17():
    """Default c = C ᵀ∂L/∂h^L with C = (0, ∂_w F^{L−2}) (eq. 17): zero on the skipped block and
    on the head; the step is eq. 19's a + βc."""
    torch.manual_seed(0)
    model, (x, y) = Net(), batch()
    rho, lr, kappa = 0.1, 0.1, 0.25
    ref = copy.deepcopy(model)
    a = flat_grad(F.cross_entropy(ref(x), y), ref)
    c = eq17_c(ref, x, y)
    names = [n for n, _ in ref.named_parameters()]
    for n, ci in zip(names, c):
        if n.startswith(("head.", "stage.1.")):
            assert ci.abs().max() == 0, n
        else:
            assert ci.abs().max() > 0, n
    beta = sqnorm(a) / (2 * sqnorm(c) + rho / (2 * kappa))
    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=lr, rho=rho, momentum=0.0, kappa=kappa)
    assert opt.options.c == "shortcut"
    prepare(opt, model)
    opt.step(closure_of(model, opt, x, y))
    assert opt.diagnostics["beta"] == pytest.approx(beta, rel=1e-5)
    assert opt.diagnostics["c_over_a"] == pytest.approx((sqnorm(c) / sqnorm(a)) ** 0.5, rel=1e-5)
    for n, p, p0, ai, ci in zip(names, model.parameters(), ref.parameters(), a, c):
        assert torch.allclose((p0 - p) / lr, ai + beta * ci, atol=1e-5), n

def test_beta_guard_raises_or_clamps():
    torch.manual_seed(0)
    model, (x, y) = Net(), batch()
    ref = copy.deepcopy(model)
    a, c = flat_grad(F.cross_entropy(ref(x), y), ref), eq17_c(ref, x, y)
    beta = sqnorm(a) / (2 * sqnorm(c))
    cap = beta / 2
    m = copy.deepcopy(model)
    opt = timm.optim.create_optimizer_v2(m, "dcacounter", lr=0.1, momentum=0.0, beta_max=cap)
    prepare(opt, m)
    with pytest.raises(ValueError, match=r"dcacounter: beta = \|a\|\^2/\(2\|c\|\^2 \+ rho/\(2 kappa\)\) = .* exceeds "
                                         r"beta_max = .*beta_policy='clamp'") as err:
        opt.step(closure_of(m, opt, x, y))
    assert "\n" not in str(err.value)
    m = copy.deepcopy(model)
    opt = timm.optim.create_optimizer_v2(m, "dcacounter", lr=0.1, momentum=0.0, beta_max=cap, beta_policy="clamp")
    prepare(opt, m)
    opt.step(closure_of(m, opt, x, y))
    assert opt.diagnostics["beta"] == cap and opt.diagnostics["beta_eq19"] == pytest.approx(beta, rel=1e-5)
    for p, p0, ai, ci in zip(m.parameters(), model.parameters(), a, c):
        assert torch.allclose(p, p0 - 0.1 * (ai + cap * ci), atol=1e-6)

def test_beta_guard_fires_on_the_convex_resnets_of_paper_003():
    from dcanets.papers.p003_convex import ConvexResNets
    torch.manual_seed(0)
    nets = ConvexResNets(4, num_nets=3, layers=2, hidden=5)
    x, y = torch.rand(32, 4), torch.rand(32, 3)
    opt = timm.optim.create_optimizer_v2(nets, "dcacounter", lr=0.05, beta_max=float("inf"))
    prepare(opt, nets)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(nets(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.diagnostics["beta"] > 1e3 and opt.diagnostics["c_over_a"] < 0.03
