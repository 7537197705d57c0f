"""Schema upgrades with Alembic: what ``leasehold migrate`` runs. Never ``create_all``.

``upgrade`` runs under a store-wide lock, so replicas or init containers that all run
``leasehold migrate`` at start-up take turns: the first migrates, the others wait, then find the
store at head. ``require_head`` is what workers, beat and the CLI check before they use a store.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, inspect, text
from sqlalchemy import exc as sa_exc

from storage.database import Database, classify, redact, translate_errors
from storage.errors import ConfigurationError, SchemaError, StorageBusy, StorageUnavailable
from storage.tables import metadata

VERSION_TABLE = "alembic_version"
# How long ``upgrade`` waits for another ``leasehold migrate`` on the same store to finish.
# Generous: a migration that rewrites a large table can take minutes.
DEFAULT_LOCK_TIMEOUT = 900.0
LOCK_PREFIX = "leasehold_migrate:"
# MySQL refuses longer GET_LOCK names (MariaDB does not, but a store may move between them).
MYSQL_LOCK_NAME_MAX = 64
_MIGRATE = "run `leasehold migrate`"


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
        return _read_revision(conn, db)


def require_head(db: Database) -> str:
    """Check that the store is at exactly this code's head revision, and return it.

    Raises ``SchemaError`` (one line, with the URL redacted) when the store is not migrated, is
    behind, or is at a revision this code does not know (a newer leasehold migrated it).
    ``StorageUnavailable`` propagates: the caller decides whether to wait or give up.
    """
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    assert head is not None
    where = redact(str(db.engine.url))
    try:
        current = current_revision(db)
    except StorageUnavailable as exc:
        raise StorageUnavailable(f"cannot reach {where}: {exc}") from exc
    if current == head:
        return head
    if current is None:
        raise SchemaError(
            f"the store {where} is not migrated: this leasehold needs revision {head}: {_MIGRATE}"
        )
    if current in _known_revisions(script):
        raise SchemaError(
            f"the store {where} is at revision {current}, this leasehold needs {head}: {_MIGRATE}"
        )
    raise SchemaError(
        f"the store {where} is at revision {current}, which this leasehold does not know "
        f"(its newest is {head}): a newer leasehold migrated it; run that version, "
        "or upgrade this one"
    )


def upgrade(db: Database, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> tuple[str | None, str]:
    """Upgrade to the newest revision; idempotent. Returns (revision before, revision after).

    Runs under the store's migration lock, taken before the current revision is read: concurrent
    runs take turns, and each one that waited finds the store as the one before it left it (at
    head, it reports ``(head, head)``). ``lock_timeout`` is how many seconds to wait for the lock
    before giving up with ``SchemaError``.

    Refuses a database that holds tables but no leasehold revision (someone else's database), or
    one at a revision this code does not know (a newer leasehold migrated it).
    """
    if not (math.isfinite(lock_timeout) and lock_timeout >= 0):
        raise ConfigurationError(f"lock_timeout must be a number of seconds >= 0: {lock_timeout}")
    cfg = alembic_config()
    script = ScriptDirectory.from_config(cfg)
    try:
        with translate_errors(), db.engine.connect() as conn, _store_lock(conn, db, lock_timeout):
            # The connection is inside a transaction here, so Alembic treats it as external:
            # it neither begins nor commits, and every revision runs under the lock.
            before = _read_revision(conn, db)
            _refuse_foreign(conn, before, script, db)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            after = _read_revision(conn, db)
    except StorageUnavailable as exc:
        raise StorageUnavailable(f"cannot reach {redact(str(db.engine.url))}: {exc}") from exc
    assert after is not None
    return before, after


def migration_lock_name(database: str) -> str:
    """The MySQL/MariaDB ``GET_LOCK`` name for migrating ``database``: at most 64 characters.

    User locks are server-wide, so the name carries the database's; a long one is cut short and
    made unique again with a hash of the whole name.
    """
    name = LOCK_PREFIX + database
    if len(name) <= MYSQL_LOCK_NAME_MAX:
        return name
    digest = hashlib.sha256(database.encode()).hexdigest()[:16]
    keep = MYSQL_LOCK_NAME_MAX - len(LOCK_PREFIX) - len(digest) - 1
    return f"{LOCK_PREFIX}{database[:keep]}~{digest}"


@contextmanager
def _store_lock(conn: Connection, db: Database, timeout: float) -> Iterator[None]:
    """Hold the store-wide migration lock for the block, inside a transaction on ``conn`` that
    commits when the block succeeds and rolls back when it raises."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        with _sqlite_write_lock(conn, db, timeout):
            yield
    elif dialect in ("mysql", "mariadb"):
        with _mysql_user_lock(conn, db, timeout), conn.begin():
            yield
    elif dialect == "postgresql":
        # PostgreSQL's DDL is transactional: the whole upgrade commits or none of it.
        with _postgresql_advisory_lock(conn, db, timeout), conn.begin():
            yield
    else:
        raise ConfigurationError(
            f"cannot migrate {redact(str(db.engine.url))}: no migration lock for the {dialect!r} "
            "dialect; use sqlite://, mysql+mysqldb:// or postgresql+psycopg://"
        )


@contextmanager
def _sqlite_write_lock(conn: Connection, db: Database, timeout: float) -> Iterator[None]:
    """SQLite's database write lock: the engine begins every transaction with ``BEGIN
    IMMEDIATE``, so the revision read and the whole upgrade run inside one write transaction,
    and a second migrate waits in the busy handler (here for ``timeout``, not the engine's
    usual busy timeout) until the first has committed."""
    raw = conn.connection.driver_connection
    assert raw is not None
    # Raw PRAGMAs run outside any transaction (the engine turned pysqlite's implicit BEGIN off).
    usual = int(raw.execute("PRAGMA busy_timeout").fetchone()[0])
    raw.execute(f"PRAGMA busy_timeout = {math.ceil(timeout * 1000):d}")
    try:
        try:
            transaction = conn.begin()
        except sa_exc.DBAPIError as exc:
            if isinstance(classify(exc), StorageBusy):
                raise SchemaError(
                    f"timed out after {timeout:g} seconds waiting for the write lock of "
                    f"{redact(str(db.engine.url))}: another `leasehold migrate` (or another long "
                    "transaction) held it all that time; run `leasehold migrate` again when it "
                    "has finished"
                ) from exc
            raise
        with transaction:
            yield
    finally:
        try:
            raw.execute(f"PRAGMA busy_timeout = {usual:d}")
        except Exception:
            conn.invalidate()  # never hand the pool a connection with the wrong busy timeout


@contextmanager
def _mysql_user_lock(conn: Connection, db: Database, timeout: float) -> Iterator[None]:
    """A MySQL/MariaDB user lock (``GET_LOCK``), named after the database, held by this
    connection's session: DDL's implicit commits do not release it, the end of the session
    does."""
    where = redact(str(db.engine.url))
    database = conn.execute(text("SELECT DATABASE()")).scalar()
    if not database:
        raise ConfigurationError(f"cannot migrate {where}: the URL names no database")
    name = migration_lock_name(str(database))
    got = conn.execute(
        text("SELECT GET_LOCK(:name, :timeout)"), {"name": name, "timeout": timeout}
    ).scalar()
    # End the transaction that took the lock: the revision is read in one that begins after it.
    conn.commit()
    if got == 0:
        raise SchemaError(
            f"timed out after {timeout:g} seconds waiting for the migration lock {name!r} of "
            f"{where}: another `leasehold migrate` held it all that time; run `leasehold migrate` "
            "again when it has finished"
        )
    if got != 1:
        raise SchemaError(
            f"could not take the migration lock {name!r} of {where}: GET_LOCK returned {got!r} "
            "(the wait was killed, or the server failed)"
        )
    try:
        yield
    finally:
        _release_user_lock(conn, name)


def advisory_lock_key(name: str) -> int:
    """The signed 64-bit key of PostgreSQL's advisory lock called ``name`` (advisory locks are
    numbers; they are scoped to the database the session is connected to)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextmanager
def _postgresql_advisory_lock(conn: Connection, db: Database, timeout: float) -> Iterator[None]:
    """A session-level advisory lock held by this connection: released by
    ``pg_advisory_unlock`` or by the end of the session, never by a commit. The wait is bounded
    by a ``lock_timeout`` set for it alone."""
    where = redact(str(db.engine.url))
    key = advisory_lock_key(LOCK_PREFIX + "store")
    millis = str(max(1, math.ceil(timeout * 1000)))
    conn.execute(text("SELECT set_config('lock_timeout', :ms, false)"), {"ms": millis})
    try:
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
    except sa_exc.DBAPIError as exc:
        conn.rollback()
        if isinstance(classify(exc), StorageBusy):
            raise SchemaError(
                f"timed out after {timeout:g} seconds waiting for the migration lock of {where}: "
                "another `leasehold migrate` held it all that time; run `leasehold migrate` "
                "again when it has finished"
            ) from exc
        raise
    finally:
        if not conn.invalidated:
            conn.execute(text("RESET lock_timeout"))  # the session's own (open_database's)
            conn.commit()
    try:
        yield
    finally:
        try:
            if conn.in_transaction():
                conn.rollback()
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            conn.commit()
        except sa_exc.SQLAlchemyError:
            conn.invalidate()  # never pool a session that may still hold the lock


def _release_user_lock(conn: Connection, name: str) -> None:
    try:
        if conn.in_transaction():
            conn.rollback()
        conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": name})
        conn.commit()
    except sa_exc.SQLAlchemyError:
        # The session is broken (and its lock gone with it) or cannot say: close it rather than
        # pool a connection that may still hold the lock.
        conn.invalidate()


def _read_revision(conn: Connection, db: Database) -> str | None:
    try:
        return MigrationContext.configure(conn).get_current_revision()
    except CommandError as exc:  # e.g. several rows in alembic_version
        raise SchemaError(
            f"cannot read the revision of {redact(str(db.engine.url))}: {exc}"
        ) from exc


def _known_revisions(script: ScriptDirectory) -> set[str]:
    return {revision.revision for revision in script.walk_revisions()}


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
    if before not in _known_revisions(script):
        raise SchemaError(
            f"{where} is at revision {before!r}, which this leasehold does not know "
            "(migrated by a newer version?)"
        )
