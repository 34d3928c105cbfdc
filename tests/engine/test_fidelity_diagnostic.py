"""``TrainConfig.fidelity_every``: the direction-fidelity diagnostic of the training engine."""
import json
import math
import typing

import pytest
from engine_runs import interrupted_then_resumed, numbers

from dcanets.engine import TrainConfig, train
from dcanets.engine.fidelity import REFERENCES
from dcanets.tune.tracking import logged_metrics

STAGES = ("stem", "layer1", "layer2", "layer3", "head")


def tiny(**kw):
    base = dict(model="cifar_resnet20", data="digits", limit=96, batch_size=32, epochs=2, lr=0.05,
                momentum=0.0, weight_decay=0.0)
    return TrainConfig(**{**base, **kw})


def test_references_are_the_fidelity_modules():
    assert typing.get_args(TrainConfig.model_fields["fidelity_reference"].annotation) == REFERENCES
    assert TrainConfig().fidelity_every == 0
    with pytest.raises(ValueError, match="fidelity_every"):
        TrainConfig(fidelity_every=-1)


def test_plain_sgd_against_itself_is_one_and_the_diagnostic_leaves_the_run_unchanged():
    seen = []
    on = train(tiny(fidelity_every=1, fidelity_reference="self"), on_epoch=seen.append)
    off = train(tiny())
    assert numbers(on["history"], drop="fidelity") == numbers(off["history"])   # same trajectory, bit for bit
    assert "fidelity_cos" not in off and "fidelity" not in off["history"][0]
    raw = [m["fidelity"] for m in on["history"]]
    steps = [r["step"] for epoch in raw for r in epoch]
    assert steps == list(range(len(steps))) and len(raw[0]) == len(raw[1]) > 0   # every step, global counter
    for m in seen:
        assert m["fidelity_cos"] == pytest.approx(1.0, abs=1e-5)
        assert m["fidelity_sgd_cos"] == pytest.approx(1.0, abs=1e-5)
        for stage in STAGES:
            assert m[f"fidelity_cos_{stage}"] == pytest.approx(1.0, abs=1e-5)
        assert "fidelity" not in m   # the raw list is in the history only
    assert all(abs(r["cos"] - 1.0) < 1e-5 and set(r["stages"]) == set(STAGES) for epoch in raw for r in epoch)


def test_step_norm_over_sgd_grad_norm_is_the_lr_for_plain_sgd():
    """The raw measurements carry ‖Δw‖ and ‖∇L‖: for SGD without momentum or decay, ‖Δw‖ = lr·‖∇L‖."""
    final = train(tiny(fidelity_every=1, fidelity_reference="self", sched="constant", epochs=1))
    raw = final["history"][0]["fidelity"]
    assert len(raw) > 1
    for r in raw:
        assert r["step_norm"] == pytest.approx(0.05 * r["sgd_grad_norm"], rel=1e-4)


def test_every_n_steps_on_a_global_counter_and_saved_in_metrics_json(tmp_path):
    out = tmp_path / "run"
    final = train(tiny(fidelity_every=2, output=str(out)))
    steps = [r["step"] for m in final["history"] for r in m["fidelity"]]
    assert steps and all(s % 2 == 0 for s in steps) and steps == sorted(steps) and steps[0] == 0
    assert steps[-1] > final["history"][0]["fidelity"][-1]["step"]   # the second epoch continues the count
    saved = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for m in saved["history"] for r in m["fidelity"]] == steps
    assert "fidelity_cos_layer1" in saved["final"]


