"""``dcanets tune CONFIG.yaml``: validate, create or resume the search folder, run, report."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dcanets.tune import schema as tune_config
from dcanets.tune.report import report, summarize
from dcanets.tune.search import DEFAULT_OUTPUT, STATE, create_search_dir, run_search
from dcanets.validation import Count, argparse_type


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", type=Path, help="search YAML (see tune_configs/)")
    parser.add_argument("--schema", action="store_true",
                        help="print the JSON Schema of a search file (for editors) and exit")
    parser.add_argument("--resume", type=Path, metavar="DIR",
                        help="continue an interrupted search from its output folder (Tuner.restore)")
    parser.add_argument("--address", help="join a running Ray cluster: 'auto' or 'ray://host:10001'")
    parser.add_argument("--num-cpus", type=argparse_type(Count, "count"), help="CPUs of the local Ray (default: all)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"root folder of searches and of the default MLflow store (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<output>/mlflow.db)")
    parser.add_argument("--num-samples", type=argparse_type(Count, "count"), help="override tune_config.num_samples")
    parser.add_argument("--top", type=argparse_type(Count, "count"), default=5, help="rows in the final table")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    parser.add_argument("--worker-logs", action="store_true", help="forward trial stdout/stderr to the driver")


def run(args: argparse.Namespace) -> int:
    if args.schema:
        json.dump(tune_config.json_schema(), sys.stdout, indent=2)
        print()
        return 0
    if args.resume is None and args.config is None:
        raise ValueError("give a search config (e.g. tune_configs/quickstart.yaml) or --resume DIR")
    exp_dir, spec, state = _prepare(args)
    result = run_search(spec, exp_dir, state, address=args.address, num_cpus=args.num_cpus,
                        resume=args.resume is not None, quiet=args.quiet, worker_logs=args.worker_logs)
    report(result, spec, exp_dir, top=args.top)
    summarize(result, spec, exp_dir, state)
    return 130 if result["status"] == "KILLED" else 0


def _prepare(args: argparse.Namespace):
    """The experiment folder, the validated spec and the saved state (resume) or new ones."""
    if args.resume is not None:
        exp_dir = args.resume.expanduser().resolve()
        state_file = exp_dir / STATE
        if not state_file.is_file():
            raise FileNotFoundError(f"{exp_dir} is not a dcanets tune output folder (no {STATE})")
        state = json.loads(state_file.read_text())
        spec = tune_config.load(exp_dir / "config.yaml", base=Path(state["config_dir"]))
        tune_config.check_registries(spec)
        return exp_dir, spec, state
    spec = tune_config.load(args.config)
    tune_config.check_registries(spec)  # unknown model/optimizer: one error, before any output or Ray
    if args.num_samples is not None:
        spec.tune_config["num_samples"] = args.num_samples
    exp_dir, state = create_search_dir(spec, args.output, args.tracking_uri)
    return exp_dir, spec, state


