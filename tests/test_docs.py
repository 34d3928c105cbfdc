"""Every fenced ```python and ```bash block of README.md and docs/*.md, run as written.

What a block may rely on (say so in the page if a block needs more):

- each page runs in a fresh folder of its own, its blocks in page order: a file a block writes
  (``runs/...``, ``best.yaml``) is there for the page's later blocks; the repository's top-level
  folders (``tune_configs/``, ``benchmarks/``, ``plugins/``, ...) are linked into it, so paths
  relative to a clone's root work;
- a ```bash block runs in ``bash -eo pipefail`` (every command must succeed) with this
  environment's ``dcanets``, ``python`` and ``mlflow`` first on PATH, ``OMP_NUM_THREADS=1``, a
  fresh ``DCANETS_CACHE`` and no ``MLFLOW_TRACKING_URI``;
- a ```python block runs in this test process (in a fresh namespace, as ``__main__``), so the
  imports of torch and timm are paid once: blocks share nothing but those modules.

A block that cannot run here (needs a GPU, a cluster, S3, the CIFAR-10 tar, a tracking server, or
is a fragment of a larger file) has the line ``<!-- docs-test: skip: <reason> -->`` right above
its opening fence, and is reported as skipped with that reason.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = ("python", "bash")
SKIP = re.compile(r"^<!-- docs-test: skip: (?P<reason>.+?) -->$")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
BLOCK_TIMEOUT_S = 600

pytestmark = pytest.mark.slow


class Block(NamedTuple):
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    skip: Optional[str]

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> List[Block]:
    """The page's python and bash blocks, each with the skip reason written above it (if any)."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        if fence["lang"] in LANGUAGES:
            marker = SKIP.match(lines[i - 1].strip()) if i else None
            out.append(Block(page, i + 1, fence["lang"], "\n".join(lines[i + 1:end]) + "\n",
                             marker["reason"] if marker else None))
        i = end + 1
    return out


BLOCKS = [b for page in PAGES for b in blocks_of(page)]
_FOLDERS: Dict[Path, Path] = {}


def _folder(page: Path, factory: pytest.TempPathFactory) -> Path:
    """The page's own folder, with the clone's top-level folders linked into it."""
    if page not in _FOLDERS:
        folder = factory.mktemp(page.stem)
        for entry in ROOT.iterdir():
            if entry.name not in (".git", "runs", ".tox") and not entry.name.startswith("."):
                (folder / entry.name).symlink_to(entry)
        _FOLDERS[page] = folder
    return _FOLDERS[page]


def _environment(folder: Path) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               DCANETS_CACHE=str(folder / ".cache"), MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    return env


def test_every_marker_is_right_above_a_block_and_says_why():
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if "docs-test:" in line:
                assert SKIP.match(line.strip()), f"{page.name}:{i + 1}: write <!-- docs-test: skip: <reason> -->"
                assert i + 1 < len(lines) and FENCE.match(lines[i + 1]), f"{page.name}:{i + 1}: not above a fence"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_block_runs(block: Block, tmp_path_factory, monkeypatch):
    if block.skip:
        pytest.skip(block.skip)
    folder = _folder(block.page, tmp_path_factory)
    if block.lang == "bash":
        proc = subprocess.run(["bash", "-eo", "pipefail", "-c", block.code], cwd=folder, env=_environment(folder),
                              capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        assert proc.returncode == 0, (f"{block.name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                      f"{proc.stderr[-3000:]}")
        return
    monkeypatch.chdir(folder)
    for key, value in _environment(folder).items():
        monkeypatch.setenv(key, value)
    exec(compile(block.code, block.name, "exec"), {"__name__": "__main__"})
