"""Convex residual nets stay convex in the input while trained by any optimizer timm knows."""
from __future__ import annotations

import pytest
import timm
import timm.optim
import torch

import dcanets  # noqa: F401  (registers the DCA decompositions into timm's optimizer registry)
from dcanets.papers.p003_convex import ConvexResNets, convexity_gap

try:
    from dcanets.optim import prepare
except ImportError:  # the DCA module is optional
    prepare = None

TOL = 1e-5  # float32 rounding of outputs of order one


def concave_task(n: int = 4, batch: int = 64):
    """A target the nets can only fit by breaking convexity: -|x|^2 pulls weights below zero."""
    x = torch.randn(batch, n)
    return x, -(x ** 2).sum(1, keepdim=True).expand(-1, 3)


def assert_convex_and_constrained(nets: ConvexResNets, n: int) -> None:
    for name in ("W", "V", "b"):
        value = getattr(nets, name)
        assert value is None or (value >= 0).all(), name
    assert (nets.c > 0).all()
    x, y = 3 * torch.randn(500, n), 3 * torch.randn(500, n)
    gap = convexity_gap(nets, x, y)
    assert torch.isfinite(gap).all()
    assert gap.max() <= TOL * (1 + nets(x).abs().max()), float(gap.max())


def train_steps(nets: ConvexResNets, opt: torch.optim.Optimizer, steps: int, second_order: bool) -> None:
    x, y = concave_task(nets.in_features)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(nets(x), y)
        loss.backward(create_graph=second_order)
        return loss

    for _ in range(steps):
        opt.step(closure)


def test_convex_after_many_adam_steps_at_a_large_rate():
    nets = ConvexResNets(4, num_nets=3, layers=3, hidden=6)
    before = [p.detach().clone() for p in nets.parameters()]
    train_steps(nets, torch.optim.Adam(nets.parameters(), lr=0.3), steps=60, second_order=False)
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(nets.parameters(), before))
    assert moved > 1.0   # the raw parameters really travelled
    assert_convex_and_constrained(nets, 4)


def test_convex_scalar_nets_with_identity_v():
    nets = ConvexResNets(1, num_nets=3, layers=10, v_identity=True, bias_range=(0.0, 1.0))
    assert nets.V is None
    train_steps(nets, torch.optim.SGD(nets.parameters(), lr=0.5, momentum=0.9, nesterov=True), 40, False)
    assert_convex_and_constrained(nets, 1)


def _optimizer_names():
    return timm.optim.list_optimizers()


@pytest.mark.parametrize("name", _optimizer_names())
def test_every_registered_optimizer_keeps_convexity(name):
    nets = ConvexResNets(4, num_nets=3, layers=2, hidden=5)
    try:
        # dcacounter's eq. 19 β is ~3e4 on these nets (|c|/|a| ~ 0.004), which it refuses by
        # default; clamping keeps it stepping, which is what this test is about
        kwargs = {"beta_policy": "clamp"} if name == "dcacounter" else {}
        opt = timm.optim.create_optimizer_v2(nets, name, lr=0.05, **kwargs)
    except (ImportError, AssertionError) as err:
        if not any(word in str(err) for word in ("CUDA", "apex", "APEX", "bitsandbytes")):
            raise
        pytest.skip(f"{name} needs CUDA or an extra package: {err}")
    if prepare is not None:
        prepare(opt, nets)  # the DCA counter-loss decompositions attach to the model
    info = timm.optim.get_optimizer_info(name)
    before = torch.cat([p.detach().flatten() for p in nets.parameters()])
    train_steps(nets, opt, steps=3, second_order=info.second_order)
    after = torch.cat([p.detach().flatten() for p in nets.parameters()])
    assert not torch.equal(before, after), f"{name} did not update the parameters"
    assert_convex_and_constrained(nets, 4)
