"""Paper 002, §3.2: multi-branch MLPs in timm and the non-convexity measurements."""
import pytest
import timm
import torch
import torch.nn as nn

import dcanets  # noqa: F401
from dcanets.papers import p002_multibranch as bl


def test_model_is_the_mean_of_independent_branches():
    m = timm.create_model("multibranch_mlp_1h", num_branches=4, total_width=16, num_classes=3)
    x = torch.randn(5, 1, 8, 8)
    out = m(x)
    branches = []
    for i in range(4):  # branch i as a plain nn.Linear MLP
        h = torch.relu(x.flatten(1) @ m.hidden[0].weight[i] + m.hidden[0].bias[i])
        branches.append(h @ m.head.weight[i] + m.head.bias[i])
    assert torch.allclose(out, torch.stack(branches).mean(0), atol=1e-5)  # eq. 16
    assert sum(p.numel() for p in m.parameters()) == 4 * (64 * 4 + 4 + 4 * 3 + 3)


def test_total_width_is_fixed_and_bad_splits_are_rejected():
    deep = timm.create_model("multibranch_mlp_3h", num_branches=8, total_width=32)
    assert deep.num_features == 4 and len(deep.hidden) == 3
    with pytest.raises(ValueError, match="divide total_width"):
        timm.create_model("multibranch_mlp_1h", num_branches=3, total_width=64)


def test_convex_envelope_gap():
    ts = torch.linspace(-1, 1, 21, dtype=torch.float64)
    assert bl.convex_envelope_gap(ts ** 2, ts) == pytest.approx(0.0, abs=1e-12)
    w = (ts ** 2 - 0.5) ** 2  # double well: envelope is flat at 0 between the wells, gap 0.25
    assert bl.convex_envelope_gap(w, ts) == pytest.approx(0.25 / 0.25, rel=1e-6)


def test_hessian_negative_share_on_a_known_quadratic():
    class Quad(nn.Module):  # logits linear in parameters -> CE Hessian is PSD
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    share = bl.hessian_negative_share(Quad(), x, y, steps=15)
    assert share["negative_mass"] == 0.0 and share["lambda_max"] > 0
    m = timm.create_model("multibranch_mlp_1h", num_branches=2, total_width=8)
    deep = bl.hessian_negative_share(m, torch.randn(32, 1, 8, 8), y, steps=12)
    assert deep["lambda_min"] < 0  # a ReLU net at a random point has negative curvature


def test_measure_runs_end_to_end():
    reps = bl.measure([1, 4], total_width=8, n=64, steps=20, lines=1, lanczos_steps=5)
    assert [r.num_branches for r in reps] == [1, 4]
    assert all(r.train_loss < 2.5 and 0 <= r.lines["envelope_gap_max"] <= 1 for r in reps)