def _eq19_beta_from_the_record(r, lr):
    """β of a measured step, read two ways from the logged numbers alone.

    With reference="last", g_ref = a + c (the one-block TestNet gradient, tests/analysis/test_fidelity.py)
    and dcacounter's step (no momentum or decay) is Δw = −lr·(a + βc) = −lr·((1 − β)a + β·g_ref). In the
    plane of a and g_ref, the part of Δw/lr normal to g_ref is (1 − β) times a's, which gives |1 − β| from
    ‖a‖ (``sgd_grad_norm``), cos(a, g_ref) (``sgd_cos``), ‖Δw‖ (``step_norm``) and cos(Δw, g_ref) (``cos``);
    the part along g_ref then gives ‖g_ref‖, hence ‖c‖² = ‖g_ref − a‖², and eq. 19 at ρ = 0 says
    β = ‖a‖²/(2‖c‖²). Returns the pairs (β from the geometry, β from eq. 19) for both signs of 1 − β."""
    A, cos_a, D, cos_d = r["sgd_grad_norm"], r["sgd_cos"], r["step_norm"] / lr, r["cos"]
    off = D * math.sqrt(max(0.0, 1 - cos_d ** 2)) / (A * math.sqrt(1 - cos_a ** 2))   # |1 − β|
    pairs = []
    for one_minus_beta in (off, -off):
        beta = 1 - one_minus_beta
        G = (D * cos_d - one_minus_beta * A * cos_a) / beta                           # ‖g_ref‖
        pairs.append((beta, A ** 2 / (2 * (G ** 2 - 2 * cos_a * A * G + A ** 2))))
    return pairs


def test_dcacounter_steps_are_eq19_by_the_logged_cosines():
    """dcacounter on a plain net against its one-block TestNet: each logged step is eq. 19's a + βc
    (β recovered from the cosines and norms agrees with ‖a‖²/(2‖c‖²) to 1e-4), and it is not SGD's
    step (whose cosine would equal ``sgd_cos`` and whose length would be lr·‖a‖)."""
    final = train(tiny(model="cifar_plainnet20", opt="dcacounter", fidelity_every=1, epochs=1, sched="constant",
                       fidelity_reference="last"))
    raw = final["history"][0]["fidelity"]
    assert len(raw) == 3                                    # every step of the epoch (96 images, batch 32)
    for r in raw:
        assert abs(r["cos"] - r["sgd_cos"]) > 1e-2 and abs(r["step_norm"] / (0.05 * r["sgd_grad_norm"]) - 1) > 1e-2
        errors = [abs(geometry - eq19) / eq19 for geometry, eq19 in _eq19_beta_from_the_record(r, 0.05)]
        assert min(errors) < 1e-4, (r, errors)


def test_a_model_outside_the_shortcut_family_is_refused_before_training():
    steps = []
    with pytest.raises(ValueError, match="fidelity_every=1: model ResNet has no blocks of the shortcut family") as e:
        train(tiny(model="resnet18", fidelity_every=1), on_batch=lambda *a: steps.append(a))
    assert steps == [] and "\n" not in str(e.value)
    train(tiny(model="resnet18", fidelity_every=1, fidelity_reference="self", epochs=1))   # its own gradient works


def test_resume_with_the_diagnostic_equals_the_uninterrupted_run(tmp_path):
    cfg = tiny(epochs=3, output=str(tmp_path / "run"), augment=True, fidelity_every=2, momentum=0.9)
    full = train(tiny(epochs=3, augment=True, fidelity_every=2, momentum=0.9))

    resumed = interrupted_then_resumed(cfg)
    assert numbers(resumed["history"]) == numbers(full["history"])
    plain = train(tiny(epochs=3, augment=True, momentum=0.9))
    assert numbers(full["history"], drop="fidelity") == numbers(plain["history"])


def test_tracking_logs_the_fidelity_metrics():
    result = {"epoch": 1, "train_loss": 0.5, "fidelity_cos": 0.3, "fidelity_sgd_cos": 0.2,
              "fidelity_cos_layer1": 0.1, "fidelity_cos_stages.0": 0.4, "fidelity": [{"step": 0}],
              "node_id": "abc", "done": False}
    assert logged_metrics(result) == {"train_loss": 0.5, "fidelity_cos": 0.3, "fidelity_sgd_cos": 0.2,
                                      "fidelity_cos_layer1": 0.1, "fidelity_cos_stages.0": 0.4}
