"""The Celery application. ``celery -A tasks worker|beat|flower`` finds it as ``tasks.app``."""

from __future__ import annotations

from celery import Celery

app = Celery("leasehold", include=["tasks.entrypoints"])
app.config_from_object("celeryconfig")
