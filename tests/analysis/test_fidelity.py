"""Direction fidelity against independent autograd computations (tiny batches, depth-20 nets)."""
import argparse
import json
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import dcanets  # noqa: F401  (registers the models and decompositions)
from dcanets.analysis.fidelity import direction_fidelity, fidelity_over_training
from dcanets.engine.fidelity import optimizer_step, shortcut_twin, stage_names
from dcanets.layers import shortcut_blocks

CIFAR_STAGES = ["stem", "layer1", "layer2", "layer3", "head"]


def _batch(n=8, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _model(name):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10)


def _flat_grad(model, x, y):
    model.train()
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).double().flatten()
                      for p, g in zip(model.parameters(), grads)])


def _cos(u, v):
    return float(u @ v / (u.norm() * v.norm()))


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


# -- SGD against its own gradient: exactly 1 ---------------------------------------------------

@pytest.mark.parametrize("reference", ["gradnet", "self"])
def test_plain_sgd_on_resnet20_has_cosine_one_with_its_own_gradient(reference):
    model = _model("cifar_resnet20")
    x, y = _batch()
    report = direction_fidelity(model, _sgd, x, y, reference=reference)
    assert report.cosine == pytest.approx(1.0, abs=1e-6)
    assert report.baseline_cosine == pytest.approx(1.0, abs=1e-6)
    assert list(report.stages) == CIFAR_STAGES
    for stage in report.stages.values():
        assert stage.cosine == pytest.approx(1.0, abs=1e-6)
    assert report.step_norm == pytest.approx(0.1 * report.reference_norm, rel=1e-5)   # Δw = −lr·∇L
    assert report.step_norm == pytest.approx(0.1 * report.baseline_norm, rel=1e-5)    # and ∇L is the baseline
    assert sum(s.numel for s in report.stages.values()) == sum(p.numel() for p in model.parameters())
    assert report.forward_gap == pytest.approx(0.0, abs=1e-6)


def test_weight_decay_takes_sgd_off_its_own_gradient():
    """The measurement can fail: SGD with weight decay steps along −(∇L + wd·w), and the cosine is
    that direction's with ∇L, computed here by autograd."""
    model = _model("cifar_resnet20")
    x, y = _batch()
    g = _flat_grad(model, x, y)
    w = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    expected = _cos(g + 1.0 * w, g)
    report = direction_fidelity(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=1.0),
                                x, y, reference="self")
    assert report.cosine == pytest.approx(expected, abs=1e-6)
    assert expected < 0.99                                       # far from SGD's 1
    assert report.baseline_cosine == pytest.approx(1.0, abs=1e-6)


# -- the twin is the registered gradnet --------------------------------------------------------

def test_plain_sgd_against_the_gradnet_twin_equals_cifar_gradnet20_computed_independently():
    plain = _model("cifar_plainnet20")
    gradnet = timm.create_model("cifar_gradnet20", num_classes=10)
    gradnet.load_state_dict(plain.state_dict())
    x, y = _batch()
    expected = _cos(_flat_grad(plain, x, y), _flat_grad(gradnet, x, y))
    report = direction_fidelity(plain, _sgd, x, y, reference="gradnet")
    assert report.cosine == pytest.approx(expected, abs=1e-6)
    assert report.baseline_cosine == pytest.approx(expected, abs=1e-6)
    assert report.cosine < 0.9          # a plain net's gradient is not the shortcut gradient
    assert report.stages["head"].cosine == pytest.approx(1.0, abs=1e-6)   # the head sees no shortcut
    assert report.forward_gap == pytest.approx(0.0, abs=1e-6)             # same forward


def test_twin_switches_plain_blocks_only_and_restores_them():
    plain = _model("cifar_plainnet20")
    x, _ = _batch()
    plain.eval()
    out = plain(x)
    with shortcut_twin(plain, "gradnet") as switched:
        assert len(switched) == 9
        assert all(m.shortcut_grad_only and m.act_placement == "before_add" for m in switched)
        assert torch.allclose(plain(x), out, atol=1e-6)        # plain forward
    assert all(m.shortcut_alpha == 0.0 and not m.shortcut_grad_only and m.act_placement == "after_add"
               for _, m in shortcut_blocks(plain))
    with shortcut_twin(plain, "last") as switched:
        assert switched == [plain.layer3[2]]
    with shortcut_twin(_model("cifar_resnet20"), "gradnet") as switched:
        assert switched == []                                  # has shortcuts: its own gradient


