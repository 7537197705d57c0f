"""Alembic environment. Used by ``leasehold migrate`` (which passes its own connection) and by
``alembic upgrade head`` from the project root (which reads LEASEHOLD_DATABASE_URL)."""

from __future__ import annotations

from alembic import context

from storage.database import open_database
from storage.tables import metadata

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    db = open_database(config.get_main_option("sqlalchemy.url") or None)
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
