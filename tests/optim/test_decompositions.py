"""Network-loss DC decompositions as timm optimizers (paper 000, §3–4)."""
import copy

import pytest
import timm
import timm.optim
import torch
import torch.nn as nn
import torch.nn.functional as F

import dcanets  # noqa: F401  (registers the decompositions into timm)
from dcanets.optim import DECOMPOSITIONS, DcaCounter, DcaL2, decomposition, prepare, remember_batch
from dcanets.optim.counter import CounterLoss

CLOSURE_NAMES = ["dcaprox", "dcacounter", "dcaquasihalf", "dcaquasineghalf"]


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class Net(nn.Module):
    """stem → stage of two same-shape blocks → head: h^{L−1}, h^L are stage[1]'s input/output."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.stage = nn.Sequential(Block(width), Block(width))
        self.head = nn.Linear(width, 3)

    def forward(self, x, skip=(), mix=None, grad_shortcut=False):
        h = torch.tanh(self.stem(x))
        for i, blk in enumerate(self.stage):
            out = blk(h)
            if grad_shortcut and i == len(self.stage) - 1:
                out = out + (h - h.detach())      # plain forward, ResNet gradient ("TestNet")
            if i in skip:
                out = h
            elif mix is not None and i == len(self.stage) - 1:
                out = mix * out + (1 - mix) * h
            h = out
        return self.head(h)


def _data(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def _sq(vs):
    return sum(float((v.double() ** 2).sum()) for v in vs if v is not None)


def _dot(us, vs):
    return sum(float((u.double() * v.double()).sum()) for u, v in zip(us, vs))


def _flat_grad(loss, model):
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads)]


@pytest.mark.parametrize("name", list(DECOMPOSITIONS) + ["lookahead_dcacounter", "lookahead_dcal2"])
def test_timm_factory_builds_each_name(name):
    model = Net()   # timm's factory splits it into weight-decay and no-weight-decay (1-D) groups
    opt = timm.optim.create_optimizer_v2(model, name, lr=0.05, weight_decay=5e-4, momentum=0.0)
    assert len(opt.param_groups) == 2 and {g["weight_decay"] for g in opt.param_groups} == {0.0, 5e-4}
    # only dcaprox needs a closure with its defaults (tests/optim/test_plain_loop.py)
    assert prepare(opt, model) is (name.split("_")[-1] == "dcaprox")
    assert prepare(opt, model) is (name.split("_")[-1] == "dcaprox")  # idempotent


def test_prepare_plain_sgd_is_false():
    model = Net()
    assert prepare(torch.optim.SGD(model.parameters(), lr=0.1), model) is False


def _steps_agree(pairs, batches):
    """Step each (model, optimizer) pair on the same batches; the parameters must agree to 1e-6."""
    for x, y in batches:
        for m, o in pairs:
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    (m1, _), (m2, _) = pairs
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p1, p2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("opts", [
    dict(), dict(weight_decay=1e-2), dict(momentum=0.9), dict(momentum=0.9, dampening=0.1, weight_decay=1e-3),
    dict(momentum=0.9, nesterov=True, weight_decay=5e-4)])
def test_dcal2_reproduces_sgd(opts):
    torch.manual_seed(0)
    m1 = Net()
    m2 = copy.deepcopy(m1)
    sgd = torch.optim.SGD(m1.parameters(), lr=0.1, **opts)
    dca = DcaL2(m2.parameters(), lam=10.0, **opts)        # lr = 1/λ
    start = copy.deepcopy(m1)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(30)]
    _steps_agree([(m1, sgd), (m2, dca)], batches)
    assert not torch.allclose(m2.head.bias, start.head.bias)  # it moved


def test_dcal2_through_timm_groups_matches_sgd():
    torch.manual_seed(0)
    m1 = Net()
    m2 = copy.deepcopy(m1)
    sgd = timm.optim.create_optimizer_v2(m1, "momentum", lr=0.05, weight_decay=1e-3)
    dca = timm.optim.create_optimizer_v2(m2, "dcal2", lam=20.0, weight_decay=1e-3)
    assert [g["weight_decay"] for g in dca.param_groups] == [0.0, 1e-3]   # no decay on 1-D params
    _steps_agree([(m1, sgd), (m2, dca)], [_data()] * 10)


def test_counter_loss_is_the_mixed_output():
    torch.manual_seed(0)
    model, (x, y) = Net(), _data()
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
    model, (x, y) = Net(), _data()
    opt = DcaCounter(model.parameters(), lr=0.1, c="skip")
    prepare(opt, model)
    closure = _closure(model, opt, x, y)
    closure()
    opt.counter.observe()
    c = opt.loss_gradients(closure, 0.0)
    want = _flat_grad(F.cross_entropy(model(x, skip=(1,)), y), model)
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
    model, (x, y) = Net(), _data()
    counter = CounterLoss(model, where="all")
    model(x)
    counter.observe()
    with counter.mixing(0.0):
        got = F.cross_entropy(model(x), y)
    assert torch.allclose(got, F.cross_entropy(model(x, skip=(0, 1)), y), atol=1e-6)


@pytest.mark.parametrize("name", ["dcacounter", "dcaquasihalf", "dcaquasineghalf"])
def test_where_all_is_refused_by_the_optimizers(name):
    with pytest.raises(ValueError, match="where='all' is refused: skipping every same-shape block"):
        timm.optim.create_optimizer_v2(Net(), name, lr=0.1, where="all")


def test_skip_counter_newton_step_is_eq19_with_c_the_skipped_net_gradient():
    torch.manual_seed(0)
    model, (x, y) = Net(), _data()
    rho, lr, kappa = 0.3, 0.1, 0.7
    ref = copy.deepcopy(model)
    a = _flat_grad(F.cross_entropy(ref(x), y), ref)
    c = _flat_grad(F.cross_entropy(ref(x, skip=(1,)), y), ref)
    beta = _sq(a) / (2 * _sq(c) + rho / (2 * kappa))              # paper 000, eq. 19 (ρ in Hessian units)
    assert _sq(c[-2:]) > 0       # c = ∇L'_0 has a head gradient (at the features h^{L−1})
    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=lr, rho=rho, momentum=0.0, c="skip", kappa=kappa)
    assert prepare(opt, model)
    loss = opt.step(_closure(model, opt, x, y))
    assert torch.isclose(loss, F.cross_entropy(ref(x), y))
    assert opt.diagnostics["beta"] == pytest.approx(beta, rel=1e-6)
    for p, p0, ai, ci in zip(model.parameters(), ref.parameters(), a, c):
        assert torch.allclose(p, p0 - lr * (ai + beta * ci), atol=1e-6)
    for p, ai in zip(model.parameters(), a):                      # p.grad left as ∇L(w_k)
        assert torch.allclose(p.grad, ai, atol=1e-6)


@pytest.mark.parametrize("name, alpha, direction", [
    ("dcaquasihalf", 0.5, None), ("dcaquasineghalf", -0.5, None),
    ("dcaquasihalf", 0.5, "projection"), ("dcaquasihalf", 0.5, "line"), ("dcaquasineghalf", -0.5, "paper")])
def test_skip_quasi_steps_along_the_counter_loss_gradient(name, alpha, direction):
    """c="skip": g = ∇L'_α from the mixed network; d = g/α or the projection coefficient."""
    torch.manual_seed(0)
    model, (x, y) = Net(), _data()
    g = _flat_grad(F.cross_entropy(model(x, mix=alpha), y), model)
    a = _flat_grad(F.cross_entropy(model(x), y), model)
    rho, kappa = 0.2, 0.8
    proj = _dot(a, g) / (_sq(g) + rho / (2 * kappa))
    kind = direction or ("paper" if alpha > 0 else "projection")
    kind = "projection" if kind == "line" else kind
    coef = 1 / alpha if kind == "paper" else proj
    m = copy.deepcopy(model)
    opt = timm.optim.create_optimizer_v2(m, name, lr=0.1, rho=rho, momentum=0.0, direction=direction, c="skip",
                                         kappa=kappa if kind == "projection" else None)
    prepare(opt, m)
    opt.step(_closure(m, opt, x, y))
    assert opt.diagnostics["coef"] == pytest.approx(coef, rel=1e-5)
    for p, p0, gi in zip(m.parameters(), model.parameters(), g):
        assert torch.allclose(p, p0 - 0.1 * coef * gi, atol=1e-6)


