"""A trained model as a folder anyone can load back: ``model.pt`` (the state_dict) + ``model.yaml``.

Why not ``last.pt``: it is for resuming (optimizer, schedule, every RNG state) and needs the data
set to rebuild the model, since the class and channel counts come from the data. Why not
``mlflow.pytorch.log_model``: it pickles the whole module, and loading a pickle can run code. The
folder holds tensors only (read with ``torch.load(weights_only=True)``) and, in YAML, the timm name
and keyword arguments that rebuild the network (``timm.create_model(model, **kwargs)``, dcanets
plugin names included), with the class names and the input normalisation the engine trained with.
``dcanets tune`` logs the best trial's final weights this way (artifact ``best_model/`` of the
search's parent MLflow run), and :func:`load_model` reads them back from any MLflow artifact URI
or a local folder.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from dcanets import safe_yaml
from dcanets.engine.checkpoint import load_checkpoint

WEIGHTS, SPEC = "model.pt", "model.yaml"


def export_model(checkpoint: str | Path, folder: str | Path, **info: Any) -> Path:
    """Write ``folder/model.pt`` and ``folder/model.yaml`` from an engine checkpoint (``last.pt``).

    ``info`` (e.g. the trial id and its metric) is kept in ``model.yaml`` for the record. The
    keyword arguments are those the engine built the network with: the class and channel counts
    of its training data, then ``model_kwargs``.
    """
    ckpt = load_checkpoint(checkpoint)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = ckpt["config"]
    kwargs = {"num_classes": len(ckpt["classes"]), "in_chans": len(ckpt["mean"]), **cfg["model_kwargs"]}
    spec = {"model": cfg["model"], "kwargs": kwargs, "epoch": int(ckpt["epoch"]),
            "classes": [str(c) for c in ckpt["classes"]],
            # the engine feeds (image / 255 - mean) / std, per channel
            "mean": [float(m) for m in ckpt["mean"]], "std": [float(s) for s in ckpt["std"]], **info}
    import yaml

    torch.save(ckpt["model"], folder / WEIGHTS)
    (folder / SPEC).write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


def load_model(uri: str, tracking_uri: Optional[str] = None) -> torch.nn.Module:
    """The network saved by :func:`export_model`, rebuilt by timm and in eval mode.

    ``uri`` is an MLflow artifact URI (``runs:/<run_id>/best_model``, ``mlflow-artifacts:/...``,
    ``s3://...``) or a local folder; ``tracking_uri`` is the MLflow store that resolves a
    ``runs:/`` URI (default: ``MLFLOW_TRACKING_URI``, as everywhere in MLflow). The weights are
    read with ``weights_only=True``, so a crafted file cannot run code, and ``model.yaml`` is read by
    :func:`trusted_spec`, so it cannot make timm fetch or read anything either.
    """
    import timm

    import dcanets  # noqa: F401  (plugin model names into timm's registry)

    spec, weights = _read(uri, tracking_uri)
    name, kwargs = trusted_spec(spec, f"{uri}: {SPEC}")
    model = timm.create_model(name, **kwargs)
    model.load_state_dict(weights)
    return model.eval()


# timm.create_model's own arguments that load weights or configs from a hub, a URL or a path: an
# artifact that sets them would make the loader follow them (e.g. checkpoint_path=/any/file)
FOLLOWED = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")
PLAIN = (bool, int, float, str, type(None))


def trusted_spec(spec: Any, source: str) -> Tuple[str, Dict[str, Any]]:
    """The timm name and keyword arguments of a ``model.yaml``, if they are safe to build from.

    An artifact is data from elsewhere (an MLflow store, a shared folder): only a model name
    registered in timm (dcanets plugins included; no ``hf-hub:`` or other source prefix, no
    pretrained tag) and keyword arguments that are plain values are accepted, never one of timm's
    arguments that fetch or read weights and configs (:data:`FOLLOWED`) nor a string that looks
    like a path or a URL. Anything else is one ValueError line naming what was refused.
    """
    import timm

    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs") or {}, dict):
        raise ValueError(f"{source}: not a model description (a mapping with 'model' and 'kwargs')")
    name, kwargs = spec.get("model"), dict(spec.get("kwargs") or {})
    if not isinstance(name, str) or name not in timm.list_models():
        raise ValueError(f"{source}: model {name!r} is not a model name registered in timm; dcanets loads only "
                         "registered names (no hub or file sources)")
    for key, value in kwargs.items():
        why = _followed(key, value)
        if why:
            raise ValueError(f"{source}: refusing kwargs.{key}: {why}; a saved model holds plain keyword values "
                             "only, never weights, paths or URLs for the loader to follow")
    return name, kwargs


def _followed(key: Any, value: Any) -> Optional[str]:
    """Why ``key: value`` may not be passed to ``timm.create_model`` (None: it may)."""
    if not isinstance(key, str):
        return f"the key {key!r} is not text"
    if key in FOLLOWED:
        return "timm would load weights or a config it names"
    if isinstance(value, (list, tuple, dict)):  # each item (a mapping's under its own key) as a value
        items = value.items() if isinstance(value, dict) else ((key, v) for v in value)
        return next((why for k, v in items if (why := _followed(k, v))), None)
    if not isinstance(value, PLAIN):
        return f"a {type(value).__name__} is not a plain value"
    if isinstance(value, str) and ("/" in value or "\\" in value or ":" in value or value.startswith(("~", "."))):
        return f"{value!r} looks like a path or a URL"
    return None


def _read(uri: str, tracking_uri: Optional[str]) -> tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """``model.yaml`` and the state_dict of a local folder, or of a download of ``uri``."""
    import yaml

    from dcanets.validation import yaml_problem

    with tempfile.TemporaryDirectory(prefix="dcanets-model-") as tmp:
        folder = Path(uri) if Path(uri).is_dir() else _download(uri, tracking_uri, tmp)
        if not (folder / SPEC).is_file() or not (folder / WEIGHTS).is_file():
            raise ValueError(f"{uri}: not a model saved by dcanets (it needs {WEIGHTS} and {SPEC}, e.g. the "
                             "best_model artifact of a dcanets tune search)")
        try:
            spec = safe_yaml.load((folder / SPEC).read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"{uri}: {SPEC} is not valid YAML: {yaml_problem(exc)}") from None
        return spec, load_checkpoint(folder / WEIGHTS)


def _download(uri: str, tracking_uri: Optional[str], dst: str) -> Path:
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst, tracking_uri=tracking_uri))
