"""Every way ``dcanets tune`` can be given something wrong ends in one line on stderr that says what
to fix, a non-zero exit status and no traceback, before Ray runs any trial.

Each case is a YAML change (merged into the tiny search of ``conftest.py``) or a command line;
the cases run in-process through ``dcanets.cli.main`` (stderr captured at the file-descriptor
level, so library logging counts too), a few through a real ``python -m dcanets tune``. The
cases that need a cluster (resources no node has) are in ``test_search.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import yaml
from tune_files import write_config_file


def resume_dir(tmp_path: Path, **state: Any) -> Path:
    """An output folder as a started search leaves it (Tune's state faked: nothing reads it first)."""
    d = tmp_path / "runs" / "tiny-20260101-000000"
    d.mkdir(parents=True)
    cfg = write_config_file(tmp_path)
    (d / "config.yaml").write_text(cfg.read_text())
    saved = {"config_dir": str(tmp_path), "config_path": str(cfg), "experiment": "tiny", "num_samples": 3,
             "tracking_uri": f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", "trials": {}}
    (d / "search.json").write_text(json.dumps({**saved, **state}))
    (d / "tuner.pkl").write_bytes(b"")
    return d


def _yaml(**overrides: Any) -> Callable[[Path], List[str]]:
    return lambda tmp: [str(write_config_file(tmp, **overrides)), "--output", str(tmp / "out")]


def _text(text: str) -> Callable[[Path], List[str]]:
    def make(tmp: Path) -> List[str]:
        (tmp / "search.yaml").write_text(text)
        return [str(tmp / "search.yaml"), "--output", str(tmp / "out")]
    return make


def _args(*argv: str) -> Callable[[Path], List[str]]:
    def make(tmp: Path) -> List[str]:
        cfg = str(write_config_file(tmp))
        return [a.format(tmp=tmp, cfg=cfg) for a in argv]
    return make


def _file_as_output(tmp: Path) -> List[str]:
    (tmp / "afile").write_text("x")
    return [str(write_config_file(tmp)), "--output", str(tmp / "afile")]


def _readonly_output(tmp: Path) -> List[str]:
    if os.geteuid() == 0:  # root writes into read-only folders, but not into /proc
        return [str(write_config_file(tmp)), "--output", "/proc/dcanets-tune-out"]
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return [str(write_config_file(tmp)), "--output", str(ro / "sub")]


def _resume(**state: Any) -> Callable[[Path], List[str]]:
    return lambda tmp: ["--resume", str(resume_dir(tmp, **state))]


def _resume_file(tmp: Path) -> List[str]:
    (tmp / "afile").write_text("x")
    return ["--resume", str(tmp / "afile")]


def _resume_no_state(tmp: Path) -> List[str]:
    (tmp / "empty").mkdir()
    return ["--resume", str(tmp / "empty")]


def _resume_damaged(tmp: Path) -> List[str]:
    d = resume_dir(tmp)
    (d / "search.json").write_text("{not json")
    return ["--resume", str(d)]


def _resume_incomplete(tmp: Path) -> List[str]:
    d = resume_dir(tmp)
    saved = json.loads((d / "search.json").read_text())
    (d / "search.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "tracking_uri"}))
    return ["--resume", str(d)]


def _resume_never_started(tmp: Path) -> List[str]:
    d = resume_dir(tmp)
    (d / "tuner.pkl").unlink()
    return ["--resume", str(d)]


def _resume_other_config(tmp: Path) -> List[str]:
    d = resume_dir(tmp)
    other = tmp / "other.yaml"
    other.write_text(yaml.safe_dump({**yaml.safe_load((d / "config.yaml").read_text()), "name": "other"}))
    return [str(other), "--resume", str(d)]


def _resume_with(flag: str, value: str) -> Callable[[Path], List[str]]:
    return lambda tmp: ["--resume", str(resume_dir(tmp)), flag, value]


FIFO_KW: Dict[str, Any] = {"type": "FIFOScheduler", "grace_period": None, "reduction_factor": None}

# id -> (how to build the command line, expected status, what the first stderr line must name)
CASES: Dict[str, tuple] = {
    # -- the file itself
    "config-missing": (_args("{tmp}/nope.yaml"), 2, "tune config not found"),
    "yaml-syntax": (_text("train: {epochs: 2\nspace: ["), 2, "invalid YAML"),
    "yaml-not-mapping": (_text("- train\n- space\n"), 2, "a tune config is a YAML mapping"),
    "unknown-top-key": (_yaml(trian={"epochs": 2}), 2, "trian"),
    "name-not-a-folder-name": (_yaml(name="my search!"), 2, "name: letters, digits"),
    "description-not-text": (_yaml(description=["a", "list"]), 2, "description"),
    # -- train: (checked by TrainConfig, as dcanets train checks it)
    "train-not-mapping": (_yaml(train=[1, 2]), 2, "train: must be a mapping"),
    "train-epochs-missing": (_yaml(train={"epochs": None}), 2, "train.epochs: required"),
    "train-epochs-zero": (_yaml(train={"epochs": 0}), 2, "train.epochs"),
    "train-epochs-text": (_yaml(train={"epochs": "three"}), 2, "train.epochs"),
    "train-lr-zero": (_yaml(train={"lr": 0}), 2, "train.lr"),
    "train-unknown-field": (_yaml(train={"modle": "x"}), 2, "train.modle"),
    "train-data-missing": (_yaml(train={"data": "missing/cifar.tar"}), 2, "data path not found"),
    "train-model-unknown": (_yaml(train={"model": "cifar_resnet2O"}), 2, "unknown model 'cifar_resnet2O'"),
    "train-opt-unknown": (_yaml(train={"opt": "sgdd"}), 2, "unknown opt 'sgdd'"),
    "train-batch-size-negative": (_yaml(train={"batch_size": -64}), 2, "train.batch_size"),
    # -- space:
    "space-empty": (_yaml(space={"lr": None}), 2, "space: required"),
    "space-unknown-field": (_yaml(space={"leraning_rate": {"type": "uniform", "low": 0.1, "high": 0.2}}), 2,
                            "space.leraning_rate"),
    "space-type-unknown": (_yaml(space={"lr": {"type": "gaussian", "low": 0.1, "high": 0.2}}), 2, "space.lr.type"),
    "space-loguniform-low-zero": (_yaml(space={"lr": {"type": "loguniform", "low": 0, "high": 0.1}}), 2,
                                  "space.lr.low"),
    "space-high-below-low": (_yaml(space={"lr": {"type": "uniform", "low": 0.2, "high": 0.1}}), 2, "space.lr.high"),
    "space-choice-empty": (_yaml(space={"lr": None, "model": {"type": "choice", "values": []}}), 2,
                           "space.model.values"),
    "space-when-undeclared": (_yaml(space={"lr": {"type": "uniform", "low": 0.1, "high": 0.2, "when": {"opt": "sgd"}}}),
                              2, "space.lr.when.opt"),
    "space-also-fixed": (_yaml(train={"lr": 0.1}), 2, "space.lr: also fixed as train.lr"),
    # -- search_alg:
    "search-alg-type": (_yaml(search_alg={"type": "HyperOptSearch"}), 2, "search_alg.type"),
    "sampler-type": (_yaml(search_alg={"sampler": {"type": "GridSampler"}}), 2, "search_alg.sampler.type"),
    "sampler-unknown-arg": (_yaml(search_alg={"sampler": {"type": "TPESampler", "n_startup": 2}}), 2,
                            "search_alg.sampler.n_startup"),
    "sampler-seed-text": (_yaml(search_alg={"sampler": {"type": "TPESampler", "seed": "zero"}}), 2,
                          "search_alg.sampler.seed"),
    # -- scheduler:
    "scheduler-type": (_yaml(scheduler={"type": "PopulationBasedTraining"}), 2, "scheduler.type"),
    "scheduler-grace-zero": (_yaml(scheduler={"grace_period": 0}), 2, "scheduler.grace_period"),
    "scheduler-grace-above-max-t": (_yaml(scheduler={"grace_period": 5}), 2, "scheduler.grace_period: must be <="),
    "scheduler-reduction-one": (_yaml(scheduler={"reduction_factor": 1}), 2, "scheduler.reduction_factor"),
    "scheduler-unknown-arg": (_yaml(scheduler={"grace_perod": 1}), 2, "scheduler.grace_perod"),
    # -- tune_config:
    "metric-unknown": (_yaml(tune_config={"metric": "accuracy"}), 2, "tune_config.metric"),
    "mode-unknown": (_yaml(tune_config={"mode": "maximize"}), 2, "tune_config.mode"),
    "num-samples-zero": (_yaml(tune_config={"num_samples": 0}), 2, "tune_config.num_samples"),
    "time-budget-negative": (_yaml(tune_config={"time_budget_s": -5}), 2, "tune_config.time_budget_s"),
    "max-concurrent-zero": (_yaml(tune_config={"max_concurrent_trials": 0}), 2, "tune_config.max_concurrent_trials"),
    "tune-config-typo": (_yaml(tune_config={"max_concurent_trials": 2}), 2, "tune_config.max_concurent_trials"),
    # -- resources: (what the cluster lacks: test_search.py)
    "cpu-zero": (_yaml(resources={"cpu": 0}), 2, "resources.cpu"),
    "gpu-negative": (_yaml(resources={"gpu": -1}), 2, "resources.gpu"),
    "gpu-text": (_yaml(resources={"gpu": "one"}), 2, "resources.gpu"),
    "resources-unknown": (_yaml(resources={"tpu": 1}), 2, "resources.tpu"),
    # -- tracking:
    "tracking-enabled-text": (_yaml(tracking={"enabled": "maybe"}), 2, "tracking.enabled"),
    "tracking-unknown-key": (_yaml(tracking={"experimnet": "x"}), 2, "tracking.experimnet"),
    "tracking-uri-scheme": (_yaml(tracking={"uri": "foo://bar"}), 2, "tracking uri foo://bar"),
    "tracking-uri-no-folder": (_yaml(tracking={"uri": "sqlite:////nonexistent-dir/m.db"}), 2, "does not exist"),
    # -- failure_config: (retries of a trial whose node died: test_real_cluster.py)
    "max-failures-below-minus-one": (_yaml(failure_config={"max_failures": -2}), 2,
                                     "failure_config.max_failures: must be >= -1, got -2"),
    "max-failures-fraction": (_yaml(failure_config={"max_failures": 1.5}), 2, "failure_config.max_failures"),
    "failure-config-typo": (_yaml(failure_config={"max_failure": 2}), 2,
                            "failure_config.max_failure: unknown key; did you mean: max_failures"),
    # -- checkpoints:
    "keep-best-zero": (_yaml(checkpoints={"keep_best": 0}), 2, "checkpoints.keep_best: must be an integer >= 1, got 0"),
    "checkpoints-typo": (_yaml(checkpoints={"keep_bets": 2}), 2,
                         "checkpoints.keep_bets: unknown key; did you mean: keep_best"),
    # -- storage: (an unreachable server or a missing bucket: test_storage.py)
    "storage-not-text": (_yaml(storage=["s3://bucket"]), 2, "storage: must be a folder on a shared filesystem"),
    "storage-credentials": (_yaml(storage="s3://KEY:SECRET@bucket/tune"), 2,
                            "storage: credentials in the URI are refused"),
    "storage-scheme": (_yaml(storage="foo://bar/tune", tracking={"enabled": False}), 2,
                       "storage foo://bar/tune: pyarrow cannot open it"),
    # -- the command line
    "no-config": (lambda tmp: [], 2, "give a search config"),
    "flag-num-samples-zero": (_args("{cfg}", "--num-samples", "0"), 2, "--num-samples: must be an integer >= 1"),
    "flag-num-samples-text": (_args("{cfg}", "--num-samples", "six"), 2, "--num-samples"),
    "flag-top-zero": (_args("{cfg}", "--top", "0"), 2, "--top"),
    "flag-num-cpus-negative": (_args("{cfg}", "--num-cpus", "-1"), 2, "--num-cpus"),
    "flag-tracking-uri": (_args("{cfg}", "--tracking-uri", "foo://bar", "--output", "{tmp}/out"), 2,
                          "tracking uri foo://bar"),
    "flag-storage-credentials": (_args("{cfg}", "--storage", "s3://KEY:SECRET@bucket/tune"), 2,
                                 "--storage: credentials in the URI are refused"),
    "output-is-a-file": (_file_as_output, 2, "--output"),
    "output-read-only": (_readonly_output, 2, "--output"),
    # -- --resume
    "resume-missing-dir": (lambda tmp: ["--resume", str(tmp / "nope")], 2, "--resume"),
    "resume-a-file": (_resume_file, 2, "--resume"),
    "resume-not-a-search": (_resume_no_state, 2, "not a dcanets tune output folder"),
    "resume-damaged-state": (_resume_damaged, 2, "search.json is unreadable or damaged"),
    "resume-incomplete-state": (_resume_incomplete, 2, "search.json is unreadable or damaged (tracking_uri: "),
    "resume-never-started": (_resume_never_started, 2, "the search never started"),
    "resume-finished": (_resume(status="FINISHED"), 2, "already finished"),
    "resume-other-config": (_resume_other_config, 2, "differs from it"),
    "resume-num-samples": (_resume_with("--num-samples", "3"), 2, "--num-samples cannot change a resumed search"),
    "resume-tracking-uri": (_resume_with("--tracking-uri", "sqlite:///x.db"), 2, "--tracking-uri cannot change"),
    "resume-output": (_resume_with("--output", "elsewhere"), 2, "--output cannot change"),
    "resume-storage": (_resume_with("--storage", "/mnt/shared/tune"), 2, "--storage cannot change"),
    "resume-tracking-store-elsewhere": (_resume(tracking_uri="sqlite:////another-machine/mlflow.db"), 2,
                                        "MLflow store sqlite:////another-machine/mlflow.db is not on this machine"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_ends_in_one_line(case, tmp_path, capfd, monkeypatch):
    from dcanets.cli import main

    make, code, what = CASES[case]
    monkeypatch.chdir(tmp_path)
    argv = ["tune", *make(tmp_path)]
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse
        status = exc.code
    _, err = capfd.readouterr()
    assert status == code, err
    assert "Traceback" not in err, err
    first = err.strip().splitlines()[0] if err.strip() else ""
    assert first.startswith("dcanets tune: error:") and what in first, err
    assert not list((tmp_path / "out").glob("tiny-*")), "a search that never started left a folder"


def test_cases_cover_every_section_of_the_file():
    from dcanets.tune.schema import SearchFile

    named = " ".join(what for _, _, what in CASES.values()) + " " + " ".join(CASES)
    for key in SearchFile.model_fields:
        assert key in named or key.replace("_", "-") in named, key
    assert len(CASES) >= 60


@pytest.mark.slow
@pytest.mark.parametrize("argv, what", [
    (["{tmp}/nope.yaml"], "tune config not found"),
    (["{cfg}", "--num-samples", "0"], "--num-samples"),
    (["--resume", "{tmp}"], "not a dcanets tune output folder"),
])
def test_the_real_command_prints_one_line(argv, what, tmp_path):
    """The same through `python -m dcanets tune`: status 2, one line, nothing else from Python."""
    cfg = write_config_file(tmp_path)
    args = [a.format(tmp=tmp_path, cfg=cfg) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "dcanets", "tune", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and what in lines[0] and lines[0].startswith("dcanets tune: error:"), proc.stderr
