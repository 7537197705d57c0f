"""The ``leasehold`` console script. Errors are one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from storage import applies, audit, migrate
from storage.database import Database, open_database, redact
from storage.errors import InvalidInput, LeaseholdError
from storage.states import ApplyState


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code = _main(args)
        sys.stdout.flush()  # here, not at exit, where a closed pipe would print a traceback
        return code
    except BrokenPipeError:
        # The reader went away (`leasehold logs 7 | head`): stop quietly. Point stdout at
        # /dev/null so that the interpreter's final flush does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(args: argparse.Namespace) -> int:
    try:
        if args.func in _WITHOUT_DATABASE:
            result: int = args.func(None, args)
            return result
        from tasks import runtime  # the Celery configuration validates LEASEHOLD_* on import

        db = open_database(runtime.settings().database_url)
        try:
            if args.func not in _ANY_REVISION:
                # A store nobody migrated, or one migrated by another version, gets one line
                # that says what to do, instead of a driver error from the first query.
                migrate.require_head(db)
            result = args.func(db, args)
        finally:
            db.dispose()
    except LeaseholdError as exc:
        print(f"leasehold: {exc}", file=sys.stderr)
        # audit's exit 1 means "violations found"; an audit that could not run is another thing.
        return 2 if args.func is _audit else 1
    except ValueError as exc:  # celeryconfig's LeaseholdConfigError
        print(f"leasehold: configuration: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leasehold", description="Run schema applies on Celery workers, fenced by leases."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("migrate", help="upgrade the configured database to the newest schema")
    p.set_defaults(func=_migrate)
    p = sub.add_parser("submit", help="submit the apply described by a JSON file")
    p.add_argument("file", type=Path)
    p.add_argument("--by", default=None, help=_BY_HELP + " (else the file's requested_by)")
    p.set_defaults(func=_submit)
    p = sub.add_parser("status", help="the lease table, or one apply with its tasks")
    p.add_argument("apply_id", type=int, nargs="?")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="one apply as leasehold.get_apply gives it")
    p.set_defaults(func=_status)
    p = sub.add_parser("logs", help="an apply's log, with the lease epoch of each line")
    p.add_argument("apply_id", type=int)
    p.set_defaults(func=_logs)
    for action, text in _CONTROL_HELP.items():
        p = sub.add_parser(action, help=text, description=text)
        p.add_argument("apply_id", type=int)
        p.add_argument("--by", default=None, help=_BY_HELP)
        p.set_defaults(func=_control, action=action)
    p = sub.add_parser("doctor", help="check store, broker, workers, beat, routing and applies")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for workers")
    p.set_defaults(func=_doctor)
    p = sub.add_parser("audit", help="check the stored history of applies (read-only)")
    p.add_argument("--apply", type=int, default=None, metavar="ID", help="audit this apply only")
    p.add_argument("--json", action="store_true", help="the violations as a JSON list")
    p.set_defaults(func=_audit)
    p = sub.add_parser("run", help="run a worker and beat (and Flower if installed) here")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-flower", action="store_true")
    p.set_defaults(func=_run)
    p = sub.add_parser("demo", help="a scripted tour: a worker is killed, beat reclaims, ...")
    p.add_argument("--dir", type=Path, default=Path("var/demo"))
    p.set_defaults(func=_demo)
    return parser


_BY_HELP = "who asks, recorded with it (default: USER@HOST)"
_CONTROL_HELP = {
    "stop": "stop an apply at a safe point (resumable)",
    "resume": "resume a stopped apply from its first unfinished task",
    "cancel": "cancel an apply (final)",
    "retry": "retry a failed apply from its failed task (completed tasks stay done)",
}


def _migrate(db: Database, args: argparse.Namespace) -> int:
    before, after = migrate.upgrade(db)
    where = redact(str(db.engine.url))
    if before == after:
        print(f"{where}: already at revision {after}")
    else:
        print(f"{where}: migrated {before or 'empty'} -> {after}")
    return 0


def _submit(db: Database, args: argparse.Namespace) -> int:
    from tasks import runtime, service
    from tasks.dispatcher import send_run

    try:
        payload: Any = json.loads(args.file.read_text())
    except OSError as exc:
        raise InvalidInput(f"cannot read {args.file}: {exc.strerror}") from None
    except ValueError as exc:
        raise InvalidInput(f"{args.file} is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidInput(f"{args.file} must hold a JSON object")
    if args.by is not None:
        payload["requested_by"] = args.by
    elif payload.get("requested_by") is None:
        payload["requested_by"] = _operator()
    apply_id = service.submit(db, runtime.settings(), payload, send_run)
    print(json.dumps({"apply_id": apply_id}))
    return 0


def _status(db: Database, args: argparse.Namespace) -> int:
    if args.json:
        if args.apply_id is None:
            raise InvalidInput("--json shows one apply: give its id")
        from tasks import service

        print(json.dumps(service.get_apply(db, args.apply_id)))
        return 0
    if args.apply_id is not None:
        return _status_one(db, args.apply_id)
    rows = applies.lease_table(db, limit=args.limit)
    print(
        f"{'id':>6}  {'state':<10}  {'epoch':>5}  {'token':<8}  {'owner':<40}  {'heartbeat':<12}"
        f"  {'requested by':<{_BY_WIDTH}}  line"
    )
    for row in rows:
        line = f"{row['database_name']}/{row['environment']}"
        if row["line_position"] is not None:
            line += f" (#{row['line_position']} in line)"
        print(
            f"{row['id']:>6}  {row['state']:<10}  {row['lease_epoch']:>5}  "
            f"{_token(row['lease_token']):<8}  {(row['lease_owner'] or '-')[:40]:<40}  "
            f"{_age(row['heartbeat_age']):<12}  {_cut(_shown(row['requested_by'])):<{_BY_WIDTH}}  "
            f"{line}"
        )
    if not rows:
        print("(no applies yet)")
    return 0


def _status_one(db: Database, apply_id: int) -> int:
    row = applies.get(db, apply_id)
    print(f"apply {row['id']}: {row['state']}  ({row['database_name']} in {row['environment']})")
    print(f"  requested by {_shown(row['requested_by'])}")
    place = applies.place(db, apply_id) if not ApplyState(row["state"]).terminal else None
    if place is not None:
        print(
            f"  #{place.position} in line on {place.line}, behind apply {place.head.apply_id} "
            f"({place.head.state}): it starts when the applies ahead of it end"
        )
    print(f"  lease epoch {row['lease_epoch']}, token {_token(row['lease_token'])}…, ", end="")
    print(f"owner {row['lease_owner'] or '-'}, heartbeat {_age(row['heartbeat_age'])}")
    print(
        f"  reclaims {row['reclaim_count']}" + (f", error: {row['error']}" if row["error"] else "")
    )
    for request in applies.pending_requests(db, apply_id):
        print(
            f"  pending request {request['id']}: {request['action']}"
            + (f" by {_shown(request['requested_by'])}" if request["requested_by"] else "")
            + f", asked {_age(request['age'])}"
        )
    for task in applies.tasks(db, apply_id):
        print(
            f"  {task['position'] + 1:>3}. {task['table_name']:<30} {task['state']:<10} "
            f"{task['progress']:>3}%  (epoch {task['lease_epoch']})"
            + (f"  {task['error']}" if task["error"] else "")
        )
    return 0


def _logs(db: Database, args: argparse.Namespace) -> int:
    row = applies.get(db, args.apply_id)
    # The header: who asked for the apply, and for each control request of it.
    print(
        f"apply {row['id']}: {row['database_name']} in {row['environment']}, "
        f"requested by {_shown(row['requested_by'])}"
    )
    for request in applies.control_requests(db, args.apply_id):
        print(
            f"  control request {request['id']}: {request['action']} "
            f"by {_shown(request['requested_by'])}, {request['state']}"
        )
    after = 0
    while True:
        rows = applies.logs(db, args.apply_id, after_id=after)
        for row in rows:
            print(
                f"{row['id']:>6}  {row['created_at']}  epoch {row['lease_epoch']:>3}  "
                f"{row['level']:<5}  {row['event']:<16} {row['message']}"
            )
        if len(rows) < 1000:
            return 0
        after = int(rows[-1]["id"])


def _control(db: Database, args: argparse.Namespace) -> int:
    from tasks import service
    from tasks.dispatcher import send_notification, send_run

    by = _operator() if args.by is None else args.by
    result = service.control_apply(db, args.apply_id, args.action, by, send_run, send_notification)
    print(json.dumps(result))
    if result["request_state"] == "failed":
        # The JSON above is for scripts; the error is one line on stderr, as for every error.
        print(f"leasehold: {args.action} {args.apply_id}: {result['error']}", file=sys.stderr)
        return 1
    return 0


def _run(db: Database, args: argparse.Namespace) -> int:
    from tasks.testing.processes import run_foreground

    migrate.upgrade(db)
    return run_foreground(workers=args.workers, flower=not args.no_flower)


def _doctor(db: Database, args: argparse.Namespace) -> int:
    from tasks import doctor, runtime
    from tasks.app import app

    findings = []
    for finding in doctor.examine(db, runtime.settings(), app, timeout=args.timeout):
        print(finding, flush=True)
        findings.append(finding)
    bad = doctor.failed(findings)
    print("something is wrong: see the FAIL lines above" if bad else "all good")
    return 1 if bad else 0


def _audit(db: Database, args: argparse.Namespace) -> int:
    report = audit.run(db, args.apply)
    if args.json:
        print(json.dumps([v.as_json() for v in report.violations]))
    elif report.violations:
        for violation in report.violations:
            print(violation)
    else:
        noun = "apply" if report.applies == 1 else "applies"
        print(f"audited {report.applies} {noun}: no violations")
    return 1 if report.violations else 0


def _demo(db: None, args: argparse.Namespace) -> int:
    from tasks.demo import run_demo

    return run_demo(args.dir)


def _operator() -> str:
    """Who runs this command, when ``--by`` does not say: USER@HOST (the CLI only: a Celery
    caller that names nobody is recorded as nobody)."""
    from tasks.payload import MAX_REQUESTED_BY

    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name, no USER variable, no passwd entry (containers)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"[:MAX_REQUESTED_BY]


_BY_WIDTH = 24


def _shown(text: str | None) -> str:
    """Free text from other apps, safe on a terminal: what is not printable (line breaks, escape
    sequences) shows as U+FFFD, so it can neither forge lines nor drive the terminal."""
    if not text:
        return "-"
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


def _cut(text: str, width: int = _BY_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _token(token: str | None) -> str:
    return (token or "")[:6] or "-"


def _age(age: float | None) -> str:
    return "-" if age is None else f"{age:.1f}s ago"


_WITHOUT_DATABASE = {_demo}
# Commands that work on a store at any revision: they migrate it, or report on it.
_ANY_REVISION = {_migrate, _run, _doctor}

if __name__ == "__main__":
    raise SystemExit(main())
