"""What the built-in plugins register, and that every name has a definition a grep finds."""
import inspect
import json
import re
import subprocess
import sys

import pytest
import timm

import dcanets
from dcanets import plugins

DEPTHS_CIFAR = (18, 20, 32, 44, 56, 110)
FAMILIES = ("resnet", "negnet", "plainnet", "gradnet", "actresnet")

#: Every name each built-in plugin adds; a name added or removed must be added or removed here too.
EXPECTED_MODELS = {
    "shortcut": {f"{f}{d}" for f in FAMILIES[1:] for d in (18, 34, 50)},
    "cifar_shortcut": {f"cifar_{f}{d}" for f in FAMILIES for d in DEPTHS_CIFAR},
    "double_resnet": {"double_resnet_mnist", "double_resnet_cifar", "double_resnet_flat"},
    "teacher_student": {"teacher_student_resnet", "teacher_student_cnn"},
    "multibranch": {"multibranch_mlp_1h", "multibranch_mlp_3h"},
}
EXPECTED_DECOMPOSITIONS = {"decompositions": {"dcal2", "dcaprox", "dcacounter", "dcaquasihalf", "dcaquasineghalf"}}

# a fresh interpreter whose entry-point metadata holds nothing in the dcanets group
NO_ENTRY_POINTS = """
import importlib.metadata, json
real = importlib.metadata.entry_points
importlib.metadata.entry_points = lambda **kw: [] if kw.get("group") == "dcanets" else real(**kw)
import dcanets
print(json.dumps([dcanets.list_models(), dcanets.list_decompositions(), dcanets.list_plugins()]))
"""


def _by_plugin(registered):
    out = {}
    for name, plugin in registered.items():
        out.setdefault(plugin, set()).add(name)
    return out


def test_default_plugins_are_the_builtins_and_registered_by_name():
    names = [plugins.plugin_name(m) for m in plugins.DEFAULT_PLUGINS]
    assert set(names) == set(EXPECTED_MODELS) | set(EXPECTED_DECOMPOSITIONS)
    assert plugins.ESSENTIAL_PLUGINS <= set(names)
    loaded = dict(dcanets.list_plugins())
    for module, name in zip(plugins.DEFAULT_PLUGINS, names):
        assert loaded[name] == module


def test_builtins_need_no_entry_points():
    """Only third parties use the entry-point group: without it no model or decomposition is lost."""
    out = subprocess.run([sys.executable, "-c", NO_ENTRY_POINTS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    models, decompositions, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    by_plugin = _by_plugin(models)
    for plugin, names in EXPECTED_MODELS.items():
        assert by_plugin.get(plugin) == names, plugin
    assert _by_plugin(decompositions) == EXPECTED_DECOMPOSITIONS
    assert [name for name, _ in loaded] == [plugins.plugin_name(m) for m in plugins.DEFAULT_PLUGINS]


def test_builtins_are_registered_in_this_process():
    by_plugin = _by_plugin(dcanets.list_models())
    for plugin, names in EXPECTED_MODELS.items():
        assert by_plugin.get(plugin) == names, plugin
    assert _by_plugin(dcanets.list_decompositions())["decompositions"] == EXPECTED_DECOMPOSITIONS["decompositions"]


@pytest.mark.parametrize("name", sorted(dcanets.list_models()))
def test_every_registered_model_has_a_def_in_its_module(name):
    """``grep "def <name>(pretrained"`` finds every model: no name is generated at import time."""
    fn = timm.models.model_entrypoint(name)
    module = sys.modules[fn.__module__]
    source = inspect.getsource(module)
    assert re.search(rf"^def {re.escape(name)}\(pretrained", source, re.M), \
        f"{name}: no 'def {name}(pretrained' in {inspect.getsourcefile(module)}"
    assert inspect.getsourcefile(fn) == inspect.getsourcefile(module)
    assert re.search(rf"^def {re.escape(name)}\(pretrained", inspect.getsource(fn), re.M), \
        f"{name}: the registered function is not the one defined as {name}"
    assert fn.__doc__, f"{name} has no docstring"
    assert timm.models.get_pretrained_cfg(name) is not None, f"{name} has no entry in its module's default_cfgs"
