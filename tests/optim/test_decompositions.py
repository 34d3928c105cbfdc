"""Network-loss DC decompositions as timm optimizers (paper 000, §3–4)."""
import copy

import pytest
import timm
import timm.optim
import torch
import torch.nn as nn
import torch.nn.functional as F

import dcanets  # noqa: F401  (registers the decompositions into timm)
from dcanets.optim.counter import CounterLoss
from dcanets.optim.decompositions import DECOMPOSITIONS, DcaCounter, DcaL2, decomposition, prepare

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


def _flat_grad(loss, model):
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads)]


@pytest.mark.parametrize("name", list(DECOMPOSITIONS) + ["lookahead_dcacounter", "lookahead_dcal2"])
def test_timm_factory_builds_each_name(name):
    model = Net()   # timm's factory splits it into weight-decay and no-weight-decay (1-D) groups
    opt = timm.optim.create_optimizer_v2(model, name, lr=0.05, weight_decay=5e-4, momentum=0.0)
    assert len(opt.param_groups) == 2 and {g["weight_decay"] for g in opt.param_groups} == {0.0, 5e-4}
    assert prepare(opt, model) is (name.split("_")[-1] != "dcal2")
    assert prepare(opt, model) is (name.split("_")[-1] != "dcal2")  # idempotent


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
    opt = DcaCounter(model.parameters(), lr=0.1)
    prepare(opt, model)
    closure = _closure(model, opt, x, y)
    closure()
    opt._counter.observe()
    c = opt._eval(closure, 0.0)
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


def test_where_all_skips_every_same_shape_block():
    torch.manual_seed(0)
    model, (x, y) = Net(), _data()
    opt = DcaCounter(model.parameters(), lr=0.1, where="all")
    prepare(opt, model)
    closure = _closure(model, opt, x, y)
    closure()
    opt._counter.observe()
    c = opt._eval(closure, 0.0)
    want = _flat_grad(F.cross_entropy(model(x, skip=(0, 1)), y), model)
    for ci, wi in zip(c, want):
        assert torch.allclose(torch.zeros_like(wi) if ci is None else ci, wi, atol=1e-6)


def test_counter_newton_step_is_eq19():
    torch.manual_seed(0)
    model, (x, y) = Net(), _data()
    rho, lr = 0.3, 0.1
    ref = copy.deepcopy(model)
    a = _flat_grad(F.cross_entropy(ref(x), y), ref)
    c = _flat_grad(F.cross_entropy(ref(x, skip=(1,)), y), ref)
    sq = lambda vs: sum(float((v.double() ** 2).sum()) for v in vs)  # noqa: E731
    beta = sq(a) / (2 * sq(c) + rho / 4)                          # paper 000, eq. 19
    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=lr, rho=rho, momentum=0.0)
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
    ("dcaquasihalf", 0.5, "line"), ("dcaquasineghalf", -0.5, "paper")])
def test_quasi_steps_along_counter_gradient(name, alpha, direction):
    torch.manual_seed(0)
    model, (x, y) = Net(), _data()
    g = _flat_grad(F.cross_entropy(model(x, mix=alpha), y), model)
    a = _flat_grad(F.cross_entropy(model(x), y), model)
    rho = 0.2
    line = sum(float((ai * gi).sum()) for ai, gi in zip(a, g)) / (sum(float((gi ** 2).sum()) for gi in g) + rho / 4)
    kind = direction or ("paper" if alpha > 0 else "line")
    coef = 1 / alpha if kind == "paper" else line            # paper 000, eqs. 24–25
    m = copy.deepcopy(model)
    opt = timm.optim.create_optimizer_v2(m, name, lr=0.1, rho=rho, momentum=0.0, direction=direction)
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
    assert prepare(opt, model)
    closure = _closure(model, opt, x, y)
    first = closure().item()
    for _ in range(30):
        opt.step(closure)
    # SGD with momentum reaches 0.94 of the first loss; quasineghalf (line step) is the slowest
    assert closure().item() < (0.99 if "neghalf" in name else 0.97) * first


