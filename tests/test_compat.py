"""Each private API dcanets uses (all in dcanets/_compat.py), called against the installed libraries.

A failure here means a new release of the named library changed a private name: fix
dcanets/_compat.py (or pin the library), not the caller.
"""
from contextlib import contextmanager

import pytest
import timm
import torch
from timm.optim import OptimInfo, create_optimizer_v2, get_optimizer_info, list_optimizers

from dcanets import _compat


@contextmanager
def private_api_of(library: str, version: str, what: str):
    """Turn any error into a failure that names the library, its version and the private API."""
    try:
        yield
    except Exception as exc:
        pytest.fail(f"{library} {version} changed a private API dcanets relies on ({what}): "
                    f"{type(exc).__name__}: {exc}. Update dcanets/_compat.py.", pytrace=False)


class _Opt(torch.optim.SGD):
    pass


def test_timm_optimizer_registry_register_and_unregister():
    info = OptimInfo(name="dcacompatprobe", opt_class=_Opt, description="probe", has_eps=False)
    with private_api_of("timm", timm.__version__, "timm.optim._optim_factory.default_registry"):
        _compat.register_optimizer(info)
        assert get_optimizer_info("dcacompatprobe") is info
        assert isinstance(create_optimizer_v2(torch.nn.Linear(2, 1), "dcacompatprobe", lr=0.1), _Opt)
        _compat.unregister_optimizer("dcacompatprobe")
        assert "dcacompatprobe" not in list_optimizers()
        _compat.unregister_optimizer("dcacompatprobe")  # a missing name is ignored


def test_torch_will_engine_execute_node():
    """True for a leaf the running backward accumulates into, False for one it skips (``inputs=``)."""
    sentinel, x = torch.zeros((), requires_grad=True), torch.ones((), requires_grad=True)
    seen = []

    def record(grad):
        seen.append(_compat.will_engine_execute_node(torch.autograd.graph.get_gradient_edge(sentinel).node))
        return grad

    with private_api_of("torch", torch.__version__, "torch._C._will_engine_execute_node"):
        for run in (lambda y: y.backward(), lambda y: y.backward(inputs=[x]),
                    lambda y: torch.autograd.grad(y, [x])):
            y = x * 2 + sentinel
            y.register_hook(record)
            run(y)
        assert seen == [True, False, False]


def test_torch_autograd_transforms_active():
    """False in plain autograd; True inside torch.func.grad and inside a forward-AD dual level."""
    seen = []

    def f(x):
        seen.append(_compat.autograd_transforms_active())
        return x.sum()

    what = "torch._C._are_functorch_transforms_active, torch.autograd.forward_ad._current_level"
    with private_api_of("torch", torch.__version__, what):
        f(torch.ones(2))
        torch.func.grad(f)(torch.ones(2))
        with torch.autograd.forward_ad.dual_level():
            seen.append(_compat.autograd_transforms_active())
        assert seen == [False, True, True]


def test_torch_has_forward_hooks():
    """A module's own forward hook and pre-hook count, and so do global module hooks."""
    module = torch.nn.ReLU()
    with private_api_of("torch", torch.__version__, "nn.Module._forward_hooks, _forward_pre_hooks, _global_*"):
        assert not _compat.has_forward_hooks(module)
        for register in (module.register_forward_hook, module.register_forward_pre_hook,
                         torch.nn.modules.module.register_module_forward_hook):
            handle = register(lambda *args: None)
            assert _compat.has_forward_hooks(module)
            handle.remove()
            assert not _compat.has_forward_hooks(module)


def test_timm_lookahead_wrapped_optimizer():
    """timm's Lookahead around SGD: the chain is [lookahead, sgd]; a plain optimizer is its own chain."""
    model = torch.nn.Linear(2, 1)
    with private_api_of("timm", timm.__version__, "timm.optim.Lookahead._base_optimizer"):
        wrapped = create_optimizer_v2(model, "lookahead_sgd", lr=0.1)
        chain = _compat.wrapped_optimizers(wrapped)
        assert len(chain) == 2 and chain[0] is wrapped and type(chain[1]) is torch.optim.SGD
        assert _compat.unwrap_optimizer(wrapped) is chain[1]
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    assert _compat.wrapped_optimizers(plain) == [plain] and _compat.unwrap_optimizer(plain) is plain


