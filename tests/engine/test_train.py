"""The training engine: learning, determinism, exact resume, callbacks, CLI and config errors."""
import copy
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from engine_runs import interrupted_then_resumed, numbers

from dcanets import cli
from dcanets.engine import TrainConfig, data, train
from dcanets.engine import loop as engine
from dcanets.validation import parse_kv

EPOCH_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds",
              "images_per_s", "data_seconds", "checkpoint"}


def tiny(**kw):
    base = dict(model="cifar_resnet20", data="digits", limit=96, batch_size=32, epochs=2, lr=0.05)
    return TrainConfig(**{**base, **kw})


def test_training_reduces_loss_and_reports_every_epoch():
    seen = []
    final = train(tiny(epochs=3, limit=160), on_epoch=seen.append)
    assert [m["epoch"] for m in seen] == [1, 2, 3]
    assert all(EPOCH_KEYS <= set(m) for m in seen)
    assert seen[-1]["train_loss"] < 0.8 * seen[0]["train_loss"]
    assert seen[-1]["lr"] < seen[0]["lr"] < 0.05  # cosine decays per step
    assert final["num_params"] > 0 and final["best_val_acc"] >= final["val_acc"]
    assert final["val_acc"] > 0.3  # 10 classes: chance is 0.1
    assert seen[0]["data_seconds"] < seen[0]["epoch_seconds"]


def test_same_seed_same_numbers_on_cpu():
    a, b = train(tiny()), train(tiny())
    assert numbers(a["history"]) == numbers(b["history"])
    c = train(tiny(seed=1))
    assert numbers(c["history"]) != numbers(a["history"])


