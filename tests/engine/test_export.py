"""A trained model exported as model.pt + model.yaml and loaded back from a local folder (the
MLflow ``runs:/`` URIs: tests/tune/test_search.py and test_mlflow_server.py)."""
import pytest
import torch
import yaml
from engine_runs import CodeRunningPayload

import dcanets
from dcanets.engine import TrainConfig, train
from dcanets.engine.export import export_model
from dcanets.engine.loop import build_model


def test_an_exported_model_loads_back_as_the_engine_built_it(tmp_path):
    cfg = TrainConfig(model="cifar_resnet20", data="digits", limit=100, epochs=1, batch_size=50,
                      model_kwargs={"shortcut_type": "pad"}, output=str(tmp_path / "run"))
    train(cfg, progress=False)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    export_model(tmp_path / "run" / "last.pt", tmp_path / "model", trial_id="t1")
    spec = yaml.safe_load((tmp_path / "model" / "model.yaml").read_text())
    assert spec["model"] == "cifar_resnet20" and spec["trial_id"] == "t1" and spec["epoch"] == 1
    assert spec["kwargs"] == {"num_classes": 10, "in_chans": 1, "shortcut_type": "pad"}

    model = dcanets.load_model(str(tmp_path / "model"))
    engine_model = build_model(cfg, num_classes=10, in_chans=1)
    engine_model.load_state_dict(ckpt["model"])
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not model.training and torch.equal(model(x), engine_model.eval()(x))


def test_weights_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"model": "cifar_resnet20", "kwargs": {}}))
    torch.save({"conv1.weight": CodeRunningPayload(marker)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="refusing to load"):
        dcanets.load_model(str(tmp_path))
    assert not marker.exists()


def test_a_folder_without_a_model_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="not a model saved by dcanets"):
        dcanets.load_model(str(tmp_path))