def test_prox_one_inner_step_is_sgd_and_k_steps_solve_the_prox_subproblem():
    torch.manual_seed(0)
    model, (x, y) = Net(), _data()
    lr, rho = 0.2, 0.5
    for k in (1, 4):
        m = copy.deepcopy(model)
        opt = timm.optim.create_optimizer_v2(m, "dcaprox", lr=lr, rho=rho, inner_steps=k, momentum=0.0)
        prepare(opt, m)
        opt.step(_closure(m, opt, x, y))
        ref = copy.deepcopy(model)
        w0 = [p.detach().clone() for p in ref.parameters()]
        for _ in range(k):   # ∇S(w) = ∇L(w) + ρ(w − w_k)
            g = _flat_grad(F.cross_entropy(ref(x), y), ref)
            with torch.no_grad():
                for p, gi, w in zip(ref.parameters(), g, w0):
                    p.sub_(lr * (gi + rho * (p - w)))
        for p, q in zip(m.parameters(), ref.parameters()):
            assert torch.allclose(p, q, atol=1e-6)


def test_counter_inner_solver_decreases_the_subproblem():
    torch.manual_seed(0)
    model, (x, y) = Net(), _data()
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    o1 = timm.optim.create_optimizer_v2(m1, "dcacounter", lr=0.1, solver="inner", inner_steps=1, momentum=0.0)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    prepare(o1, m1)
    o1.step(_closure(m1, o1, x, y))
    _closure(m2, o2, x, y)()
    o2.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p, q, atol=1e-6)          # K = 1: the first inner step is SGD


