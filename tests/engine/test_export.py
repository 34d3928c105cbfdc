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


@pytest.mark.parametrize("spec, refused", [
    ({"model": "hf-hub:timm/resnet18.a1_in1k", "kwargs": {}}, "model 'hf-hub:timm/resnet18.a1_in1k' is not a model "
                                                              "name registered in timm"),
    ({"model": "resnet18.a1_in1k", "kwargs": {}}, "model 'resnet18.a1_in1k' is not a model name registered"),
    ({"model": "cifar_resnet20", "kwargs": {"checkpoint_path": "{secret}"}}, "refusing kwargs.checkpoint_path: timm "
                                                                             "would load weights"),
    ({"model": "cifar_resnet20", "kwargs": {"pretrained": True}}, "refusing kwargs.pretrained"),
    ({"model": "cifar_resnet20", "kwargs": {"pretrained_cfg_overlay": {"file": "{secret}"}}},
     "refusing kwargs.pretrained_cfg_overlay"),
    ({"model": "cifar_resnet20", "kwargs": {"shortcut_type": "{secret}"}}, "refusing kwargs.shortcut_type: '.*' "
                                                                           "looks like a path or a URL"),
    ({"model": "cifar_resnet20", "kwargs": {"block_args": [{"url": "https://example.invalid/w.pt"}]}},
     "refusing kwargs.block_args: 'https://example.invalid/w.pt' looks like a path or a URL"),
    ({"model": "cifar_resnet20", "kwargs": {"when": "2020-01-01"}}, "refusing kwargs.when: a date is not a plain"),
])
def test_a_model_yaml_that_would_make_timm_fetch_or_read_is_refused(spec, refused, tmp_path, monkeypatch):
    """model.yaml is an artifact: timm is never asked to build from a hub name, a pretrained tag or
    kwargs it would follow (checkpoint_path, pretrained_cfg_overlay.file, a path or URL value)."""
    import re

    import timm

    secret = tmp_path / "secret.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, secret)
    text = yaml.safe_dump(spec).replace("{secret}", str(secret)).replace("'2020-01-01'", "2020-01-01")
    (tmp_path / "model.yaml").write_text(text)
    torch.save({}, tmp_path / "model.pt")
    built = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append((a, k)))
    with pytest.raises(ValueError) as info:
        dcanets.load_model(str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{tmp_path}: model.yaml: ")
    assert re.search(refused, message), message
    assert built == []  # refused before timm saw any of it


def test_an_alias_bomb_in_model_yaml_is_one_line(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (tmp_path / "model.yaml").write_text("\n".join(lines) + "\nmodel: cifar_resnet20\nkwargs: {x: *a8}\n")
    torch.save({}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"model.yaml is not valid YAML: its aliases expand to more than 100000 "):
        dcanets.load_model(str(tmp_path))
