"""The Celery application. ``celery -A tasks worker|beat|flower`` finds it as ``tasks.app``."""

from __future__ import annotations

from celery import Celery

import tasks.broker  # noqa: F401  (filesystem:// and redis:// transports that refuse poison)
from tasks.slots import ApplyLaneStep

app = Celery("leasehold", include=["tasks.entrypoints"])
app.config_from_object("celeryconfig")
# Every worker gets its apply slots beside Celery's pool, which then serves the control plane only.
app.steps["worker"].add(ApplyLaneStep)
# Every worker's consumer refuses poison messages to the dead letters instead of dying on them.
app.conf.worker_consumer = "tasks.guard:GuardedConsumer"