@pytest.mark.parametrize("name", CLOSURE_NAMES + ["lookahead_dcacounter"])
def test_closure_optimizers_train(name):
    torch.manual_seed(0)
    model, (x, y) = Net(8), _data(32)
    opt = timm.optim.create_optimizer_v2(model, name, lr=0.3, weight_decay=1e-4, momentum=0.5)
    assert prepare(opt, model) is (name == "dcaprox")   # the others also take a closure
    closure = _closure(model, opt, x, y)
    first = closure().item()
    for _ in range(30):
        opt.step(closure)
    # SGD with momentum reaches 0.94 of the first loss; quasineghalf (line step) is the slowest
    assert closure().item() < (0.99 if "neghalf" in name else 0.97) * first


@pytest.mark.parametrize("name, c", [("dcacounter", "skip"), ("dcacounter", "shortcut"),
                                     ("dcaquasihalf", "shortcut"), ("dcaquasineghalf", "shortcut")])
def test_counter_evaluations_leave_batchnorm_statistics_alone(name, c):
    """"BatchNorm running statistics move once per step, as with SGD" (docs/decompositions.md);
    dcaquasineghalf's projection runs no extra pass, so this holds for every step kind."""
    torch.manual_seed(0)
    model = Net()
    model.stage = nn.Sequential(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh()),
                                nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh()))
    ref = copy.deepcopy(model)
    x, y = _data()
    opt = timm.optim.create_optimizer_v2(model, name, lr=1e-12, momentum=0.0, c=c)
    prepare(opt, model)
    opt.step(_closure(model, opt, x, y))    # probe + L (+ L'_0): only one pass may move the stats
    ref(x)                                   # one ordinary training forward
    for b, r in zip(model.buffers(), ref.buffers()):
        assert torch.allclose(b.float(), r.float(), atol=1e-6)
    assert not torch.allclose(model.stage[1][1].running_mean, torch.zeros(6))


