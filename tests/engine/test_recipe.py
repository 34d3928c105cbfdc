"""timm's recipe pieces in the engine (dcanets/engine/recipe.py): Mixup/CutMix soft targets, model
EMA, top-5, gradient clipping, gradient accumulation, their refusals and their exact resume."""
import copy

import pytest
import torch
import torch.nn.functional as F
from engine_runs import interrupted_then_resumed, numbers

from dcanets.cli import train as train_cli
from dcanets.engine import TrainConfig, train
from dcanets.engine import loop as engine
from dcanets.engine import recipe as recipe_mod

MLP = dict(model="multibranch_mlp_1h", data="digits", limit=96, batch_size=32, epochs=1, lr=0.05)  # no BatchNorm


def tiny(**kw):
    return TrainConfig(**{**MLP, **kw})


def smoothed_one_hot(y, classes, eps):
    return F.one_hot(y, classes).float() * (1 - eps) + eps / classes


# -- Mixup / CutMix ------------------------------------------------------------------------------
def test_mixup_trains_on_mixed_pairs_with_soft_targets(monkeypatch):
    """mixup=1 (per batch): image i becomes lam*x_i + (1-lam)*x_{n-1-i}, its target the same mix of the
    two smoothed one-hot labels (rows sum to 1); the step's loss, and the loss handed to a
    curvature-measuring decomposition, is the soft-target cross-entropy of that batch."""
    eps = 0.1
    run = engine._Run(tiny(mixup=1.0, label_smoothing=eps, lr=0.2), progress=False)
    run.train_epoch()  # outputs far from uniform, where every target gives the same loss
    x, y = next(iter(run.train_loader))
    original = x.clone()
    inputs, targets = run.recipe.batch(x, y, epoch=0)
    assert targets.shape == (32, 10) and torch.allclose(targets.sum(1), torch.ones(32))
    a, b = smoothed_one_hot(y, 10, eps), smoothed_one_hot(y.flip(0), 10, eps)
    i = int((y != y.flip(0)).nonzero()[0])  # an image whose pair has another label
    lam = ((targets[i] - b[i]) / (a[i] - b[i]))[y[i]].item()  # the weight of its own label
    assert 0 < lam < 1
    assert torch.allclose(targets, lam * a + (1 - lam) * b, atol=1e-6)
    assert torch.allclose(inputs, lam * original + (1 - lam) * original.flip(0), atol=1e-5)

    handed = []
    monkeypatch.setattr(engine, "remember_batch", lambda opt, x, y, loss_fn: handed.append(loss_fn))
    loss, out = run._step(inputs, targets)
    soft = -(targets * torch.log_softmax(out.float(), dim=1)).sum(1).mean()
    assert loss.item() == pytest.approx(soft.item(), rel=1e-5)
    assert handed[0](out.float(), targets).item() == pytest.approx(soft.item(), rel=1e-5)
    for other in (F.cross_entropy(out.float(), y, label_smoothing=eps),  # unmixed targets
                  F.cross_entropy(out.float(), targets, label_smoothing=eps)):  # smoothing applied twice
        assert abs(loss.item() - other.item()) > 1e-3 * loss.item()  # would fail the checks above


def test_cutmix_pastes_a_box_of_the_paired_image_and_mixup_off_epoch_stops_it():
    """cutmix=1: a box of image n-1-i replaces the same box of image i, and the target weight of the
    pasted label is the box's share of the image (timm's corrected lam). From mixup_off_epoch on, images
    pass unchanged and targets are the smoothed one-hot labels."""
    run = engine._Run(tiny(data="synthetic:64", limit=None, cutmix=1.0, mixup_off_epoch=1), progress=False)
    x, y = next(iter(run.train_loader))
    original = x.clone()
    inputs, targets = run.recipe.batch(x, y, epoch=0)
    changed = (inputs != original).any(1)  # [n, H, W]: pixels replaced
    assert changed.any()
    rows, cols = changed.any(0).any(1).nonzero().flatten(), changed.any(0).any(0).nonzero().flatten()
    box = (slice(None), slice(None), slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    assert torch.equal(inputs[box], original.flip(0)[box])  # the box comes from the paired image
    outside = torch.ones_like(inputs, dtype=torch.bool)
    outside[box] = False
    assert torch.equal(inputs[outside], original[outside])
    share = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1) / (32 * 32)
    i = int((y != y.flip(0)).nonzero()[0])  # an image whose pair has another label
    assert targets[i, y.flip(0)[i]].item() == pytest.approx(share.item(), abs=1e-6)

    x2 = original.clone()
    inputs, targets = run.recipe.batch(x2, y, epoch=1)
    assert torch.equal(inputs, original) and torch.equal(targets, F.one_hot(y, 10).float())


