"""A mutation gate for the safety core: deliberately broken copies of the lease statements, each
run against the contract tests that must catch it.

Every mutant is a small textual patch (exact old -> new strings) to a module of
storage/_statements/ (the lease row, the effect window, owned writes, lines), to
storage/_leasing.py or to storage/fenced.py: a condition of the fence, of redemption, of the
heartbeat or of a rotation removed, a lock dropped, a transaction split in two. Each is applied to
a scratch copy of the tree (never to this one), and the contract tests listed for it run there with
``-x``, on SQLite and MariaDB/MySQL alike (the contract fixtures run both, and fail under CI when
MariaDB is missing). A mutant is KILLED when a test fails; one that SURVIVES, a run that errors (a
test id that no longer exists, say), or a patch that no longer applies fails the gate.

    .venv/bin/python scripts/mutants.py            # every mutant (make mutants)
    .venv/bin/python scripts/mutants.py --list     # what each one breaks and its tests
    .venv/bin/python scripts/mutants.py fence-without-row-lock redeem-without-owner-null

Before the mutants, their tests run once on the unbroken copy (``--no-baseline`` skips that): a
test that fails there would "kill" every mutant.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Not copied into the scratch tree: the virtualenv (its python runs the tests), git, runtime state,
# caches, build metadata.
IGNORED = (
    *(".venv", ".git", "var", "__pycache__", "*.pyc"),
    *(".mypy_cache", ".pytest_cache", ".ruff_cache", "*.egg-info", "leasehold.sqlite3*"),
)
RESULT_TAIL = 40  # lines of a run's output shown when a run goes wrong

# The modules of storage/_statements/ that the mutants patch.
STATEMENTS_LEASE = "storage/_statements/lease.py"
STATEMENTS_EFFECTS = "storage/_statements/effects.py"
STATEMENTS_OWNED = "storage/_statements/owned.py"
STATEMENTS_LINES = "storage/_statements/lines.py"
LEASING = "storage/_leasing.py"
FENCED = "storage/fenced.py"

CONTRACT = "tests/contract"
SHAPES = f"{CONTRACT}/test_fence_shapes.py"
RACES = f"{CONTRACT}/test_races.py"
OWNED = f"{CONTRACT}/test_owned_writes.py"
LIFECYCLE = f"{CONTRACT}/test_lifecycle.py"
LINES_TESTS = f"{CONTRACT}/test_lines.py"
LINE_RACES = f"{CONTRACT}/test_line_races.py"
EFFECTS = f"{CONTRACT}/test_effect_records.py"
MODEL = f"{CONTRACT}/test_lease_model.py"

# Killers named more than once (each runs on SQLite and MariaDB; the race tests at REPEATABLE READ
# and READ COMMITTED too).
CHECK_THEN_WRITE = (
    f"{SHAPES}::test_a_rotation_started_between_the_fence_check_and_its_write_waits_for_the_commit"
)
SAME_EPOCH_RACE = (
    f"{SHAPES}::test_a_holder_of_the_same_epoch_with_another_token_waits_for_the_fence_then_is_"
    "refused"
)
SAME_EPOCH = (
    f"{SHAPES}::test_every_lease_operation_of_the_same_epoch_with_another_token_fails_closed"
)
HEARTBEAT_NEVER_ISSUED = f"{LIFECYCLE}::test_heartbeat_of_a_lease_never_issued_is_lease_lost"


RECLAIM_SKIP = "        .limit(limit)\n        .with_for_update(skip_locked=True)\n"
BATCHED = f"{CONTRACT}/test_batched_heartbeat.py"
BATCH_RECLAIMED = f"{BATCHED}::test_one_apply_of_a_batch_reclaimed_while_the_batch_renews"
BATCH_LOST = f"{BATCHED}::test_each_lease_of_a_batch_is_lost_only_by_its_own_row"
BATCH_LOCK = "        .order_by(applies.c.id)\n        .with_for_update(skip_locked=True)\n"
BATCH_CHECK = "        elif row.lease_epoch != epoch or row.lease_token != token:\n"
BATCH_STATE_CHECK = "        elif row.state != ApplyState.RUNNING:\n"


@dataclass(frozen=True)
class Patch:
    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Mutant:
    name: str
    breaks: str
    tests: tuple[str, ...]  # pytest arguments (node ids or files), the expected killer first
    patches: tuple[Patch, ...]


def mutant(name: str, breaks: str, tests: Sequence[str], *patches: tuple[str, str, str]) -> Mutant:
    return Mutant(name, breaks, tuple(tests), tuple(Patch(*p) for p in patches))


FENCE_WHERE = (
    "            applies.c.lease_token == token,\n"
    "            applies.c.state == ApplyState.RUNNING,\n"
    "        )\n"
    "        .with_for_update()\n"
)
HEARTBEAT_WHERE = (
    "            applies.c.lease_epoch == epoch,\n"
    "            applies.c.lease_token == token,\n"
    "            applies.c.state == ApplyState.RUNNING,\n"
    "        )\n"
    "        .values(heartbeat_at=clock.now())\n"
)


def without(text: str, line: str) -> str:
    """``text`` less one of its lines (given without indentation or newline)."""
    lines = text.splitlines(keepends=True)
    kept = [each for each in lines if each.strip() != line]
    assert len(kept) == len(lines) - 1, f"{line!r} is not one line of the pattern"
    return "".join(kept)


MUTANTS: tuple[Mutant, ...] = (
    # --- the fence -------------------------------------------------------------------------------
    mutant(
        "fence-check-then-act",
        "the fence's check commits in a transaction of its own and the block's writes run in a "
        "second one: a rotation can commit between the check and the write",
        [CHECK_THEN_WRITE, MODEL],
        (
            FENCED,
            "    for txn in db.attempts():\n        with txn as conn:\n            line = None\n",
            "    with db.transaction() as check:\n"
            "        leasing.fence(check, apply_id, epoch, token)\n"
            "    for txn in db.attempts():\n"
            "        with txn as conn:\n"
            "            line = None\n",
        ),
        (FENCED, "            leasing.fence(conn, apply_id, epoch, token)\n", ""),
    ),
    mutant(
        "fence-without-row-lock",
        "the fence's SELECT loses FOR UPDATE: it proves the token and locks nothing (MySQL)",
        [CHECK_THEN_WRITE, f"{RACES}::test_fenced_write_in_flight_makes_hand_back_wait"],
        (
            STATEMENTS_LEASE,
            FENCE_WHERE + "    )\n\n\ndef lock_apply(",
            without(FENCE_WHERE, ".with_for_update()") + "    )\n\n\ndef lock_apply(",
        ),
    ),
    mutant(
        "fence-without-token",
        "the fence's SELECT loses `lease_token = ?`: its epoch check alone admits another token of "
        "the current epoch",
        [SAME_EPOCH_RACE, SAME_EPOCH, MODEL],
        (STATEMENTS_LEASE, FENCE_WHERE, without(FENCE_WHERE, "applies.c.lease_token == token,")),
    ),
    mutant(
        "fence-without-running-state",
        "the fence's SELECT loses `state = 'running'`: the lease of a dispatched (or stopped, or "
        "ended) apply is admitted",
        [f"{OWNED}::test_write_fails_closed_on_a_dispatched_lease_nobody_redeemed"],
        (
            STATEMENTS_LEASE,
            FENCE_WHERE,
            without(FENCE_WHERE, "applies.c.state == ApplyState.RUNNING,"),
        ),
    ),
    mutant(
        "fence-without-epoch-check",
        "the fence no longer compares the epoch it read with the lease's: the current token with "
        "another epoch is admitted, and its writes are stamped with that epoch",
        [f"{OWNED}::test_write_fails_closed"],
        (LEASING, "    if found != epoch:\n", "    if False:\n"),
    ),
    # --- redemption ------------------------------------------------------------------------------
    mutant(
        "redeem-without-owner-null",
        "redemption loses `lease_owner IS NULL`: a dispatched lease that has an owner is "
        "redeemed again",
        [f"{SHAPES}::test_redeem_refuses_a_dispatched_lease_that_already_has_an_owner"],
        (
            STATEMENTS_LEASE,
            "            applies.c.lease_token == token,\n"
            "            applies.c.lease_owner.is_(None),\n"
            "            applies.c.state == ApplyState.DISPATCHED,\n"
            "        )\n"
            "        .values(\n"
            "            lease_owner=owner,\n",
            "            applies.c.lease_token == token,\n"
            "            applies.c.state == ApplyState.DISPATCHED,\n"
            "        )\n"
            "        .values(\n"
            "            lease_owner=owner,\n",
        ),
    ),
    mutant(
        "redeem-without-token",
        "redemption loses `lease_token = ?`: a lease never issued (the current epoch, a forged "
        "token) is redeemed",
        [f"{LIFECYCLE}::test_redeem_of_a_lease_never_issued"],
        (
            STATEMENTS_LEASE,
            "            applies.c.lease_token == token,\n"
            "            applies.c.lease_owner.is_(None),\n",
            "            applies.c.lease_owner.is_(None),\n",
        ),
    ),
    # --- heartbeat -------------------------------------------------------------------------------
    mutant(
        "heartbeat-without-token",
        "the heartbeat loses `lease_token = ?`: another token of the current epoch renews it",
        [HEARTBEAT_NEVER_ISSUED, SAME_EPOCH],
        (
            STATEMENTS_LEASE,
            HEARTBEAT_WHERE,
            without(HEARTBEAT_WHERE, "applies.c.lease_token == token,"),
        ),
    ),
    mutant(
        "heartbeat-without-epoch",
        "the heartbeat loses `lease_epoch = ?`: the current token with another epoch renews it",
        [HEARTBEAT_NEVER_ISSUED],
        (
            STATEMENTS_LEASE,
            HEARTBEAT_WHERE,
            without(HEARTBEAT_WHERE, "applies.c.lease_epoch == epoch,"),
        ),
    ),
    mutant(
        "heartbeat-without-running-state",
        "the heartbeat loses `state = 'running'`: a lease nobody redeemed renews it",
        [f"{LIFECYCLE}::test_heartbeat_of_a_dispatched_lease_is_lease_lost"],
        (
            STATEMENTS_LEASE,
            HEARTBEAT_WHERE,
            without(HEARTBEAT_WHERE, "applies.c.state == ApplyState.RUNNING,"),
        ),
    ),
    # --- a worker's batched heartbeat ---------------------------------------------------------
    mutant(
        "batch-heartbeat-without-row-lock",
        "the batched heartbeat reads its rows without locking them: it decides on a row that a "
        "rotation in flight is about to change",
        [BATCH_RECLAIMED],
        (
            STATEMENTS_LEASE,
            BATCH_LOCK,
            BATCH_LOCK.replace("        .with_for_update(skip_locked=True)\n", ""),
        ),
    ),
    mutant(
        "batch-heartbeat-without-token-check",
        "the batched heartbeat compares epochs only: a lease of the current epoch with another "
        "token is taken for current",
        [BATCH_LOST],
        (LEASING, BATCH_CHECK, BATCH_CHECK.replace(" or row.lease_token != token", "")),
    ),
    mutant(
        "batch-heartbeat-without-running-check",
        "the batched heartbeat renews a lease whose apply left running",
        [BATCH_LOST],
        (
            LEASING,
            BATCH_STATE_CHECK,
            BATCH_STATE_CHECK.replace("row.state != ApplyState.RUNNING", "False"),
        ),
    ),
    # --- rotation --------------------------------------------------------------------------------
    mutant(
        "rotate-without-cas",
        "a rotation loses its compare-and-swap on (epoch, token): it rotates whatever lease the "
        "row holds by then",
        [f"{SHAPES}::test_a_rotation_from_a_row_read_before_another_rotation_matches_nothing"],
        (
            STATEMENTS_LEASE,
            "            applies.c.lease_epoch == old_epoch,\n            token_matches,\n",
            "",
        ),
    ),
    mutant(
        "rotate-without-token",
        "a rotation compares the epoch only: another token of the same epoch rotates the lease",
        [SAME_EPOCH],
        (STATEMENTS_LEASE, "            token_matches,\n", ""),
    ),
    mutant(
        "rotate-keeps-the-owner",
        "a rotation leaves `lease_owner` set, so that the new lease can never be redeemed",
        [f"{LIFECYCLE}::test_redeem_of_a_stale_lease"],
        (STATEMENTS_LEASE, '        "lease_owner": None,\n', ""),
    ),
    mutant(
        "terminal-rotation-leaves-requests-pending",
        "a rotation to a terminal state no longer fails the apply's pending control requests",
        [
            f"{OWNED}::test_finish_ends_the_apply_and_fails_the_requests_still_pending",
            f"{LINES_TESTS}::test_a_stop_that_arrives_as_the_apply_completes_fails_saying_so",
        ],
        (
            LEASING,
            "        conn.execute(statements.fail_pending_control_requests(row.apply_id,"
            " apply_state=to_state))\n",
            "",
        ),
    ),
    mutant(
        "request-ending-update-ends-finished-requests",
        "the request-ending update loses `state = 'pending'`: requests already completed are "
        "rewritten as failed",
        [f"{LINES_TESTS}::test_a_cancel_completes_and_fails_the_stop_still_pending"],
        (
            STATEMENTS_OWNED,
            "        .where(control_requests.c.apply_id == apply_id, control_requests.c.state"
            ' == "pending")\n'
            '        .values(state="failed", error=reason, completed_at=clock.now())\n',
            "        .where(control_requests.c.apply_id == apply_id)\n"
            '        .values(state="failed", error=reason, completed_at=clock.now())\n',
        ),
    ),
    mutant(
        "terminal-rotation-owes-no-notification",
        "a rotation to a terminal state no longer makes the completion notification due",
        [
            f"{CONTRACT}/test_notify.py::"
            "test_a_notification_is_recorded_and_owed_only_once_the_apply_ends"
        ],
        (LEASING, "        conn.execute(statements.notification_due(row.apply_id))\n", ""),
    ),
    # --- reclaim ---------------------------------------------------------------------------------
    mutant(
        "reclaim-waits-for-locked-rows",
        "reclaim's candidate scan loses SKIP LOCKED: a pass waits for every fenced row (MySQL)",
        [f"{RACES}::test_reclaim_skips_a_fenced_write_in_flight_and_rotates_after_it"],
        (STATEMENTS_LEASE, RECLAIM_SKIP, RECLAIM_SKIP.replace("(skip_locked=True)", "()")),
    ),
    mutant(
        "reclaim-fresh-heartbeats",
        "reclaim's candidate scan loses its staleness condition: live applies are reclaimed",
        [f"{CONTRACT}/test_reclaim.py::test_running_heartbeat_just_inside_stale_after_is_kept"],
        (
            STATEMENTS_LEASE,
            '            applies.c.heartbeat_at < clock.now_minus(bindparam("older_than",'
            " older_than)),\n",
            "",
        ),
    ),
    # --- lines -----------------------------------------------------------------------------------
    mutant(
        "line-lock-noop",
        "the line lock's SELECT loses FOR UPDATE: the transactions that pass a line's turn on no "
        "longer wait for each other (MySQL)",
        [f"{LINE_RACES}::test_two_submits_wait_for_the_line_and_one_takes_the_turn"],
        (
            STATEMENTS_LINES,
            "    return select(apply_lines.c.database_name).where(*where).with_for_update()\n",
            "    return select(apply_lines.c.database_name).where(*where)\n",
        ),
    ),
    mutant(
        "line-lock-read-on-postgres",
        "PostgreSQL's line lock is a locking read instead of a write: under REPEATABLE READ a "
        "submit that waited for the line keeps a snapshot without the apply its holder added, "
        "and both take the turn",
        [f"{LINE_RACES}::test_two_submits_wait_for_the_line_and_one_takes_the_turn"],
        (
            STATEMENTS_LINES,
            '    if dialect == "postgresql":\n        return (\n            apply_lines',
            "    if False:\n        return (\n            apply_lines",
        ),
    ),
    mutant(
        "finishing-fence-skips-the-line-lock",
        "a finishing fence no longer locks its line before the apply row",
        [f"{LINE_RACES}::test_a_submit_waits_for_the_finishing_apply_of_its_line"],
        (FENCED, "                lines.lock(conn, line)\n", ""),
    ),
    mutant(
        "finish-does-not-pass-the-turn",
        "ending an apply no longer dispatches the next apply of its line",
        [f"{LINES_TESTS}::test_finishing_dispatches_the_next_apply_in_the_same_transaction"],
        (
            FENCED,
            "    return Finished(epoch, lines.promote(conn, line, successor_token))\n",
            "    return Finished(epoch, None)\n",
        ),
    ),
    # --- the effect window (GitHub calls) ---------------------------------------------------------
    mutant(
        "window-without-token",
        "the effect window opens for any holder of the epoch, current token or not",
        [f"{EFFECTS}::test_only_the_current_lease_opens_a_window"],
        (
            STATEMENTS_EFFECTS,
            "            applies.c.lease_token == token,\n"
            "            applies.c.effect_until.is_(None)\n",
            "            applies.c.effect_until.is_(None)\n",
        ),
    ),
    mutant(
        "window-ignores-an-open-window",
        "a later epoch opens its window while an earlier epoch's call may still be in flight",
        [f"{EFFECTS}::test_a_later_epoch_waits_for_an_open_window_told_how_long"],
        (
            STATEMENTS_EFFECTS,
            "            applies.c.effect_until.is_(None)\n"
            "            | (applies.c.effect_epoch == epoch)\n"
            "            | (applies.c.effect_until <= clock.now()),\n",
            "",
        ),
    ),
    mutant(
        "close-any-window",
        "closing an epoch's window closes whichever window is open, a later epoch's too",
        [f"{EFFECTS}::test_a_later_epoch_waits_for_an_open_window_told_how_long"],
        (
            STATEMENTS_EFFECTS,
            "        .where(applies.c.id == apply_id, applies.c.effect_epoch == epoch)\n",
            "        .where(applies.c.id == apply_id)\n",
        ),
    ),
    mutant(
        "effect-record-without-token",
        "an effect's answer is recorded for whoever names the apply, lease moved on or not",
        [f"{EFFECTS}::test_a_lease_that_moved_on_records_nothing"],
        (
            STATEMENTS_EFFECTS,
            "        .where(applies.c.id == apply_id, applies.c.lease_token == token)\n"
            "        .with_for_update()\n",
            "        .where(applies.c.id == apply_id)\n        .with_for_update()\n",
        ),
    ),
)


# --- running ----------------------------------------------------------------------------------


class PatchFailed(Exception):
    pass


def apply_patches(tree: Path, mutant: Mutant) -> None:
    for patch in mutant.patches:
        target = tree / patch.path
        text = target.read_text()
        found = text.count(patch.old)
        if found != 1:
            raise PatchFailed(
                f"{mutant.name}: the patch to {patch.path} no longer applies: its old text is "
                f"found {found} times (exactly 1 expected):\n{patch.old}"
            )
        mutated = text.replace(patch.old, patch.new)
        compile(mutated, str(target), "exec")  # a mutant must still be Python
        target.write_text(mutated)


def restore(tree: Path, mutant: Mutant, originals: dict[str, str]) -> None:
    """Put back the files a mutant patched, as they were copied (not as the working tree may
    have them by now)."""
    for path in {p.path for p in mutant.patches}:
        (tree / path).write_text(originals[path])


def environment(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("LEASEHOLD_TEST_MYSQL_URL", "mysql+mysqldb://root@127.0.0.1:3306/")
    return env


def check_isolation(python: str, tree: Path) -> None:
    """The copy's modules, not this tree's (the virtualenv has an editable install of it), must
    be the ones imported."""
    # Every module a mutant patches (storage/_statements/'s among them), and the packages around.
    patched = {p.path.removesuffix(".py").replace("/", ".") for m in MUTANTS for p in m.patches}
    around = {"celeryconfig", "leases", "storage._statements", "storage._lines", "tasks"}
    modules = sorted({*around, "tests.support", *patched})
    probe = (
        "import importlib; "
        f"print('\\n'.join(importlib.import_module(m).__file__ for m in {modules!r}))"
    )
    done = subprocess.run(
        [python, "-c", probe],
        cwd=tree,
        env=environment(tree),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if done.returncode != 0:
        raise SystemExit(f"mutants: cannot import the scratch copy:\n{done.stderr}")
    strays = [f for f in done.stdout.split() if not Path(f).resolve().is_relative_to(tree)]
    if strays:
        raise SystemExit(f"mutants: modules imported from outside the scratch copy: {strays}")


@dataclass
class Run:
    returncode: int
    seconds: float
    output: str

    @property
    def first_failure(self) -> str | None:
        for line in self.output.splitlines():
            if line.startswith(("FAILED ", "ERROR ")):
                return line.split(" ", 1)[1].split(" - ", 1)[0]
        return None

    @property
    def reason(self) -> str:
        """The first line of the first failure's explanation: pytest's first ``E`` line, or the
        message of a ``pytest.fail(..., pytrace=False)`` right under the failure's title."""
        lines = self.output.splitlines()
        for line in lines:
            if line.startswith("E "):
                return line[1:].strip()[:160]
        for title, message in itertools.pairwise(lines):
            if title.startswith("_") and title.endswith("_") and message.strip():
                return message.strip()[:160]
        return "?"

    def tail(self) -> str:
        return "\n".join(self.output.splitlines()[-RESULT_TAIL:])