def test_step_before_prepare_is_an_error():
    model, (x, y) = Net(), _data()
    opt = DcaCounter(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="prepare"):
        opt.step(_closure(model, opt, x, y))


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0.1, rho=-1.0), "rho must be >= 0"),
    (dict(lam=0.0), "lam must be > 0"),
    (dict(lam=-2.0), "lam must be > 0"),
    (dict(lr=-0.1), "lr must be > 0"),
    (dict(lr=0.1, lam=5.0), "lr = 1/lam"),
    (dict(), "give lr"),
    (dict(lr=0.1, inner_steps=0), "inner_steps"),
    (dict(lr=0.1, solver="cg"), "solver must be one of newton, inner"),
    (dict(lr=0.1, where="first"), "where must be 'last'"),
    (dict(lr=0.1, where="all"), "where='all' is refused"),
    (dict(lr=0.1, beta_max=0.0), "beta_max must be > 0"),
    (dict(lr=0.1, beta_policy="ignore"), "beta_policy must be one of raise, clamp"),
])
def test_input_errors_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DcaCounter(Net().parameters(), **kwargs)


def test_unknown_decomposition():
    with pytest.raises(ValueError, match="unknown decomposition 'dcaconter'; known: dcacounter"):
        decomposition("dcaconter")
    with pytest.raises(ValueError):
        timm.optim.create_optimizer_v2(Net(), "dcaconter", lr=0.1)


def test_model_without_same_shape_blocks():
    flat = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="no same-shape blocks"):
        prepare(DcaCounter(flat.parameters(), lr=0.1), flat)
    changing = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = DcaCounter(changing.parameters(), lr=0.1)
    prepare(opt, changing)
    x, y = _data()
    with pytest.raises(ValueError, match="no same-shape blocks"):
        opt.step(_closure(changing, opt, x, y))


def _shortcut_c(model, x, y):
    """c = ∂L/∂h^L · ∂h^{L−1}/∂w, by hand: the identity-shortcut part of the ResNet gradient."""
    h0 = torch.tanh(model.stem(x))
    h1 = model.stage[0](h0)
    h2 = model.stage[1](h1)
    loss = F.cross_entropy(model.head(h2), y)
    (g2,) = torch.autograd.grad(loss, [h2], retain_graph=True)
    return _flat_grad((g2 * h1).sum(), model)


def test_default_quasihalf_step_is_the_one_block_testnet_gradient():
    """a + c (eq. 17's c, the default) = the gradient of the plain net with a gradient-only
    identity shortcut around the last block (the one-block "TestNet"), in one forward."""
    torch.manual_seed(0)
    model, (x, y) = Net(), _data()
    ref = copy.deepcopy(model)
    grad = _flat_grad(F.cross_entropy(ref(x, grad_shortcut=True), y), ref)   # a + c
    opt = timm.optim.create_optimizer_v2(model, "dcaquasihalf", lr=0.1, momentum=0.0)
    prepare(opt, model)
    opt.step(_closure(model, opt, x, y))
    assert opt.diagnostics["s_a"] == 1.0 and opt.diagnostics["s_c"] == 1.0
    for p, p0, g in zip(model.parameters(), ref.parameters(), grad):
        assert torch.allclose(p, p0 - 0.1 * g, atol=1e-6)


def test_shortcut_counter_step_and_reused_beta():
    torch.manual_seed(0)
    model, (x, y) = Net(), _data()
    rho, lr, kappa = 0.1, 0.05, 0.5
    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=lr, rho=rho, momentum=0.0,
                                         c="shortcut", beta_every=2, kappa=kappa)
    prepare(opt, model)
    closure = _closure(model, opt, x, y)
    sq = _sq
    flags = []
    beta = None
    for k in range(3):
        ref = copy.deepcopy(model)
        a = _flat_grad(F.cross_entropy(ref(x), y), ref)
        c = _shortcut_c(ref, x, y)
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
    with pytest.raises(ValueError, match="kappa is the curvature scale of direction='newton' and 'projection' only"):
        timm.optim.create_optimizer_v2(Net(), "dcaquasihalf", lr=0.1, kappa=1.0)
    with pytest.raises(ValueError, match="direction must be one of paper, projection, newton"):
        timm.optim.create_optimizer_v2(Net(), "dcaquasihalf", lr=0.1, direction="exact")