# -- model EMA -----------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup", [False, True])
def test_ema_weights_are_the_moving_average_of_the_updates(warmup, monkeypatch, tmp_path):
    """After k updates the EMA is e_1 = w_1, e_j = d_j e_{j-1} + (1 - d_j) w_j with d_j = decay, or with
    model_ema_warmup d_j = min(decay, 1 - j^(-2/3)) (timm's ModelEmaV3 with step = update count); it
    differs from the model's weights, is saved in last.pt and is what val_acc_ema and best_val_acc measure."""
    decay, seen = 0.8, []
    original = recipe_mod.Recipe.after_update

    def record(self, model, num_updates):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        original(self, model, num_updates)

    monkeypatch.setattr(recipe_mod.Recipe, "after_update", record)
    cfg = tiny(epochs=2, model_ema=True, model_ema_decay=decay, model_ema_warmup=warmup, output=str(tmp_path))
    final = train(cfg)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert len(seen) == 6  # 96 images, batches of 32, two epochs
    expected = dict(seen[0])
    for j, weights in enumerate(seen[1:], 2):
        d = min(decay, 1 - j ** (-2 / 3)) if warmup else decay
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in weights}
    for name, value in ckpt["model_ema"].items():
        assert torch.allclose(value, expected[name], atol=1e-6), name
    assert any(not torch.allclose(ckpt["model_ema"][k], ckpt["model"][k], atol=1e-4) for k in ckpt["model"])

    ema_model = engine._Run(cfg, progress=False)  # the same split and validation batches
    ema_model.model.load_state_dict(ckpt["model_ema"])
    loss, acc = (recipe_mod.evaluate_metrics(ema_model.model, ema_model.val_loader, False)[k] for k in ("loss", "acc"))
    assert final["val_loss_ema"] == pytest.approx(loss, rel=1e-6) and final["val_acc_ema"] == acc
    assert final["val_loss_ema"] != pytest.approx(final["val_loss"], rel=1e-4)
    assert final["best_val_acc"] == max(m["val_acc_ema"] for m in final["history"])  # timm: the EMA's


# -- top-5 ---------------------------------------------------------------------------------------
class _Batches(list):
    device = torch.device("cpu")


def test_top5_is_the_label_among_the_five_largest_outputs():
    torch.manual_seed(0)
    logits, labels = torch.randn(40, 12), torch.randint(0, 12, (40,))
    loader = _Batches([(logits[:25], labels[:25]), (logits[25:], labels[25:])])
    got = recipe_mod.evaluate_metrics(torch.nn.Identity(), loader, amp=False)
    ranked = [sorted(range(12), key=lambda c: -row[c].item()) for row in logits]
    top1 = sum(r[0] == t for r, t in zip(ranked, labels.tolist())) / 40
    top5 = sum(t in r[:5] for r, t in zip(ranked, labels.tolist())) / 40
    assert got["acc"] == top1 and got["acc5"] == top5 and top5 > top1
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    few = recipe_mod.evaluate_metrics(torch.nn.Identity(), _Batches([(logits[:, :4], labels % 4)]), amp=False)
    assert "acc5" not in few  # four classes: top-5 would always be 1


