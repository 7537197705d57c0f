"""Test doubles and helpers, shipped because ``leasehold demo`` and ``leasehold run`` use them:
the GitHub stand-in (a real HTTP server speaking the part of GitHub's API leasehold uses, with
scripted faults) and the helpers that start and stop real ``celery`` processes. Nothing else in
``tasks`` imports from here; users' own tests may."""