def test_misspelt_option_is_refused_and_rho_is_uniform():
    with pytest.raises(TypeError, match="inner_step"):
        DcaCounter(Net().parameters(), lr=0.1, inner_step=3)
    DcaL2(Net().parameters(), lr=0.1, rho=0.5)   # every decomposition takes lr, rho, lam
    with pytest.raises(ValueError, match="rho must be >= 0"):
        DcaL2(Net().parameters(), lr=0.1, rho=-0.5)


# ---- faithful by default: eq. 17's c, the one-block identity, β guard, quasi-DC coefficients ----

def _eq17_c(model, x, y):
    """c = (∂h^{L−1}/∂w)ᵀ ∂L/∂h^L through torch.autograd.functional.vjp (paper 000, eq. 17)."""
    params = dict(model.named_parameters())
    h2 = model.stage[1](model.stage[0](torch.tanh(model.stem(x))))
    (v,) = torch.autograd.grad(F.cross_entropy(model.head(h2), y), [h2])

    def h1_of(*ws):
        p = dict(zip(params, ws))
        h0 = torch.tanh(F.linear(x, p["stem.weight"], p["stem.bias"]))
        return torch.tanh(F.linear(h0, p["stage.0.lin.weight"], p["stage.0.lin.bias"]))

    _, vjp = torch.autograd.functional.vjp(h1_of, tuple(params.values()), v)
    return list(vjp)


def test_default_dcacounter_c_is_eq17():
    """Default c = C ᵀ∂L/∂h^L with C = (0, ∂_w F^{L−2}) (eq. 17): zero on the skipped block and
    on the head; the step is eq. 19's a + βc."""
    torch.manual_seed(0)
    model, (x, y) = Net(), _data()
    rho, lr, kappa = 0.1, 0.1, 0.25
    ref = copy.deepcopy(model)
    a = _flat_grad(F.cross_entropy(ref(x), y), ref)
    c = _eq17_c(ref, x, y)
    names = [n for n, _ in ref.named_parameters()]
    for n, ci in zip(names, c):
        if n.startswith(("head.", "stage.1.")):
            assert ci.abs().max() == 0, n
        else:
            assert ci.abs().max() > 0, n
    beta = _sq(a) / (2 * _sq(c) + rho / (2 * kappa))
    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=lr, rho=rho, momentum=0.0, kappa=kappa)
    assert opt.options.c == "shortcut"
    prepare(opt, model)
    opt.step(_closure(model, opt, x, y))
    assert opt.diagnostics["beta"] == pytest.approx(beta, rel=1e-5)
    assert opt.diagnostics["c_over_a"] == pytest.approx((_sq(c) / _sq(a)) ** 0.5, rel=1e-5)
    for n, p, p0, ai, ci in zip(names, model.parameters(), ref.parameters(), a, c):
        assert torch.allclose((p0 - p) / lr, ai + beta * ci, atol=1e-5), n


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
    opt.step(_closure(model, opt, x, y))
    got = {n: start[n] - p.detach() for n, p in model.named_parameters()}
    scale = max(float(g.abs().max()) for g in want.values())
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-5 * scale, rtol=1e-4), n
    flat = lambda d: torch.cat([d[n].flatten() for n in want])  # noqa: E731
    assert float(F.cosine_similarity(flat(got), flat(other), dim=0)) < 0.99


