"""SQLAlchemy Core tables. The schema itself is created by the Alembic migrations, never by
``metadata.create_all`` in production; a test checks the two agree."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Computed,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Microsecond timestamps on MySQL: heartbeat ages and the order of rotations are finer than 1 s.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# SQLite only auto-increments an INTEGER PRIMARY KEY.
Id = BigInteger().with_variant(Integer(), "sqlite")
LongText = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")

TOKEN_LENGTH = 32  # 128 random bits, hex

applies = Table(
    "applies",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("state", String(16), nullable=False),
    Column("database_name", String(128), nullable=False),
    Column("environment", String(64), nullable=False),
    Column("engine", String(32), nullable=False),
    Column("repository", String(140), nullable=True),
    Column("pull_request", Integer, nullable=True),
    Column("head_sha", String(40), nullable=True),
    Column("request_id", String(128), nullable=True, unique=True),
    Column("lease_owner", String(255), nullable=True),
    Column("lease_token", String(TOKEN_LENGTH), nullable=True),
    Column("lease_epoch", Integer, nullable=False, server_default="0"),
    Column("lease_acquired_at", Timestamp, nullable=True),
    Column("heartbeat_at", Timestamp, nullable=True),
    Column("reclaim_count", Integer, nullable=False, server_default="0"),
    Column("error", Text, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    Column("finished_at", Timestamp, nullable=True),
    # The effect window: the epoch whose external call (GitHub) may be in flight, and until when
    # by the store's clock. An effect of a later epoch starts only once it has closed
    # (storage/published.py), so a rotation never waits for GitHub and two epochs' calls never
    # overlap.
    Column("effect_epoch", Integer, nullable=True),
    Column("effect_until", Timestamp, nullable=True),
    # The epoch whose run_apply could not be sent (the broker was down): re-sent by every
    # reclaim pass until one gets through, instead of waiting out the dispatch timeout.
    Column("dispatch_owed_epoch", Integer, nullable=True),
    # Who asked for the apply, as the submitter said (free text, shown in status, logs and on the
    # pull request; escaped wherever it is rendered). NULL: nobody said.
    Column("requested_by", String(255), nullable=True),
    # The reclaim scan reads (state, heartbeat_at) ranges only: finished applies are never touched.
    Index("ix_applies_state_heartbeat_at", "state", "heartbeat_at"),
    # A line's unfinished applies, in id order (InnoDB appends the primary key to the index).
    Index("ix_applies_database_name_environment_state", "database_name", "environment", "state"),
)

# One row per (database, environment): the lock that serializes every change of who holds the
# line's turn (submit, the end of an apply, control of an unowned one). Lock order: a line row
# before any applies row of that line.
apply_lines = Table(
    "apply_lines",
    metadata,
    Column("database_name", String(128), primary_key=True),
    Column("environment", String(64), primary_key=True),
    Column("created_at", Timestamp, nullable=False),
)

apply_tasks = Table(
    "apply_tasks",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("apply_id", Id, ForeignKey("applies.id"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("table_name", String(128), nullable=False),
    Column("ddl", LongText, nullable=False),
    Column("options", JSON, nullable=False),
    Column("state", String(16), nullable=False),
    Column("progress", Integer, nullable=False, server_default="0"),
    Column("checkpoint", JSON, nullable=True),
    Column("started_at", Timestamp, nullable=True),
    Column("finished_at", Timestamp, nullable=True),
    Column("error", Text, nullable=True),
    Column("lease_epoch", Integer, nullable=False, server_default="0"),
    UniqueConstraint("apply_id", "position"),
)

apply_logs = Table(
    "apply_logs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("apply_id", Id, ForeignKey("applies.id"), nullable=False),
    Column("lease_epoch", Integer, nullable=False),
    Column("level", String(16), nullable=False),
    Column("event", String(64), nullable=False),
    Column("message", Text, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Index("ix_apply_logs_apply_id_id", "apply_id", "id"),
)

apply_comments = Table(
    "apply_comments",
    metadata,
    Column("apply_id", Id, ForeignKey("applies.id"), primary_key=True),
    Column("kind", String(32), primary_key=True),
    Column("github_comment_id", BigInteger, nullable=True),
    Column("edit_count", Integer, nullable=False, server_default="0"),
    Column("last_epoch", Integer, nullable=False),
    Column("body_sha256", String(64), nullable=True),
    Column("updated_at", Timestamp, nullable=False),
)

checks = Table(
    "checks",
    metadata,
    Column("apply_id", Id, ForeignKey("applies.id"), primary_key=True),
    Column("github_check_run_id", BigInteger, nullable=True),
    Column("status", String(16), nullable=False),
    Column("conclusion", String(16), nullable=True),
    Column("last_epoch", Integer, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)

control_requests = Table(
    "control_requests",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("apply_id", Id, ForeignKey("applies.id"), nullable=False),
    Column("action", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("requested_by", String(255), nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("completed_at", Timestamp, nullable=True),
    Column("error", Text, nullable=True),
    # NULL once the request is no longer pending; unique indexes ignore NULLs on both backends,
    # so this allows at most one *pending* request per apply and action.
    Column(
        "pending_action",
        String(16),
        Computed("CASE WHEN state = 'pending' THEN action END", persisted=True),
        nullable=True,
    ),
    UniqueConstraint("apply_id", "pending_action"),
)

# Completion for callers: the task to send when an apply ends (submit's ``notify``). ``due_at`` is
# set in the transaction that ends the apply; a sender claims it (``claimed_at``), sends, and
# records ``sent_at``; a claim whose sender died expires, so a notification is sent at least once.
notifications = Table(
    "notifications",
    metadata,
    Column("apply_id", Id, ForeignKey("applies.id"), primary_key=True),
    Column("task", String(200), nullable=False),
    Column("queue", String(200), nullable=False),
    Column("due_at", Timestamp, nullable=True),
    Column("claimed_at", Timestamp, nullable=True),
    Column("sent_at", Timestamp, nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    # Owed ones are read as a range: sent_at IS NULL, due_at set.
    Index("ix_notifications_sent_at_due_at", "sent_at", "due_at"),
)

# What a pull request still has to be shown: the stopped or final state of an apply, made due in
# the transaction that stops or ends it (storage._leasing.rotate), published after that commit by
# the holder's publisher, or by a later reclaim pass if the holder could not (GitHub down, worker
# dead). ``due_at``: when the next attempt may start (NULL: nothing owed); ``claimed_at``: a
# publisher at work (expires); ``published_at``: the last time it was settled.
publications = Table(
    "publications",
    metadata,
    Column("apply_id", Id, ForeignKey("applies.id"), primary_key=True),
    Column("due_at", Timestamp, nullable=True),
    Column("claimed_at", Timestamp, nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    Column("published_at", Timestamp, nullable=True),
    Index("ix_publications_due_at", "due_at"),
)

# When each background duty last ran, by the database clock (``leasehold doctor`` reads them).
marks = Table(
    "marks",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("at", Timestamp, nullable=True),
    Column("detail", String(255), nullable=True),
)