# -- dcacounter on one block: the cosine of a + βc with the one-block TestNet gradient ----------

def _one_block_quantities(model, x, y):
    """a = ∇L (plain), c = ∂L/∂h^L·∂h^{L−1}/∂w at the last block (eq. 17), and the gradient of
    the one-block TestNet (that block alone computes act(F) + h − h.detach()), all by autograd."""
    block = model.layer3[2]
    params = list(model.parameters())
    model.train()
    a = _flat_grad(model, x, y)
    seen = {}
    handle = block.register_forward_hook(lambda m, i, o: seen.update(h_in=i[0], h_out=o))
    loss = F.cross_entropy(model(x), y)
    handle.remove()
    (g_out,) = torch.autograd.grad(loss, [seen["h_out"]], retain_graph=True)
    c = torch.autograd.grad(seen["h_in"], params, g_out, allow_unused=True)
    c = torch.cat([(torch.zeros_like(p) if g is None else g).double().flatten() for p, g in zip(params, c)])
    testnet = timm.create_model("cifar_plainnet20", num_classes=10)
    testnet.load_state_dict(model.state_dict())
    last = testnet.layer3[2]
    last.shortcut_alpha, last.act_placement, last.shortcut_grad_only = 1.0, "before_add", True
    return a, c, _flat_grad(testnet, x, y)


def test_dcacounter_fidelity_equals_the_cosine_of_a_plus_beta_c_with_the_one_block_testnet():
    model = _model("cifar_plainnet20")
    x, y = _batch()
    a, c, testnet = _one_block_quantities(model, x, y)
    assert (a + c - testnet).norm() <= 1e-5 * testnet.norm()      # the one-block identity (float32 rounding)
    rho = 0.0
    beta = float(a @ a) / (2 * float(c @ c) + rho / 4)            # paper 000, eq. 19
    expected = _cos(a + beta * c, testnet)
    # c="shortcut": the documented option for "c = the shortcut part of the block's gradient" (eq. 17)
    report = direction_fidelity(
        model, lambda m: create_optimizer_v2(m, "dcacounter", lr=0.1, rho=rho, c="shortcut"), x, y, reference="last")
    assert report.cosine == pytest.approx(expected, abs=1e-5)
    assert report.baseline_cosine == pytest.approx(_cos(a, testnet), abs=1e-5)
    assert abs(beta - 1.0) > 0.05 and report.cosine < 0.9999      # β ≠ 1: the step is not a + c itself
    assert report.extra["diagnostics"]["beta"] == pytest.approx(beta, rel=1e-4)


# -- an optimizer instance is stepped on a trial basis ------------------------------------------

def test_an_optimizer_instance_is_restored_after_the_measurement():
    model = _model("cifar_plainnet20")
    x, y = _batch()
    opt = create_optimizer_v2(model, "dcacounter", lr=0.1, momentum=0.9, rho=0.0)
    optimizer_step(model, opt, x, y)                           # a momentum buffer to keep
    weights = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    state = {k: v["momentum_buffer"].clone() for k, v in opt.state.items()}
    first = direction_fidelity(model, opt, x, y)
    second = direction_fidelity(model, opt, x, y)
    assert first.cosine == pytest.approx(second.cosine, abs=1e-9)
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    assert all(torch.equal(b, c) for b, c in zip(buffers, model.buffers()))
    assert all(torch.equal(state[k], v["momentum_buffer"]) for k, v in opt.state.items())
    assert opt.num_steps == 1