def test_beta_guard_raises_or_clamps():
    torch.manual_seed(0)
    model, (x, y) = Net(), _data()
    ref = copy.deepcopy(model)
    a, c = _flat_grad(F.cross_entropy(ref(x), y), ref), _eq17_c(ref, x, y)
    beta = _sq(a) / (2 * _sq(c))
    cap = beta / 2
    m = copy.deepcopy(model)
    opt = timm.optim.create_optimizer_v2(m, "dcacounter", lr=0.1, momentum=0.0, beta_max=cap)
    prepare(opt, m)
    with pytest.raises(ValueError, match=r"dcacounter: beta = \|a\|\^2/\(2\|c\|\^2 \+ rho/\(2 kappa\)\) = .* exceeds "
                                         r"beta_max = .*beta_policy='clamp'") as err:
        opt.step(_closure(m, opt, x, y))
    assert "\n" not in str(err.value)
    m = copy.deepcopy(model)
    opt = timm.optim.create_optimizer_v2(m, "dcacounter", lr=0.1, momentum=0.0, beta_max=cap, beta_policy="clamp")
    prepare(opt, m)
    opt.step(_closure(m, opt, x, y))
    assert opt.diagnostics["beta"] == cap and opt.diagnostics["beta_eq19"] == pytest.approx(beta, rel=1e-5)
    for p, p0, ai, ci in zip(m.parameters(), model.parameters(), a, c):
        assert torch.allclose(p, p0 - 0.1 * (ai + cap * ci), atol=1e-6)


def _hessian_of_counter_loss(model, x, y, alpha):
    """Dense ∂²L'_α over all parameters (flattened in registration order)."""
    names, params = zip(*model.named_parameters())
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().flatten() for p in params])

    def loss(flat):
        ws, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            ws[n] = flat[i:i + k].view(s)
            i += k
        out = torch.func.functional_call(model, ws, (x,), {"mix": alpha})
        return F.cross_entropy(out, y)

    return torch.autograd.functional.hessian(loss, flat0)


def _flat(vs):
    return torch.cat([v.flatten() for v in vs])


def _flat_call(model, x, alpha):
    """w ↦ logits of the net with the last block mixed by α (eq. 10), on flat weights."""
    names, params = zip(*model.named_parameters())
    sizes = [p.numel() for p in params]

    def logits(flat):
        ws = {n: c.view(p.shape) for n, p, c in zip(names, params, torch.split(flat, sizes))}
        return torch.func.functional_call(model, ws, (x,), {"mix": alpha})

    return logits, torch.cat([p.detach().flatten() for p in params])


def _gauss_newton(model, x, y, alpha, u):
    """uᵀJᵀ∂²_zL J u with J = ∂z/∂w (autograd's JVP) and ∂²_zL the dense Hessian of the loss in z."""
    logits, w0 = _flat_call(model, x, alpha)
    z, ju = torch.func.jvp(logits, (w0,), (u,))
    hz = torch.autograd.functional.hessian(lambda t: F.cross_entropy(t, y), z.detach())
    return float(ju.flatten() @ hz.reshape(z.numel(), z.numel()) @ ju.flatten())


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
    x, y = _data()
    x = x.double()
    rho, lr = 0.2, 0.1
    a = _flat_grad(F.cross_entropy(model(x), y), model)
    if c == "skip":
        g = _flat_grad(F.cross_entropy(model(x, mix=alpha), y), model)
    else:
        g = [alpha * ai + (1 - alpha) * ci for ai, ci in zip(a, _eq17_c(model, x, y))]
    fa, fg = _flat(a), _flat(g)
    n = fg.numel()
    if direction == "projection":
        curv = _gauss_newton(model, x, y, alpha, fg) / float(fg @ fg) ** 2
        denom = float(fg @ fg) + rho / (2 * (kappa or curv))
        t = float(fa @ fg) / denom
    else:
        hess = kappa * torch.outer(fg, fg) if kappa else _hessian_of_counter_loss(model, x, y, alpha)
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
    opt.step(_closure(m, opt, x, y))
    assert opt.diagnostics["coef"] == pytest.approx(t, rel=1e-6)
    d = _flat([(p0 - p).detach() / lr for p, p0 in zip(m.parameters(), model.parameters())])
    assert torch.allclose(d, t * fg, atol=1e-9, rtol=1e-7)
    # never an ascent direction for L while the denominator is > 0: ⟨a, d⟩ = ⟨a, g⟩²/denominator
    assert denom > 0 and float(fa @ d) == pytest.approx(float(fa @ fg) ** 2 / denom, rel=1e-6)


