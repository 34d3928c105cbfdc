"""``dcanets tune CONFIG.yaml``: validate, create or resume the search folder, run, report.

Every way a search can go wrong ends in one line on stderr and a non-zero status: a problem in
the YAML, the flags, the output folder, the MLflow store or the cluster's resources (status 2,
before Ray starts any trial), every trial failed (status 1), and an interrupted search (status
130, with the ``--resume`` command). Ray is imported only after its environment is set up.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple

from dcanets.engine.atomic import DiskFull
from dcanets.engine.divergence import describe, first_diverged
from dcanets.tune import editor_schema, raytoken, schema
from dcanets.tune import storage as search_storage
from dcanets.tune.state import DIVERGED, STATE, STATE_FILES, TRIALS, SearchState
from dcanets.validation import Count, argparse_type

if TYPE_CHECKING:
    from dcanets.tune.state import SearchResult

DEFAULT_OUTPUT = Path("runs") / "tune"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.error = _one_line_error.__get__(parser)  # type: ignore[method-assign]
    parser.add_argument("config", nargs="?", type=Path, help="search YAML (see tune_configs/)")
    parser.add_argument("--schema", action="store_true",
                        help="print the JSON Schema of a search file (for editors) and exit")
    parser.add_argument("--resume", metavar="DIR|URI",
                        help="continue an interrupted search (Tuner.restore) with the config saved with it: its "
                             "output folder, or its folder in the storage (e.g. s3://bucket/prefix/<name>-<time>)")
    parser.add_argument("--storage", type=_storage_flag, metavar="DIR|URI",
                        help="where Ray keeps checkpoints and results, reachable from every node: a shared "
                             "folder or a URI such as s3://bucket/prefix (overrides storage: in the config)")
    parser.add_argument("--address", help="join a running Ray cluster: 'auto' or 'ray://host:10001'")
    parser.add_argument("--num-cpus", type=argparse_type(Count, "count"), help="CPUs of the local Ray (default: all)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"root folder of searches and of the default MLflow store (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (overrides tracking.uri; default: "
                                               "$MLFLOW_TRACKING_URI, else sqlite:///<output>/mlflow.db)")
    parser.add_argument("--num-samples", type=argparse_type(Count, "count"), help="override tune_config.num_samples")
    parser.add_argument("--top", type=argparse_type(Count, "count"), default=5, help="rows in the final table")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    parser.add_argument("--worker-logs", action="store_true", help="forward trial stdout/stderr to the driver")


def _storage_flag(text: str) -> str:
    try:
        return search_storage.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _one_line_error(parser: argparse.ArgumentParser, message: str):
    """A wrong flag value ends in one line that names it (argparse would print the usage first)."""
    parser.exit(2, f"dcanets tune: error: {message} (see dcanets tune --help)\n")


def check(args: argparse.Namespace) -> None:
    """The first line, at once (before torch, timm and Ray are imported: 10-30 s on 2 cores, then
    Ray's start and the first trial's imports), so a search never starts in silence."""
    if args.schema or (args.resume is None and args.config is None):
        return
    what = f"resuming {args.resume}" if args.resume is not None else str(args.config)
    where = f"joining the Ray cluster at {args.address}" if args.address else "a local Ray"
    print(f"dcanets tune: {what}: checking the search file, then {where}; one line per trial epoch follows",
          flush=True)


def run(args: argparse.Namespace) -> int:
    if args.schema:
        json.dump(editor_schema.json_schema(), sys.stdout, indent=2)
        print()
        return 0
    if args.resume is None and args.config is None:
        raise ValueError("give a search config (e.g. tune_configs/quickstart.yaml) or --resume DIR")
    configure_ray_auth(args.address)
    if args.resume is not None:
        _check_resume_flags(args)
    spec, state = _prepare(args)
    print(f"dcanets tune: {spec.name}: {spec.tune_config.num_samples} trial(s) of up to {spec.train['epochs']} "
          f"epoch(s); outputs in {state.folder}; starting Ray", flush=True)

    from dcanets.tune.report import report, summarize
    from dcanets.tune.search import SearchInterrupted, run_search

    location = state.location
    exposed = raytoken.exposure()  # a valid search is about to use the token: is it private?
    if exposed:
        print(f"dcanets tune: warning: {exposed}", file=sys.stderr)
    try:
        result = run_search(spec, state, address=args.address, num_cpus=args.num_cpus,
                            resume=args.resume is not None, quiet=args.quiet, worker_logs=args.worker_logs)
    except SearchInterrupted as exc:  # a second signal, or one before Tune started the trials
        if exc.started:
            print(f"dcanets tune: interrupted ({exc.signal_name} received): continue with  "
                  f"{location.resume_command()}", file=sys.stderr)
        else:
            _discard_unstarted(args, state.folder, location)
            print(f"dcanets tune: interrupted ({exc.signal_name} received) before any trial started; "
                  f"nothing to resume", file=sys.stderr)
        return 130
    except DiskFull as exc:  # the runs ended KILLED; what Tune saved last stands
        _discard_unstarted(args, state.folder, location)
        then = (f"then continue with  {location.resume_command()}" if location.started() else
                "the search had not started, nothing to resume")
        print(f"dcanets tune: error: {exc}; {then}", file=sys.stderr)
        return 2
    except BaseException:
        _discard_unstarted(args, state.folder, location)  # e.g. no node has the resources a trial asks for
        raise
    report(result, spec, state, top=args.top)
    search_storage.copy_files(location, state.folder, search_storage.RESULT_FILES)
    summarize(result, spec, state)
    _warn_failed_trials(result, spec)
    return {"KILLED": 130, "FAILED": 1}.get(result.status, 0)


def _warn_failed_trials(result: "SearchResult", spec: schema.TuneSpec) -> None:
    """One stderr line when a search finished (status 0: its best trial is usable) with some trials
    failed, e.g. on a node that died: otherwise only their ERROR rows in the table would say so."""
    diverged = [t for t in result.trials if t.status == DIVERGED]
    if diverged:  # failures too, whatever the search's status: never left to a row of the table
        print(f"dcanets tune: warning: {len(diverged)} of {len(result.trials)} trial(s) diverged (trial "
              f"{diverged[0].trial_id} {describe(first_diverged(diverged[0].history) or {})}); they are kept in "
              "trials.csv as DIVERGED, never ranked", file=sys.stderr)
    failed = [t for t in result.trials if t.status == "ERROR"]
    if result.status != "FINISHED" or not failed:
        return
    first = f"; first error: {result.errors[0]}" if result.errors else ""
    retry = ("" if spec.failure_config.max_failures else
             "; failure_config: {max_failures: N} retries a failed trial from its last checkpoint")
    print(f"dcanets tune: warning: {len(failed)} of {len(result.trials)} trial(s) failed{first}{retry}",
          file=sys.stderr)


def configure_ray_auth(address: str | None) -> None:
    """Token authentication configured rather than left to Ray's default, which warns on every run.

    Ray 2.60 turns token authentication on for a new local cluster when ``RAY_AUTH_MODE`` is unset
    (and then logs "Token authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt out");
    joining with ``--address auto`` it does the same when a token exists. Saying so explicitly
    (``RAY_AUTH_MODE=token``; Ray creates ``~/.ray/auth_token`` if there is none) keeps the same,
    authenticated, cluster and the warning away. A mode the user set is left alone, and so is an
    explicit address (Ray then follows the user's settings). Only before Ray is imported: Ray reads
    the mode once, when it is loaded. The token file a local Ray needs is created readable by its
    owner only (Ray would make it world-readable; :mod:`dcanets.tune.raytoken`).
    """
    if "RAY_AUTH_MODE" in os.environ or "ray" in sys.modules:
        return
    if address is None:
        os.environ["RAY_AUTH_MODE"] = "token"
        raytoken.create_private_token()
    elif address == "auto" and _ray_token_available():
        os.environ["RAY_AUTH_MODE"] = "token"


def _ray_token_available() -> bool:
    """Where Ray looks for a token: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).expanduser().is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()