def test_timm_model_registry_unregister():
    def dcacompat_probe_model(pretrained=False, **kwargs):
        return torch.nn.Linear(2, 1)

    timm.models.register_model(dcacompat_probe_model)
    assert timm.is_model("dcacompat_probe_model")
    with private_api_of("timm", timm.__version__, "timm.models._registry._model_entrypoints / _clear_model_entries"):
        _compat.unregister_model("dcacompat_probe_model")
        assert not timm.is_model("dcacompat_probe_model")
        assert "dcacompat_probe_model" not in timm.list_models()
        assert timm.models.get_pretrained_cfg("dcacompat_probe_model") is None


@pytest.mark.slow
def test_ray_result_grid_trials_carry_status(tmp_path):
    import ray
    from ray import tune

    def trainable(config):  # defined here so Ray pickles it by value: workers cannot import tests
        if config["fail"]:
            raise RuntimeError("probe failure")
        tune.report({"score": 1.0})

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        grid = tune.Tuner(
            trainable, param_space={"fail": tune.grid_search([False, True])},
            run_config=tune.RunConfig(name="compat", storage_path=str(tmp_path), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        ).fit()
        with private_api_of("ray", ray.__version__, "ResultGrid._experiment_analysis.trials"):
            trials = _compat.result_grid_trials(grid)
            assert len(trials) == len(grid) == 2
            by_status = {t.status: t.config["fail"] for t in trials}
            assert by_status == {"TERMINATED": False, "ERROR": True}
            for res, trial in zip(grid, trials):  # same order as the grid's results
                assert (res.error is not None) == (trial.status == "ERROR") == trial.config["fail"]
    finally:
        if started:
            ray.shutdown()


def test_ray_restored_tuner_callbacks(tmp_path):
    import ray
    from ray import tune

    class Probe(tune.Callback):
        def __init__(self, tag: str) -> None:
            self.tag = tag

    def trainable(config):
        tune.report({"score": 1.0})

    tune.Tuner(trainable, run_config=tune.RunConfig(name="compat", storage_path=str(tmp_path), verbose=0,
                                                   callbacks=[Probe("saved")]))
    with private_api_of("ray", ray.__version__, "Tuner._local_tuner.get_run_config().callbacks"):
        restored = tune.Tuner.restore(str(tmp_path / "compat"), trainable=trainable)
        (probe,) = _compat.tuner_callbacks(restored)
        assert type(probe).__name__ == "Probe" and probe.tag == "saved"


@pytest.mark.slow
def test_ray_quiet_tune_output(tmp_path, monkeypatch, capfd):
    """Tuner.fit at verbose=0 prints none of Tune's own output (the new engine's configuration box
    and "View detailed results here" lines)."""
    import ray
    from ray import tune

    def trainable(config):
        tune.report({"score": 1.0})

    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    _compat.quiet_tune_output()
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        capfd.readouterr()
        grid = tune.Tuner(trainable, run_config=tune.RunConfig(name="quiet", storage_path=str(tmp_path),
                                                               verbose=0)).fit()
        out, err = capfd.readouterr()
    finally:
        if started:
            ray.shutdown()
    assert grid[0].metrics["score"] == 1.0
    with private_api_of("ray", ray.__version__, "the RAY_AIR_NEW_OUTPUT=0 switch to the legacy reporter"):
        for text in ("View detailed results", "Configuration for experiment", "Trial status"):
            assert text not in out + err, out + err


def test_torch_dataloader_persistent_workers_end():
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2, num_workers=1, persistent_workers=True)
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3]]
    workers = list(loader._iterator._workers)
    with private_api_of("torch", torch.__version__, "DataLoader._iterator._shutdown_workers"):
        _compat.end_dataloader_workers(loader)
    assert not any(w.is_alive() for w in workers) and loader._iterator is None
    _compat.end_dataloader_workers(loader)  # twice: nothing left to end
