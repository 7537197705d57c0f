"""Lines: one apply per (database, environment) at a time; waiting applies are ``queued``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Applies that an older leasehold left ``pending`` (inserted, never dispatched) become ``queued``:
the next reclaim pass dispatches each line's head. Applies already running side by side on one
database finish as they are; from then on their line admits one at a time.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "apply_lines",
        sa.Column("database_name", sa.String(128), nullable=False),
        sa.Column("environment", sa.String(64), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("database_name", "environment", name="pk_apply_lines"),
    )
    op.create_index(
        "ix_applies_database_name_environment_state",
        "applies",
        ["database_name", "environment", "state"],
    )
    op.execute(
        "INSERT INTO apply_lines (database_name, environment, created_at) "
        "SELECT database_name, environment, MIN(created_at) FROM applies "
        "GROUP BY database_name, environment"
    )
    op.execute("UPDATE applies SET state = 'queued' WHERE state = 'pending'")


def downgrade() -> None:
    op.execute("UPDATE applies SET state = 'pending' WHERE state = 'queued'")
    op.drop_index("ix_applies_database_name_environment_state", table_name="applies")
    op.drop_table("apply_lines")