def test_newton_line_step_refuses_a_non_convex_g(monkeypatch):
    model, (x, y) = Net(), _data()
    opt = timm.optim.create_optimizer_v2(model, "dcaquasihalf", lr=0.1, rho=0.0, direction="newton")
    prepare(opt, model)
    monkeypatch.setattr(opt, "line_curvature", lambda closure, g, g2: -1.0)
    with pytest.raises(ValueError, match="not convex along g .* needs rho > "):
        opt.step(_closure(model, opt, x, y))


def test_line_is_the_old_name_of_projection():
    opt = timm.optim.create_optimizer_v2(Net(), "dcaquasihalf", lr=0.1, direction="line")
    assert opt.options.direction == "projection"


@pytest.mark.parametrize("c, diverges", [("skip", True), ("shortcut", False)])
def test_neghalf_paper_direction_on_the_test_mlp(c, diverges):
    """docs: the paper direction of dcaquasineghalf (d = g/α, α = −½) diverged on the test MLP
    with c="skip" (loss 1.05 → 177 in 30 steps, lr 0.3); with eq. 17's c (a − 3c) it did not."""
    torch.manual_seed(0)
    model, (x, y) = Net(8), _data(32)
    opt = timm.optim.create_optimizer_v2(model, "dcaquasineghalf", lr=0.3, weight_decay=1e-4, momentum=0.5,
                                         direction="paper", c=c)
    prepare(opt, model)
    closure = _closure(model, opt, x, y)
    first = closure().item()
    for _ in range(30):
        opt.step(closure)
    last = closure().item()
    assert first == pytest.approx(1.05, abs=0.01)
    assert (last == pytest.approx(177, rel=0.05)) if diverges else (last == pytest.approx(0.81, abs=0.02))


@pytest.mark.parametrize("name, kwargs, runs, grad", [
    ("dcacounter", {}, 1, "a"),
    ("dcacounter", {"c": "skip"}, 2, "a"),
    ("dcaquasihalf", {}, 1, "d"),                              # constant (1, 1): p.grad = a + c
    ("dcaquasihalf", {"c": "skip"}, 2, "a"),
    ("dcaquasineghalf", {}, 1, "a"),
    ("dcaquasihalf", {"direction": "newton"}, 3, "a"),
    ("dcaquasihalf", {"direction": "newton", "c": "skip"}, 4, "a"),
    ("dcaquasihalf", {"direction": "newton", "kappa": 1.0}, 1, "a"),
])
def test_closure_runs_per_step_and_the_gradient_left_in_p_grad(name, kwargs, runs, grad):
    torch.manual_seed(0)
    model, (x, y) = Net(), _data()
    opt = timm.optim.create_optimizer_v2(model, name, lr=0.1, momentum=0.0, rho=1.0, **kwargs)
    prepare(opt, model)
    inner = _closure(model, opt, x, y)
    calls = []

    def closure():
        calls.append(1)
        return inner()

    remember_batch(opt, x, y)            # ρ = 1 without kappa: κ measured on this batch (no closure run)
    opt.step(closure)                    # the first step also learns the block order
    calls.clear()
    before = copy.deepcopy(model)
    a = _flat_grad(F.cross_entropy(before(x), y), before)
    opt.step(closure)
    assert len(calls) == runs
    for p, p0, ai in zip(model.parameters(), before.parameters(), a):
        want = ai if grad == "a" else (p0 - p).detach() / 0.1
        assert torch.allclose(p.grad, want, atol=1e-6)


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
