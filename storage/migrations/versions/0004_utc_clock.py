"""Timestamps in UTC on MySQL/MariaDB.

Until this revision leasehold wrote ``NOW(6)``: the server's local time when its ``time_zone`` is
``SYSTEM`` (most servers), which jumps at daylight-saving changes. From now on every timestamp is
``UTC_TIMESTAMP(6)`` (storage/clock.py), so the stored ones are moved to UTC by the server's
current offset from it. SQLite always stored UTC: nothing changes there.

A row written before the last daylight-saving change of a server that runs in local time moves by
the current offset, not by the offset of its day: an hour off for history (logs, finished
applies), which no decision reads. The rows decisions read (heartbeats and dispatch times of live
applies, claims of owed notifications) are recent.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS: dict[str, tuple[str, ...]] = {
    "applies": ("lease_acquired_at", "heartbeat_at", "created_at", "updated_at", "finished_at"),
    "apply_lines": ("created_at",),
    "apply_tasks": ("started_at", "finished_at"),
    "apply_logs": ("created_at",),
    "apply_comments": ("updated_at",),
    "checks": ("updated_at",),
    "control_requests": ("created_at", "completed_at"),
    "notifications": ("due_at", "claimed_at", "sent_at"),
    "marks": ("at",),
}


def _server_offset_seconds(conn: sa.Connection) -> int:
    """The server's local time minus UTC, in seconds, as ``NOW()`` saw it before this revision:
    in the server's global time zone (leasehold's own sessions are pinned to UTC now)."""
    session_zone = conn.exec_driver_sql("SELECT @@session.time_zone").scalar_one()
    conn.exec_driver_sql("SET SESSION time_zone = @@global.time_zone")
    try:
        offset = conn.exec_driver_sql(
            "SELECT TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(), NOW())"
        ).scalar_one()
    finally:
        conn.exec_driver_sql("SET SESSION time_zone = %s", (session_zone,))
    # NOW() and UTC_TIMESTAMP() are read in the same statement, so the difference is exact, but
    # round to the minute anyway: every real offset is a whole number of minutes.
    return round(int(offset) / 60.0) * 60


def _shift(seconds: int) -> None:
    for table, columns in COLUMNS.items():
        assignments = ", ".join(f"{c} = {c} + INTERVAL {seconds:d} SECOND" for c in columns)
        op.execute(f"UPDATE {table} SET {assignments}")


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name not in ("mysql", "mariadb"):
        return
    offset = _server_offset_seconds(conn)
    if offset:
        _shift(-offset)


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name not in ("mysql", "mariadb"):
        return
    offset = _server_offset_seconds(conn)
    if offset:
        _shift(offset)
