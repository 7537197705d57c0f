"""``leasehold`` commands run in this process, as the console script runs them (:func:`run_cli`):
a second of interpreter start and imports saved per command, for the CLI suites."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from kombu import pools
from kombu.utils.collections import eqhash

from tests.celery_fixtures import celeryconfig_settings, forget_connections


@dataclass(frozen=True)
class Ran:
    """What a command did: its exit status and what it wrote (as ``subprocess.run`` gives)."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(args: Sequence[str], env: Mapping[str, str], cwd: Path) -> Ran:
    """``leasehold ARGS`` run in this process, as the console script runs it: ``tasks.cli.main``
    with ``args`` in ``cwd``, under ``env`` only (``os.environ`` is replaced for the call), with
    the Celery app configured as ``celeryconfig`` makes it under ``env``. Captures stdout, stderr
    (with what logging's last resort prints there in a process that configured no logging) and
    the exit status (argparse's ``SystemExit`` included). The app's configuration, leasehold's
    runtime, the working directory and the environment are restored afterwards.

    Signed messages (``LEASEHOLD_SECURITY_*``) are set up once per process, at the app's first
    configuration: a command that needs them runs in a subprocess."""
    from tasks import cli, runtime
    from tasks.app import app

    assert not any(k.startswith("LEASEHOLD_SECURITY_") for k in env), "use a subprocess"
    env = {"COLUMNS": "80", **env}  # argparse's width when stdout is not a terminal
    settings = celeryconfig_settings(env, cwd)
    changes = app.conf.changes
    kept = dict(changes)
    out, err = io.StringIO(), io.StringIO()
    # Logging as in a process nobody configured: no handler on the root logger (pytest's are
    # set aside), so a record no handler takes goes to logging's last resort, sys.stderr.
    root = logging.getLogger()
    handlers = root.handlers[:]
    runtime.reset()
    forget_connections(app)
    app.conf.update(settings)
    root.handlers = []
    try:
        with (
            mock.patch.dict(os.environ, env, clear=True),
            contextlib.chdir(cwd),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            try:
                code = cli.main(list(args))
            except SystemExit as exc:  # argparse: --help, usage errors
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        root.handlers = handlers
        if app._pool is not None:  # the command's broker connections, as its exit would close
            used = app.connection_for_write()
            for group in (pools.producers, pools.connections):
                pool = group.pop(eqhash(used), None)  # type: ignore[no-untyped-call]
                if pool is not None:
                    pool.force_close_all()
            used.release()
        runtime.reset()
        forget_connections(app)
        changes.clear()
        changes.update(kept)
    return Ran(code, out.getvalue(), err.getvalue())
