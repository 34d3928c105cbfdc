"""MLflow for ``dcanets train``, only when asked: which store and experiment, if any.

Asked means one of: ``--tracking-uri URI``, ``--experiment NAME``, a ``tracking:`` section in the
``--config`` YAML (``{uri, experiment, enabled}``, the keys of a search file's ``tracking:``),
``MLFLOW_TRACKING_URI`` in the environment (MLflow's own variable), or a ``--resume`` of a run that
was tracked (it continues the same MLflow run). ``--no-tracking`` or ``tracking: {enabled: false}``
turns it off. Without any of these no store is created. The URI is the first given of the flag,
the file and the variable; a run asked for by ``--experiment`` or ``tracking:`` alone goes to
``sqlite:///<the runs' folder>/mlflow.db`` (``runs/train/mlflow.db`` by default), shared by the runs
under it as a search's is. The run itself: :class:`dcanets.engine.tracking.RunTracker`.
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from dcanets.engine.config import TrainConfig
from dcanets.engine.tracking import URI_VARIABLE, RunTracker, choose_uri

DEFAULT_EXPERIMENT = "dcanets-train"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", metavar="URI",
                        help=f"log the run to MLflow there (default: ${URI_VARIABLE} if set; without either, "
                             "and without --experiment or tracking: in --config, nothing is logged)")
    parser.add_argument("--experiment", metavar="NAME",
                        help=f"MLflow experiment of the run (default: {DEFAULT_EXPERIMENT}); turns tracking on")
    parser.add_argument("--no-tracking", action="store_true", help=f"log nothing to MLflow, even with ${URI_VARIABLE}")


def section(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``tracking:`` section of the ``--config`` file ({} when none), validated as a search's."""
    import yaml

    from dcanets.tune.schema import Tracking
    from dcanets.validation import format_problems, problems_of

    config = getattr(args, "config", None)
    if not config or not Path(config).is_file():
        return {}
    loaded = yaml.safe_load(Path(config).read_text()) or {}
    raw = loaded.get("tracking") if isinstance(loaded, dict) else None
    if raw is None:
        return {}
    from pydantic import ValidationError

    try:
        return Tracking.model_validate(raw).model_dump(exclude_unset=True)
    except ValidationError as exc:
        raise ValueError(f"{config}: {format_problems(problems_of(exc, Tracking, 'tracking'))}") from None


def tracker_for(args: argparse.Namespace, cfg: TrainConfig) -> Optional[RunTracker]:
    """The run's tracker, started (its store checked and its run open), or None when not asked."""
    import os

    output = Path(str(cfg.output))
    if args.no_tracking:
        return None
    resumed = RunTracker.resumed(output) if getattr(args, "resume", None) else None
    if resumed is not None:
        if args.tracking_uri and args.tracking_uri != resumed.uri:
            raise ValueError(f"--tracking-uri cannot change a resumed run: it is logged to {resumed.uri} "
                             "(drop --tracking-uri, or --no-tracking)")
        resumed.start(cfg.to_dict(), output.name)
        return resumed
    given = section(args)
    asked = bool(args.tracking_uri or args.experiment or given or os.environ.get(URI_VARIABLE, "").strip())
    if not asked or given.get("enabled", True) is False:
        return None
    uri, origin = choose_uri(args.tracking_uri, given.get("uri"), output.resolve().parent)
    tracker = RunTracker(uri, args.experiment or given.get("experiment") or DEFAULT_EXPERIMENT, output, origin)
    tracker.start(cfg.to_dict(), output.name)
    return tracker


def flags(args: argparse.Namespace) -> List[str]:
    """The MLflow flags of ``args`` as given, for the ranks of ``dcanets train --nproc`` (rank 0 logs)."""
    out = [f for flag, value in (("--tracking-uri", args.tracking_uri), ("--experiment", args.experiment))
           if value for f in (flag, str(value))]
    return out + (["--no-tracking"] if args.no_tracking else [])


class _Untracked:
    """What the train command calls when no MLflow run is asked for: nothing happens."""

    def on_epoch(self, callback: Optional[Callable[[Dict[str, Any]], None]]) -> Any:
        return callback

    def finish(self, final: Dict[str, Any]) -> None:
        pass


@contextlib.contextmanager
def tracked(tracker: Optional[RunTracker]) -> Iterator[Any]:
    """``tracker`` as a context (its run ended however the block ends), or a tracker that does nothing."""
    if tracker is None:
        yield _Untracked()
        return
    with tracker:
        yield tracker


__all__ = ["DEFAULT_EXPERIMENT", "add_arguments", "flags", "section", "tracked", "tracker_for"]
