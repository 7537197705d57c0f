"""The Celery application and the task entry points; engines; the CLI.

``celery -A tasks worker|beat|flower`` loads ``tasks.app``.
"""

from tasks.app import app

__all__ = ["app"]
