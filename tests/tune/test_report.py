"""What a finished search writes (``dcanets/tune/report.py``), on hand-made trial results."""
from __future__ import annotations

import matplotlib.figure

from dcanets.tune import report, schema
from dcanets.tune.state import TrialResult


def test_curves_name_each_trial_by_its_sampled_values(tmp_path, monkeypatch, write_config):
    """NegNet and ResNet trials are told apart in curves.png by their legend, not by trial ids alone."""
    spec = schema.load(write_config(tmp_path))
    history = ({"epoch": 1, "val_acc": 0.5, "train_loss": 1.0}, {"epoch": 2, "val_acc": 0.7, "train_loss": 0.6})
    trials = [TrialResult(trial_id=f"t{i}", status="TERMINATED", params={"model": model, "lr": 0.0123},
                          history=history, best=0.7, node_id=None, checkpoint=None)
              for i, model in enumerate(["cifar_negnet20", "cifar_resnet20"])]
    seen = []
    legend = matplotlib.figure.Figure.legend

    def spy(self, *args, **kwargs):
        seen.extend(args[1] if len(args) > 1 else kwargs.get("labels", []))
        return legend(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "legend", spy)
    report.plot_curves(trials, spec, tmp_path / "curves.png")
    assert seen == ["t0 model=cifar_negnet20 lr=0.0123", "t1 model=cifar_resnet20 lr=0.0123"]
    assert (tmp_path / "curves.png").stat().st_size > 1000
