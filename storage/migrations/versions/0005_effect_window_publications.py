"""The effect window on applies, dispatches owed while the broker was down, and the outbox of
owed pull-request publications.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("applies") as batch:
        batch.add_column(sa.Column("effect_epoch", sa.Integer, nullable=True))
        batch.add_column(sa.Column("effect_until", Timestamp, nullable=True))
        batch.add_column(sa.Column("dispatch_owed_epoch", sa.Integer, nullable=True))
    op.create_table(
        "publications",
        sa.Column("apply_id", Id, nullable=False),
        sa.Column("due_at", Timestamp, nullable=True),
        sa.Column("claimed_at", Timestamp, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("published_at", Timestamp, nullable=True),
        sa.PrimaryKeyConstraint("apply_id", name="pk_publications"),
        sa.ForeignKeyConstraint(
            ["apply_id"], ["applies.id"], name="fk_publications_apply_id_applies"
        ),
    )
    op.create_index("ix_publications_due_at", "publications", ["due_at"])


def downgrade() -> None:
    op.drop_index("ix_publications_due_at", table_name="publications")
    op.drop_table("publications")
    with op.batch_alter_table("applies") as batch:
        batch.drop_column("dispatch_owed_epoch")
        batch.drop_column("effect_until")
        batch.drop_column("effect_epoch")
