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
from typing import Any, Dict, Optional

import torch

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
    read with ``weights_only=True``, so a crafted file cannot run code.
    """
    import timm

    import dcanets  # noqa: F401  (plugin model names into timm's registry)

    spec, weights = _read(uri, tracking_uri)
    model = timm.create_model(spec["model"], **spec["kwargs"])
    model.load_state_dict(weights)
    return model.eval()


def _read(uri: str, tracking_uri: Optional[str]) -> tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """``model.yaml`` and the state_dict of a local folder, or of a download of ``uri``."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="dcanets-model-") as tmp:
        folder = Path(uri) if Path(uri).is_dir() else _download(uri, tracking_uri, tmp)
        if not (folder / SPEC).is_file() or not (folder / WEIGHTS).is_file():
            raise ValueError(f"{uri}: not a model saved by dcanets (it needs {WEIGHTS} and {SPEC}, e.g. the "
                             "best_model artifact of a dcanets tune search)")
        return yaml.safe_load((folder / SPEC).read_text()), load_checkpoint(folder / WEIGHTS)


def _download(uri: str, tracking_uri: Optional[str], dst: str) -> Path:
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst, tracking_uri=tracking_uri))
