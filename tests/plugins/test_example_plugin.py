"""A real third-party package: pip-installed into a temporary target, discovered through its entry point.

The running environment is never changed: the package goes to ``pip install --target`` under
tmp_path and only a subprocess with that folder on PYTHONPATH sees it.
"""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).parents[2] / "plugins" / "examples" / "dcanets-tinymlp"
PROBE = ("import dcanets, timm, torch; m = timm.create_model('tinymlp', num_classes=4); "
         "print(m(torch.zeros(2, 1, 8, 8)).shape[1], dcanets.list_models()['tinymlp'])")


def _probe(extra_path=None):
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_install_into_target_and_discover(tmp_path):
    # build from a copy: an in-tree build would leave build/ and *.egg-info in the example folder
    src = shutil.copytree(EXAMPLE, tmp_path / "src", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(src)],
                   check=True, capture_output=True, text=True)
    out = _probe(target)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["4", "tinymlp"]
    without = _probe()
    assert without.returncode != 0
    assert "Unknown model (tinymlp)" in without.stderr
