"""``TrainConfig``: one pydantic model for fields, defaults, help and checks; one-line errors;
``dcanets train`` flags generated from it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from dcanets import cli
from dcanets.cli import train as train_cli
from dcanets.engine import TrainConfig
from dcanets.engine.config import ConfigError


@pytest.mark.parametrize("values, message", [
    ({"lr": "abc"}, "lr: must be a number, got 'abc'"),
    ({"lr": 0}, "lr: must be > 0, got 0"),
    ({"lr": float("nan")}, "lr: must be a finite number, got nan"),
    ({"epochs": 0}, "epochs: must be an integer >= 1, got 0"),
    ({"epochs": True}, "epochs: must be an integer >= 1, got True"),
    ({"batch_size": 2.5}, "batch_size: must be an integer >= 1, got 2.5"),
    ({"limit": 0}, "limit: must be an integer >= 1, got 0"),
    ({"val_limit": -3}, "val_limit: must be an integer >= 1, got -3"),
    ({"seed": "x"}, "seed: must be an integer, got 'x'"),
    ({"sched": "linear"}, "sched: must be one of 'cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', "
                          "'constant' or 'none', got 'linear'"),
    ({"warmup_epochs": 10}, "warmup_epochs: must be < epochs (10), got 10"),
    ({"warmup_epochs": -1}, "warmup_epochs: must be >= 0, got -1"),
    ({"val_fraction": 1.0}, "val_fraction: must be < 1, got 1.0"),
    ({"momentum": -0.1}, "momentum: must be >= 0, got -0.1"),
    ({"opt_kwargs": {"rho": -1}}, "opt_kwargs.rho: must be >= 0, got -1"),
    ({"opt_kwargs": {"lam": 0}}, "opt_kwargs.lam: must be > 0, got 0"),
    ({"opt_kwargs": "rho=1"}, "opt_kwargs: must be a mapping, got 'rho=1'"),
    ({"amp": "maybe"}, "amp: must be true or false, got 'maybe'"),
    ({"amp_dtype": "fp8"}, "amp_dtype: must be one of 'auto', 'bfloat16' or 'float16', got 'fp8'"),
    ({"model": 3}, "model: must be a string, got 3"),
])
def test_each_check_is_one_line_naming_the_field(values, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**values)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_every_problem_at_once_and_unknown_keys_with_a_suggestion():
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict({"lrr": 0.1, "epochs": 0, "lr": -1})
    msg = str(info.value)
    assert msg.startswith("lr: must be > 0, got -1; epochs: must be an integer >= 1, got 0; ")
    assert "lrr: not a TrainConfig field; did you mean: lr; valid keys: model, model_kwargs, data," in msg
    assert TrainConfig.problems({"epochs": 0}) == [("epochs", "must be an integer >= 1, got 0")]
    assert TrainConfig.problems({"epochs": 3}) == []
    with pytest.raises(ValueError, match="a training config is a mapping of fields, got list"):
        TrainConfig.from_dict([("lr", 0.1)])  # type: ignore[arg-type]


def test_values_are_coerced_as_flags_and_paths_give_them():
    cfg = TrainConfig.from_dict({"lr": "0.1", "epochs": "3", "limit": 64.0, "data": Path("/data/set.tar"),
                                 "opt_kwargs": {"rho": 0.01, "lam": 10, "eps": 1}})
    assert (cfg.lr, cfg.epochs, cfg.limit, cfg.data) == (0.1, 3, 64, "/data/set.tar")
    assert cfg.opt_kwargs == {"rho": 0.01, "lam": 10, "eps": 1}  # other kwargs pass through
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig().to_dict()["sched"] == "cosine" and TrainConfig().model_kwargs == {}


def test_validate_rechecks_assigned_attributes():
    cfg = TrainConfig(epochs=4, warmup_epochs=2)
    cfg.validate()
    cfg.epochs = 2  # assignment is not validated; the engine calls validate() before a run
    with pytest.raises(ValueError, match=r"^warmup_epochs: must be < epochs \(2\), got 2$"):
        cfg.validate()


def test_every_field_is_a_flag_with_its_description(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, info in TrainConfig.model_fields.items():
        assert info.description, f"{name} has no description"
        flag = "--" + name.replace("_", "-")
        # `--flag X`, `--flag K=V [K=V ...]` (lists), `--flag, --no-flag`, then timm's aliases (`, -b N`)
        shape = r"(,? \S+)?( \[\S+ \.\.\.\])?(, -[-\w]+( \S+)?)*"
        assert re.search(rf"{re.escape(flag)}{shape} {re.escape(info.description)}", text), flag
    assert "--lr X peak learning rate (default: 0.05)" in text
    assert "--sched {cosine,tanh,step,multistep,plateau,poly,constant,none} lr schedule" in text
    assert "--decay-milestones X [X ...] multistep" in text
    assert text.endswith("--output TEXT directory for last.pt and metrics.json "
                         "(dcanets train: runs/train/<model>-<time> if unset)")  # a None default is not shown


def test_flags_are_validated_by_the_model(capsys):
    assert cli.main(["train", "--lr", "abc"]) == 2
    assert capsys.readouterr().err.strip() == "dcanets train: error: lr: must be a number, got 'abc'"
    assert cli.main(["train", "--epochs", "2", "--warmup-epochs", "2"]) == 2
    assert "warmup_epochs: must be < epochs (2), got 2" in capsys.readouterr().err
    args = cli.build_parser(["train"]).parse_args(["train", "--epochs", "3", "--opt-kwargs", "rho=0.1", "--no-amp"])
    cfg = train_cli.config_from_args(args)
    assert (cfg.epochs, cfg.opt_kwargs, cfg.amp, cfg.lr) == (3, {"rho": 0.1}, False, 0.05)
