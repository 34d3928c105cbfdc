"""Every YAML dcanets reads goes through ``dcanets.safe_yaml``: an alias bomb, a self-referencing
anchor, deep nesting or a huge file is one line, at once, wherever it is read (issue 24, item 10)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from dcanets import safe_yaml


def bomb(levels: int = 9, key: str = "model_kwargs") -> str:
    """Ten-fold aliases, ``levels`` deep, all under ``key``: 10**levels values once expanded, a few
    hundred bytes."""
    lines = ["  a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return f"{key}:\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, problem", [
    (bomb(), "its aliases expand to more than 100000 values"),
    ("x: &r [1, *r]\n", "an anchor contains an alias of itself"),
    ("[" * 300 + "]" * 300, "nests deeper than 200 levels"),
    ("x: " + "y" * (safe_yaml.MAX_BYTES + 1), "more than the 4194304 dcanets reads"),
])
def test_documents_over_the_limits_are_refused_at_once(text, problem):
    t0 = time.perf_counter()
    with pytest.raises(yaml.YAMLError) as info:
        safe_yaml.load(text)
    assert problem in info.value.problem and "\n" not in info.value.problem
    assert time.perf_counter() - t0 < 5


def test_anchors_within_the_limits_load_as_safe_load_does():
    text = "base: &b {lr: 0.1, epochs: 3}\nrun: *b\nlist: [*b, *b]\n"
    assert safe_yaml.load(text) == yaml.safe_load(text)
    assert safe_yaml.load("") is None
    with pytest.raises(yaml.constructor.ConstructorError):  # still safe_load: no Python objects
        safe_yaml.load("!!python/object/apply:os.system ['true']")


def test_the_expanded_size_counts_every_alias():
    node = yaml.compose("a: &a [1, 2]\nb: [*a, *a, *a]\n")
    # mapping 1 + key a 1 + [1, 2] 3 + key b 1 + list 1 + 3 x 3
    assert safe_yaml.expanded_size(node) == 16


def test_train_config_with_an_alias_bomb_in_model_kwargs_is_one_line_not_a_hang(tmp_path):
    """The reproduction of issue 24: with plain ``yaml.safe_load`` this command validates the
    expanded model_kwargs (10**9 values) and never ends."""
    (tmp_path / "bomb.yaml").write_text(bomb())
    env = dict(os.environ, OMP_NUM_THREADS="1", DCANETS_CACHE=str(tmp_path / "cache"))
    env.pop("DCANETS_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "dcanets", "train", "--config", "bomb.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "dcanets train: error: invalid YAML in 'bomb.yaml': its aliases expand to more than 100000 values (an alias "
        "bomb?); write the values out instead of repeating anchors"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("reader", ["tune_schema", "kv_flag"])
def test_the_other_readers_refuse_it_too(reader, tmp_path):
    from dcanets.tune import schema
    from dcanets.validation import parse_kv

    path = tmp_path / "bomb.yaml"
    path.write_text(bomb(key="train"))
    expected = "an anchor contains an alias of itself" if reader == "kv_flag" else "aliases expand to more than 100000"
    with pytest.raises(ValueError, match=expected):
        if reader == "tune_schema":
            schema.load(path)
        else:
            parse_kv("x=&a [*a]")  # a flag value has no commas: the never-ending anchor instead
