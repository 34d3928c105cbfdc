"""Every registered decomposition in timm's own training loop, which knows nothing of dcanets.

timm's ``train.py`` builds the optimizer with ``create_optimizer_v2`` (``lookahead_<name>`` wraps
it in Lookahead), computes its loss with timm's ``LabelSmoothingCrossEntropy`` and steps through
``NativeScaler`` (a ``GradScaler``: ``scale(loss).backward()``, ``step``, ``update``), then
``zero_grad()``: no ``prepare``, no ``remember_batch``, no closure. A model built by
``timm.create_model`` of a dcanets name is recorded (``dcanets.builder``) and the optimizer attaches
to it when built; ρ > 0 and ``rho="auto"`` read their batch off the loop's passes
(``dcanets.optim.batches``). Each step must equal the ``prepare()`` + ``remember_batch`` path's
(the engine's) on a copy of the model dcanets did not record, and differ from SGD's (``dcal2`` is
SGD by paper 000, eq. 9: equal to it).
"""
import copy

import pytest
import timm
import timm.optim
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy
from timm.utils import NativeScaler

import dcanets
from dcanets._compat import unwrap_optimizer
from dcanets.builder import owning_model
from dcanets.optim import prepare, remember_batch

LR, WD, STEPS = 0.05, 5e-4, 3
NAMES = sorted(dcanets.list_decompositions())
CASES = [(n, {}) for n in NAMES] + [(f"lookahead_{n}", {}) for n in NAMES] + [
    ("dcacounter", {"rho": 0.5}),              # κ measured on the batch read off the loop
    ("dcacounter", {"rho": "auto", "rho_lanczos": 4}),   # λ_min of G2 and H2 on that batch
    ("dcaquasineghalf", {"rho": 0.5}),         # "projection": κ of L'_-1/2
    ("lookahead_dcaquasihalf", {"direction": "projection", "rho": 0.5}),
]


def _id(case):
    name, kwargs = case
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items())


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g))
            for _ in range(STEPS)]


def _timm_step(model, optimizer, scaler, loss_fn, x, y, before=None):
    """One update of timm's train_one_epoch (no AMP context on CPU; NativeScaler still scales)."""
    output = model(x)
    loss = loss_fn(output, y)
    if before is not None:
        before(x, y)
    scaler(loss, optimizer, parameters=model.parameters())
    optimizer.zero_grad()
    return loss


def _run(model, name, kwargs, engine_path=False, opt_name=None):
    opt = timm.optim.create_optimizer_v2(model, opt_name or name, lr=LR, weight_decay=WD, momentum=0.9, **kwargs)
    loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1)
    before = None
    if engine_path:                                      # what dcanets.engine does around the same loop
        assert prepare(opt, model) is False
        before = lambda x, y: remember_batch(opt, x, y, loss_fn)  # noqa: E731
    scaler = NativeScaler(device="cpu")
    for x, y in _batches():
        _timm_step(model, opt, scaler, loss_fn, x, y, before)
    return opt


def _close(m1, m2, rel=1e-7):
    ps1, ps2 = list(m1.parameters()), list(m2.parameters())
    scale = max(float(p.detach().abs().max()) for p in ps2)
    return all(torch.allclose(a, b, atol=rel * scale, rtol=0) for a, b in zip(ps1, ps2))


