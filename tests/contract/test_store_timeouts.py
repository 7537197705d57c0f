"""A store statement never hangs for ever: on MySQL/MariaDB every connection has a read and a
write timeout (``storage.database``), so a statement stuck on a partitioned or frozen server
ends as ``StorageUnavailable`` (retried like any outage) instead of blocking its thread. The
URL's own values win over the defaults, which is how this test makes the wait short."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from storage import open_database
from storage.errors import StorageUnavailable


def test_a_statement_outlasting_the_read_timeout_is_unavailable_not_a_hang(
    mysql_server: str,
) -> None:
    separator = "&" if "?" in mysql_server else "?"
    db = open_database(f"{mysql_server}{separator}read_timeout=1")
    try:
        with pytest.raises(StorageUnavailable, match="Lost connection"), db.transaction() as conn:
            conn.execute(text("SELECT SLEEP(3)"))
        with db.transaction() as conn:  # the pool recovers: the next statement works
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        db.dispose()
