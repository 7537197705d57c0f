"""Celery settings from LEASEHOLD_* environment variables (filled in by the Celery issue)."""
