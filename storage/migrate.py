"""Schema upgrades with Alembic: what ``leasehold migrate`` runs. Never ``create_all``."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect

from storage.engine import Database, redact, translate_errors
from storage.errors import SchemaError, StorageUnavailable
from storage.tables import metadata

VERSION_TABLE = "alembic_version"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("storage") / "migrations"))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(db: Database) -> str | None:
    with translate_errors(), db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(db: Database) -> tuple[str | None, str]:
    """Upgrade to the newest revision; idempotent. Returns (revision before, revision after).

    Refuses a database that holds tables but no leasehold revision (someone else's database), or
    one at a revision this code does not know (a newer leasehold migrated it).
    """
    cfg = alembic_config()
    script = ScriptDirectory.from_config(cfg)
    try:
        with translate_errors(), db.engine.connect() as conn:
            before = MigrationContext.configure(conn).get_current_revision()
            _refuse_foreign(conn, before, script, db)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()
            after = MigrationContext.configure(conn).get_current_revision()
    except StorageUnavailable as exc:
        raise StorageUnavailable(f"cannot reach {redact(str(db.engine.url))}: {exc}") from exc
    assert after is not None
    return before, after


def _refuse_foreign(
    conn: Connection, before: str | None, script: ScriptDirectory, db: Database
) -> None:
    where = redact(str(db.engine.url))
    if before is None:
        existing = set(inspect(conn).get_table_names())
        ours = set(metadata.tables)
        if existing - {VERSION_TABLE}:
            overlap = ", ".join(sorted(existing & ours)) or "none of leasehold's"
            raise SchemaError(
                f"{where} already holds tables ({len(existing)}, of which leasehold's: {overlap}) "
                "but no leasehold migration revision: refusing to migrate a foreign database; "
                "point LEASEHOLD_DATABASE_URL at an empty database"
            )
        return
    try:
        script.get_revision(before)
    except Exception as exc:
        raise SchemaError(
            f"{where} is at revision {before!r}, which this leasehold does not know "
            "(migrated by a newer version?)"
        ) from exc
