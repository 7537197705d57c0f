"""Completion notifications for callers, and marks of background duties (the reclaim pass).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "notifications",
        sa.Column("apply_id", Id, nullable=False),
        sa.Column("task", sa.String(200), nullable=False),
        sa.Column("queue", sa.String(200), nullable=False),
        sa.Column("due_at", Timestamp, nullable=True),
        sa.Column("claimed_at", Timestamp, nullable=True),
        sa.Column("sent_at", Timestamp, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("apply_id", name="pk_notifications"),
        sa.ForeignKeyConstraint(
            ["apply_id"], ["applies.id"], name="fk_notifications_apply_id_applies"
        ),
    )
    op.create_index("ix_notifications_sent_at_due_at", "notifications", ["sent_at", "due_at"])
    op.create_table(
        "marks",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("at", Timestamp, nullable=True),
        sa.Column("detail", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_marks"),
    )
    # The row every reclaim pass updates: one UPDATE, never an insert race between two beats.
    op.execute("INSERT INTO marks (name) VALUES ('reclaim_pass')")


def downgrade() -> None:
    op.drop_table("marks")
    op.drop_index("ix_notifications_sent_at_due_at", table_name="notifications")
    op.drop_table("notifications")
