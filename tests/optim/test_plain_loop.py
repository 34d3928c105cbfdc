"""Every registered decomposition in an ordinary training loop (zero_grad; forward; loss;
loss.backward(); step()), or, where the step must evaluate the loss elsewhere, a one-line error.

The plain loop takes eq. 17's c from hooks run during the loop's own backward
(``dcanets.optim.counter.ShortcutTap``); ``step(closure)`` computes the same step by a separate
code path (one forward with the graph cut at h^{L−1}), so agreement of the two is a check of both.
"""
import copy

import pytest
import timm
import timm.optim
import torch
import torch.nn as nn
import torch.nn.functional as F
from dca_nets import closure_of

import dcanets
from dcanets.optim import prepare


class Net(nn.Module):
    """stem → stage of two same-shape tanh blocks → head (no BatchNorm: batches add up)."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.stage = nn.Sequential(nn.Sequential(nn.Linear(width, width), nn.Tanh()),
                                   nn.Sequential(nn.Linear(width, width), nn.Tanh()))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.stage(torch.tanh(self.stem(x))))


def _ours():
    """timm's optimizer registry filtered to the names dcanets' plugins registered."""
    mine = dcanets.list_decompositions()
    return [n for n in timm.optim.list_optimizers() if n in mine]


def _needs_closure(name, kwargs):
    model = Net()
    return prepare(timm.optim.create_optimizer_v2(model, name, lr=0.1, **kwargs), model)


OURS = _ours()
PLAIN = [(n, {}) for n in OURS if not _needs_closure(n, {})] + [
    ("dcacounter", {"beta_every": 2}),                      # fused backward on the reused steps
    ("dcacounter", {"rho": 0.5, "kappa": 2.0}),            # ρ > 0 with its curvature scale given
    ("dcaquasihalf", {"direction": "projection"}),
    ("dcaquasineghalf", {"rho": 0.5, "kappa": 3.0}),
    ("dcaquasihalf", {"direction": "newton", "kappa": 1.0}),
    ("dcaquasineghalf", {"direction": "paper"}),
    ("dcaquasineghalf", {"beta_every": 2}),                 # fused with s_a ≠ 1
    ("lookahead_dcacounter", {}),
]
CLOSURE = [(n, {}) for n in OURS if _needs_closure(n, {})] + [
    ("dcacounter", {"c": "skip"}),
    ("dcacounter", {"solver": "inner"}),
    ("dcaquasihalf", {"direction": "newton"}),
    ("dcaquasineghalf", {"c": "skip"}),
]


def _id(case):
    name, kwargs = case
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items())


def test_which_defaults_run_closure_free():
    """docs/decompositions.md's table: every registered name but dcaprox runs in the plain loop."""
    assert sorted(OURS) == ["dcacounter", "dcal2", "dcaprox", "dcaquasihalf", "dcaquasineghalf"]
    assert sorted(n for n, kw in PLAIN if not kw and n in OURS) == ["dcacounter", "dcal2", "dcaquasihalf",
                                                                     "dcaquasineghalf"]
    assert [n for n, kw in CLOSURE if not kw] == ["dcaprox"]
    for name, kwargs in PLAIN:
        assert not _needs_closure(name, kwargs), (name, kwargs)
    for name, kwargs in CLOSURE:
        assert _needs_closure(name, kwargs), (name, kwargs)


def _plain_step(model, opt, x, y):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def _closure_step(model, opt, x, y):
    return opt.step(closure_of(model, opt, x, y))


def _batches(n, size, shape, classes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]


def _assert_close(ts1, ts2, rel=1e-6):
    """Agreement to ``rel`` of the largest magnitude among the tensors."""
    ts1, ts2 = [t.detach().double() for t in ts1], [t.detach().double() for t in ts2]
    scale = max(float(t.abs().max()) for t in ts2)
    for t1, t2 in zip(ts1, ts2):
        assert torch.allclose(t1, t2, atol=rel * scale, rtol=0)


@pytest.mark.parametrize("case", PLAIN, ids=_id)
def test_plain_loop_matches_the_closure_path(case):
    """4 steps of cifar_plainnet20 (timm's factory: parameter groups, momentum 0.9) from one
    initial state: weights, p.grad, BatchNorm statistics and coefficients agree to 1e-6 of their
    scale. In float64: with batch-4 BatchNorm a float32 rounding difference of the weights
    (a fused step rounds s_a·(a + r·c), the closure path s_a·a + s_c·c) changes the next
    gradient by ~1e-3 of its scale, which would test the chaos, not the step."""
    name, kwargs = case
    torch.manual_seed(0)
    base = timm.create_model("cifar_plainnet20").double()
    plain, closure = copy.deepcopy(base), copy.deepcopy(base)
    opts = [timm.optim.create_optimizer_v2(m, name, lr=0.05, weight_decay=5e-4, **kwargs) for m in (plain, closure)]
    assert [prepare(o, m) for o, m in zip(opts, (plain, closure))] == [False, False]
    for x, y in _batches(4, 4, (3, 32, 32), 10):
        x = x.double()
        lp = _plain_step(plain, opts[0], x, y)
        lc = _closure_step(closure, opts[1], x, y)
        assert float(lp.detach()) == pytest.approx(float(lc.detach()), rel=1e-6)
        _assert_close(plain.parameters(), closure.parameters())
        _assert_close([p.grad for p in plain.parameters()], [p.grad for p in closure.parameters()])
        _assert_close(plain.buffers(), closure.buffers())
        d1, d2 = (getattr(o, "diagnostics", {}) for o in opts)
        assert d1.keys() == d2.keys() and all(d1[k] == pytest.approx(d2[k], rel=1e-5) for k in d1)
    assert not torch.equal(plain.fc.weight, base.fc.weight)   # it moved


