"""The ``leasehold`` console script. Errors are one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from storage import applies, migrate
from storage.engine import Database, open_database, redact
from storage.errors import LeaseholdError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        db = open_database()
        try:
            result: int = args.func(db, args)
        finally:
            db.dispose()
    except LeaseholdError as exc:
        print(f"leasehold: {exc}", file=sys.stderr)
        return 1
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leasehold", description="Run schema applies on Celery workers, fenced by leases."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("migrate", help="upgrade the configured database to the newest schema")
    p.set_defaults(func=_migrate)
    p = sub.add_parser("status", help="show the lease table of recent applies")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=_status)
    return parser


def _migrate(db: Database, args: argparse.Namespace) -> int:
    before, after = migrate.upgrade(db)
    where = redact(str(db.engine.url))
    if before == after:
        print(f"{where}: already at revision {after}")
    else:
        print(f"{where}: migrated {before or 'empty'} -> {after}")
    return 0


def _status(db: Database, args: argparse.Namespace) -> int:
    rows = applies.lease_table(db, limit=args.limit)
    header = f"{'id':>6}  {'state':<10}  {'epoch':>5}  {'token':<8}  {'owner':<24}  heartbeat"
    print(header)
    for row in rows:
        token = (row["lease_token"] or "")[:6]
        age = row["heartbeat_age"]
        beat = "-" if age is None else f"{age:.1f}s ago"
        owner = row["lease_owner"] or "-"
        print(
            f"{row['id']:>6}  {row['state']:<10}  {row['lease_epoch']:>5}  {token:<8}  "
            f"{owner:<24}  {beat}"
        )
    if not rows:
        print("(no applies yet)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