def test_momentum_changes_the_step_and_the_cosine_says_so():
    """A momentum buffer from another batch: the step is −lr·(0.9·g_2 + g_1) (g_2 = ∇L at the first
    weights on batch 2, g_1 = ∇L at the current weights on this batch), and the cosine with g_1 is
    that vector's, computed here by autograd."""
    model = _model("cifar_resnet20")
    x, y = _batch()
    x2, y2 = _batch(seed=2)
    g2 = _flat_grad(model, x2, y2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer_step(model, opt, x2, y2)                          # momentum from another batch
    g1 = _flat_grad(model, x, y)
    expected = _cos(0.9 * g2 + g1, g1)
    report = direction_fidelity(model, opt, x, y, reference="self")
    assert report.cosine == pytest.approx(expected, abs=1e-6)
    assert expected < 0.99                                       # plain SGD would give 1


# -- over training: the measured steps are the training steps -----------------------------------

def test_fidelity_over_training_does_not_change_the_training_run():
    batches = [_batch(seed=s) for s in range(5)]
    probed, plain = _model("cifar_plainnet20"), _model("cifar_plainnet20")
    seen = []
    reports = fidelity_over_training(probed, _sgd(probed), batches, every=2, callback=seen.append)
    assert [r.step for r in reports] == [0, 2, 4] and seen == reports
    opt = _sgd(plain)
    plain.train()
    for x, y in batches:
        optimizer_step(plain, opt, x, y)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(probed.parameters(), plain.parameters()))
    assert all(r.cosine == pytest.approx(r.baseline_cosine, abs=1e-6) for r in reports)   # SGD steps along −∇L
    with pytest.raises(ValueError, match="every"):
        fidelity_over_training(probed, _sgd(probed), batches, every=0)


# -- stages and errors -------------------------------------------------------------------------

def test_stage_names_of_flat_and_nested_layouts():
    assert sorted(set(stage_names(_model("cifar_plainnet20")).values())) == sorted(CIFAR_STAGES)
    nested = nn.Module()
    nested.stem = nn.Conv2d(3, 4, 3)
    nested.stages = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 3)), nn.Sequential(nn.Conv2d(4, 4, 3)))
    nested.fc = nn.Linear(4, 2)
    assert set(stage_names(nested).values()) == {"stem", "stages.0", "stages.1", "head"}


def test_errors_name_the_fix():
    x, y = _batch()
    with pytest.raises(ValueError, match="reference must be one of"):
        direction_fidelity(_model("cifar_plainnet20"), _sgd, x, y, reference="resnet")
    toy = nn.Sequential(nn.Flatten(), nn.Linear(192, 10))
    with pytest.raises(ValueError, match="shortcut family"):
        direction_fidelity(toy, _sgd, x, y)
    assert direction_fidelity(toy, _sgd, x, y, reference="self").cosine == pytest.approx(1.0, abs=1e-6)


# -- the command -------------------------------------------------------------------------------

def test_cli_prints_the_table_and_writes_json_and_png(tmp_path, capsys):
    from dcanets.cli import fidelity

    parser = argparse.ArgumentParser()
    fidelity.add_arguments(parser)
    args = parser.parse_args(["--model", "cifar_plainnet20", "--opt", "dcacounter", "--opt-kwargs", "rho=0.01",
                              "--data", "digits", "--batch", "16", "--steps", "3", "--every", "2",
                              "--output", str(tmp_path)])
    assert fidelity.run(args) == 0
    out = capsys.readouterr().out
    assert "layer3" in out and "batch 16" in out
    result = json.loads((tmp_path / "cifar_plainnet20-dcacounter.json").read_text())
    assert [r["step"] for r in result["records"]] == [0, 2]
    assert result["opt_kwargs"] == {"rho": 0.01} and result["batch"] == 16
    assert all(-1 <= r["cosine"] <= 1 and not math.isnan(r["cosine"]) for r in result["records"])
    assert (tmp_path / "cifar_plainnet20-dcacounter.png").stat().st_size > 1000
    sgd = parser.parse_args(["--model", "cifar_plainnet20", "--batch", "16", "--steps", "1", "--json"])
    assert fidelity.run(sgd) == 0          # timm's "sgd" with momentum 0 (no Nesterov)
    record = json.loads(capsys.readouterr().out)["records"][0]
    assert record["cosine"] == pytest.approx(record["baseline_cosine"], abs=1e-6)
    assert record["step_norm"] == pytest.approx(0.05 * record["baseline_norm"], rel=1e-5)   # the "len" column's 1
    sgd_table = parser.parse_args(["--model", "cifar_plainnet20", "--batch", "16", "--steps", "1"])
    assert fidelity.run(sgd_table) == 0
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert float(row[4]) == pytest.approx(1.0, abs=1e-3)   # step, loss, cos, sgd, len
    with pytest.raises(ValueError, match="unknown model"):
        fidelity.run(parser.parse_args(["--model", "cifar_plainet20"]))
