"""Alembic environment. Used by ``leasehold migrate`` (which passes its own connection) and by
``alembic upgrade head`` from the project root (which reads LEASEHOLD_DATABASE_URL)."""

from __future__ import annotations

import os

from alembic import context

from storage.database import open_database
from storage.tables import metadata

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    # `alembic upgrade head` from the project root: the store the configuration names (storage
    # has no default URL of its own; `leasehold migrate` is the way that locks, use it).
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("LEASEHOLD_DATABASE_URL")
    if not url:
        raise SystemExit("set LEASEHOLD_DATABASE_URL, or run `leasehold migrate`")
    db = open_database(url)
    try:
        with db.engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        db.dispose()


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode recreates tables
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