def _check_resume_flags(args: argparse.Namespace) -> None:
    """A resumed search runs with what it was started with; flags that would change it are refused.
    ``--output`` is accepted with a storage URI: it is where the search folder is made again."""
    output = None if search_storage.is_uri(args.resume) else args.output
    for flag, value in (("--num-samples", args.num_samples), ("--tracking-uri", args.tracking_uri),
                        ("--output", output), ("--storage", args.storage)):
        if value is not None:
            raise ValueError(f"{flag} cannot change a resumed search (it continues with the settings saved in "
                             f"{args.resume}); drop {flag}, or start a new search without --resume")


def _check_same_config(config: Optional[Path], saved: Path) -> None:
    if config is None:
        return
    given, kept = _yaml_or_none(config), _yaml_or_none(saved)
    if given is None or given != kept:
        raise ValueError(f"--resume continues a search with its saved config ({saved}), and {config} "
                         f"differs from it: drop {config} to resume, or start a new search without --resume")


def _yaml_or_none(path: Path):
    import yaml

    from dcanets import safe_yaml

    try:
        return safe_yaml.load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _prepare(args: argparse.Namespace) -> Tuple[schema.TuneSpec, SearchState]:
    """The validated spec and the search's state: a new search folder, or the resumed one."""
    if args.resume is not None:
        return _prepare_resume(args)
    spec = schema.load(args.config)
    schema.check_registries(spec)  # unknown model/optimizer: one error, before any output or Ray
    if args.num_samples is not None:
        spec.tune_config.num_samples = args.num_samples
    from dcanets.tune.search import create_search_dir

    root = (args.output or DEFAULT_OUTPUT).expanduser()
    try:
        state = create_search_dir(spec, root, args.tracking_uri, storage=args.storage)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ValueError(f"--output {root}: cannot create the search folder there ({why}); "
                         "give a writable folder") from None
    return spec, state


