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