def test_split_seed_fixes_validation_across_training_seeds_and_val_limit_keeps_it_whole():
    a = engine._Run(tiny(seed=0, split_seed=0, limit=50), progress=False)
    b = engine._Run(tiny(seed=1, split_seed=0, limit=50), progress=False)
    assert torch.equal(a.val_data.images, b.val_data.images)
    c = engine._Run(tiny(seed=1, limit=50), progress=False)  # split_seed None: the run's seed
    assert not torch.equal(a.val_data.images, c.val_data.images)
    whole = engine._Run(tiny(limit=50, val_limit=10_000), progress=False)
    assert len(a.val_data) == 6 and len(whole.val_data) == round(0.1 * 1797)


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = tiny(epochs=3, output=str(tmp_path / "run"), augment=True)
    full = train(tiny(epochs=3, augment=True))

    resumed = interrupted_then_resumed(cfg)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 3
    assert numbers(resumed["history"]) == numbers(full["history"])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["final"]["epoch"] == 3 and len(saved["history"]) == 3
    with pytest.raises(ValueError, match=r"other values of model \('cifar_resnet20', now 'cifar_negnet20'\)"):
        train(tiny(model="cifar_negnet20", epochs=4), resume=tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        train(cfg, resume=tmp_path / "nothing")


def test_cli_resume_takes_the_checkpoint_config(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--limit", "64", "--batch-size", "32", "--output", str(out), "--no-progress"]
    assert cli.main(["train", "--epochs", "1", "--lr", "0.02", *args]) == 0
    assert cli.main(["train", "--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["config"]["lr"] == 0.02 and [m["epoch"] for m in saved["history"]] == [1, 2]


def test_closure_path_matches_plain_step(monkeypatch):
    """With SGD, stepping through a closure must give exactly the plain step's numbers."""
    plain = train(tiny(epochs=1))
    monkeypatch.setattr(engine, "prepare", lambda opt, model: True)
    closure = train(tiny(epochs=1))
    assert numbers(closure["history"]) == numbers(plain["history"])


def test_held_out_eval_data(tmp_path):
    """eval_data: the final model's cross-entropy and accuracy on the held-out set, normalised with the
    training split's statistics, as computed here by hand from the saved model."""
    src = data.synthetic(60, num_classes=3, size=8, channels=3, seed=0)
    held = data.synthetic(30, num_classes=3, size=8, channels=3, seed=0)  # the same class templates, other noise
    train_dir = data.write_image_folder(src, tmp_path / "train")
    eval_tar = data.write_image_tar(held, tmp_path / "test.tar")
    cfg = tiny(data=str(train_dir), eval_data=str(eval_tar), limit=None, epochs=6, batch_size=16,
               output=str(tmp_path / "run"))
    final = train(cfg)
    assert final["eval_images"] == 30
    assert final["augment"] is True  # RGB data gets crop + flip by default

    model = timm.create_model(cfg.model, num_classes=3, in_chans=3)
    model.load_state_dict(torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"])
    model.eval()
    train_split, _ = data.load_split(str(train_dir), cfg.val_fraction, seed=cfg.seed, progress=False)
    images = data.load(str(eval_tar), progress=False)
    with torch.no_grad():
        out = model(data.normalized(images.images, data.channel_stats(train_split.images)))
    assert final["eval_loss"] == pytest.approx(F.cross_entropy(out, images.labels).item(), rel=1e-5)
    assert final["eval_acc"] == (out.argmax(1) == images.labels).sum().item() / 30
    assert len(set(out.argmax(1).tolist())) > 1  # not one class for every image: the accuracy says something
    with pytest.raises(ValueError, match="eval data"):
        train(tiny(epochs=1, eval_data=str(eval_tar)))  # digits are 1x8x8, the tar 3x8x8


def test_config_errors():
    with pytest.raises(ValueError, match="lrr: not a TrainConfig field; did you mean: lr; valid keys: model"):
        TrainConfig.from_dict({"lrr": 0.1})
    assert TrainConfig.from_dict({"lr": 0.2, "opt_kwargs": {"rho": 0.01}}).opt_kwargs == {"rho": 0.01}
    with pytest.raises(ValueError, match="unknown model 'no_such_net'"):
        train(tiny(model="no_such_net"))
    with pytest.raises(ValueError, match="unknown optimizer 'nosuchopt'"):
        train(tiny(opt="nosuchopt"))
    with pytest.raises(ValueError, match="sched: must be one of"):
        train(tiny(sched="linear"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tiny(data="/no/such/data.tar"))


def test_divergence_stops_the_run():
    seen = []
    final = train(tiny(lr=1e10, epochs=3, sched="none", weight_decay=0.0), on_epoch=seen.append)
    assert final["diverged"] and len(seen) < 3


def test_parse_kv():
    assert parse_kv("rho=0.01,lam=10,name=x,flag=true") == {"rho": 0.01, "lam": 10, "name": "x", "flag": True}
    assert parse_kv('{"rho": 0.5}') == {"rho": 0.5}
    with pytest.raises(ValueError, match="key=value"):
        parse_kv("rho")


def test_cli_writes_metrics_and_flags_override_config(tmp_path, capsys):
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"model": "cifar_resnet20", "lr": 0.01, "epochs": 5, "batch_size": 32}))
    out = tmp_path / "out"
    code = cli.main(["train", "--config", str(best), "--epochs", "1", "--limit", "64", "--output", str(out),
                     "--opt-kwargs", "nesterov=false", "--no-progress"])
    assert code == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["config"]["epochs"] == 1 and saved["config"]["lr"] == 0.01
    assert saved["config"]["opt_kwargs"] == {"nesterov": False}
    assert (out / "last.pt").is_file()
    printed = json.loads(capsys.readouterr().out)
    assert printed["epoch"] == 1 and "val_acc" in printed


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nbogus: 1\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and len(err.strip().splitlines()) == 1


def test_channels_last_steps_match_the_contiguous_path():
    """NHWC changes only the memory layout: the same steps up to float summation order."""
    plain = train(tiny(channels_last=False, epochs=2, augment=True))
    nhwc = train(tiny(channels_last=True, epochs=2, augment=True))
    assert nhwc["channels_last"] is True and plain["channels_last"] is False
    for a, b in zip(plain["history"], nhwc["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)


@pytest.mark.slow
def test_compiled_forward_matches_eager():
    eager = train(tiny(model="multibranch_mlp_1h", compile=False, epochs=2))
    compiled = train(tiny(model="multibranch_mlp_1h", compile=True, epochs=2))
    assert compiled["compile"] is True
    for a, b in zip(eager["history"], compiled["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


def test_compile_with_a_closure_decomposition_is_refused():
    with pytest.raises(ValueError, match="compile=True cannot be combined with opt='dcacounter'"):
        train(tiny(model="cifar_plainnet20", opt="dcacounter", compile=True, epochs=1))


def test_momentum_zero_with_timms_nesterov_sgd_is_plain_sgd():
    """torch refuses Nesterov without momentum; the engine asks timm for plain SGD instead."""
    opt = engine.create_optimizer(torch.nn.Linear(2, 2), "sgd", 0.1, 0.0, 0.0, {})
    assert opt.param_groups[0]["nesterov"] is False and opt.param_groups[0]["momentum"] == 0.0
    assert math.isfinite(train(tiny(momentum=0.0, epochs=1))["train_loss"])


# cifar_plainnet20 cut to 372 weights (widths 2, one block per stage, two in the last: its second is
# the same-shape block the counter loss mixes), small enough to write its Hessian out
SMALL_PLAIN = dict(model="cifar_plainnet20", model_kwargs={"widths": [2, 2, 2], "depths": [1, 1, 2]}, limit=24,
                   batch_size=8, epochs=1)


def _dense_min_eigenvalue(cfg, state, x, y, gamma):
    """λ_min of the Hessian of Σ_α γ_α L'_α (paper 000, eq. 10: the last same-shape block's output h^L
    becomes α h^L + (1 − α) h^{L−1}), written out in float64 with torch.func on a fresh copy of the model."""
    net = timm.create_model(cfg.model, num_classes=10, in_chans=1, **cfg.model_kwargs).double()
    net.load_state_dict(state)
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None  # batch statistics only
    alpha = {"now": 1.0}
    net.layer3[1].register_forward_hook(lambda m, inp, out: alpha["now"] * out + (1 - alpha["now"]) * inp[0])
    named = dict(net.named_parameters())

    def loss(flat):
        params = dict(zip(named, torch.split(flat, [p.numel() for p in named.values()])))
        params = {k: v.view_as(named[k]) for k, v in params.items()}
        total = 0.0
        for alpha["now"], weight in gamma.items():
            total = total + weight * F.cross_entropy(torch.func.functional_call(net, params, (x.double(),)), y)
        return total

    hessian = torch.func.hessian(loss)(torch.cat([p.detach().flatten() for p in named.values()]))
    return torch.linalg.eigvalsh(hessian)[0].item()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch.func's own use
def test_dca_rho_auto_is_measured_on_each_batch_and_logged(monkeypatch):
    """rho="auto" (paper 000, eq. 12): at steps 0 and 2 (rho_every=2) the engine hands the step's batch
    to dcacounter, which sets ρ = max(0, −λ_min(∇²G2), −λ_min(∇²H2)) / ½ with G2 = L + ½L'_{−1} and
    H2 = ½L'_{−1} (ρ/2·L2 makes both convex); the epoch's metrics carry the last ρ and the λ_min behind
    it. Checked against dense Hessians of G2 and H2 at the weights and on the batch of step 2."""
    steps, built = [], []
    build, remember = engine.build_optimizer, engine.remember_batch
    monkeypatch.setattr(engine, "build_optimizer", lambda cfg, model: built.append(model) or build(cfg, model))
    monkeypatch.setattr(engine, "remember_batch", lambda opt, x, y, loss_fn: (
        steps.append((copy.deepcopy(built[0].state_dict()), x.clone(), y.clone())), remember(opt, x, y, loss_fn)))
    cfg = tiny(**SMALL_PLAIN, opt="dcacounter", opt_kwargs={"rho": "auto", "rho_every": 2, "rho_lanczos": 100})
    entry = train(cfg)["history"][0]
    assert len(steps) == 3  # 24 images, batches of 8: steps 0, 1, 2
    lam_g = _dense_min_eigenvalue(cfg, *steps[2], {1.0: 1.0, -1.0: 0.5})
    lam_h = _dense_min_eigenvalue(cfg, *steps[2], {-1.0: 0.5})
    assert entry["dca_lam_min_G"] == pytest.approx(lam_g, rel=5e-3)
    assert entry["dca_lam_min_H"] == pytest.approx(lam_h, rel=5e-3)
    assert entry["dca_rho"] == pytest.approx(max(0.0, -2 * lam_g, -2 * lam_h), rel=5e-3)
    assert entry["dca_rho"] > 1.0  # G2 or H2 is far from convex here: a ρ of 0 would fail the line above
    earlier = _dense_min_eigenvalue(cfg, *steps[1], {1.0: 1.0, -1.0: 0.5})  # another step's batch and weights
    assert earlier != pytest.approx(lam_g, rel=2e-2)


def test_dca_rho_auto_is_the_rho_the_step_uses():
    """The measured ρ enters the step (eq. 19's β): rho="auto" measured once (step 0) trains exactly as the
    same decomposition given that ρ as a number, and not as with ρ = 0."""
    def run(rho):
        opts = {"rho": rho, "rho_every": 100, "rho_lanczos": 100, "beta_policy": "clamp"}
        return train(tiny(**SMALL_PLAIN, opt="dcacounter", opt_kwargs=opts))["history"]

    auto = run("auto")
    rho = auto[0]["dca_rho"]
    assert rho > 1.0
    assert numbers(run(rho), drop="dca_") == numbers(auto, drop="dca_")
    assert numbers(run(0.0), drop="dca_") != numbers(auto, drop="dca_")


@pytest.mark.parametrize("opt", ["momentum", "dcaprox"])  # the plain step and the closure step
def test_label_smoothing_is_the_training_loss_in_both_step_paths(opt, monkeypatch):
    """label_smoothing=ε trains on (1-ε)·CE + ε·mean over classes of -log p (torch's smoothed
    cross-entropy), in both step paths, and hands that loss to a curvature-measuring decomposition."""
    eps = 0.2
    run = engine._Run(tiny(model="cifar_plainnet20", opt=opt, label_smoothing=eps), progress=False)
    handed = []  # the loss a curvature-measuring decomposition (rho="auto") is given with the batch
    monkeypatch.setattr(engine, "remember_batch", lambda opt, x, y, loss_fn: handed.append(loss_fn))
    x, y = next(iter(run.train_loader))
    loss, out = run._step(x, y)
    assert handed[0](out.float(), y).item() == pytest.approx(loss.item(), rel=1e-5)
    logp = torch.log_softmax(out.float(), dim=1)
    smoothed = (1 - eps) * torch.nn.functional.nll_loss(logp, y) - eps * logp.mean(dim=1).mean()
    assert loss.item() == pytest.approx(smoothed.item(), rel=1e-5)
    plain = torch.nn.functional.cross_entropy(out.float(), y).item()
    assert abs(loss.item() - plain) > 1e-4 * plain  # 10x the tolerance above: plain CE would fail it


def test_validation_loss_stays_plain_cross_entropy_under_label_smoothing(tmp_path):
    eps = 0.2
    cfg = tiny(epochs=1, label_smoothing=eps, output=str(tmp_path / "run"))
    reported = train(cfg)["history"][0]["val_loss"]
    run = engine._Run(cfg, progress=False)  # the same split, so the same validation batches
    run.model.load_state_dict(torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"])
    run.model.eval()
    with torch.no_grad():
        outs, ys = zip(*((run.model(x), y) for x, y in run.val_loader))
    out, y = torch.cat(outs), torch.cat(ys)
    assert reported == pytest.approx(torch.nn.functional.cross_entropy(out, y).item(), rel=1e-5)
    smoothed = torch.nn.functional.cross_entropy(out, y, label_smoothing=eps).item()
    assert abs(reported - smoothed) > 1e-3 * reported  # the smoothed loss would fail the check above


def test_label_smoothing_out_of_range_is_a_config_error():
    with pytest.raises(ValueError, match="label_smoothing"):
        tiny(label_smoothing=1.0)