def pytest_run(python: str, tree: Path, tests: Sequence[str], *, stop_first: bool) -> Run:
    args = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    if stop_first:
        args.append("-x")
    started = time.monotonic()
    done = subprocess.run(
        [*args, *tests],
        cwd=tree,
        env=environment(tree),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    return Run(done.returncode, time.monotonic() - started, done.stdout)


def unique(items: Sequence[str]) -> list[str]:
    """In order, without repeats (pytest itself runs a test named twice, as a node id and within
    its file, once)."""
    return list(dict.fromkeys(items))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only these mutants (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the run on the unbroken copy"
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter to run pytest with (default: this one: make mutants runs the "
        "project's .venv python)",
    )
    options = parser.parse_args(argv)

    names = {m.name for m in MUTANTS}
    unknown = sorted(set(options.names) - names)
    if unknown:
        parser.error(f"unknown mutants {unknown}; --list shows them")
    chosen = [m for m in MUTANTS if not options.names or m.name in options.names]
    if options.list:
        for m in chosen:
            print(f"{m.name}: {m.breaks}\n    killed by: {' '.join(m.tests)}")
        return 0

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="leasehold-mutants-") as scratch:
        tree = Path(scratch) / "tree"
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*IGNORED))
        check_isolation(options.python, tree)
        patched = {p.path for m in chosen for p in m.patches}
        originals = {path: (tree / path).read_text() for path in patched}
        # Every patch must apply before anything runs: a stale patch fails the gate at once.
        try:
            for m in chosen:
                apply_patches(tree, m)
                restore(tree, m, originals)
        except PatchFailed as exc:
            print(f"mutants: {exc}", file=sys.stderr)
            return 2

        if not options.no_baseline:
            tests = unique([t for m in chosen for t in m.tests])
            run = pytest_run(options.python, tree, tests, stop_first=True)
            print(f"baseline (unbroken copy): exit {run.returncode} in {run.seconds:.0f}s")
            if run.returncode != 0:
                print(run.tail(), file=sys.stderr)
                print(
                    "mutants: the tests fail on the unbroken tree; fix that first", file=sys.stderr
                )
                return 2

        killed = 0
        broken: list[str] = []
        for m in chosen:
            apply_patches(tree, m)
            try:
                run = pytest_run(options.python, tree, unique(list(m.tests)), stop_first=True)
            finally:
                restore(tree, m, originals)
            failure = run.first_failure
            if run.returncode == 1 and failure is not None:
                killed += 1
                print(f"KILLED   {m.name:<46} {run.seconds:5.1f}s  by {failure}", flush=True)
                print(f"         {'':<46}         {run.reason}", flush=True)
            elif run.returncode == 0:
                broken.append(m.name)
                print(f"SURVIVED {m.name:<46} {run.seconds:5.1f}s  ({m.breaks})", flush=True)
            else:
                broken.append(m.name)
                print(f"ERROR    {m.name:<46} {run.seconds:5.1f}s  exit {run.returncode}")
                print(run.tail(), flush=True)

    print(f"mutants: {time.monotonic() - started:.0f}s")
    print(f"mutants_killed={killed}/{len(chosen)}")
    if broken:
        print(f"mutants: not killed: {', '.join(broken)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