@pytest.mark.parametrize("case", CLOSURE, ids=_id)
def test_closure_configurations_refuse_the_plain_loop_in_one_line(case):
    name, kwargs = case
    model = Net()
    opt = timm.optim.create_optimizer_v2(model, name, lr=0.1, **kwargs)
    assert prepare(opt, model)
    x, y = _batches(1, 8, (4,), 3)[0]
    with pytest.raises(ValueError, match=r"needs a closure \(.+\): call optimizer.step\(closure\)") as err:
        _plain_step(model, opt, x, y)
    assert "\n" not in str(err.value)
    _closure_step(model, opt, x, y)                           # the closure path still works


def _one_block_testnet_gradient(model, x, y):
    """∇ of the same net with a gradient-only identity shortcut around its last block: a + c
    (eq. 17's c, tests/optim/test_dcacounter.py), computed without the optimizer."""
    testnet = copy.deepcopy(model)
    blk = testnet.layer3[-1]
    blk.shortcut_alpha, blk.shortcut_grad_only, blk.act_placement = 1.0, True, "before_add"
    loss = F.cross_entropy(testnet(x), y)
    return list(torch.autograd.grad(loss, list(testnet.parameters())))


def test_a_timm_user_gets_eq19():
    """create_optimizer_v2(model, "dcacounter") + prepare + the standard loop: the first step is
    a + βc with β = ‖a‖²/(2‖c‖² + ρ/(2κ)) (eq. 19, ρ in Hessian units), a and c computed independently."""
    torch.manual_seed(0)
    model = timm.create_model("cifar_plainnet20")
    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=0.05, rho=0.01, kappa=0.5)   # momentum 0.9
    assert prepare(opt, model) is False
    batches = _batches(3, 4, (3, 32, 32), 10)
    x, y = batches[0]
    ref = copy.deepcopy(model)
    a = list(torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters())))
    c = [t - ai for t, ai in zip(_one_block_testnet_gradient(ref, x, y), a)]
    sq = lambda vs: sum(float((v.double() ** 2).sum()) for v in vs)  # noqa: E731
    beta = sq(a) / (2 * sq(c) + 0.01 / (2 * 0.5))
    w0 = [p.detach().clone() for p in model.parameters()]
    for x, y in batches:
        _plain_step(model, opt, x, y)
        if w0 is not None:   # first step: the momentum buffer is d itself
            assert opt.diagnostics["beta"] == pytest.approx(beta, rel=1e-4)
            _assert_close([(w - p) / 0.05 for w, p in zip(w0, model.parameters())],
                          [ai + beta * ci for ai, ci in zip(a, c)], rel=1e-5)
            w0 = None
        assert opt.diagnostics["refreshed"] is True


