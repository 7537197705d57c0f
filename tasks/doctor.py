"""``leasehold doctor``: what an operator runs when something seems stuck.

Checks the configuration (with who may send leasehold work: whether messages are signed,
``tasks/security.py``), the store (reachable, migrated to this code's head), the broker
(reachable), that each leasehold queue has a consuming worker, that a beat runs reclaim passes
(the age of the last one, by the database clock), that nothing of leasehold's waits in Celery's
default queue ``celery`` (where a caller that names no queue sends, and no leasehold worker
reads), the dead letters (messages the workers refused: how many, and why and when for the newest
few, never their bodies), that every running apply is heartbeating or being reclaimed, and the
pull request publications still owed (``storage/publications.py``). One line per finding; the
exit status is 1 when any finding is a failure (dead letters are a warning: some producer is
wrong, leasehold is not; so is a publication backlog: GitHub is, and it is retried).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from storage import applies, marks, migrate, publications
from storage.database import Database, redact
from storage.errors import LeaseholdError, StorageError, StorageUnavailable
from tasks import deadletter, security
from tasks.settings import Settings

OK, WARN, FAIL = "ok", "warn", "FAIL"
CELERY_DEFAULT_QUEUE = "celery"
PEEK = 1000  # messages of the default queue read for leasehold task names
DEAD_SHOWN = 3  # newest dead letters described


@dataclass(frozen=True, slots=True)
class Finding:
    level: str  # ok, warn or FAIL
    topic: str
    text: str

    def __str__(self) -> str:
        return f"{self.level:<4}  {self.topic:<9}  {self.text}"


def examine(db: Database, settings: Settings, app: Any, *, timeout: float) -> Iterator[Finding]:
    """Every finding, in the order an operator would look."""
    yield from _configuration(settings, app)
    store_ok = False
    for finding in _store(db):
        store_ok = finding.level == OK
        yield finding
    broker_ok = False
    for finding in _broker(app):
        broker_ok = finding.level == OK
        yield finding
    if broker_ok:
        yield from _workers(app, settings, timeout)
        yield from _misrouted(app, settings)
        yield from _dead_letters(app)
    if store_ok:
        yield from _beat(db, settings)
        yield from _applies(db, settings)
        yield from _publications(db)


def failed(findings: list[Finding]) -> bool:
    return any(f.level == FAIL for f in findings)


# --- the checks ----------------------------------------------------------------------------------


def _configuration(settings: Settings, app: Any) -> Iterator[Finding]:
    conf = app.conf
    yield Finding(
        OK,
        "config",
        f"heartbeat {settings.heartbeat_interval:g}s, stale_after {settings.stale_after:g}s, "
        f"reclaim every {settings.reclaim_interval:g}s, dispatch timeout "
        f"{settings.dispatch_timeout:g}s; queues {conf.leasehold_queue!r} (control) and "
        f"{conf.leasehold_apply_queue!r} (applies); {settings.apply_slots} apply slots and "
        f"{settings.control_concurrency} control threads per worker",
    )
    if settings.heartbeat_interval > settings.stale_after / 2:
        yield Finding(
            WARN,
            "config",
            f"LEASEHOLD_HEARTBEAT_INTERVAL ({settings.heartbeat_interval:g}s) leaves fewer than "
            f"two heartbeats per LEASEHOLD_STALE_AFTER ({settings.stale_after:g}s): one slow "
            "heartbeat gets a healthy apply reclaimed",
        )
    yield from _security(app)
    broker = str(conf.broker_url)
    if settings.database_url.startswith("sqlite") and not broker.startswith("filesystem://"):
        yield Finding(
            WARN,
            "config",
            f"the store is a SQLite file ({redact(settings.database_url)}) but the broker is "
            f"{_scheme(broker)}: workers on other machines cannot share that file",
        )


def _security(app: Any) -> Iterator[Finding]:
    """Who may send leasehold work, and whether GitHub's credentials cross the network in clear
    (docs/security.md)."""
    signing = security.signing()
    if signing is not None:
        yield Finding(
            OK,
            "security",
            f"messages signed as {signing.signer}; taken only when signed by one of "
            f"{len(signing.trusted)} certificates: {', '.join(sorted(signing.trusted.values()))}",
        )
    elif not str(app.conf.broker_url).startswith("filesystem://"):
        yield Finding(
            WARN,
            "security",
            "messages are not signed: any client that can write to the broker can submit, stop "
            "and cancel applies (LEASEHOLD_SECURITY_*, docs/security.md)",
        )
    github = urlsplit(str(app.conf.leasehold_github_api_url))
    if github.scheme != "https" and github.hostname not in _LOOPBACK:
        yield Finding(
            WARN,
            "security",
            f"LEASEHOLD_GITHUB_API_URL is {github.scheme}:// to {github.hostname}: GitHub's "
            "token crosses the network in clear",
        )


_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def _store(db: Database) -> Iterator[Finding]:
    where = redact(str(db.engine.url))
    try:
        revision = migrate.require_head(db)
    except StorageUnavailable as exc:
        yield Finding(FAIL, "store", f"cannot reach {where}: {exc}")
    except LeaseholdError as exc:  # not migrated, behind, ahead, foreign
        yield Finding(FAIL, "store", str(exc))
    else:
        yield Finding(OK, "store", f"{where} reachable, at revision {revision} (this code's head)")


def _broker(app: Any) -> Iterator[Finding]:
    where = _scheme(str(app.conf.broker_url))
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:  # kombu and transport errors alike: report, do not crash
        yield Finding(FAIL, "broker", f"cannot reach the broker ({where}): {_one_line(exc)}")
    else:
        yield Finding(OK, "broker", f"reachable ({where})")


def _workers(app: Any, settings: Settings, timeout: float) -> Iterator[Finding]:
    control_queue = str(app.conf.leasehold_queue)
    apply_queue = str(app.conf.leasehold_apply_queue)
    inspect = app.control.inspect(timeout=timeout)
    try:
        queues = inspect.active_queues() or {}
        lanes = inspect._request("apply_slots") or {}
    except Exception as exc:
        yield Finding(FAIL, "workers", f"could not ask the workers: {_one_line(exc)}")
        return
    consuming = {w: {q["name"] for q in qs or []} for w, qs in queues.items()}
    control = sorted(w for w, names in consuming.items() if control_queue in names)
    # A worker whose apply slots are all busy stops consuming the apply queue until one frees:
    # count it as serving that queue.
    appliers = sorted(
        w
        for w, lane in lanes.items()
        if isinstance(lane, dict)
        and lane.get("queue") == apply_queue
        and (lane.get("consuming") or lane.get("busy") == lane.get("size"))
    )
    if not consuming:
        yield Finding(
            FAIL,
            "workers",
            f"no worker answered within {timeout:g}s: start `celery -A tasks worker`",
        )
        return
    for queue, found, role in (
        (control_queue, control, "submit, control and reclaim"),
        (apply_queue, appliers, "applies"),
    ):
        if found:
            yield Finding(OK, "workers", f"queue {queue!r} ({role}): {', '.join(found)}")
        else:
            yield Finding(
                FAIL,
                "workers",
                f"no worker consumes queue {queue!r} ({role}); workers answering: "
                f"{', '.join(sorted(consuming))}",
            )
    busy = [w for w, lane in lanes.items() if isinstance(lane, dict) and not lane.get("consuming")]
    if appliers and set(appliers) == set(busy):
        yield Finding(
            WARN,
            "workers",
            f"every apply slot of every worker is busy: new applies wait for one "
            f"({len(appliers)} workers x {settings.apply_slots} slots)",
        )


def _misrouted(app: Any, settings: Settings) -> Iterator[Finding]:
    if CELERY_DEFAULT_QUEUE in (app.conf.leasehold_queue, app.conf.leasehold_apply_queue):
        return
    try:
        names = list(_peek_task_names(app, CELERY_DEFAULT_QUEUE))
    except _CannotPeek as exc:
        yield Finding(WARN, "routing", str(exc))
        return
    except Exception as exc:
        yield Finding(WARN, "routing", f"could not read queue 'celery': {_one_line(exc)}")
        return
    ours = [n for n in names if n.startswith("leasehold.")]
    if ours:
        counts = {n: ours.count(n) for n in sorted(set(ours))}
        shown = ", ".join(f"{n} x{c}" for n, c in counts.items())
        yield Finding(
            FAIL,
            "routing",
            f"{len(ours)} leasehold messages wait in Celery's default queue 'celery', which no "
            f"leasehold worker reads ({shown}): their senders must name queue "
            f"{app.conf.leasehold_queue!r} (send_task(..., queue=...) or task_routes)",
        )
    else:
        yield Finding(OK, "routing", "no leasehold message waits in queue 'celery'")


def _dead_letters(app: Any) -> Iterator[Finding]:
    try:
        with deadletter.open_store(app) as store:
            where, count = store.where, store.count()
            size = store.size() if count else 0
            newest = store.newest(DEAD_SHOWN) if count else []
    except Exception as exc:
        yield Finding(WARN, "dead", f"could not read the dead letters: {_one_line(exc)}")
        return
    if not count:
        yield Finding(OK, "dead", f"no dead letters ({where})")
        return
    bound = f"the newest {deadletter.KEEP} and at most {_bytes(deadletter.MAX_BYTES)} are kept"
    held = "" if size is None else f", {_bytes(size)},"
    yield Finding(
        WARN,
        "dead",
        f"{count} dead letters{held} in {where} ({bound}): messages the workers refused; some "
        "producer sends what leasehold cannot run (README: dead letters)",
    )
    for letter in newest:
        yield Finding(WARN, "dead", letter.summary())
    if count and not newest:
        yield Finding(WARN, "dead", "read them with the broker's own tools (they are messages)")


def _publications(db: Database) -> Iterator[Finding]:
    """Stopped or final states of applies not yet shown on their pull requests (the outbox of
    ``storage/publications.py``): their holder publishes them at once, so a backlog that stays
    means GitHub refuses or no reclaim pass (beat) settles it."""
    try:
        owed = publications.backlog(db)
    except StorageError as exc:
        yield Finding(FAIL, "github", f"cannot read the owed publications: {exc}")
        return
    if not owed.count:
        yield Finding(OK, "github", "no pull request publication owed")
        return
    since = owed.oldest_due_at
    if isinstance(since, datetime):
        since = since.strftime("%Y-%m-%d %H:%M:%S UTC")
    yield Finding(
        WARN,
        "github",
        f"{owed.count} pull request publications owed (the final or stopped state of an apply), "
        f"the oldest due at {since}: reclaim passes retry them; if this stays, is GitHub "
        "answering (LEASEHOLD_GITHUB_API_URL, LEASEHOLD_GITHUB_TOKEN)?",
    )


def _beat(db: Database, settings: Settings) -> Iterator[Finding]:
    try:
        mark = marks.read(db, marks.RECLAIM_PASS)
    except StorageError as exc:
        yield Finding(FAIL, "beat", f"cannot read the last reclaim pass: {exc}")
        return
    late = 3 * settings.reclaim_interval + 10
    if mark.age is None:
        yield Finding(
            FAIL,
            "beat",
            "no reclaim pass ever ran: start `celery -A tasks beat` (one is enough), and a "
            "worker to run its passes",
        )
    elif mark.age > late:
        yield Finding(
            FAIL,
            "beat",
            f"the last reclaim pass ran {mark.age:.0f}s ago (one is due every "
            f"{settings.reclaim_interval:g}s): is `celery -A tasks beat` running, and a worker "
            "consuming its queue?",
        )
    else:
        yield Finding(OK, "beat", f"last reclaim pass {mark.age:.1f}s ago ({mark.detail or ''})")


def _applies(db: Database, settings: Settings) -> Iterator[Finding]:
    try:
        rows = applies.active(db)
        last_pass = marks.read(db, marks.RECLAIM_PASS).age
    except StorageError as exc:
        yield Finding(FAIL, "applies", f"cannot read the applies: {exc}")
        return
    stuck = 0
    for row in rows:
        age = row["heartbeat_age"]
        limit = settings.stale_after if row["state"] == "running" else settings.dispatch_timeout
        if age is None or age <= limit:
            continue
        stuck += 1
        stale_for = age - limit
        if last_pass is not None and last_pass < stale_for:
            why = (
                "reclaim passes ran since but skip it: its row is locked (a worker frozen "
                "inside a transaction holds it until the server ends that session)"
            )
        else:
            why = "no reclaim pass ran since: is beat running?"
        what = "heartbeat" if row["state"] == "running" else "dispatch"
        yield Finding(
            FAIL,
            "applies",
            f"apply {row['id']} ({row['state']}): {what} {age:.0f}s old, over {limit:g}s; {why}",
        )
    if not stuck:
        running = sum(1 for r in rows if r["state"] == "running")
        yield Finding(
            OK,
            "applies",
            f"{running} running, {len(rows) - running} dispatched: none past its staleness",
        )


# --- reading the default queue without taking its messages ---------------------------------------


class _CannotPeek(Exception):
    pass


def _peek_task_names(app: Any, queue: str) -> Iterator[str]:
    """The task names of the messages waiting in ``queue``, read without consuming them."""
    url = str(app.conf.broker_url)
    if url.startswith(("redis://", "rediss://")):
        with app.connection_for_read() as conn:
            client = conn.default_channel.client
            for raw in client.lrange(queue, 0, PEEK - 1):
                name = _task_name(raw)
                if name is not None:
                    yield name
        return
    if url.startswith("filesystem://"):
        folder = Path(app.conf.broker_transport_options["data_folder_in"])
        for path in sorted(folder.glob(f"*.{queue}.msg"))[:PEEK]:
            try:
                name = _task_name(path.read_bytes())
            except OSError:
                continue  # taken meanwhile
            if name is not None:
                yield name
        return
    raise _CannotPeek(
        f"queue 'celery' is not read on {_scheme(url)} (only on Redis and the embedded broker: "
        "reading it there would take the messages)"
    )


def _task_name(raw: bytes | str) -> str | None:
    """A kombu envelope's task name (protocol 2 headers, else the protocol 1 body)."""
    try:
        envelope = json.loads(raw)
        headers = envelope.get("headers") or {}
        if headers.get("task"):
            return str(headers["task"])
        body = envelope.get("body")
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        return str(decoded.get("task")) if isinstance(decoded, dict) else None
    except (ValueError, TypeError, AttributeError):
        return None  # not a message of ours to judge


def _bytes(n: int) -> str:
    """``n`` bytes for people: ``512 bytes``, ``3.2 KiB``, ``64 MiB``."""
    if n < 1024:
        return f"{n} bytes"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f}".removesuffix(".0") + f" {unit}"
        size /= 1024
    return f"{size:.1f}".removesuffix(".0") + " GiB"


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url else "?"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
