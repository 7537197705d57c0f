"""The initial schema: applies, apply tasks, logs, comments, checks, control requests.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Written out rather than imported from storage.tables: a migration is a frozen record.
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
LongText = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "applies",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("database_name", sa.String(128), nullable=False),
        sa.Column("environment", sa.String(64), nullable=False),
        sa.Column("engine", sa.String(32), nullable=False),
        sa.Column("repository", sa.String(140), nullable=True),
        sa.Column("pull_request", sa.Integer, nullable=True),
        sa.Column("head_sha", sa.String(40), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_token", sa.String(32), nullable=True),
        sa.Column("lease_epoch", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_acquired_at", Timestamp, nullable=True),
        sa.Column("heartbeat_at", Timestamp, nullable=True),
        sa.Column("reclaim_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.Column("finished_at", Timestamp, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_applies"),
        sa.UniqueConstraint("request_id", name="uq_applies_request_id"),
    )
    op.create_index("ix_applies_state_heartbeat_at", "applies", ["state", "heartbeat_at"])

    op.create_table(
        "apply_tasks",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("apply_id", Id, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("table_name", sa.String(128), nullable=False),
        sa.Column("ddl", LongText, nullable=False),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("progress", sa.Integer, nullable=False, server_default="0"),
        sa.Column("checkpoint", sa.JSON, nullable=True),
        sa.Column("started_at", Timestamp, nullable=True),
        sa.Column("finished_at", Timestamp, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("lease_epoch", sa.Integer, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("id", name="pk_apply_tasks"),
        sa.ForeignKeyConstraint(
            ["apply_id"], ["applies.id"], name="fk_apply_tasks_apply_id_applies"
        ),
        sa.UniqueConstraint("apply_id", "position", name="uq_apply_tasks_apply_id_position"),
    )

    op.create_table(
        "apply_logs",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("apply_id", Id, nullable=False),
        sa.Column("lease_epoch", sa.Integer, nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_apply_logs"),
        sa.ForeignKeyConstraint(
            ["apply_id"], ["applies.id"], name="fk_apply_logs_apply_id_applies"
        ),
    )
    op.create_index("ix_apply_logs_apply_id_id", "apply_logs", ["apply_id", "id"])

    op.create_table(
        "apply_comments",
        sa.Column("apply_id", Id, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("github_comment_id", sa.BigInteger, nullable=True),
        sa.Column("edit_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_epoch", sa.Integer, nullable=False),
        sa.Column("body_sha256", sa.String(64), nullable=True),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("apply_id", "kind", name="pk_apply_comments"),
        sa.ForeignKeyConstraint(
            ["apply_id"], ["applies.id"], name="fk_apply_comments_apply_id_applies"
        ),
    )

    op.create_table(
        "checks",
        sa.Column("apply_id", Id, nullable=False),
        sa.Column("github_check_run_id", sa.BigInteger, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("conclusion", sa.String(16), nullable=True),
        sa.Column("last_epoch", sa.Integer, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("apply_id", name="pk_checks"),
        sa.ForeignKeyConstraint(["apply_id"], ["applies.id"], name="fk_checks_apply_id_applies"),
    )

    op.create_table(
        "control_requests",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("apply_id", Id, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("requested_by", sa.String(255), nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("completed_at", Timestamp, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column(
            "pending_action",
            sa.String(16),
            sa.Computed("CASE WHEN state = 'pending' THEN action END", persisted=True),
            nullable=True,
        ),
        sa.PrimaryKeyConstraint("id", name="pk_control_requests"),
        sa.ForeignKeyConstraint(
            ["apply_id"], ["applies.id"], name="fk_control_requests_apply_id_applies"
        ),
        sa.UniqueConstraint(
            "apply_id", "pending_action", name="uq_control_requests_apply_id_pending_action"
        ),
    )


def downgrade() -> None:
    for table in ("control_requests", "checks", "apply_comments", "apply_logs", "apply_tasks"):
        op.drop_table(table)
    op.drop_index("ix_applies_state_heartbeat_at", table_name="applies")
    op.drop_table("applies")
