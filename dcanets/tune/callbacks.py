"""The Tune callbacks of a search run in the driver: progress lines, trial outcomes, state copies.

Why a ``bind``: ``Tuner.restore`` (``--resume``) runs the copies of the callbacks pickled into
``tuner.pkl`` when the search started, not the ones the resumed session creates. What belongs to a
session (its search folder and storage, the time the earlier sessions spent, the trials that
ended in them) is therefore handed to each callback that Tune will run by :func:`bind_session`,
before ``Tuner.fit``; everything a callback keeps lives on its instance, so two searches in one
process never share it (as Ray's own callbacks keep theirs on ``self``).
"""
from __future__ import annotations

import time
from typing import Iterable, Optional, Set

from ray.tune import Callback

from dcanets.engine.divergence import describe, diverged
from dcanets.tune import schema
from dcanets.tune.builders import short_params
from dcanets.tune.state import SearchState


class SessionCallback(Callback):
    """A Tune callback that keeps per-session state, given to it by :meth:`bind`."""

    def bind(self, state: SearchState) -> None:
        """Take the session of ``state`` (this session's search folder and what it knows)."""
        raise NotImplementedError


def bind_session(callbacks: Iterable[Callback], state: SearchState) -> None:
    """Bind the callbacks Tune will run (after ``Tuner.restore``: the restored copies) to this session."""
    for callback in callbacks:
        if isinstance(callback, SessionCallback):
            callback.bind(state)


class ProgressLines(SessionCallback):
    """One line per trial per epoch, in the driver (Ray's own table is switched off: verbose=0).

    The elapsed time counts search time only: after ``--resume`` it continues from where the
    interrupted session stopped (``earlier``, the state's ``fit_seconds``), without the time the
    search was not running.
    """

    def __init__(self, spec: schema.TuneSpec, earlier: float = 0.0) -> None:
        self.metric, self.epochs = spec.metric, int(spec.train["epochs"])
        self.earlier = earlier
        self.t0: Optional[float] = time.time() - earlier

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "t0"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.t0 = None  # set by setup(): the resumed session's start, less the time already spent

    def bind(self, state: SearchState) -> None:
        self.earlier, self.t0 = state.fit_seconds, None

    def setup(self, **info):
        self._start()

    def _start(self) -> float:
        if self.t0 is None:
            self.t0 = time.time() - self.earlier
        return self.t0

    def _say(self, trial, text: str) -> None:
        print(f"{time.time() - self._start():6.1f}s [{trial.trial_id}] {text}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._say(trial, f"epoch {result.get('epoch', '?')}/{self.epochs}  "
                         f"{self.metric}={result.get(self.metric, float('nan')):.4f}  "
                         f"train_loss={result.get('train_loss', float('nan')):.4f}  lr={result.get('lr', 0):.3g}  "
                         f"{result.get('epoch_seconds', 0):.1f}s  node={str(result.get('node_id', '?'))[:8]}  "
                         f"{short_params(trial.config)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        self._say(trial, f"DIVERGED ({describe(result)})" if diverged(result) else "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        error = _error_name(trial)
        hint = ("; failure_config: {max_failures: N} retries a trial from its last checkpoint"
                if error in LOST and trial.max_failures == 0 else "")
        self._say(trial, f"FAILED ({error}{_on_node(trial)}): see {trial.path}/error.txt{hint}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A failed trial that ``failure_config.max_failures`` retries: the line says from where.

        The retry restores the last checkpoint Tune *registered*, which need not be the one of the
        last epoch reported: Tune registers a reported checkpoint in a second round trip to the
        trial's process (its ``save`` task), which a node that dies right after the report never
        answers. The epoch is read from that checkpoint's own result, not from the last result.
        """
        registered = getattr(trial, "latest_checkpoint_result", None)
        epoch = (getattr(registered, "metrics", None) or {}).get("epoch")
        budget = "unlimited" if trial.max_failures < 0 else trial.max_failures
        self._say(trial, f"failed ({_error_name(trial)}{_on_node(trial)}): retry {trial.num_failures} of {budget}, "
                         + (f"from its epoch {epoch} checkpoint" if epoch else "from the start")
                         + " on a node with room")


# the errors of a trial whose process or node went away (not of its own code): what retries are for
LOST = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "NodeDiedError", "WorkerCrashedError")


def _error_name(trial) -> str:
    """The class of a trial's last error (``ActorDiedError``: its node or process went away), read
    back from the ``error.pkl`` Tune writes beside ``error.txt``; ``error`` when there is none."""
    import cloudpickle

    try:
        with open(trial.pickled_error_file, "rb") as f:
            exc = cloudpickle.load(f)
        cause = exc.as_instanceof_cause() if hasattr(exc, "as_instanceof_cause") else exc
        return type(cause).__name__.replace("RayTaskError(", "").rstrip(")")
    except Exception:  # no pickled error (e.g. a TuneError), or one that does not unpickle here
        return "error"


def _on_node(trial) -> str:
    node = (trial.last_result or {}).get("node_id")
    return f" on node {str(node)[:8]}" if node else ""


class Outcomes(SessionCallback):
    """The trials that ended on their own (completed, stopped by the scheduler, or crashed), in
    this session and (from the state's ``ended_trials``) the earlier ones.

    When a signal stops a search, Tune marks the trials it cuts TERMINATED too; a trial not
    listed here was cut, and is reported INTERRUPTED.
    """

    def __init__(self) -> None:
        self.ended: Set[str] = set()

    def bind(self, state: SearchState) -> None:
        self.ended = set(state.ended_trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)


class StateCopies(SessionCallback):
    """Keeps the storage's copy of ``search.json`` current as trials start and end (the MLflow
    tracker, earlier in the callback list, writes their run ids there), so that a search resumed
    from its storage after the driver died knows the runs to close."""

    def __init__(self) -> None:
        self.state: Optional[SearchState] = None

    def bind(self, state: SearchState) -> None:
        self.state = state

    def _copy(self) -> None:
        if self.state is not None:
            self.state.share()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._copy()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._copy()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._copy()


__all__ = ["LOST", "Outcomes", "ProgressLines", "SessionCallback", "StateCopies", "bind_session"]
