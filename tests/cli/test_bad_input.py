"""Bad input to every command ends in one clear line: the exit code, no traceback, and a first
stderr line that says what to fix (issue 14).

Each case runs the real CLI in-process (``dcanets.cli.main``); the broken-plugin cases need a
fresh interpreter and run ``python -m dcanets`` as a subprocess. Inputs that reach training use
tiny data (digits, 64 images, one epoch), so the whole table takes seconds.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from dcanets import cli
from dcanets.engine import data as dcadata

TINY = ["--data", "digits", "--limit", "64", "--epochs", "1", "--batch-size", "32", "--no-progress"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    """Every broken input the table refers to, built once: {name: path}."""
    root = tmp_path_factory.mktemp("bad_input")
    small = dcadata.synthetic(40, num_classes=4, size=8)
    out: Dict[str, str] = {}

    out["file"] = str(root / "afile.txt")
    Path(out["file"]).write_text("not a directory, not a tar\n")
    out["missing"] = str(root / "does-not-exist")

    one = dcadata.ImageData(small.images[:12], torch.zeros(12, dtype=torch.int64), ["only"], "one")
    out["oneclass"] = str(dcadata.write_image_folder(one, root / "oneclass"))
    out["badimg"] = str(dcadata.write_image_folder(small, root / "badimg"))
    (Path(out["badimg"]) / "class2" / "00002.png").write_bytes(b"this is no png" * 8)

    full = dcadata.write_image_tar(small, root / "full.tar")
    blob = full.read_bytes()
    with tarfile.open(full) as tf:
        members = tf.getmembers()
    cut = members[len(members) // 2].offset  # at a member boundary: tarfile reads it without an error
    (root / "half.tar").write_bytes(blob[:cut])
    out["half_tar"] = str(root / "half.tar")
    (root / "empty.tar").write_bytes(blob[:3 * 512])  # the directory headers only: not one image
    out["empty_tar"] = str(root / "empty.tar")

    configs = {"bad_yaml": "lr: [0.1\n", "list_yaml": "- lr\n- 0.1\n", "typed_yaml": "lr: [1]\n",
               "unknown_yaml": "lrr: 0.1\n", "kwargs_yaml": "opt_kwargs: 5\n", "bool_yaml": "amp: maybe\n"}
    for name, text in configs.items():
        out[name] = str(root / f"{name}.yaml")
        Path(out[name]).write_text(text)

    out["not_ckpt"] = str(root / "garbage.pt")
    Path(out["not_ckpt"]).write_bytes(b"\x00garbage" * 10)
    out["evil_ckpt"] = str(root / "evil.pt")
    torch.save({"config": {}, "payload": os.getcwd}, out["evil_ckpt"])  # a GLOBAL: refused, never called
    out["out"] = str(root / "out")
    locked = root / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    out["locked"] = str(locked)
    return out


# (id, argv with {name} placeholders for `files`, exit code, regex the first stderr line must match[, mark])
CASES: List[tuple] = [
    # ---- the top-level command
    ("no-command", [], 2, r"^dcanets: error: the following arguments are required: COMMAND"),
    ("unknown-command", ["trian"], 2, r"invalid choice: 'trian'"),
    ("unknown-option", ["models", "a", "b"], 2, r"unrecognized argument: b"),
    # ---- train: wrong type, out of range, for every kind of flag
    ("lr-text", ["train", "--lr", "abc"], 2, r"^dcanets train: error: lr: must be a number, got 'abc'"),
    ("lr-zero", ["train", "--lr", "0"], 2, r"lr: must be > 0"),
    ("lr-negative", ["train", "--lr", "-1"], 2, r"lr: must be > 0"),
    ("lr-nan", ["train", "--lr", "nan"], 2, r"lr: must be a finite number"),
    ("epochs-fraction", ["train", "--epochs", "1.5"], 2, r"epochs: must be an integer >= 1"),
    ("epochs-zero", ["train", "--epochs", "0"], 2, r"epochs: must be an integer >= 1"),
    ("batch-size-text", ["train", "--batch-size", "big"], 2, r"batch_size: must be an integer >= 1"),
    ("batch-size-zero", ["train", "--batch-size", "0"], 2, r"batch_size: must be an integer >= 1"),
    ("val-fraction-one", ["train", "--val-fraction", "1"], 2, r"val_fraction: must be < 1"),
    ("val-fraction-negative", ["train", "--val-fraction", "-0.1"], 2, r"val_fraction: must be >= 0"),
    ("limit-zero", ["train", "--limit", "0"], 2, r"limit: must be an integer >= 1"),
    ("val-limit-negative", ["train", "--val-limit", "-3"], 2, r"val_limit: must be an integer >= 1"),
    ("momentum-negative", ["train", "--momentum", "-0.9"], 2, r"momentum: must be >= 0"),
    ("weight-decay-text", ["train", "--weight-decay", "lots"], 2, r"weight_decay: must be a number"),
    ("warmup-too-long", ["train", "--epochs", "2", "--warmup-epochs", "2"], 2, r"warmup_epochs: must be < epochs"),
    ("seed-fraction", ["train", "--seed", "1.5"], 2, r"seed: must be an integer"),
    ("split-seed-text", ["train", "--split-seed", "x"], 2, r"split_seed: must be an integer"),
    ("sched-unknown", ["train", "--sched", "linear"], 2, r"argument --sched: invalid choice: 'linear'"),
    ("amp-dtype-unknown", ["train", "--amp-dtype", "fp8"], 2, r"argument --amp-dtype: invalid choice: 'fp8'"),
    ("bool-flag-with-value", ["train", "--amp=yes"], 2, r"argument --amp/--no-amp: ignored explicit argument 'yes'"),
    ("unknown-train-flag", ["train", "--learning-rate", "0.1"], 2, r"unrecognized argument: --learning-rate"),
    ("misspelt-train-flag", ["train", "--smothing", "0.1", "--moel", "x"], 2,
     r"dcanets train: error: unrecognized arguments: --smothing \(did you mean: --smoothing, --label-smoothing.*\), "
     r"--moel \(did you mean: --model"),
    ("misspelt-tune-flag", ["tune", "--adress", "auto"], 2,
     r"unrecognized argument: --adress \(did you mean: --address"),
    # ---- train: kwargs flags
    ("opt-kwargs-no-value", ["train", "--opt-kwargs", "rho"], 2, r"argument --opt-kwargs: bad key=value item 'rho'"),
    ("opt-kwargs-bad-json", ["train", "--opt-kwargs", "{rho: 1"], 2, r"argument --opt-kwargs: bad JSON"),
    ("opt-kwargs-json-list", ["train", "--opt-kwargs", '{"a": 1'], 2, r"bad JSON"),
    ("rho-text", ["train", "--opt-kwargs", "rho=abc"], 2,
     r"opt_kwargs\.rho: must be a number >= 0 or 'auto', got 'abc'"),
    ("rho-negative", ["train", "--opt-kwargs", "rho=-1"], 2, r"opt_kwargs\.rho: must be >= 0"),
    ("lam-zero", ["train", "--opt-kwargs", "lam=0"], 2, r"opt_kwargs\.lam: must be > 0"),
    ("model-kwargs-bad-yaml", ["train", "--model-kwargs", "a=[1"], 2,
     r"argument --model-kwargs: bad value '\[1' for 'a'"),
    ("model-kwargs-unknown", ["train", *TINY, "--model-kwargs", "drop_ratez=0.1"], 2,
     r"model 'cifar_resnet20' rejected model_kwargs \{'drop_ratez': 0\.1\}"),
    ("opt-kwargs-unknown", ["train", *TINY, "--opt-kwargs", "betaz=0.1"], 2, r"optimizer 'sgd' rejected its arguments"),
    ("model-unknown", ["train", *TINY, "--model", "cifar_resnet2O"], 2,
     r"unknown model 'cifar_resnet2O'; did you mean"),
    ("opt-unknown", ["train", *TINY, "--opt", "adamm"], 2, r"unknown optimizer 'adamm'; did you mean"),
    ("device-unknown", ["train", *TINY, "--device", "tpu"], 2, r"unknown device 'tpu'"),
    # ---- train: data that is missing, not data, or broken
    ("data-missing", ["train", *TINY, "--data", "{missing}"], 2, r"data path '.*does-not-exist' does not exist"),
    ("data-not-tar", ["train", *TINY, "--data", "{file}"], 2, r"data file '.*afile.txt' is not a tar archive"),
    ("data-synthetic-text", ["train", *TINY, "--data", "synthetic:many"], 2, r"bad generated set 'synthetic:many'"),
    ("data-one-class", ["train", *TINY, "--data", "{oneclass}"], 2,
     r"data '.*oneclass' has only the class 'only': a classifier needs at least 2 classes"),
    ("data-bad-image", ["train", *TINY, "--data", "{badimg}"], 2,
     r"cannot decode image '.*badimg/class2/00002\.png' \(not an image"),
    ("data-empty-tar", ["train", *TINY, "--data", "{empty_tar}"], 2, r"'.*empty\.tar'.* truncated"),
    ("data-truncated-tar", ["train", *TINY, "--data", "{half_tar}", "--output", "{out}/half"], 0,
     r"^dcanets train: warning: tar archive '.*half\.tar' is truncated .*: using only the \d+ images in \d+ classes"),
    ("eval-data-missing", ["train", *TINY, "--eval-data", "{missing}"], 2,
     r"data path '.*does-not-exist' does not exist"),
    # ---- train: outputs that cannot be written
    ("output-is-file", ["train", *TINY, "--output", "{file}"], 2, r"output '.*afile.txt' is a file, not a directory"),
    ("output-under-file", ["train", *TINY, "--output", "{file}/run"], 2,
     r"cannot write to output directory '.*afile.txt/run': Not a directory"),
    ("output-unwritable", ["train", *TINY, "--output", "/proc/dcanets-no-such/run"], 2,
     r"cannot write to output directory '/proc/dcanets-no-such/run'"),
    ("output-read-only", ["train", *TINY, "--output", "{locked}/run"], 2,
     r"cannot write to output directory '.*locked/run': Permission denied",
     pytest.mark.skipif(IS_ROOT, reason="root writes into a read-only directory")),
    # ---- train: config files and checkpoints
    ("config-missing", ["train", "--config", "{missing}"], 2, r"config file '.*does-not-exist' does not exist"),
    ("config-directory", ["train", "--config", "{out}/.."], 2, r"config file '.*' is a directory"),
    ("config-bad-yaml", ["train", "--config", "{bad_yaml}"], 2, r"invalid YAML in '.*bad_yaml\.yaml': .* at line \d+"),
    ("config-not-mapping", ["train", "--config", "{list_yaml}"], 2, r"'.*list_yaml\.yaml' must hold a mapping"),
    ("config-wrong-type", ["train", "--config", "{typed_yaml}"], 2, r"lr: must be a number, got \[1\]"),
    ("config-unknown-key", ["train", "--config", "{unknown_yaml}"], 2,
     r"lrr: not a TrainConfig field; did you mean: lr"),
    ("config-kwargs-not-mapping", ["train", "--config", "{kwargs_yaml}"], 2, r"opt_kwargs: must be a mapping, got 5"),
    ("config-bool-text", ["train", "--config", "{bool_yaml}"], 2, r"amp: must be true or false, got 'maybe'"),
    ("resume-missing", ["train", "--resume", "{missing}"], 2,
     r"checkpoint '.*does-not-exist' does not exist; pass a last\.pt"),
    ("resume-not-checkpoint", ["train", "--resume", "{not_ckpt}"], 2, r"cannot read checkpoint '.*garbage\.pt'"),
    ("resume-code-payload", ["train", "--resume", "{evil_ckpt}"], 2, r"refusing to load checkpoint '.*evil\.pt'"),
    # ---- models / plugins
    ("models-no-match", ["models", "zzz*"], 1, r"^dcanets models: no plugin model matches 'zzz\*'"),
    ("plugins-no-match", ["plugins", "shortcutt"], 1,
     r"^dcanets plugins: no plugin matches 'shortcutt'; did you mean: shortcut"),
    # ---- curvature
    ("curvature-no-model", ["curvature"], 2, r"the following arguments are required: --model"),
    ("curvature-unknown-model", ["curvature", "--model", "cifar_resnet2O"], 2,
     r"unknown model 'cifar_resnet2O'; did you mean"),
    ("curvature-batch-zero", ["curvature", "--model", "cifar_resnet20", "--batch", "0"], 2,
     r"--batch and --steps must be >= 1"),
    ("curvature-steps-text", ["curvature", "--model", "cifar_resnet20", "--steps", "many"], 2,
     r"argument --steps: invalid int value: 'many'"),
    ("curvature-seed-text", ["curvature", "--model", "cifar_resnet20", "--seed", "x"], 2,
     r"argument --seed: invalid int value"),
    ("curvature-data-missing", ["curvature", "--model", "cifar_resnet20", "--data", "{missing}"], 2,
     r"data path '.*does-not-exist' does not exist"),
    ("curvature-data-one-class", ["curvature", "--model", "cifar_resnet20", "--data", "{oneclass}"], 2,
     r"has only the class 'only'"),
    # ---- shortcut-prior
    ("prior-no-experiment", ["shortcut-prior"], 2, r"the following arguments are required: experiment"),
    ("prior-unknown-experiment", ["shortcut-prior", "teacher"], 2, r"argument experiment: invalid choice: 'teacher'"),
    ("prior-k-zero", ["shortcut-prior", "teacher-student", "--k", "0"], 2, r"--k, --p and --teachers must be >= 1"),
    ("prior-k-text", ["shortcut-prior", "teacher-student", "--k", "two"], 2, r"argument --k: invalid int value: 'two'"),
    ("prior-steps-zero", ["shortcut-prior", "relaxation", "--steps", "0"], 2, r"--steps must be >= 1"),
    ("prior-tol-negative", ["shortcut-prior", "teacher-student", "--tol", "-1"], 2,
     r"--tol must be a finite number > 0"),
    ("prior-lr-nan", ["shortcut-prior", "deep-linear", "--lr", "nan"], 2, r"--lr must be a finite number > 0"),
    ("prior-noise-negative", ["shortcut-prior", "relaxation", "--noise", "-0.1"], 2,
     r"--noise must be a finite number >= 0"),
    ("prior-depth-zero", ["shortcut-prior", "deep-linear", "--depth", "0"], 2, r"--depth values must be >= 1"),
    ("prior-init-unknown", ["shortcut-prior", "relaxation", "--init", "sideways"], 2,
     r"argument --init: invalid choice"),
    ("prior-branches-not-dividing", ["shortcut-prior", "multibranch", "--branches", "3"], 2,
     r"--branches \[3\] do not divide --total-width 64"),
    ("prior-width-zero", ["shortcut-prior", "multibranch", "--total-width", "0"], 2, r"--total-width must be >= 1"),
]


def _argv(template: List[str], files: Dict[str, str]) -> List[str]:
    return [re.sub(r"\{(\w+)\}", lambda m: files.get(m.group(1), m.group(0)), part) for part in template]


def run_cli(argv: List[str], capsys: pytest.CaptureFixture) -> tuple:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's errors exit from parse_args
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, code, first_line",
                         [pytest.param(*c[1:4], id=c[0], marks=c[4:]) for c in CASES])
def test_bad_input_ends_in_one_clear_line(argv, code, first_line, files, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DCANETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DCANETS_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)  # a run that starts writes runs/train/... here, not in the checkout
    got, _, err = run_cli(_argv(argv, files), capsys)
    assert "Traceback" not in err
    assert got == code, err
    first = err.splitlines()[0] if err else ""
    assert re.search(first_line, first), f"first stderr line {first!r} does not match {first_line!r}"


def test_the_table_is_large_enough():
    assert len(CASES) >= 45


# ---------------------------------------------------------------------------- plugins that break
PLUGINS = {
    "badplug": ("nonexistent_module_for_dcanets_tests", None),
    "clashplug": ("dcanets_clash_plugin", '''
        import dcanets

        @dcanets.hookimpl
        def dcanets_register_models():
            def resnet18(**kwargs):
                raise AssertionError("never built")
            return [resnet18]
    '''),
}


def _plugin_env(tmp_path: Path, name: str) -> Dict[str, str]:
    """A site directory holding one installed-looking third-party plugin (its dist-info entry point)."""
    module, source = PLUGINS[name]
    info = tmp_path / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[dcanets]\n{name} = {module}\n")
    if source:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    env.pop("DCANETS_DEBUG", None)
    return env


@pytest.mark.parametrize("plugin, argv, code, first_line", [
    ("badplug", ["--help"], 0, r"^usage: dcanets"),
    ("badplug", ["train", "--help"], 0, r"^usage: dcanets train"),
    ("badplug", ["models"], 2, r"^dcanets models: error: dcanets plugin 'badplug' .*failed to import: "
                               r"ModuleNotFoundError.*DCANETS_DISABLE_PLUGINS=badplug"),
    ("badplug", ["train", "--epochs", "1"], 2, r"^dcanets train: error: dcanets plugin 'badplug'"),
    ("clashplug", ["plugins"], 2, r"^dcanets plugins: error: dcanets plugin 'clashplug' registers model 'resnet18', "
                                  r"which timm already has"),
])
def test_a_broken_plugin_is_one_line_and_help_still_works(plugin, argv, code, first_line, tmp_path):
    env = _plugin_env(tmp_path, plugin)
    proc = subprocess.run([sys.executable, "-m", "dcanets", *argv], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == code, proc.stderr
    text = proc.stdout if code == 0 else proc.stderr
    assert re.search(first_line, text.splitlines()[0]), text


def test_disabling_the_broken_plugin_makes_the_command_work(tmp_path):
    env = _plugin_env(tmp_path, "badplug")
    env["DCANETS_DISABLE_PLUGINS"] = "badplug"
    proc = subprocess.run([sys.executable, "-m", "dcanets", "plugins", "shortcut"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("shortcut ")


def test_a_library_import_still_raises_the_plugin_error(tmp_path):
    """Only the command defers the error to its one line; `import dcanets` elsewhere fails loudly."""
    env = _plugin_env(tmp_path, "badplug")
    proc = subprocess.run([sys.executable, "-c", "import dcanets"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert "PluginError: dcanets plugin 'badplug'" in proc.stderr
