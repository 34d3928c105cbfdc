"""A real third-party package: pip-installed, discovered through its entry point, uninstalled."""
import pathlib
import subprocess
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).parents[2] / "plugins" / "examples" / "dcanets-tinymlp"
PROBE = ("import dcanets, timm, torch; m = timm.create_model('tinymlp', num_classes=4); "
         "print(m(torch.zeros(2, 1, 8, 8)).shape[1], dcanets.list_models()['tinymlp'])")


def _pip(*args):
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                   check=True, capture_output=True, text=True)


def _probe():
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)


@pytest.mark.slow
def test_install_discover_uninstall(tmp_path):
    _pip("install", "--no-deps", "--no-build-isolation", str(EXAMPLE))
    try:
        out = _probe()
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["4", "tinymlp"]
    finally:
        _pip("uninstall", "-y", "dcanets-tinymlp")
    gone = _probe()
    assert gone.returncode != 0
    assert "Unknown model (tinymlp)" in gone.stderr
