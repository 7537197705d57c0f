"""The ``sleep`` engine: pretends to apply a change, in small steps. For demos and tests."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final

from storage.errors import InvalidInput
from tasks.engines.base import Engine, EngineCancelled, EngineContext, EngineError, TaskSpec

MAX_SECONDS: Final = 24 * 3600.0
# A wait ends at once when the run is interrupted (``ctx.cancelled``), so the step is not how
# promptly a cancellation is seen: it is how often the engine wakes up to report progress. Short
# tasks keep 0.05 s steps (and every task's first step, so its first checkpoint comes at once);
# a long one wakes at most once a second, the runner's checkpoint interval anyway: at 0.05 s,
# 20 wake-ups a second per apply made the GIL of a worker running hundreds of them its hotspot.
STEP: Final = 0.05
LONG_STEP: Final = 1.0


class SleepEngine(Engine):
    name = "sleep"

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(options) - {"seconds", "fail"}
        if unknown:
            raise InvalidInput(f"sleep engine: unknown options {sorted(unknown)}")
        seconds = options.get("seconds", 1.0)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise InvalidInput("sleep engine: options.seconds must be a number")
        if not 0 <= seconds <= MAX_SECONDS:
            raise InvalidInput(f"sleep engine: options.seconds must be within 0..{MAX_SECONDS:g}")
        fail = options.get("fail", False)
        if not isinstance(fail, bool):
            raise InvalidInput("sleep engine: options.fail must be true or false")
        return {"seconds": float(seconds), "fail": fail}

    def already_applied(self, task: TaskSpec) -> bool:
        return False

    def run(self, task: TaskSpec, ctx: EngineContext) -> None:
        total = float(task.options.get("seconds", 1.0))
        # Resume where the last holder checkpointed, so that a handover loses no work.
        done = float((task.checkpoint or {}).get("elapsed", 0.0))
        last = time.monotonic()
        step, later = STEP, min(LONG_STEP, max(STEP, total / 20))
        while done < total:
            if ctx.cancelled.wait(min(step, total - done)):
                raise EngineCancelled("cancelled")
            now = time.monotonic()
            done = min(total, done + (now - last))
            last = now
            step = later
            ctx.progress(int(100 * done / total) if total else 100, {"elapsed": round(done, 3)})
        if task.options.get("fail"):
            raise EngineError(f"sleep engine: task {task.table_name} failed as asked (fail=true)")
        ctx.progress(100, {"elapsed": total})
