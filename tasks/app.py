"""The Celery application. ``celery -A tasks worker|beat|flower`` finds it as ``tasks.app``."""

from __future__ import annotations

from typing import Any

from celery import Celery

import tasks.broker  # noqa: F401  (filesystem:// and redis:// transports that refuse poison)
from tasks import security
from tasks.slots import ApplyLaneStep


class LeaseholdApp(Celery):  # type: ignore[misc]
    """Celery, with signed messages set up (``LEASEHOLD_SECURITY_*``, tasks/security.py) as its
    configuration loads, at the first read of ``app.conf``: not at import, so that a wrong setting
    is one line from the CLI like any other configuration error; and not in the
    ``on_after_configure`` signal, whose handlers' exceptions Celery logs and swallows (a worker
    would then run unsigned)."""

    def _load_config(self) -> Any:
        conf = super()._load_config()
        security.setup(self)
        return conf


app = LeaseholdApp("leasehold", include=["tasks.entrypoints"])
app.config_from_object("celeryconfig")
# Every worker gets its apply slots beside Celery's pool, which then serves the control plane only.
app.steps["worker"].add(ApplyLaneStep)
# Every worker's consumer refuses poison messages to the dead letters instead of dying on them.
app.conf.worker_consumer = "tasks.guard:GuardedConsumer"