def test_counter_evaluations_leave_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = Net()
    model.stage = nn.Sequential(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh()),
                                nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh()))
    ref = copy.deepcopy(model)
    x, y = _data()
    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=1e-12, momentum=0.0, where="all")
    prepare(opt, model)
    opt.step(_closure(model, opt, x, y))    # probe + L + L'_0: only one pass may move the stats
    ref(x)                                   # one ordinary training forward
    for b, r in zip(model.buffers(), ref.buffers()):
        assert torch.allclose(b.float(), r.float(), atol=1e-6)
    assert not torch.allclose(model.stage[1][1].running_mean, torch.zeros(6))


@pytest.mark.parametrize("name", CLOSURE_NAMES)
def test_step_without_closure_is_an_error(name):
    model = Net()
    opt = timm.optim.create_optimizer_v2(model, name, lr=0.1)
    prepare(opt, model)
    with pytest.raises(ValueError, match="closure"):
        opt.step()


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
    (dict(lr=0.1, where="first"), "where must be one of last, all"),
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


def test_shortcut_c_gives_the_testnet_gradient_in_one_forward():
    torch.manual_seed(0)
    model, (x, y) = Net(), _data()
    ref = copy.deepcopy(model)
    grad = _flat_grad(F.cross_entropy(ref(x, grad_shortcut=True), y), ref)   # a + c
    opt = timm.optim.create_optimizer_v2(model, "dcaquasihalf", lr=0.1, momentum=0.0, c="shortcut")
    prepare(opt, model)
    opt.step(_closure(model, opt, x, y))
    assert opt.diagnostics["s_a"] == 1.0 and opt.diagnostics["s_c"] == 1.0
    for p, p0, g in zip(model.parameters(), ref.parameters(), grad):
        assert torch.allclose(p, p0 - 0.1 * g, atol=1e-6)


def test_shortcut_counter_step_and_reused_beta():
    torch.manual_seed(0)
    model, (x, y) = Net(), _data()
    rho, lr = 0.1, 0.05
    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=lr, rho=rho, momentum=0.0,
                                         c="shortcut", beta_every=2)
    prepare(opt, model)
    closure = _closure(model, opt, x, y)
    flags = []
    for k in range(3):
        ref = copy.deepcopy(model)
        a = _flat_grad(F.cross_entropy(ref(x), y), ref)
        c = _shortcut_c(ref, x, y)
        sq = lambda vs: sum(float((v.double() ** 2).sum()) for v in vs)  # noqa: E731
        beta = sq(a) / (2 * sq(c) + rho / 4) if k != 1 else beta      # k = 1 reuses step 0's β
        opt.step(closure)
        flags.append(opt.diagnostics["refreshed"])
        assert opt.diagnostics["s_c"] == pytest.approx(beta, rel=1e-5)
        for p, p0, ai, ci in zip(model.parameters(), ref.parameters(), a, c):
            assert torch.allclose(p, p0 - lr * (ai + beta * ci), atol=1e-6)
    assert flags == [True, False, True]


def test_shortcut_mode_input_errors():
    with pytest.raises(ValueError, match="c must be one of skip, shortcut"):
        DcaCounter(Net().parameters(), lr=0.1, c="resnet")
    with pytest.raises(ValueError, match="where='last' and solver='newton'"):
        DcaCounter(Net().parameters(), lr=0.1, c="shortcut", where="all")
    with pytest.raises(ValueError, match="beta_every"):
        DcaCounter(Net().parameters(), lr=0.1, c="shortcut", beta_every=0)


def test_misspelt_option_is_refused_and_rho_is_uniform():
    with pytest.raises(TypeError, match="inner_step"):
        DcaCounter(Net().parameters(), lr=0.1, inner_step=3)
    DcaL2(Net().parameters(), lr=0.1, rho=0.5)   # every decomposition takes lr, rho, lam
    with pytest.raises(ValueError, match="rho must be >= 0"):
        DcaL2(Net().parameters(), lr=0.1, rho=-0.5)
