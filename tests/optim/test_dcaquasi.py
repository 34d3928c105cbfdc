"""dcaquasihalf and dcaquasineghalf (paper 000, eqs. 23–26): steps on the line of g = αa + (1 − α)c."""
import copy

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from dca_nets import (
    Net,
    batch,
    closure_of,
    counter_loss_hessian,
    dot,
    eq17_c,
    flat_cat,
    flat_grad,
    gauss_newton,
    sqnorm,
)

import dcanets  # noqa: F401  (registers the decompositions into timm)
from dcanets.optim import prepare, remember_batch


@pytest.mark.parametrize("name, alpha, direction", [
    ("dcaquasihalf", 0.5, None), ("dcaquasineghalf", -0.5, None),
    ("dcaquasihalf", 0.5, "projection"), ("dcaquasihalf", 0.5, "line"), ("dcaquasineghalf", -0.5, "paper")])
def test_skip_quasi_steps_along_the_counter_loss_gradient(name, alpha, direction):
    """c="skip": g = ∇L'_α from the mixed network; d = g/α or the projection coefficient."""
    torch.manual_seed(0)
    model, (x, y) = Net(), batch()
    g = flat_grad(F.cross_entropy(model(x, mix=alpha), y), model)
    a = flat_grad(F.cross_entropy(model(x), y), model)
    rho, kappa = 0.2, 0.8
    proj = dot(a, g) / (sqnorm(g) + rho / (2 * kappa))
    kind = direction or ("paper" if alpha > 0 else "projection")
    kind = "projection" if kind == "line" else kind
    coef = 1 / alpha if kind == "paper" else proj
    m = copy.deepcopy(model)
    opt = timm.optim.create_optimizer_v2(m, name, lr=0.1, rho=rho, momentum=0.0, direction=direction, c="skip",
                                         kappa=kappa if kind == "projection" else None)
    prepare(opt, m)
    opt.step(closure_of(m, opt, x, y))
    assert opt.diagnostics["coef"] == pytest.approx(coef, rel=1e-5)
    for p, p0, gi in zip(m.parameters(), model.parameters(), g):
        assert torch.allclose(p, p0 - 0.1 * coef * gi, atol=1e-6)

def test_default_quasihalf_step_is_the_one_block_testnet_gradient():
    """a + c (eq. 17's c, the default) = the gradient of the plain net with a gradient-only
    identity shortcut around the last block (the one-block "TestNet"), in one forward."""
    torch.manual_seed(0)
    model, (x, y) = Net(), batch()
    ref = copy.deepcopy(model)
    grad = flat_grad(F.cross_entropy(ref(x, grad_shortcut=True), y), ref)   # a + c
    opt = timm.optim.create_optimizer_v2(model, "dcaquasihalf", lr=0.1, momentum=0.0)
    prepare(opt, model)
    opt.step(closure_of(model, opt, x, y))
    assert opt.diagnostics["s_a"] == 1.0 and opt.diagnostics["s_c"] == 1.0
    for p, p0, g in zip(model.parameters(), ref.parameters(), grad):
        assert torch.allclose(p, p0 - 0.1 * g, atol=1e-6)

def _named_grads(model, x, y):
    loss = F.cross_entropy(model(x), y)
    names, params = zip(*model.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))


def test_one_block_identity_on_cifar_plainnet_and_not_gradnet():
    """On cifar_plainnet20, a + c (dcaquasihalf's default step) is the gradient of the same net
    whose last block gets a gradient-only identity shortcut around the whole block (activation
    included); it is not the gradient of cifar_gradnet20 (gradient-only shortcuts on every block)."""
    torch.manual_seed(0)
    model = timm.create_model("cifar_plainnet20")
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    testnet = copy.deepcopy(model)
    blk = testnet.layer3[-1]
    blk.shortcut_alpha, blk.shortcut_grad_only, blk.act_placement = 1.0, True, "before_add"
    want = _named_grads(testnet, x, y)
    gradnet = timm.create_model("cifar_gradnet20")
    gradnet.load_state_dict(model.state_dict())
    other = _named_grads(gradnet, x, y)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = timm.optim.create_optimizer_v2(model, "dcaquasihalf", lr=1.0, momentum=0.0, weight_decay=0.0)
    prepare(opt, model)
    opt.step(closure_of(model, opt, x, y))
    got = {n: start[n] - p.detach() for n, p in model.named_parameters()}
    scale = max(float(g.abs().max()) for g in want.values())
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-5 * scale, rtol=1e-4), n
    flat = lambda d: torch.cat([d[n].flatten() for n in want])  # noqa: E731
    assert float(F.cosine_similarity(flat(got), flat(other), dim=0)) < 0.99

@pytest.mark.parametrize("name, alpha", [("dcaquasihalf", 0.5), ("dcaquasineghalf", -0.5)])
@pytest.mark.parametrize("c", ["shortcut", "skip"])
@pytest.mark.parametrize("direction, kappa", [("projection", None), ("projection", 0.7), ("newton", None),
                                              ("newton", 0.7)])
