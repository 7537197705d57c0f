"""End-to-end tests: real ``celery worker`` and ``celery beat`` processes on two stacks."""
