"""The plugin manager: discovery, attribution and every error path."""
import importlib.metadata
import pathlib

import pluggy
import pytest
import timm
import torch
from timm.optim import OptimInfo, create_optimizer_v2

import dcanets
from dcanets import PluginError, hookimpl, plugins


def _tiny(pretrained=False, **kwargs):
    return torch.nn.Linear(4, kwargs.get("num_classes", 2))


def _named(name):
    def fn(pretrained=False, **kwargs):
        return _tiny(**kwargs)
    fn.__name__ = name
    return fn


class ModelPlugin:
    def __init__(self, *names):
        self.names = names

    @hookimpl
    def dcanets_register_models(self):
        return [_named(n) for n in self.names]


@pytest.fixture
def registered():
    """Register plugin objects for one test and remove them (and their names) afterwards."""
    names = []

    def add(plugin, name):
        names.append(dcanets.register_plugin(plugin, name=name))
    yield add
    for name in names:
        if dcanets.get_plugin_manager().has_plugin(name):
            dcanets.unregister_plugin(name)


def test_builtins_are_listed_with_their_plugin_and_declare_no_entry_point():
    pyproject = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert "[project.entry-points.dcanets]" not in pyproject  # the group is for third parties only
    models = dcanets.list_models()
    assert models["negnet18"] == "shortcut" and models["cifar_negnet56"] == "cifar_shortcut"
    assert "resnet18" not in models  # timm's own, not added by a plugin
    assert timm.is_model("cifar_gradnet56")


class CountingPlugin(ModelPlugin):
    calls = 0

    @hookimpl
    def dcanets_register_models(self):
        type(self).calls += 1
        return super().dcanets_register_models()


def test_register_plugin_calls_only_the_new_plugins_hooks_through_pluggy(registered):
    registered(CountingPlugin("dcatest_count_a"), "count-a")
    assert CountingPlugin.calls == 1
    seen = []
    undo = dcanets.get_plugin_manager().add_hookcall_monitoring(
        lambda hook_name, impls, kwargs: seen.append((hook_name, [i.plugin_name for i in impls])),
        lambda outcome, hook_name, impls, kwargs: None)
    try:
        registered(ModelPlugin("dcatest_count_b"), "count-b")
    finally:
        undo()
    assert CountingPlugin.calls == 1  # not re-run, nor the built-ins
    assert ("dcanets_register_models", ["count-b"]) in seen
    assert all(names in ([], ["count-b"]) for _, names in seen)


def test_essential_builtins_cannot_be_disabled_others_can(monkeypatch):
    monkeypatch.setenv("DCANETS_DISABLE_PLUGINS", "multibranch, shortcut")
    with pytest.raises(PluginError, match="essential built-in plugin.*shortcut.*cannot be disabled"):
        plugins._load_builtins(pluggy.PluginManager("dcanets"))
    monkeypatch.setenv("DCANETS_DISABLE_PLUGINS", "multibranch")
    pm = pluggy.PluginManager("dcanets")
    plugins._load_builtins(pm)
    assert not pm.has_plugin("multibranch") and pm.has_plugin("shortcut") and pm.has_plugin("double_resnet")


def test_entry_points_naming_builtins(monkeypatch):
    stale = importlib.metadata.EntryPoint("shortcut", "dcanets_plugins.shortcut", "dcanets")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [stale])
    pm = pluggy.PluginManager("dcanets")
    plugins._load_builtins(pm)
    plugins._load_entry_points(pm)  # an old dcanets install's metadata: skipped, the built-in stays
    assert pm.get_plugin("shortcut").__name__ == "dcanets_plugins.shortcut"
    other = importlib.metadata.EntryPoint("shortcut", "json", "dcanets")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [other])
    with pytest.raises(PluginError, match="entry point 'shortcut' \\(json\\) has the name of a plugin"):
        plugins._load_entry_points(pm)


def test_runtime_plugin_adds_and_removes_a_model(registered):
    registered(ModelPlugin("dcatest_model_a"), "test-a")
    assert dcanets.list_models()["dcatest_model_a"] == "test-a"
    assert isinstance(timm.create_model("dcatest_model_a", num_classes=3), torch.nn.Linear)
    dcanets.unregister_plugin("test-a")
    assert not timm.is_model("dcatest_model_a")
    assert "dcatest_model_a" not in dcanets.list_models()


def test_name_timm_already_has_is_refused(registered):
    with pytest.raises(PluginError, match=r"plugin 'clash'.*'resnet18'.*timm already has"):
        registered(ModelPlugin("resnet18"), "clash")
    assert timm.create_model("resnet18").__class__.__name__ == "ResNet"  # not shadowed
    assert not dcanets.get_plugin_manager().has_plugin("clash")


def test_name_another_plugin_has_is_refused(registered):
    registered(ModelPlugin("dcatest_model_b"), "first")
    with pytest.raises(PluginError, match=r"plugin 'second'.*'dcatest_model_b'.*plugin 'first'"):
        registered(ModelPlugin("dcatest_model_b"), "second")
    with pytest.raises(PluginError, match="plugin 'third'.*'negnet18'.*plugin 'shortcut'"):
        registered(ModelPlugin("negnet18"), "third")


def test_plugin_raising_in_its_hook_is_named(registered):
    class Broken:
        @hookimpl
        def dcanets_register_models(self):
            raise RuntimeError("boom")

    with pytest.raises(PluginError, match="plugin 'broken' raised in dcanets_register_models: RuntimeError: boom"):
        registered(Broken(), "broken")


def test_plugin_failing_to_import_is_named(monkeypatch):
    bad = importlib.metadata.EntryPoint("badplug", "no_such_module_dcanets_xyz", "dcanets")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [bad])
    pm = pluggy.PluginManager("dcanets")
    with pytest.raises(PluginError, match="plugin 'badplug' .*failed to import: ModuleNotFoundError"):
        plugins._load_entry_points(pm)
    monkeypatch.setenv("DCANETS_DISABLE_PLUGINS", "badplug")
    plugins._load_entry_points(pm)  # skipped when disabled
    assert not pm.has_plugin("badplug")


class _SGDLike(torch.optim.SGD):
    pass


class DecompositionPlugin:
    def __init__(self, name):
        self.name = name

    @hookimpl
    def dcanets_register_decompositions(self):
        return [OptimInfo(name=self.name, opt_class=_SGDLike, description="test", has_eps=False)]


def test_decomposition_plugin_reaches_timm_optimizer_factory(registered):
    registered(DecompositionPlugin("dcatestopt"), "opt")
    assert dcanets.list_decompositions()["dcatestopt"] == "opt"
    model = torch.nn.Linear(3, 2)
    assert isinstance(create_optimizer_v2(model, "dcatestopt", lr=0.1), _SGDLike)
    assert type(create_optimizer_v2(model, "lookahead_dcatestopt", lr=0.1)).__name__ == "Lookahead"


@pytest.mark.parametrize("name,match", [("dca_bad", "no '_'"), ("sgd", "timm already has")])
def test_bad_decomposition_names_are_refused(registered, name, match):
    with pytest.raises(PluginError, match=match):
        registered(DecompositionPlugin(name), "badopt")
