"""Target errors in words for people, and which of them mean "the target is not there" (retried)
rather than "the change failed": real driver exceptions, wrapped as SQLAlchemy wraps them."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import exc as sa_exc

from tasks.engines import EngineError, TargetUnavailable
from tasks.engines.target_errors import (
    ALREADY_THERE_CODES,
    UNAVAILABLE_CODES,
    describe,
    error_code,
    is_already_there,
    is_unavailable,
    redact,
    translate,
)

MySQLdb: Any = pytest.importorskip("MySQLdb")


def wrapped(code: int, message: str, *, kind: str = "OperationalError") -> sa_exc.DBAPIError:
    """A driver error as SQLAlchemy raises it: with the statement and its "Background" link."""
    orig = getattr(MySQLdb, kind)(code, message)
    wrapper = getattr(sa_exc, kind)
    error = wrapper("/* leasehold apply=1 task=2 epoch=3 */ ALTER TABLE big ...", None, orig)
    assert isinstance(error, sa_exc.DBAPIError)
    assert "sqlalche.me" in str(error)  # what must never reach people
    return error


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (2013, "Lost connection to server during query"),
        (2006, "Server has gone away"),
        (2002, "Can't connect to server on '127.0.0.1' (115)"),
        (2003, "Can't connect to MySQL server on 'db:3306' (111)"),
        (2055, "Lost connection to server at 'reading initial communication packet'"),
        (1053, "Server shutdown in progress"),
        (1927, "Connection was killed"),
        (4031, "The client was disconnected by the server because of inactivity"),
        (1040, "Too many connections"),
    ],
)
def test_lost_refused_and_shutting_down_targets_are_unavailable(code: int, message: str) -> None:
    error = wrapped(code, message)
    assert is_unavailable(error)
    assert error.orig is not None
    assert is_unavailable(error.orig)  # unwrapped too (the DDL runs on the driver's cursor)
    assert error_code(error) == code
    assert describe(error) == f"{message} (MySQL error {code})"
    translated = translate(error, target="orders", failed="DDL on big failed")
    assert isinstance(translated, TargetUnavailable)
    assert (translated.target, translated.reason) == ("orders", describe(error))
    assert str(translated) == f"target 'orders' unavailable: {message} (MySQL error {code})"


@pytest.mark.parametrize(
    ("code", "message", "kind"),
    [
        (1060, "Duplicate column name 'extra'", "OperationalError"),
        (1064, "You have an error in your SQL syntax; ...", "ProgrammingError"),
        (1146, "Table 'shop.missing' doesn't exist", "ProgrammingError"),
        (
            1045,
            "Access denied for user 'leasehold'@'10.0.0.2' (using password: YES)",
            "OperationalError",
        ),
        (1049, "Unknown database 'shopp'", "OperationalError"),
        (1317, "Query execution was interrupted", "OperationalError"),
        (1205, "Lock wait timeout exceeded; try restarting transaction", "OperationalError"),
    ],
)
def test_everything_else_is_the_changes_own_failure(code: int, message: str, kind: str) -> None:
    error = wrapped(code, message, kind=kind)
    assert not is_unavailable(error)
    translated = translate(error, target="orders", failed="DDL on big failed")
    assert type(translated) is EngineError
    assert str(translated) == f"DDL on big failed: {message} (MySQL error {code})"


def test_sqlalchemys_own_disconnect_detection_counts_as_unavailable() -> None:
    error = wrapped(9999, "something the server never said before")
    error.connection_invalidated = True
    assert is_unavailable(error)


@pytest.mark.parametrize("code", [1050, 1060, 1061, 1068, 1091, 1826])
def test_already_there_codes(code: int) -> None:
    assert is_already_there(wrapped(code, "already there"))
    assert code in ALREADY_THERE_CODES
    assert code not in UNAVAILABLE_CODES
    assert not is_already_there(wrapped(1064, "syntax"))


def test_no_code_no_wrapping_no_password() -> None:
    plain = RuntimeError("connect to mysql://leasehold:s3cret@db/shop failed")
    assert error_code(plain) is None
    assert not is_unavailable(plain)
    assert describe(plain) == "connect to mysql://leasehold:***@db/shop failed"
    text_only = sa_exc.OperationalError("SELECT 1", None, RuntimeError("gone"))
    assert describe(text_only) == "gone"
    assert redact("mysql+mysqldb://u:p%40ss@h:3306/db and https://x.y/") == (
        "mysql+mysqldb://u:***@h:3306/db and https://x.y/"
    )