def test_training_reports_top5_and_the_ema_to_mlflow():
    from dcanets.tune.tracking import logged_metrics

    final = train(tiny(model_ema=True))
    assert 1 >= final["val_acc5"] >= final["val_acc"] and "val_acc5" in final["history"][0]
    assert {"val_acc5", "val_acc_ema", "val_loss_ema", "val_acc5_ema"} <= set(logged_metrics(final))


# -- gradient clipping ---------------------------------------------------------------------------
def _grads_at_step(run, steps=3):
    """The gradients the optimizer steps with, over the first ``steps`` steps."""
    seen, step = [], run.optimizer.step

    def recording(*args, **kwargs):
        seen.append([None if p.grad is None else p.grad.clone() for p in run.model.parameters()])
        return step(*args, **kwargs)

    run.optimizer.step = recording
    for k, (x, y) in enumerate(run.train_loader):
        if k == steps:
            break
        run._step(x, y)
    return seen


def _norm(grads):
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)).item()


def test_norm_and_value_clipping_bound_the_gradient_the_optimizer_steps_with():
    free = [_norm(g) for g in _grads_at_step(engine._Run(tiny(), progress=False))]
    assert max(free) > 0.5
    clipped = [_norm(g) for g in _grads_at_step(engine._Run(tiny(clip_grad=0.5), progress=False))]
    assert max(clipped) <= 0.5 * (1 + 1e-5) and clipped[0] == pytest.approx(0.5, rel=1e-4)
    by_value = _grads_at_step(engine._Run(tiny(clip_grad=0.01, clip_mode="value"), progress=False))
    assert max(g.abs().max().item() for step in by_value for g in step) <= 0.01
    free_max = max(g.abs().max().item() for step in _grads_at_step(engine._Run(tiny(), progress=False))
                   for g in step)
    assert free_max > 0.01


def test_agc_clips_unit_wise_and_leaves_the_head():
    """clip_mode=agc (timm's adaptive_clip_grad): every row of a weight's gradient is at most
    clip_grad x max(the row's weight norm, 1e-3), except the classifier's two parameters."""
    run = engine._Run(tiny(clip_grad=0.001, clip_mode="agc"), progress=False)
    before = [p.detach().clone() for p in run.model.parameters()]
    grads = _grads_at_step(run, steps=1)[0]
    free = _grads_at_step(engine._Run(tiny(), progress=False), steps=1)[0]
    for w, g in list(zip(before, grads))[:-2]:
        dims = tuple(range(1, w.ndim))
        bound = 0.001 * (w.norm(dim=dims) if dims else w.norm()).clamp(min=1e-3)
        assert ((g.norm(dim=dims) if dims else g.norm()) <= bound * (1 + 1e-5)).all()
    assert any(not torch.equal(g, f) for g, f in zip(grads[:-2], free[:-2]))
    assert all(torch.equal(g, f) for g, f in zip(grads[-2:], free[-2:]))


def test_clipping_acts_on_the_unscaled_gradient_under_a_grad_scaler():
    """With a GradScaler (fp16 AMP) the gradient is unscaled before clipping: the optimizer steps with
    the same clipped gradient as without loss scaling, not with clip_grad / scale."""
    plain = _grads_at_step(engine._Run(tiny(clip_grad=0.5), progress=False), steps=1)[0]
    run = engine._Run(tiny(clip_grad=0.5), progress=False)
    run.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled = _grads_at_step(run, steps=1)[0]
    assert _norm(scaled) == pytest.approx(0.5, rel=1e-4)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, scaled))


