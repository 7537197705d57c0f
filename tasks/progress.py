"""A run's progress for Flower, best-effort: the task's state in the result backend and a
``task-progress`` event (Flower's event views show a custom state only from events).

The database is the truth; this is a courtesy to people watching Flower. It never fails or
stalls an apply: reports go to a thread of their own, which sends only the newest one (they
coalesce), and a broker or result backend that is down or unreachable costs a logged warning,
not the schema change. (Before this, a Redis restart of a second failed running applies: the
report's ``ConnectionError`` reached the runner.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger(__name__)

PROGRESS: Final = "PROGRESS"
# Warn about a failing report at most this often: an outage of an hour is one line a minute.
WARN_EVERY: Final = 60.0
CLOSE_WAIT: Final = 2.0


class CeleryProgress:
    """The ``tasks.runner.Reporter`` of one ``run_apply`` task."""

    def __init__(
        self,
        apply_id: int,
        *,
        store: Callable[[dict[str, Any]], None],
        event: Callable[[dict[str, Any]], None],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.apply_id = apply_id
        self._store = store
        self._event = event
        self._monotonic = monotonic
        self._cond = threading.Condition()
        self._latest: dict[str, Any] | None = None
        self._closed = False
        self._warned_at = -WARN_EVERY
        self.sent = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name=f"progress-{apply_id}", daemon=True)
        self._thread.start()

    @classmethod
    def for_task(cls, task: Any, apply_id: int) -> CeleryProgress:
        """Bound to the running Celery task: its id and hostname are read here, on the task's
        own thread (``task.request`` is thread-local)."""
        task_id, hostname, app = task.request.id, task.request.hostname, task.app
        # The task thread's result backend, which Celery has already set up to record the
        # task's start: ``app.backend`` is per thread, and this thread's would be a new backend
        # (and a new connection to Redis) for every run.
        backend = task.backend

        def store(meta: dict[str, Any]) -> None:
            backend.store_result(task_id, meta, PROGRESS)

        def event(meta: dict[str, Any]) -> None:
            with app.events.default_dispatcher(hostname=hostname) as dispatcher:
                dispatcher.send("task-progress", uuid=task_id, retry=False, **meta)

        return cls(apply_id, store=store, event=event)

    def progress(self, *, epoch: int, index: int, total: int, table: str, percent: int) -> None:
        meta = {
            "apply_id": self.apply_id,
            "epoch": epoch,
            "task": index + 1,
            "tasks": total,
            "table": table,
            "percent": percent,
        }
        with self._cond:
            self._latest = meta
            self._cond.notify()

    def close(self, timeout: float = CLOSE_WAIT) -> None:
        """Stop reporting. A report in flight is waited for up to ``timeout`` (it takes
        milliseconds when the backend is up), so that it cannot overwrite the task's final state
        stored right after; one stuck on an unreachable backend is abandoned."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._latest is None and not self._closed:
                    self._cond.wait()
                meta, self._latest = self._latest, None
                if self._closed or meta is None:
                    return
            self._send(meta)

    def _send(self, meta: dict[str, Any]) -> None:
        try:
            self._store(meta)
            self._event(meta)
            self.sent += 1
        except Exception as exc:  # whatever the backend or broker raises: never the apply's
            self.failed += 1
            now = self._monotonic()
            if now - self._warned_at >= WARN_EVERY:
                self._warned_at = now
                log.warning(
                    "apply %s: progress not reported to Celery (%s: %s); the apply goes on",
                    self.apply_id,
                    type(exc).__name__,
                    exc,
                )
