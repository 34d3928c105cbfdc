"""The ``dcanets tune`` YAML schema: every problem with its YAML path, the train section and the
sampled bounds checked as ``dcanets train`` checks them, the defaults the search reads, the
define-by-run space, and ``dcanets tune --schema``."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

from dcanets.cli import main
from dcanets.tune import builders, editor_schema, schema


def problems(path: Path) -> str:
    with pytest.raises(ValueError) as info:
        schema.load(path)
    return str(info.value)


def test_every_problem_is_reported_with_its_yaml_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""
        train: {data: missing/cifar.tar, epochs: 0, modle: x, opt_kwargs: {rho: -1}}
        space:
          lr: {type: loguniform, low: 0, high: 0.1}
          opt_kwargs.rho: {type: uniform, low: 0.1, high: 0.9, times: opt_kwargs.lam}
          opt_kwargs.lam: {type: uniform, low: -1.0, high: 2.0}
          momentum: {type: gaussian}
        scheduler: {type: ASHAScheduler, grace_perod: 1, metric: val_acc}
        tune_config: {metric: accuracy, num_samples: 0}
        resources: {cpu: 0, gpus: 1}
        trackin: {}
    """))
    with pytest.raises(ValueError) as info:
        schema.load(path)
    msg = str(info.value)
    expected = [
        "space.lr.low: must be > 0 for loguniform",
        "space.opt_kwargs.rho.times: must name a parameter declared above it",
        "space.momentum.type: must be one of",
        "train.epochs: must be an integer >= 1",
        "train.modle: not a TrainConfig field",
        "train.opt_kwargs.rho: must be >= 0, got -1",
        "space.opt_kwargs.lam.low: must be > 0",
        "train.data: data path not found",
        "scheduler.grace_perod: not an argument of ASHAScheduler",
        "scheduler.metric: set it in tune_config",
        "tune_config.metric: must be one of",
        "tune_config.num_samples: must be an integer >= 1",
        "resources.cpu: must be > 0",
        "resources.gpus: unknown key",
        "trackin: unknown key",
    ]
    for line in expected:
        assert line in msg, f"missing {line!r} in:\n{msg}"
    assert "15 problem(s)" in msg
    assert "train.modle: not a TrainConfig field; did you mean: model" in msg  # (and remode, timm's name)
    assert "scheduler.grace_perod: not an argument of ASHAScheduler; did you mean: grace_period;" in msg
    assert "resources.gpus: unknown key; did you mean: gpu; allowed: cpu, gpu" in msg
    assert "got 'opt_kwargs.lam'; it is declared below: move it above" in msg


def test_unknown_model_and_optimizer_are_named_before_ray_starts(tmp_path, write_config):
    path = write_config(tmp_path, train={"opt": "sgdd", "model": None},
                        space={"model": {"type": "choice", "values": ["cifar_resnet20", "cifar_negnet2O"]}})
    spec = schema.load(path)
    with pytest.raises(ValueError) as info:
        schema.check_registries(spec)
    msg = str(info.value)
    assert "space.model.values[1]: unknown model 'cifar_negnet2O'" in msg and "cifar_negnet20" in msg
    assert "train.opt: unknown opt 'sgdd'" in msg


def test_relative_data_paths_resolve_against_the_yaml_folder(tmp_path, write_config):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "set.tar").write_bytes(b"")
    (tmp_path / "cfg").mkdir()
    spec = schema.load(write_config(tmp_path / "cfg", train={"data": "../data/set.tar"}))
    assert spec.train["data"] == str((tmp_path / "data" / "set.tar").resolve())


def test_shipped_configs_validate_and_match_the_json_schema():
    root = Path(__file__).resolve().parents[2] / "tune_configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"quickstart.yaml", "negnet_vs_resnet_cifar10.yaml", "dca_rho_lambda.yaml",
            "double_resnet_mnist.yaml"} <= set(names)
    validator = jsonschema.Draft202012Validator(editor_schema.json_schema())
    for name in names:
        assert not [e.message for e in validator.iter_errors(yaml.safe_load((root / name).read_text()))], name
        try:
            spec = schema.load(root / name)
        except ValueError as exc:  # a machine without ../shared/data: only the data paths may fail
            lines = str(exc).splitlines()
            problems = lines[1:] or lines  # one problem: one line
            assert all("data path not found" in p for p in problems), str(exc)
            continue
        assert spec.space and spec.train["epochs"] >= 1
        schema.check_registries(spec)