def test_norm_clipping_scales_a_hook_formed_decomposition_direction():
    """dcaquasineghalf steps along d = t g, g = -a/2 + 3c/2, t = <a, g>/|g|^2, with c from the hooks of the
    backward. Norm clipping multiplies a, and (the tap's rescale) c, by s = clip/|a|: the step becomes
    exactly s times the unclipped one. Clipping a alone would turn g and the step's direction."""
    cfg = dict(model="cifar_plainnet20", model_kwargs={"widths": [2, 2, 2], "depths": [1, 1, 2]}, batch_size=8,
               limit=24, opt="dcaquasineghalf", momentum=0.0, weight_decay=0.0)

    def first_step(**kw):
        run = engine._Run(tiny(**cfg, **kw), progress=False)
        before = [p.detach().clone() for p in run.model.parameters()]
        grads = _grads_at_step(run, steps=1)[0]
        return [p.detach() - w for p, w in zip(run.model.parameters(), before)], grads

    free, a = first_step()
    clipped, a_clipped = first_step(clip_grad=0.5 * _norm(a))  # s = 1/2: steps far above float32's rounding of w
    assert _norm(a_clipped) == pytest.approx(0.5 * _norm(a), rel=1e-5)
    assert _norm([u - 0.5 * v for u, v in zip(clipped, free)]) < 1e-5 * _norm(clipped)


# -- gradient accumulation -----------------------------------------------------------------------
def _weights_after_one_epoch(cfg):
    run = engine._Run(cfg, progress=False)
    stats = run.train_epoch()
    return run, stats


def _max_difference(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


@pytest.mark.parametrize("opt", ["momentum", "dcacounter", "dcaquasihalf"])
def test_accumulating_two_batches_is_one_step_on_both(opt):
    """grad_accum_steps=2 with batches of 16 takes the steps of batches of 32 (same images, same order):
    equal weights to 1e-6 on BatchNorm-free models, with the plain SGD step and with the decompositions
    whose c the hooks sum over the group's backward passes (dcacounter: a and c apart; dcaquasihalf:
    the fused a + c). Batches of 16 without accumulation take twice the steps and end elsewhere."""
    model = "multibranch_mlp_1h" if opt == "momentum" else "double_resnet_flat"
    kw = dict(model=model, opt=opt, limit=64, opt_kwargs={"beta_policy": "clamp"} if opt == "dcacounter" else {})
    whole, whole_stats = _weights_after_one_epoch(tiny(batch_size=32, **kw))
    accumulated, stats = _weights_after_one_epoch(tiny(batch_size=16, grad_accum_steps=2, **kw))
    halves, _ = _weights_after_one_epoch(tiny(batch_size=16, **kw))
    assert accumulated.num_updates == whole.num_updates == 2 and halves.num_updates == 4
    assert _max_difference(accumulated, whole) < 1e-6
    assert _max_difference(halves, whole) > 1e-3
    assert stats["train_loss"] == pytest.approx(whole_stats["train_loss"], rel=1e-6)


def test_accumulation_groups_end_with_the_epoch():
    """timm's grouping: 5 batches in groups of 2 are (2, 2, 1), 3 updates per epoch; the short group's
    loss is divided by its own size."""
    assert [recipe_mod.group_position(k, 5, 2) for k in range(5)] == [(0, 2), (1, 2), (0, 2), (1, 2), (0, 1)]
    assert recipe_mod.updates_per_epoch(5, 2) == 3
    run = engine._Run(tiny(limit=80, batch_size=16, grad_accum_steps=2), progress=False)
    run.train_epoch()
    assert run.num_updates == 3 and run.recipe.pending == 0


# -- refusals ------------------------------------------------------------------------------------
PLAIN = dict(model="cifar_plainnet20", model_kwargs={"widths": [2, 2, 2], "depths": [1, 1, 2]}, limit=24, batch_size=8)


@pytest.mark.parametrize("kw, message", [
    (dict(PLAIN, opt="dcaprox", clip_grad=1.0), "clip_grad cannot be combined with opt='dcaprox'"),
    (dict(PLAIN, opt="dcaprox", grad_accum_steps=2), "grad_accum_steps=2 cannot be combined with opt='dcaprox'"),
    (dict(PLAIN, opt="dcacounter", clip_grad=1.0, clip_mode="value"),
     "clip_mode='value' cannot be combined with opt='dcacounter'"),
    (dict(fidelity_every=1, grad_accum_steps=2, model="cifar_plainnet20"),
     "fidelity_every cannot be combined with grad_accum_steps=2"),
    (dict(mixup=0.2, limit=41, batch_size=32), "the last batch of each epoch has 9 (odd)"),
    (dict(data="synthetic:64", limit=None, cutmix_minmax=[0.5, 0.51]), "leaves no box side"),
])
def test_combinations_that_would_be_silently_wrong_are_refused(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        train(tiny(**kw))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kw, message", [
    (dict(mixup=0.2, batch_size=31), "batch_size: must be even with mixup/cutmix"),
    (dict(cutmix_minmax="0.8,0.2"), "cutmix_minmax: must be two fractions 0 <= min < max <= 1, got [0.8, 0.2]"),
    (dict(clip_mode="l1"), "clip_mode: must be one of 'norm', 'value' or 'agc'"),
    (dict(model_ema_decay=1.0), "model_ema_decay: must be < 1"),
    (dict(grad_accum_steps=0), "grad_accum_steps: must be an integer >= 1"),
])
def test_recipe_config_errors(kw, message):
    with pytest.raises(ValueError) as info:
        tiny(**kw)
    assert message in str(info.value)


