"""The training engine: learning, determinism, exact resume, callbacks, CLI and config errors."""
import json
import math

import pytest
import torch
import yaml
from engine_runs import interrupted_then_resumed, numbers

from dcanets import cli
from dcanets.cli import train as train_cli
from dcanets.engine import TrainConfig, data, train
from dcanets.engine import loop as engine

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
    with pytest.raises(ValueError, match="trained with model='cifar_resnet20'"):
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
    src = data.synthetic(60, num_classes=3, size=8, channels=3, seed=0)
    held = data.synthetic(30, num_classes=3, size=8, channels=3, seed=5)
    train_dir = data.write_image_folder(src, tmp_path / "train")
    eval_tar = data.write_image_tar(held, tmp_path / "test.tar")
    final = train(tiny(data=str(train_dir), eval_data=str(eval_tar), limit=None, epochs=1, batch_size=16))
    assert final["eval_images"] == 30 and 0.0 <= final["eval_acc"] <= 1.0 and final["eval_loss"] > 0
    assert final["augment"] is True  # RGB data gets crop + flip by default
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
    assert train_cli.parse_kv("rho=0.01,lam=10,name=x,flag=true") == {"rho": 0.01, "lam": 10, "name": "x", "flag": True}
    assert train_cli.parse_kv('{"rho": 0.5}') == {"rho": 0.5}
    with pytest.raises(ValueError, match="key=value"):
        train_cli.parse_kv("rho")


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


def test_dca_rho_auto_is_measured_on_each_batch_and_logged():
    """rho="auto" (paper 000, eq. 12): the engine hands every batch to the optimizer; the epoch's
    metrics carry the last measured ρ and the λ_min behind it (rho_every=2: steps 0 and 2)."""
    final = train(tiny(model="cifar_plainnet20", opt="dcacounter", epochs=1, limit=96, batch_size=32,
                       opt_kwargs={"rho": "auto", "rho_every": 2, "rho_lanczos": 2}))
    entry = final["history"][0]
    assert {"dca_rho", "dca_lam_min_G", "dca_lam_min_H"} <= set(entry)
    assert entry["dca_rho"] == pytest.approx(max(0.0, -2 * entry["dca_lam_min_G"], -entry["dca_lam_min_H"]))
    assert math.isfinite(final["train_loss"])


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