def test_quasi_line_coefficients(name, alpha, c, direction, kappa):
    """projection: t = ⟨a,g⟩/(‖g‖² + ρ/(2κ)), κ given or gᵀ∂²L'_α g/‖g‖⁴ (measured); newton:
    t = ⟨a,g⟩/(gᵀ∂²G g) with G = L'_α + ρ/2·L2 (eq. 24 on the line Δw = −t·g): ∂²L'_α the dense
    autograd Hessian, or eq. 25's κ·g gᵀ."""
    torch.manual_seed(0)
    model = Net().double()
    x, y = batch()
    x = x.double()
    rho, lr = 0.2, 0.1
    a = flat_grad(F.cross_entropy(model(x), y), model)
    if c == "skip":
        g = flat_grad(F.cross_entropy(model(x, mix=alpha), y), model)
    else:
        g = [alpha * ai + (1 - alpha) * ci for ai, ci in zip(a, eq17_c(model, x, y))]
    fa, fg = flat_cat(a), flat_cat(g)
    n = fg.numel()
    if direction == "projection":
        curv = gauss_newton(model, x, y, alpha, fg) / float(fg @ fg) ** 2
        denom = float(fg @ fg) + rho / (2 * (kappa or curv))
        t = float(fa @ fg) / denom
    else:
        hess = kappa * torch.outer(fg, fg) if kappa else counter_loss_hessian(model, x, y, alpha)
        big = hess + rho / 2 * torch.eye(n, dtype=fg.dtype)            # ∂²G
        denom = float(fg @ big @ fg)
        t = float(fg @ fa) / denom
        ts = torch.linspace(t - 1, t + 1, 201, dtype=fg.dtype)          # eq. 24's model on the line
        model_values = -ts * float(fa @ fg) + 0.5 * ts ** 2 * float(fg @ big @ fg)
        assert abs(float(ts[model_values.argmin()]) - t) <= 0.01
    m = copy.deepcopy(model)
    opt = timm.optim.create_optimizer_v2(m, name, lr=lr, rho=rho, momentum=0.0, direction=direction, c=c,
                                         kappa=kappa, fd_eps=1e-5)
    prepare(opt, m)
    remember_batch(opt, x, y)          # the measured κ of "projection" comes from this batch
    opt.step(closure_of(m, opt, x, y))
    assert opt.diagnostics["coef"] == pytest.approx(t, rel=1e-6)
    d = flat_cat([(p0 - p).detach() / lr for p, p0 in zip(m.parameters(), model.parameters())])
    assert torch.allclose(d, t * fg, atol=1e-9, rtol=1e-7)
    # never an ascent direction for L while the denominator is > 0: ⟨a, d⟩ = ⟨a, g⟩²/denominator
    assert denom > 0 and float(fa @ d) == pytest.approx(float(fa @ fg) ** 2 / denom, rel=1e-6)


def test_newton_line_step_refuses_a_non_convex_g(monkeypatch):
    model, (x, y) = Net(), batch()
    opt = timm.optim.create_optimizer_v2(model, "dcaquasihalf", lr=0.1, rho=0.0, direction="newton")
    prepare(opt, model)
    monkeypatch.setattr(opt, "line_curvature", lambda closure, g, g2: -1.0)
    with pytest.raises(ValueError, match="not convex along g .* needs rho > "):
        opt.step(closure_of(model, opt, x, y))


def test_direction_input_errors():
    with pytest.raises(ValueError, match="kappa is the curvature scale of direction='newton' and 'projection' only"):
        timm.optim.create_optimizer_v2(Net(), "dcaquasihalf", lr=0.1, kappa=1.0)
    with pytest.raises(ValueError, match="direction must be one of paper, projection, newton"):
        timm.optim.create_optimizer_v2(Net(), "dcaquasihalf", lr=0.1, direction="exact")


def test_line_is_the_old_name_of_projection():
    opt = timm.optim.create_optimizer_v2(Net(), "dcaquasihalf", lr=0.1, direction="line")
    assert opt.options.direction == "projection"


@pytest.mark.parametrize("c, diverges", [("skip", True), ("shortcut", False)])
def test_neghalf_paper_direction_on_the_test_mlp(c, diverges):
    """docs: the paper direction of dcaquasineghalf (d = g/α, α = −½) diverged on the test MLP
    with c="skip" (loss 1.05 → 177 in 30 steps, lr 0.3); with eq. 17's c (a − 3c) it did not."""
    torch.manual_seed(0)
    model, (x, y) = Net(8), batch(32)
    opt = timm.optim.create_optimizer_v2(model, "dcaquasineghalf", lr=0.3, weight_decay=1e-4, momentum=0.5,
                                         direction="paper", c=c)
    prepare(opt, model)
    closure = closure_of(model, opt, x, y)
    first = closure().item()
    for _ in range(30):
        opt.step(closure)
    last = closure().item()
    assert first == pytest.approx(1.05, abs=0.01)
    assert (last == pytest.approx(177, rel=0.05)) if diverges else (last == pytest.approx(0.81, abs=0.02))