# -- resume and the command line -----------------------------------------------------------------
RESUMED = dict(model="cifar_resnet20", epochs=3, mixup=0.4, cutmix=1.0, model_ema=True, model_ema_decay=0.9,
               clip_grad=1.0, grad_accum_steps=2, batch_size=16)


def test_resume_with_the_recipe_is_bit_exact(tmp_path):
    """Mixup draws (numpy's RNG), EMA weights, clipping and accumulation: a run killed after epoch 2 of 3
    and resumed ends with the numbers and EMA weights of an uninterrupted run."""
    full = train(tiny(**RESUMED, output=str(tmp_path / "full")))
    resumed = interrupted_then_resumed(tiny(**RESUMED, output=str(tmp_path / "run")))
    assert numbers(resumed["history"]) == numbers(full["history"])
    assert "val_acc_ema" in full["history"][-1]
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("full", "run"))
    assert all(torch.equal(a["model_ema"][k], b["model_ema"][k]) for k in a["model_ema"])
    assert b["grad_accum"] == {"steps": 2, "pending": 0}


def test_checkpoints_without_recipe_state_still_load(tmp_path):
    """A last.pt written before (no model_ema, no grad_accum) resumes: the EMA starts from the resumed
    weights, as timm's resume does; one written with another grad_accum_steps is refused in one line."""
    train(tiny(output=str(tmp_path)))
    old = torch.load(tmp_path / "last.pt", weights_only=True)
    del old["grad_accum"]
    run = engine._Run(tiny(epochs=2, model_ema=True), progress=False)
    run.load_state_dict(copy.deepcopy(old))
    assert all(torch.equal(e, m) for e, m in zip(run.recipe.ema.module.state_dict().values(),
                                                 run.model.state_dict().values()))
    with pytest.raises(ValueError, match="trained with grad_accum_steps=1, not 2"):
        engine._Run(tiny(epochs=2, batch_size=16, grad_accum_steps=2), progress=False).load_state_dict(old)


def test_recipe_flags_reach_the_config():
    import argparse

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    args = parser.parse_args(["--mixup", "0.8", "--cutmix", "1", "--cutmix-minmax", "0.2,0.8", "--mixup-mode", "elem",
                              "--mixup-off-epoch", "5", "--model-ema", "--model-ema-decay", "0.999",
                              "--clip-grad", "2", "--clip-mode", "agc", "--grad-accum-steps", "4", "--output", "x"])
    cfg = train_cli.config_from_args(args)
    assert (cfg.mixup, cfg.cutmix, cfg.cutmix_minmax, cfg.mixup_mode, cfg.mixup_off_epoch) == (0.8, 1.0, [0.2, 0.8],
                                                                                               "elem", 5)
    assert (cfg.model_ema, cfg.model_ema_decay, cfg.clip_grad, cfg.clip_mode, cfg.grad_accum_steps) == (
        True, 0.999, 2.0, "agc", 4)
