"""The Docker suite: leasehold's image, Redis and MySQL in containers, run by pytest-celery."""
