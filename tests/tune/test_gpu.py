"""A search whose trials share one GPU (``resources: {gpu: 0.5}``): both run on it, side by side.

Marked ``cuda``; skipped with its reason where no GPU is present. MLflow tracking is switched off
here so the test needs only Ray, Optuna and the engine on the GPU machine.
"""
import pytest
import torch
import yaml

pytestmark = [pytest.mark.cuda, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA path is not run")]


def test_two_trials_share_one_gpu(tmp_path, monkeypatch):
    import ray

    from dcanets.tune import schema
    from dcanets.tune.search import create_search_dir, run_search

    monkeypatch.setenv("DCANETS_CACHE", str(tmp_path / "cache"))
    doc = {
        "name": "gpu-share",
        "train": {"data": "synthetic:4096", "epochs": 3, "batch_size": 128, "model": "cifar_resnet20",
                  "sched": "cosine", "amp": True},
        "space": {"lr": {"type": "choice", "values": [0.05, 0.1]}},
        "search_alg": {"sampler": {"type": "RandomSampler", "seed": 0}},
        "scheduler": {"type": "FIFOScheduler"},
        "tune_config": {"metric": "val_acc", "mode": "max", "num_samples": 2, "max_concurrent_trials": 2},
        "resources": {"cpu": 1, "gpu": 0.5},
        "tracking": {"enabled": False},
    }
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    if ray.is_initialized():
        ray.shutdown()
    spec = schema.load(path)
    state = create_search_dir(spec, tmp_path / "out")
    result = run_search(spec, state, num_cpus=2, quiet=True)
    trials = result.trials
    assert result.status == "FINISHED" and len(trials) == 2
    assert all(t.status == "TERMINATED" and t.epochs == 3 for t in trials)
    # Ray hands each trial the same GPU (half of it) through CUDA_VISIBLE_DEVICES
    assert [t.history[-1]["gpu_ids"] for t in trials] == ["0", "0"]
    spans = [(h[0]["timestamp"] - h[0]["time_total_s"], h[-1]["timestamp"]) for h in (t.history for t in trials)]
    (a0, a1), (b0, b1) = spans
    assert a0 <= b1 + 1 and b0 <= a1 + 1, f"the two trials did not overlap in time: {spans}"