def _prepare_resume(args: argparse.Namespace) -> Tuple[schema.TuneSpec, SearchState]:
    """The search folder (fetched from the storage first when ``--resume`` is a URI), its spec and state."""
    where = args.resume
    if search_storage.is_uri(where):
        exp_dir = _fetch_from_storage(where, (args.output or DEFAULT_OUTPUT).expanduser())
    else:
        exp_dir = Path(where).expanduser().resolve()
    state = _read_state(where, exp_dir)
    location = state.location
    if not location.exists(search_storage.TUNER_STATE):
        raise ValueError(f"--resume {where}: the search never started (no Ray Tune state in {location.uri}); "
                         "start it again without --resume")
    if state.status == "FINISHED":
        raise ValueError(f"--resume {where}: this search already finished; its results are in that folder "
                         "(start a new search to run more trials)")
    _check_same_config(args.config, exp_dir / "config.yaml")
    spec = schema.load(exp_dir / "config.yaml", base=Path(state.config_dir))
    schema.check_registries(spec)
    if spec.tracking.enabled:
        _check_tracking_store(where, state.tracking_uri)
    return spec, state


def _read_state(where: str, exp_dir: Path) -> SearchState:
    """``search.json`` of a search folder, one line when it is missing or damaged. A folder that
    holds Ray's state itself (a search folder in a shared storage, given by its path) is where
    the search is kept, whatever path that storage had on the machine that started it."""
    state_file = exp_dir / STATE
    if not exp_dir.is_dir():
        raise ValueError(f"--resume {where}: no such folder (give the folder a search printed as "
                         "'outputs: ...', e.g. runs/tune/<name>-<time>, or its storage URI)")
    if not state_file.is_file():
        raise ValueError(f"--resume {where}: not a dcanets tune output folder (no {STATE}); give the folder "
                         "a search printed as 'outputs: ...'")
    state = _load_state(where, exp_dir)
    if state.storage and (exp_dir / search_storage.TUNER_STATE).is_file():
        state.move_storage(str(exp_dir.parent))
    return state


def _load_state(where: str, exp_dir: Path) -> SearchState:
    try:
        return SearchState.load(exp_dir)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--resume {where}: {STATE} is unreadable or damaged ({exc}); the search cannot "
                         "be resumed, start it again") from None


def _fetch_from_storage(uri: str, output: Path) -> Path:
    """``<output>/<name>-<time>/`` made again from a search's storage: config.yaml and search.json,
    with the storage set to the URI given (this machine may reach it by another endpoint)."""
    location = search_storage.Location.open(uri)
    if not location.exists(STATE):
        raise ValueError(f"--resume {uri}: not a dcanets tune search in the storage (no {STATE} there); give "
                         "the URI a search printed in its resume command, e.g. s3://bucket/prefix/<name>-<time>")
    exp_dir = output.resolve() / location.name
    try:
        location.get(STATE_FILES, exp_dir)
        location.get_folder(TRIALS, exp_dir / TRIALS)  # the trial records (none for an earlier version's search)
    except OSError as exc:
        raise ValueError(f"--output {output}: cannot make the search folder there ({exc.strerror or exc})") from None
    _load_state(uri, exp_dir).move_storage(search_storage.split(uri)[0])
    return exp_dir


def _check_tracking_store(where: str, uri: str) -> None:
    """A resumed search reopens its MLflow runs: a SQLite store that is not on this machine (a
    search resumed from its storage elsewhere) is one line, before Ray starts."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix):]).is_file():
        raise ValueError(f"--resume {where}: the search's MLflow store {uri} is not on this machine; resume it "
                         "where that file is, or give searches resumed elsewhere a tracking server "
                         "(tracking.uri: http://...) or tracking: {enabled: false}")


def _discard_unstarted(args: argparse.Namespace, exp_dir: Path, location: search_storage.Location) -> None:
    """A new search that stopped before Tune wrote its state leaves no folder behind, in the
    storage neither."""
    if args.resume is None and not location.started():
        shutil.rmtree(exp_dir, ignore_errors=True)
        location.remove()
