"""The Celery application. ``celery -A tasks worker|beat|flower`` finds it as ``tasks.app``."""

from __future__ import annotations

from celery import Celery

import tasks.broker  # noqa: F401  (filesystem:// safe against half-written messages)

app = Celery("leasehold", include=["tasks.entrypoints"])
app.config_from_object("celeryconfig")
