"""Who asked for an apply: ``applies.requested_by``, free text from the submitter (as control
requests have had since 0001). Applies submitted before keep NULL.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("applies") as batch:
        batch.add_column(sa.Column("requested_by", sa.String(255), nullable=True))


def downgrade() -> None:
    # Not a batch: on SQLite a batch rebuilds ``applies``, and dropping the old table fails the
    # foreign keys of the tables that reference it (they cannot be switched off inside the one
    # transaction ``leasehold migrate`` runs in). SQLite 3.35+ drops a plain column in place.
    op.drop_column("applies", "requested_by")
