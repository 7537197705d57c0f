"""What went wrong on a target, in words for people, and whether it is the target's absence
(retried) or the change's own failure (the apply fails).

Driver errors carry a MySQL error code and a message; SQLAlchemy wraps them in text of its own
(the statement, "Background on this error at: https://sqlalche.me/..."), which an operator
reading ``leasehold logs`` or an apply's error has no use for. Everything an engine shows of a
target error goes through :func:`describe`: ``Lost connection to server during query (MySQL
error 2013)``."""

from __future__ import annotations

import re
from typing import Any, Final

from sqlalchemy import exc as sa_exc

from tasks.engines.base import EngineError, TargetUnavailable

# The target is not there (yet, or any more): refused, lost or dropped connections, a server
# going away or shutting down, too many connections. Retried. Everything else is the change's
# own failure. Not here on purpose: 1045 (access denied) and 1049 (unknown database) are
# configuration, 2005 (unknown host) is usually a typo, 1290/1836 (read-only) may be a replica
# named by mistake: retrying them for minutes would only delay the message that says so.
UNAVAILABLE_CODES: Final = frozenset(
    {
        1040,  # ER_CON_COUNT_ERROR: too many connections
        1053,  # ER_SERVER_SHUTDOWN: server shutdown in progress
        1158,  # ER_NET_READ_ERROR
        1159,  # ER_NET_READ_INTERRUPTED
        1160,  # ER_NET_ERROR_ON_WRITE
        1161,  # ER_NET_WRITE_INTERRUPTED
        1927,  # ER_CONNECTION_KILLED (MariaDB): the connection was killed (a shutdown)
        2002,  # CR_CONNECTION_ERROR: can't connect (socket, or refused on some clients)
        2003,  # CR_CONN_HOST_ERROR: can't connect to the server on host (refused, timed out)
        2006,  # CR_SERVER_GONE_ERROR: server has gone away
        2012,  # CR_SERVER_HANDSHAKE_ERR: error in server handshake (a server starting)
        2013,  # CR_SERVER_LOST: lost connection to server during query
        2055,  # CR_SERVER_LOST_EXTENDED: lost connection to server at '...'
        4031,  # ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8): disconnected by the server
    }
)

# The target refused the change because it is already there. Counted as done only when the
# engine's own check (``already_applied``) confirms it; otherwise it is a failure like any other.
ALREADY_THERE_CODES: Final = frozenset(
    {
        1050,  # ER_TABLE_EXISTS_ERROR: table already exists
        1060,  # ER_DUP_FIELDNAME: duplicate column name
        1061,  # ER_DUP_KEYNAME: duplicate key name
        1068,  # ER_MULTIPLE_PRI_KEY: multiple primary key defined
        1091,  # ER_CANT_DROP_FIELD_OR_KEY: can't drop; check that it exists
        1826,  # ER_FK_DUP_NAME: duplicate foreign key constraint name
    }
)

_CREDENTIALS: Final = re.compile(r"(://[^:/@\s]*):[^@/\s]*@")
_BOILERPLATE: Final = re.compile(r"\s*(\[SQL: |\[parameters: |\(Background on this error at: )")


def _unwrapped(exc: BaseException) -> BaseException:
    """The driver's exception inside SQLAlchemy's wrapper, or ``exc`` itself."""
    if isinstance(exc, sa_exc.DBAPIError) and isinstance(exc.orig, BaseException):
        return exc.orig
    return exc


def error_code(exc: BaseException) -> int | None:
    """The MySQL error code behind ``exc`` (wrapped by SQLAlchemy or not), if any."""
    args: tuple[Any, ...] = tuple(getattr(_unwrapped(exc), "args", ()))
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return args[0]
    return None


def redact(text: str) -> str:
    """``text`` with the password of any URL in it replaced: target URLs carry passwords."""
    return _CREDENTIALS.sub(r"\1:***@", text)


def describe(exc: BaseException) -> str:
    """``exc`` in words for people: the server's or client's message and the MySQL error code,
    none of SQLAlchemy's wrapping; any URL's password redacted."""
    orig = _unwrapped(exc)
    code = error_code(exc)
    args: tuple[Any, ...] = tuple(getattr(orig, "args", ()))
    if code is not None and len(args) >= 2:
        message = str(args[1])
    else:
        message = str(orig) or type(orig).__name__
    # Whatever text is left (a wrapper's own message): cut SQLAlchemy's statement and link.
    message = _BOILERPLATE.split(message, maxsplit=1)[0].strip()
    message = redact(message)
    return f"{message} (MySQL error {code})" if code is not None else message


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the target is not there, rather than that the change failed."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True  # SQLAlchemy's own disconnect detection agrees
    return error_code(exc) in UNAVAILABLE_CODES


def is_already_there(exc: BaseException) -> bool:
    return error_code(exc) in ALREADY_THERE_CODES


def translate(exc: BaseException, *, target: str, failed: str) -> EngineError:
    """The engine error for ``exc``: ``TargetUnavailable`` (retried) or an ``EngineError``
    whose message starts with ``failed`` (e.g. "DDL on orders failed")."""
    if is_unavailable(exc):
        return TargetUnavailable(target, describe(exc))
    return EngineError(f"{failed}: {describe(exc)}")
