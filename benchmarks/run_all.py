"""Run every benchmark script in quick mode (what CI does); exits non-zero if any fails."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"run_all.py", "common.py"}


def main() -> int:
    mode = sys.argv[1:] or ["--quick"]
    scripts = sorted(p for p in HERE.glob("*.py") if p.name not in SKIP and not p.name.startswith("_"))
    failed = []
    for script in scripts:
        t0 = time.perf_counter()
        print(f"== {script.name} {' '.join(mode)}", flush=True)
        code = subprocess.run([sys.executable, str(script), *mode], cwd=HERE).returncode
        verdict = "ok" if code == 0 else f"FAILED ({code})"
        print(f"== {script.name}: {verdict} in {time.perf_counter() - t0:.1f}s", flush=True)
        if code:
            failed.append(script.name)
    print(f"{len(scripts) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
