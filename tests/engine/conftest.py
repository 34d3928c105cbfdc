"""Engine tests run on one torch thread with their own decode cache."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    """One torch thread: on a loaded 2-core machine two threads spin against each other."""
    monkeypatch.setenv("DCANETS_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