def _largest_change(m1, m2):
    return max(float((a - b).detach().abs().max()) for a, b in zip(m1.parameters(), m2.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_timms_loop_steps_like_the_prepare_path_and_unlike_sgd(case):
    name, kwargs = case
    torch.manual_seed(0)
    model = timm.create_model("cifar_plainnet20").double()
    base, engine, sgd = (copy.deepcopy(model) for _ in range(3))   # copies: not recorded, need prepare
    assert owning_model(model.parameters()) is model and owning_model(engine.parameters()) is None
    if name.endswith("dcaprox"):
        opt = timm.optim.create_optimizer_v2(model, name, lr=LR, weight_decay=WD, momentum=0.9)
        x, y = _batches()[0]
        with pytest.raises(ValueError, match=r"needs a closure .* timm's train.py, needs another decomposition") \
                as err:
            _timm_step(model, opt, NativeScaler(device="cpu"), LabelSmoothingCrossEntropy(0.1), x, y)
        assert "\n" not in str(err.value) and _close(model, base, rel=0)        # nothing moved
        return
    opt = _run(model, name, kwargs)
    _run(engine, name, kwargs, engine_path=True)
    _run(sgd, "momentum", {}, opt_name="lookahead_momentum" if name.startswith("lookahead_") else "momentum")
    assert _largest_change(model, base) > 1e-3                                # it trained
    assert _close(model, engine), f"{_largest_change(model, engine):.3g}"
    if name.endswith("dcal2"):
        assert _close(model, sgd)                                              # eq. 9: DCA with G1 = λ·L2 is SGD
    else:
        assert _largest_change(model, sgd) > 1e-2 * _largest_change(model, base)
    if "rho" in kwargs:                                  # it measured, on the batch it read off the loop
        assert unwrap_optimizer(opt).rho_history


def test_a_model_dcanets_did_not_build_keeps_the_one_line_error():
    model = nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.Sequential(nn.Linear(6, 6), nn.Tanh()),
                                                         nn.Sequential(nn.Linear(6, 6), nn.Tanh())), nn.Linear(6, 3))
    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=0.1)
    F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    with pytest.raises(RuntimeError, match=r"not attached to a model: .*not those of a model dcanets built.*"
                                           r"call dcanets.optim.prepare\(optimizer, model\) first") as err:
        opt.step()
    assert "\n" not in str(err.value)


def test_every_registered_name_is_recorded_by_timm_create_model():
    """timm.create_model of a dcanets name (the builders go through dcanets.builder.build) records the
    model; a model built by timm's own names is not."""
    for name in ("cifar_negnet20", "negnet18", "double_resnet_flat", "teacher_student_cnn", "multibranch_mlp_1h"):
        model = timm.create_model(name)
        assert owning_model(model.parameters()) is model, name
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(3)
            assert owning_model(model.parameters()) is model, name      # a new head still counts
        assert owning_model(list(model.parameters())[:2]) is model      # a subset (frozen layers) too
    assert owning_model(timm.create_model("resnet10t").parameters()) is None


@pytest.mark.parametrize("loss_name", ["ce", "smoothing", "mixup", "mse", "sum"])
def test_the_targets_read_off_a_backward_are_those_of_the_loss(loss_name):
    """t = softmax(z) − N·∂L/∂z recovers the targets of every softmax cross-entropy averaged over the
    batch (timm's CrossEntropyLoss, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy after Mixup);
    an MSE, or a sum over the batch, does not fit and is named."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    from dcanets.optim.batches import implied_targets

    torch.manual_seed(0)
    z = torch.randn(8, 10, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (8,))
    onehot = F.one_hot(y, 10).double()
    targets = {"ce": onehot, "smoothing": 0.9 * onehot + 0.1 / 10,
               "mixup": Mixup(mixup_alpha=1.0, num_classes=10, label_smoothing=0.0)(torch.randn(8, 3, 4, 4), y)[1]}
    losses = {"ce": lambda: nn.CrossEntropyLoss()(z, y), "smoothing": lambda: LabelSmoothingCrossEntropy(0.1)(z, y),
              "mixup": lambda: SoftTargetCrossEntropy()(z, targets["mixup"].double()),
              "mse": lambda: F.mse_loss(z, onehot), "sum": lambda: F.cross_entropy(z, y, reduction="sum")}
    (g,) = torch.autograd.grad(losses[loss_name](), z)
    t, why = implied_targets(z.detach(), g)
    if loss_name in targets:
        assert why == "" and torch.allclose(t, targets[loss_name].double(), atol=1e-12)
    else:
        assert t is None and why