def test_define_by_run_conditions_and_fractions():
    import optuna

    space = {
        "opt": {"type": "choice", "values": ["sgd", "dcacounter"]},
        "opt_kwargs.lam": {"type": "loguniform", "low": 1.0, "high": 10.0, "when": {"opt": "dcacounter"}},
        "opt_kwargs.rho": {"type": "uniform", "low": 0.1, "high": 0.5, "times": "opt_kwargs.lam",
                           "when": {"opt": "dcacounter"}},
    }
    fn = builders.DefineByRun(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        values = fn(study.ask())
        seen.add(values["opt"])
        if values["opt"] == "sgd":
            assert set(values) == {"opt"}
        else:
            lam, rho = values["opt_kwargs.lam"], values["opt_kwargs.rho"]
            assert 0.1 * lam <= rho <= 0.5 * lam  # rho as a fraction of lam
    assert seen == {"sgd", "dcacounter"}
    cfg = builders.trial_train_config({"opt_kwargs": {"eps": 1}}, {"opt_kwargs.rho:fraction": 0.2,
                                                                   "opt_kwargs.rho": 0.5, "lr": 0.1})
    assert cfg == {"opt_kwargs": {"eps": 1, "rho": 0.5}, "lr": 0.1}


def test_fixed_train_values_are_checked_as_dcanets_train_checks_them(tmp_path, write_config):
    msg = problems(write_config(tmp_path, train={"lr": 0, "sched": "linear", "warmup_epochs": 2,
                                                  "batch_size": "many", "augment": "maybe"},
                                space={"lr": None, "momentum": {"type": "uniform", "low": 0.5, "high": 0.9}}))
    assert "train.lr: must be > 0, got 0" in msg
    assert ("train.sched: must be one of 'cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'constant' "
            "or 'none', got 'linear'") in msg
    assert "train.warmup_epochs: must be < epochs (2), got 2" in msg
    assert "train.batch_size: must be an integer >= 1, got 'many'" in msg
    assert "train.augment: must be true or false, got 'maybe'" in msg
    assert "5 problem(s)" in msg


def test_sampled_bounds_and_choices_are_checked_as_train_config_values(tmp_path, write_config):
    space = {"lr": {"type": "uniform", "low": 0, "high": 0.1},
             "amp_dtype": {"type": "choice", "values": ["auto", "fp8"]},
             "warmup_epochs": {"type": "uniform", "low": 0.5, "high": 3},
             "opt_kwargs.lam": {"type": "loguniform", "low": 1, "high": 10},
             "opt_kwargs.rho": {"type": "uniform", "low": -0.5, "high": 0.5, "times": "opt_kwargs.lam"}}
    msg = problems(write_config(tmp_path, space=space))
    assert "space.lr.low: must be > 0, got 0" in msg
    assert "space.amp_dtype.values[1]: must be one of 'auto', 'bfloat16' or 'float16', got 'fp8'" in msg
    assert "space.warmup_epochs.high: must be < epochs (2), got 3" in msg
    assert "3 problem(s)" in msg  # a scaled parameter samples a factor: its bounds are not rho's


def test_optunas_type_names_sample_as_optuna_would(tmp_path, write_config):
    """``float`` (``log: true``), ``int`` and ``categorical``: Optuna's suggest_* names, beside dcanets' own."""
    import optuna

    space = {"lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
             "momentum": {"type": "float", "low": 0.5, "high": 0.9},
             "batch_size": {"type": "int", "low": 16, "high": 64, "step": 16},
             "model": {"type": "categorical", "values": ["cifar_resnet20", "cifar_negnet20"]}}
    spec = schema.load(write_config(tmp_path, space=space, train={"batch_size": None, "model": None}))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    values = builders.DefineByRun(builders.plain_space(spec.space))(trial)
    dists = trial.distributions
    assert isinstance(dists["lr"], optuna.distributions.FloatDistribution) and dists["lr"].log
    assert not dists["momentum"].log and 0.5 <= values["momentum"] <= 0.9
    assert isinstance(dists["batch_size"], optuna.distributions.IntDistribution) and values["batch_size"] % 16 == 0
    assert isinstance(dists["model"], optuna.distributions.CategoricalDistribution)
    msg = problems(write_config(tmp_path, space={"lr": {"type": "float", "low": 0, "high": 0.2, "log": True}}))
    assert "space.lr.log: log: true needs low > 0, got low 0" in msg


def test_space_parameters_are_typed_and_their_names_suggested(tmp_path, write_config):
    space = {"lrr": {"type": "uniform", "low": 0.1, "high": 0.2},
             "momentum": {"type": "uniform", "low": 0.9, "high": 0.5, "stepp": 1},
             "batch_size": {"type": "int", "low": 16.5, "high": 64},
             "opt": {"type": "choice", "values": [], "times": "momentum"},
             "seed": {"type": "choice", "values": [0, 1], "when": {"optt": "sgd"}}}
    msg = problems(write_config(tmp_path, space=space))
    assert "space.lrr: must be a TrainConfig field or opt_kwargs/model_kwargs.<key>; did you mean: lr;" in msg
    assert "space.momentum.high: must be > low (0.9)" in msg
    assert "space.momentum.stepp: unknown key; did you mean: step;" in msg
    assert "space.batch_size.low: must be an integer, got 16.5" in msg
    assert "space.opt.values: must not be empty" in msg
    assert "space.opt.times: only numeric parameters can be scaled by another" in msg
    assert "space.seed.when.optt: must name a parameter declared above it in space; did you mean: opt" in msg


def test_sections_reject_wrong_types_and_unknown_keys(tmp_path, write_config):
    msg = problems(write_config(tmp_path, resources={"cpu": True}, tune_config={"num_samples": 2.5, "mod": "max"},
                                search_alg={"type": "BayesOpt"}, scheduler={"type": "pbt"},
                                tracking={"enabled": "sometimes"}, name="my search"))
    assert "resources.cpu: must be a number, got True" in msg
    assert "tune_config.num_samples: must be an integer >= 1, got 2.5" in msg
    assert "tune_config.mod: not a ray.tune.TuneConfig argument; did you mean: mode;" in msg
    assert "search_alg.type: only OptunaSearch is supported, got 'BayesOpt'" in msg
    assert "scheduler.type: must be one of ASHAScheduler, FIFOScheduler, MedianStoppingRule" in msg
    assert "tracking.enabled: must be true or false, got 'sometimes'" in msg
    assert "name: letters, digits, '_', '.', '-' only (it names the output folder), got 'my search'" in msg
    path = tmp_path / "list.yaml"
    path.write_text("train: {epochs: 1}\nspace: {lr: {type: uniform, low: 0.1, high: 0.2}}\nscheduler: [asha]\n")
    assert "scheduler: must be a mapping, got ['asha']" in problems(path)


def test_defaults_and_the_shapes_ray_gets(tmp_path, write_config):
    spec = schema.load(write_config(tmp_path, name=None, scheduler={"type": "asha", "grace_period": None},
                                         search_alg={"sampler": None}, tune_config={"metric": "val_loss", "mode": None},
                                         train={"epochs": "3"}))
    assert spec.name == "search" and spec.path == (tmp_path / "search.yaml").resolve()
    assert spec.train == {"data": "digits", "limit": 300, "epochs": 3, "batch_size": 64, "model": "cifar_resnet20",
                          "sched": "none"}
    assert isinstance(spec.space["lr"], schema.LogUniform) and (spec.space["lr"].low, spec.space["lr"].high) == (
        0.01, 0.2)
    assert builders.plain_space(spec.space) == {"lr": {"type": "loguniform", "low": 0.01, "high": 0.2}}
    assert builders.plain(spec.search_alg) == {"type": "OptunaSearch", "sampler": {"type": "TPESampler", "seed": 0}}
    assert builders.plain(spec.scheduler) == {"type": "ASHAScheduler", "reduction_factor": 2, "time_attr": "epoch",
                                              "max_t": 3}
    assert builders.plain(spec.tune_config) == {"metric": "val_loss", "mode": "min", "num_samples": 3,
                                                "reuse_actors": True, "max_concurrent_trials": 2}
    assert (spec.metric, spec.mode) == ("val_loss", "min")
    assert (spec.resources.cpu, spec.resources.gpu) == (1, 0) and builders.trial_resources(spec) == {"cpu": 1, "gpu": 0}
    assert (spec.tracking.uri, spec.tracking.experiment, spec.tracking.enabled) == (None, None, True)
    assert spec.failure_config.max_failures == 0
    assert spec.raw["scheduler"] == {"type": "asha", "reduction_factor": 2}
    assert type(builders.build_scheduler(spec)).__name__ == "AsyncHyperBandScheduler"  # ASHAScheduler's class
    assert builders.build_search_alg(spec).metric == "val_loss"
    config = builders.build_tune_config(spec)
    assert (config.num_samples, config.max_concurrent_trials, config.mode) == (3, 2, "min")


def test_num_samples_flag_must_be_at_least_one(tmp_path, write_config, capsys):
    with pytest.raises(SystemExit) as info:
        main(["tune", str(write_config(tmp_path)), "--num-samples", "0"])
    assert info.value.code == 2
    assert "argument --num-samples: must be an integer >= 1, got '0'" in capsys.readouterr().err


def test_schema_flag_prints_the_json_schema_without_a_config(capsys):
    assert main(["tune", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    defs = schema["$defs"]
    assert defs["TrainSection"]["required"] == ["epochs"]
    assert defs["TrainSection"]["properties"]["lr"]["exclusiveMinimum"] == 0
    assert "description" in defs["TrainSection"]["properties"]["warmup_epochs"]
    assert set(schema["properties"]["space"]["additionalProperties"]["discriminator"]["mapping"]) == {
        "loguniform", "uniform", "int", "choice", "float", "categorical"}
    validator = jsonschema.Draft202012Validator(schema)
    bad = {"train": {"epochs": 0, "lrr": 1}, "space": {"lr": {"type": "gaussian"}}}
    assert len(list(validator.iter_errors(bad))) == 3


SHIPPED = Path(__file__).resolve().parents[2] / "tune_configs"
MODELINE = "# yaml-language-server: $schema=./tune.schema.json"


def test_the_shipped_schema_is_what_the_command_prints_and_every_shipped_yaml_points_at_it(capsys):
    """Regenerate with `dcanets tune --schema > tune_configs/tune.schema.json` when this fails after
    a change of the models or of the installed timm, Ray or Optuna."""
    assert main(["tune", "--schema"]) == 0
    assert capsys.readouterr().out == (SHIPPED / "tune.schema.json").read_text()
    for path in sorted(SHIPPED.glob("*.yaml")):
        assert path.read_text().splitlines()[0] == MODELINE, path.name


@pytest.mark.parametrize("typo, where", [
    ({"tune_config": {"num_sample": 4}}, "num_sample"),
    ({"scheduler": {"type": "ASHAScheduler", "grace_peroid": 1}}, "grace_peroid"),
    ({"train": {"epochs": 2, "opt": "sgdd"}}, "sgdd"),
])
def test_an_editor_flags_the_typos_the_command_catches(typo, where):
    """jsonschema (what editors run) against the shipped file: each typo is an error naming it,
    and the same file without it is valid."""
    shipped = json.loads((SHIPPED / "tune.schema.json").read_text())
    assert shipped["$schema"] == "https://json-schema.org/draft/2020-12/schema" and shipped["$id"]
    validator = jsonschema.Draft202012Validator(shipped)
    good = {"train": {"epochs": 2, "opt": "lookahead_dcacounter"}, "space": {"lr": {"type": "float", "low": 0.01,
                                                                                    "high": 0.1}},
            "scheduler": {"type": "ASHAScheduler", "grace_period": 1}, "tune_config": {"num_samples": 4}}
    assert not list(validator.iter_errors(good))
    errors = [e.message for e in validator.iter_errors({**good, **typo})]
    assert len(errors) == 1 and where in errors[0], errors


def test_tuner_pkl_of_a_search_started_before_the_builders_module_still_loads():
    """Ray's tuner.pkl names the classes where they were when the search started: a search
    interrupted before ``dcanets.tune.builders`` existed must still resume."""
    import pickle

    import optuna

    from dcanets.tune import callbacks, search, tracking

    space = {"lr": {"type": "loguniform", "low": 0.01, "high": 0.2}}
    legacy = pickle.dumps(builders.DefineByRun(space), protocol=0).replace(b"dcanets.tune.builders",
                                                                           b"dcanets.tune.schema")
    assert b"dcanets.tune.schema\nDefineByRun" in legacy
    restored = pickle.loads(legacy)
    assert isinstance(restored, builders.DefineByRun) and restored.space == space
    assert 0.01 <= restored(optuna.create_study().ask())["lr"] <= 0.2
    for name in ("ProgressLines", "Outcomes", "StateCopies"):  # the callbacks' old home
        assert getattr(search, name) is getattr(callbacks, name)
    assert tracking.SearchTracker.__module__ == "dcanets.tune.tracking"
    with pytest.raises(AttributeError):
        schema.NoSuchName  # noqa: B018


def test_timms_recipe_keys_are_train_and_space_keys(tmp_path, write_config):
    """The recipe fields (TrainConfig, docs/training.md) go under train: and space: by timm's names and
    are checked there as dcanets train checks them."""
    recipe = {"mixup": 0.8, "cutmix": 1.0, "cutmix_minmax": [0.2, 0.8], "mixup_mode": "pair", "model_ema": True,
              "model_ema_decay": 0.999, "clip_grad": 1.0, "clip_mode": "agc", "grad_accum_steps": 2}
    spec = schema.load(write_config(tmp_path, train=recipe,
                                    space={"mixup_prob": {"type": "uniform", "low": 0.5, "high": 1.0}}))
    assert {k: spec.train[k] for k in recipe} == recipe and isinstance(spec.space["mixup_prob"], schema.Uniform)
    msg = problems(write_config(tmp_path, train={"clip_mode": "l1"},
                                space={"model_ema_decay": {"type": "uniform", "low": 0.9, "high": 1.0}}))
    assert "train.clip_mode: must be one of 'norm', 'value' or 'agc', got 'l1'" in msg
    assert "space.model_ema_decay.high: must be < 1, got 1" in msg
    msg = problems(write_config(tmp_path, train={"mixup": 0.2, "batch_size": 63}))
    assert "train: batch_size: must be even with mixup/cutmix (they mix pairs of images), got 63" in msg
