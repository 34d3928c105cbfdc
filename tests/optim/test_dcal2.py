"""dcal2 (paper 000, eq. 9): G1 = λ·L2 is SGD with lr = 1/λ."""
import copy

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from dca_nets import Net, batch

import dcanets  # noqa: F401  (registers the decompositions into timm)
from dcanets.optim import DcaL2


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
    _steps_agree([(m1, sgd), (m2, dca)], [batch()] * 10)
