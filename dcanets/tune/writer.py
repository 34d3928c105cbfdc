"""One background thread that runs a search's MLflow writes in order, off the driver's loop.

Why: Tune runs its callbacks in the driver's one loop, between trials, and a trial waits in
``tune.report`` until the driver has run them on its result. The MLflow writes of a trial (create
its run, log its parameters, its metrics every epoch, its end) took 20-30 ms each on SQLite
(a commit each), about 0.1 s per trial paid by the whole search. Submitted here they cost the
loop a queue append; one thread keeps them in order, so a run is created before its metrics and
ended after them. The queue is bounded (``limit`` writes): a store slower than the trials makes
the loop wait for the oldest write instead of holding an ever-growing backlog in the driver's
memory. :meth:`Writer.drain` waits for them (the end of a session, before its runs are closed and
before ``search.json`` says how the search ended). A write that failed is one warning line at
once (the first few), and is counted in :attr:`Writer.failures`, which the tracker reports on
the parent run and in a last line: never swallowed, and the search itself goes on.
"""
from __future__ import annotations

import collections
import concurrent.futures
import sys
from typing import Any, Callable, Deque, Optional, Tuple

LIMIT = 256  # writes queued at most (a few epochs of every running trial)
WARNINGS = 5  # failed writes named one by one; the others are counted


class Writer:
    """A bounded FIFO of writes on one thread (started at the first write); each instance its own thread."""

    def __init__(self, name: str = "dcanets-mlflow", limit: int = LIMIT) -> None:
        self.name, self.limit = name, limit
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pending: Deque[Tuple[str, concurrent.futures.Future]] = collections.deque()
        self.failures = 0  # writes that failed
        self.first_failure: Optional[str] = None  # "<what>: <error>" of the first

    def submit(self, what: str, write: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run ``write(*args, **kwargs)`` after every write submitted before it; ``what`` names it
        in a warning should it fail. With ``limit`` writes queued, waits for the oldest first."""
        while len(self._pending) >= self.limit:
            self._wait_oldest()
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        future = self._pool.submit(write, *args, **kwargs)
        self._pending.append((what, future))
        while self._pending and self._pending[0][1].done():  # what is done is let go (memory stays flat)
            self._report(*self._pending.popleft())
        return future

    def drain(self) -> None:
        """Wait for every write submitted so far."""
        while self._pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        what, future = self._pending[0]  # counted in the backlog until it is done
        concurrent.futures.wait([future])
        self._pending.popleft()
        self._report(what, future)

    def shutdown(self) -> None:
        self.drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    @property
    def backlog(self) -> int:
        return len(self._pending)

    def _report(self, what: str, future: concurrent.futures.Future) -> None:
        exc = future.exception()
        if exc is not None:
            self.failures += 1
            line = f"{what}: {type(exc).__name__}: {exc}"
            self.first_failure = self.first_failure or line
            if self.failures <= WARNINGS:
                print(f"dcanets tune: warning: not written to MLflow: {line}", file=sys.stderr)


__all__ = ["LIMIT", "Writer"]
