"""Celery application and task entry points (arrives with the Celery issue)."""
