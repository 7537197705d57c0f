"""The store side of ``bench/scale.py``'s measurements: one session of its own on the scratch
database (autocommit) that reads heartbeat ages by the database clock, counts applies and log rows,
store sessions, and the store's statement and transaction counters, counting its own statements
so that they can be taken out of the store's."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, create_engine, func, select, text
from sqlalchemy.engine import make_url

from bench import _stores
from storage import clock
from storage.database import open_database
from storage.tables import applies, apply_logs


class Sampler:
    """This bench's one session on the scratch database (autocommit), and the store's counters.

    Its own statements are counted so that they can be taken out of the store's."""

    def __init__(self, store: str, url: str, postgres_admin_url: str) -> None:
        self.store = store
        self.url = url
        self.db = open_database(url, pool_size=1, max_overflow=0)
        self.conn: Connection = self.db.engine.connect().execution_options(
            isolation_level="AUTOCOMMIT"
        )
        self.database_name = make_url(url).database
        self.own = 0  # statements / transactions this session ran on the scratch database
        self.admin: Connection | None = None
        if store == _stores.POSTGRES:
            # pg_stat_database read from the maintenance database: not counted in the scratch's.
            admin_engine = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
            self.admin = admin_engine.connect()

    def close(self) -> None:
        self.conn.close()
        self.db.dispose()
        if self.admin is not None:
            engine = self.admin.engine
            self.admin.close()
            engine.dispose()

    def _scalar(self, statement: Any) -> Any:
        self.own += 1
        return self.conn.execute(statement).scalar()

    def ages(self) -> list[float]:
        """Heartbeat ages of every running apply, by the database clock."""
        self.own += 1
        rows = self.conn.execute(
            select(clock.age_of(applies.c.heartbeat_at)).where(applies.c.state == "running")
        ).all()
        return [float(r[0]) for r in rows]

    def count(self, states: Sequence[str], above_id: int) -> int:
        return int(
            self._scalar(
                select(func.count())
                .select_from(applies)
                .where(applies.c.state.in_(states), applies.c.id > above_id)
            )
        )

    def now(self) -> datetime:
        value = self._scalar(select(clock.now()))
        assert isinstance(value, datetime), value
        return value

    def max_apply_id(self) -> int:
        return int(self._scalar(select(func.coalesce(func.max(applies.c.id), 0))))

    def max_log_id(self) -> int:
        return int(self._scalar(select(func.coalesce(func.max(apply_logs.c.id), 0))))

    def apply_ids(self, above_id: int) -> list[int]:
        self.own += 1
        return [
            int(r[0])
            for r in self.conn.execute(
                select(applies.c.id).where(applies.c.id > above_id).order_by(applies.c.id)
            )
        ]

    def last_redeemed(self, above_id: int) -> datetime | None:
        value = self._scalar(
            select(func.max(apply_logs.c.created_at)).where(
                apply_logs.c.event == "redeemed", apply_logs.c.apply_id > above_id
            )
        )
        assert value is None or isinstance(value, datetime), value
        return value

    def reclaims(self, above_log_id: int) -> int:
        return int(
            self._scalar(
                select(func.count())
                .select_from(apply_logs)
                .where(apply_logs.c.event == "reclaimed", apply_logs.c.id > above_log_id)
            )
        )

    def sessions(self) -> int:
        """Store sessions on the scratch database (this one included)."""
        if self.store == _stores.POSTGRES:
            assert self.admin is not None
            value = self.admin.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE datname = :name"),
                {"name": self.database_name},
            ).scalar()
            return int(value or 0)
        return int(
            self._scalar(
                text(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = :name"
                ).bindparams(name=self.database_name)
            )
        )

    def other_sessions(self) -> int:
        """MariaDB: sessions on other databases that ran a statement in the last seconds (their
        statements are in the server-wide counters too)."""
        if self.store != _stores.MARIADB:
            return 0
        return int(
            self._scalar(
                text(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                    "WHERE (DB IS NULL OR DB <> :name) AND ID <> CONNECTION_ID() "
                    "AND COMMAND NOT IN ('Daemon', 'Binlog Dump') "
                    "AND NOT (COMMAND = 'Sleep' AND TIME > 60)"
                ).bindparams(name=self.database_name)
            )
        )

    def counters(self) -> tuple[int | None, int, int]:
        """(statements, transactions, this session's own count so far): MariaDB's server-wide
        ``Questions`` and ``Com_commit + Com_rollback`` (and this session's ``Questions``);
        PostgreSQL's scratch-database ``xact_commit + xact_rollback`` (no statements)."""
        if self.store == _stores.POSTGRES:
            assert self.admin is not None
            row = self.admin.execute(
                text(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :name"
                ),
                {"name": self.database_name},
            ).one()
            return None, int(row[0]), self.own
        self.own += 2
        rows: dict[str, str] = dict(
            self.conn.execute(
                text(
                    "SHOW GLOBAL STATUS WHERE Variable_name IN "
                    "('Questions', 'Com_commit', 'Com_rollback')"
                )
            ).all()
        )
        own = self.conn.execute(text("SHOW SESSION STATUS LIKE 'Questions'")).one()
        return (
            int(rows["Questions"]),
            int(rows["Com_commit"]) + int(rows["Com_rollback"]),
            int(own[1]),
        )
