"""What every network-loss DC decomposition shares as a timm optimizer (paper 000, §3–4): the
registry, prepare, closures, options and errors. One file per family: test_dcal2.py, test_dcaprox.py,
test_dcacounter.py, test_dcaquasi.py."""
import copy

import pytest
import timm
import timm.optim
import torch
import torch.nn as nn
import torch.nn.functional as F
from dca_nets import Net, batch, closure_of, flat_grad, sqnorm

import dcanets  # noqa: F401  (registers the decompositions into timm)
from dcanets.optim import DECOMPOSITIONS, DcaCounter, DcaL2, decomposition, prepare, remember_batch

CLOSURE_NAMES = ["dcaprox", "dcacounter", "dcaquasihalf", "dcaquasineghalf"]

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

@pytest.mark.parametrize("name", ["dcacounter", "dcaquasihalf", "dcaquasineghalf"])
def test_where_all_is_refused_by_the_optimizers(name):
    with pytest.raises(ValueError, match="where='all' is refused: skipping every same-shape block"):
        timm.optim.create_optimizer_v2(Net(), name, lr=0.1, where="all")

def _direction(model, name, x, y, lr):
    """The family's own direction d at the model's weights: one step of a momentum- and decay-free
    copy of the optimizer on a copy of the model, d = (w_k − w_{k+1})/lr."""
    probe = Net(8)
    probe.load_state_dict(model.state_dict())
    opt = timm.optim.create_optimizer_v2(probe, name, lr=lr, weight_decay=0.0, momentum=0.0)
    prepare(opt, probe)
    before = [p.detach().clone() for p in probe.parameters()]
    opt.step(closure_of(probe, opt, x, y))
    return [(w - p.detach()) / lr for w, p in zip(before, probe.parameters())]


@pytest.mark.parametrize("name", CLOSURE_NAMES + ["lookahead_dcacounter"])
def test_closure_optimizers_train(name):
    """30 closure steps with momentum and weight decay: the loss falls, every step's direction d_k
    is the family's own (not ∇L: more than 1% apart), and momentum and decay act on d_k exactly as
    torch.optim.SGD's do on the gradient (buf = m·buf + d + wd·w, w ← w − lr·buf; Lookahead's
    interpolation of the weights aside)."""
    torch.manual_seed(0)
    model, (x, y) = Net(8), batch(32)
    lr, wd, m = 0.3, 1e-4, 0.5
    opt = timm.optim.create_optimizer_v2(model, name, lr=lr, weight_decay=wd, momentum=m)
    assert prepare(opt, model) is (name == "dcaprox")   # the others also take a closure
    decay = {p: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert sorted(set(decay.values())) == [0.0, wd]     # timm's groups: no decay on 1-D parameters
    closure = closure_of(model, opt, x, y)
    first = closure().item()
    bufs = None
    for _ in range(30):
        d = _direction(model, name.split("_")[-1], x, y, lr)
        a = flat_grad(F.cross_entropy(model(x), y), model)
        assert sqnorm([di - ai for di, ai in zip(d, a)]) > 1e-4 * sqnorm(a)      # not SGD's direction
        params = list(model.parameters())
        before = [p.detach().clone() for p in params]
        opt.step(closure)
        step = [di + decay[p] * w for di, p, w in zip(d, params, before)]
        bufs = step if bufs is None else [m * b + s for b, s in zip(bufs, step)]
        if not name.startswith("lookahead"):
            for p, w, b in zip(params, before, bufs):
                assert torch.allclose(p.detach(), w - lr * b, atol=1e-5, rtol=1e-4)
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
    x, y = batch()
    opt = timm.optim.create_optimizer_v2(model, name, lr=1e-12, momentum=0.0, c=c)
    prepare(opt, model)
    opt.step(closure_of(model, opt, x, y))    # probe + L (+ L'_0): only one pass may move the stats
    ref(x)                                   # one ordinary training forward
    for b, r in zip(model.buffers(), ref.buffers()):
        assert torch.allclose(b.float(), r.float(), atol=1e-6)
    assert not torch.allclose(model.stage[1][1].running_mean, torch.zeros(6))


def test_step_before_prepare_is_an_error():
    model, (x, y) = Net(), batch()
    opt = DcaCounter(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="prepare"):
        opt.step(closure_of(model, opt, x, y))


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
    x, y = batch()
    with pytest.raises(ValueError, match="no same-shape blocks"):
        opt.step(closure_of(changing, opt, x, y))

def test_misspelt_option_is_refused_and_rho_is_uniform():
    with pytest.raises(TypeError, match="inner_step"):
        DcaCounter(Net().parameters(), lr=0.1, inner_step=3)
    DcaL2(Net().parameters(), lr=0.1, rho=0.5)   # every decomposition takes lr, rho, lam
    with pytest.raises(ValueError, match="rho must be >= 0"):
        DcaL2(Net().parameters(), lr=0.1, rho=-0.5)

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
    model, (x, y) = Net(), batch()
    opt = timm.optim.create_optimizer_v2(model, name, lr=0.1, momentum=0.0, rho=1.0, **kwargs)
    prepare(opt, model)
    inner = closure_of(model, opt, x, y)
    calls = []

    def closure():
        calls.append(1)
        return inner()

    remember_batch(opt, x, y)            # ρ = 1 without kappa: κ measured on this batch (no closure run)
    opt.step(closure)                    # the first step also learns the block order
    calls.clear()
    before = copy.deepcopy(model)
    a = flat_grad(F.cross_entropy(before(x), y), before)
    opt.step(closure)
    assert len(calls) == runs
    for p, p0, ai in zip(model.parameters(), before.parameters(), a):
        want = ai if grad == "a" else (p0 - p).detach() / 0.1
        assert torch.allclose(p.grad, want, atol=1e-6)