def _accumulating_step(model, opt, x, y, stray=None, zero=None):
    """A stray backward cleared by ``zero``, then two half-batch backward passes."""
    if stray is not None:
        F.cross_entropy(model(stray[0]), stray[1]).backward()
        zero()
    for half in (slice(0, len(y) // 2), slice(len(y) // 2, None)):
        (F.cross_entropy(model(x[half]), y[half]) / 2).backward()
    opt.step()


@pytest.mark.parametrize("name", ["dcacounter", "dcaquasineghalf"])
def test_c_accumulates_over_backward_passes_like_the_gradients(name):
    """Two half-batch backward passes before one step = one step on the whole batch."""
    torch.manual_seed(0)
    m1 = Net()
    m2 = copy.deepcopy(m1)
    o1, o2 = (timm.optim.create_optimizer_v2(m, name, lr=0.1, momentum=0.5) for m in (m1, m2))
    prepare(o1, m1)
    prepare(o2, m2)
    batches = _batches(3, 8, (4,), 3)
    zeros = [None, m1.zero_grad,                               # p.grad = None: c restarts too
             lambda: o1.zero_grad(set_to_none=False)]          # zeros kept: the optimizer resets c
    for k, (x, y) in enumerate(batches):
        _accumulating_step(m1, o1, x, y, stray=batches[k - 1] if k else None, zero=zeros[k])
        _closure_step(m2, o2, x, y)
        _assert_close(m1.parameters(), m2.parameters())


def test_unscaling_and_clipping_between_backward_and_step_act_on_c_too():
    """GradScaler: the scaled backward gives the unscaled step. Norm clipping by k: with ρ = 0
    β is unchanged and the step is k·(a + βc). (float64: the weight changes are compared.)"""
    torch.manual_seed(0)
    base = Net().double()
    x, y = _batches(1, 8, (4,), 3)[0]
    x = x.double()
    models = [copy.deepcopy(base) for _ in range(3)]
    opts = [timm.optim.create_optimizer_v2(m, "dcacounter", lr=0.1, momentum=0.0) for m in models]
    for m, o in zip(models, opts):
        prepare(o, m)
    _plain_step(models[0], opts[0], x, y)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    opts[1].zero_grad()
    scaler.scale(F.cross_entropy(models[1](x), y)).backward()
    scaler.step(opts[1])
    scaler.update()
    _assert_close(models[1].parameters(), models[0].parameters())
    opts[2].zero_grad()
    F.cross_entropy(models[2](x), y).backward()
    norm = sum(float((p.grad ** 2).sum()) for p in models[2].parameters()) ** 0.5
    torch.nn.utils.clip_grad_norm_(models[2].parameters(), max_norm=norm / 2)
    k = (norm / 2) / (norm + 1e-6)                     # clip_grad_norm_'s factor (its eps is 1e-6)
    opts[2].step()
    assert opts[2].diagnostics["beta"] == pytest.approx(opts[0].diagnostics["beta"], rel=1e-9)
    _assert_close([p - b for p, b in zip(models[2].parameters(), base.parameters())],
                  [k * (p - b) for p, b in zip(models[0].parameters(), base.parameters())], rel=1e-9)


@pytest.mark.parametrize("name", ["dcacounter", "dcaquasihalf"])   # separate c; fused a + c
def test_gradient_probes_between_backward_and_step_are_neither_tapped_nor_changed(name):
    """torch.autograd.grad through the hooked model (a fidelity or curvature probe) returns the
    plain gradient, and the step that follows is the one without the probe."""
    torch.manual_seed(0)
    m1 = Net()
    m2, clean = copy.deepcopy(m1), copy.deepcopy(m1)
    o1, o2 = (timm.optim.create_optimizer_v2(m, name, lr=0.1) for m in (m1, m2))
    prepare(o1, m1)
    prepare(o2, m2)
    for x, y in _batches(3, 8, (4,), 3):
        o1.zero_grad()
        F.cross_entropy(m1(x), y).backward()
        probe = torch.autograd.grad(F.cross_entropy(m1(-x), y), list(m1.parameters()))
        clean.load_state_dict(m1.state_dict())
        want = torch.autograd.grad(F.cross_entropy(clean(-x), y), list(clean.parameters()))
        _assert_close(probe, want)
        o1.step()
        _plain_step(m2, o2, x, y)
        _assert_close(m1.parameters(), m2.parameters())


def test_backward_with_inputs_gets_the_plain_gradient_and_records_nothing():
    torch.manual_seed(0)
    model = Net()
    clean = copy.deepcopy(model)
    opt = timm.optim.create_optimizer_v2(model, "dcaquasihalf", lr=0.1)   # fused: a + c if tapped
    prepare(opt, model)
    x, y = _batches(1, 8, (4,), 3)[0]
    F.cross_entropy(model(x), y).backward(inputs=list(model.parameters()))
    want = torch.autograd.grad(F.cross_entropy(clean(x), y), list(clean.parameters()))
    _assert_close([p.grad for p in model.parameters()], want)
    with pytest.raises(RuntimeError, match="none went through"):
        opt.step()


def test_step_without_a_backward_is_a_one_line_error():
    torch.manual_seed(0)
    model = Net()
    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=0.1)
    prepare(opt, model)
    x, y = _batches(1, 8, (4,), 3)[0]
    with pytest.raises(RuntimeError, match=r"no loss.backward\(\)|none went through") as err:
        opt.step()
    assert "\n" not in str(err.value)
    _plain_step(model, opt, x, y)
    twin = copy.deepcopy(model)           # a copy of the hooked model carries inert hooks
    F.cross_entropy(twin(x), y).backward()
    with pytest.raises(RuntimeError, match="none went through"):
        opt.step()                         # the copy's backward fed nothing to the original


def test_a_model_whose_blocks_all_change_shape_fails_at_the_first_plain_step():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=0.1)
    prepare(opt, model)
    x, y = _batches(1, 8, (4,), 3)[0]
    with pytest.raises(ValueError, match="no same-shape blocks"):
        _plain_step(model, opt, x, y)


def test_take_step_runs_before_step_between_the_backward_and_the_step():
    """``before_step`` (the engine's gradient clipping) sees the gradients of this backward before the
    step uses them; the closure path has no such point and refuses one in one line."""
    from dcanets.optim import take_step

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    def halve():
        for p in model.parameters():
            p.grad.mul_(0.5)

    take_step(opt, closure, False, before_step=halve)
    twin = Net()
    twin.load_state_dict({k: v for k, v in zip(model.state_dict(), before)})
    F.cross_entropy(twin(x), y).backward()
    for p, w, q in zip(model.parameters(), before, twin.parameters()):
        assert torch.allclose(p, w - 0.1 * 0.5 * q.grad, atol=1e-7)
    with pytest.raises(ValueError, match="before_step needs the plain step"):
        take_step(opt, closure, True, before_step=halve)
