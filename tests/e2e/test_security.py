"""Who may change production (issue 14): signed messages, the requester on record, no secret in
any output.

The workers and beat here sign with a key of their own and take only messages signed by a
certificate in their store (``LEASEHOLD_SECURITY_*``; the certificate and the store are given
as PEM text, the key as a file). The test process plays the other apps: a client whose
certificate is in the store, one that does not sign at all, and a rogue one whose certificate is
not in the store. Certificates are made here (``tests/certs.py``).

The last test runs an apply with every secret a deployment has (signing keys, a GitHub token, a
database password and a Redis ACL user's password) and greps every process log, every CLI output
and every task event Flower would show for each of them and for every whole lease token.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from storage.tables import applies as applies_table
from storage.tables import control_requests
from tasks.testing.processes import CeleryProcess
from tasks.testing.standin import GitHubStandIn
from tests.certs import Issued, self_signed, signing_as
from tests.e2e.helpers import (
    PROCESS_START_TIMEOUT,
    RESULT_TIMEOUT,
    Cluster,
    EventRecorder,
    Stack,
    all_apply_ids,
    dispatched_apply,
    new_apply,
    row,
    sleep_payload,
    wait_for,
    wait_log,
    wait_state,
)

pytestmark = pytest.mark.slow
# Signing is the consumer's and the producer's, whatever the transport (the guard's consumer stage
# is the same on all of them): Redis + MariaDB, where passwords go with it, keeps the suite's time.
STACKS = frozenset({"redis"})

SUBMIT = "leasehold.submit_apply"
CONTROL = "leasehold.control_apply"
RUN_APPLY = "leasehold.run_apply"
APPLIES_QUEUE = "leasehold.applies"
REFUSED = "refused a message:"
REPOSITORY = "acme/schema"
SHA = "a" * 40


@dataclass(frozen=True)
class Keys:
    worker: Issued  # leasehold's own processes
    client: Issued  # another app, trusted
    rogue: Issued  # another app, not in the store


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("keys")
    return Keys(
        worker=self_signed(folder, "leasehold-worker"),
        client=self_signed(folder, "deploy-bot"),
        rogue=self_signed(folder, "rogue"),
    )


@pytest.fixture(scope="module")
def github() -> Iterator[tuple[GitHubStandIn, str]]:
    token = "ghp_" + uuid.uuid4().hex + uuid.uuid4().hex[:8]
    with GitHubStandIn([token]) as standin:
        yield standin, token


@dataclass(frozen=True)
class Secured:
    env: dict[str, str]  # the LEASEHOLD_* values of every signed process here
    secrets: dict[str, str]  # name -> a secret that must appear in no output


@pytest.fixture(scope="module")
def secured(stack: Stack, keys: Keys, github: tuple[GitHubStandIn, str]) -> Iterator[Secured]:
    standin, token = github
    env = {
        "LEASEHOLD_SECURITY_KEY": str(keys.worker.key_path),
        "LEASEHOLD_SECURITY_CERTIFICATE": keys.worker.cert_pem,
        "LEASEHOLD_SECURITY_CERT_STORE": keys.worker.cert_pem + keys.client.cert_pem,
        "LEASEHOLD_GITHUB_API_URL": standin.url,
        "LEASEHOLD_GITHUB_TOKEN": token,
    }
    secrets = {"GitHub token": token}
    for name, issued in (("worker key", keys.worker), ("client key", keys.client)):
        # Any line of a key's base64 body is enough to tell it leaked.
        for index, line in enumerate(_pem_body(issued.key_pem)):
            secrets[f"{name} line {index}"] = line
    user = None
    if stack.name == "redis":  # the workers connect to MariaDB and Redis as users with passwords
        user, password = f"lh_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
        url = make_url(stack.database_url)
        with stack.db.engine.begin() as conn:
            conn.execute(text(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"))
            conn.execute(text(f"GRANT ALL ON `{url.database}`.* TO '{user}'@'%'"))
        env["LEASEHOLD_DATABASE_URL"] = url.set(username=user, password=password).render_as_string(
            hide_password=False
        )
        secrets["database password"] = password
        # Redis: broker and result backend as an ACL user with a password, made for this module.
        broker = redis.Redis.from_url(stack.env["LEASEHOLD_BROKER_URL"])
        broker_password = uuid.uuid4().hex
        broker.acl_setuser(
            user,
            enabled=True,
            passwords=[f"+{broker_password}"],
            categories=["+@all"],
            keys=["*"],
            channels=["*"],
        )
        for name in ("LEASEHOLD_BROKER_URL", "LEASEHOLD_RESULT_BACKEND"):
            parts = urlsplit(stack.env[name])
            where = f"{user}:{broker_password}@{parts.hostname}:{parts.port}"
            env[name] = urlunsplit(parts._replace(netloc=where))
        secrets["broker password"] = broker_password
    try:
        yield Secured(env, secrets)
    finally:
        if user is not None:
            with stack.db.engine.begin() as conn:
                conn.execute(text(f"DROP USER IF EXISTS '{user}'@'%'"))
            broker.acl_deluser(user)
            broker.close()


def _pem_body(pem: str) -> list[str]:
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


def send(
    stack: Stack, issued: Issued | None, name: str, kwargs: dict[str, Any], **options: Any
) -> Any:
    with signing_as(issued) as serializer:
        return stack.client.send_task(name, kwargs=kwargs, serializer=serializer, **options)


def broadcast(stack: Stack, issued: Issued | None, command: str) -> None:
    """A remote-control broadcast to every worker, sent as ``issued`` (or unsigned)."""
    mailbox = stack.client.control.mailbox
    with signing_as(issued) as serializer:
        kept, mailbox.serializer = mailbox.serializer, serializer
        try:
            stack.client.control.broadcast(command)
        finally:
            mailbox.serializer = kept


def requests_of(stack: Stack, apply_id: int) -> list[tuple[str, str | None]]:
    with stack.db.engine.connect() as conn:
        rows = conn.execute(
            select(control_requests.c.action, control_requests.c.requested_by)
            .where(control_requests.c.apply_id == apply_id)
            .order_by(control_requests.c.id)
        ).all()
    return [(r.action, r.requested_by) for r in rows]


def refusals(proc: CeleryProcess) -> list[str]:
    return [line for line in proc.log().splitlines() if REFUSED in line]


@pytest.fixture(scope="module")
def _signed_workers() -> list[CeleryProcess]:
    return []


@pytest.fixture
def signed_worker(
    _signed_workers: list[CeleryProcess], secured: Secured, cluster: Cluster
) -> CeleryProcess:
    """The module's signed worker: started by the first test that needs it and kept for the
    others (one start instead of one per test), replaced if a test left it dead. It is one of
    the cluster's shared processes: stopped after the module, its log attached to a failing
    test's report from where that test began."""
    alive = [p for p in _signed_workers if p.proc is not None and p.proc.poll() is None]
    if alive:
        return alive[0]
    (proc,) = cluster.workers(1, env=secured.env)
    cluster.own.remove(proc)
    cluster.shared.append(proc)
    _signed_workers.append(proc)
    return proc


def cli_outputs(stack: Stack, env: dict[str, str], *commands: tuple[str, ...]) -> list[str]:
    """``leasehold COMMAND`` for each of ``commands``, run at the same time (each a process of
    its own, configured by ``env``); the stdout and stderr of each, in order."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tasks.cli", *args],
            env=env,
            cwd=stack.folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    outputs = []
    for args, proc in zip(commands, procs, strict=True):
        try:
            out, err = proc.communicate(timeout=PROCESS_START_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert "Traceback" not in err, (args, err)
        outputs.append(out + err)
    return outputs


# --- signed clients are served -------------------------------------------------------------------


def test_a_signed_client_is_served_and_on_record(
    cluster: Cluster,
    keys: Keys,
    secured: Secured,
    github: tuple[GitHubStandIn, str],
    signed_worker: CeleryProcess,
) -> None:
    stack = cluster.stack
    payload = sleep_payload(0.2) | {
        "repository": REPOSITORY,
        "pull_request": 7,
        "head_sha": SHA,
        "requested_by": "alice",
    }
    done = send(stack, keys.client, SUBMIT, payload).get(timeout=RESULT_TIMEOUT)
    apply_id = int(done["apply_id"])
    wait_state(stack.db, apply_id, "completed", timeout=RESULT_TIMEOUT)
    # The signature is what was proved, so it leads; the caller's words follow it.
    assert row(stack.db, apply_id)["requested_by"] == "CN=deploy-bot (as alice)"
    status = stack.cli("status", str(apply_id)).stdout
    assert "CN=deploy-bot (as alice)" in status, status

    stopped = int(
        send(stack, keys.client, SUBMIT, sleep_payload(30)).get(timeout=RESULT_TIMEOUT)["apply_id"]
    )
    wait_state(stack.db, stopped, "running", timeout=RESULT_TIMEOUT)
    # A header of the signer's name from the sender is not believed: only the signature is.
    send(
        stack,
        keys.client,
        CONTROL,
        {"apply_id": stopped, "action": "cancel"},
        headers={"leasehold_signer": "CN=root"},
    ).get(timeout=RESULT_TIMEOUT)
    wait_state(stack.db, stopped, "cancelled", timeout=RESULT_TIMEOUT)
    assert requests_of(stack, stopped) == [("cancel", "CN=deploy-bot")]
    assert "CN=deploy-bot" in stack.cli("logs", str(stopped)).stdout

    standin, _ = github
    comment = _comment(standin, 7)
    assert "deploy-bot" in comment, comment


def _comment(standin: GitHubStandIn, number: int) -> str:
    bodies: list[str] = []

    def found() -> bool:
        owner, repo = REPOSITORY.split("/")
        bodies[:] = [c.body for c in standin.comments(owner, repo, number)]
        return any("completed" in b.lower() for b in bodies)

    wait_for("the PR comment of the completed apply", found, timeout=RESULT_TIMEOUT)
    return "\n".join(bodies)


def test_beat_signs_its_reclaim_passes(
    cluster: Cluster, secured: Secured, signed_worker: CeleryProcess
) -> None:
    """A queued apply nobody sent is dispatched by a reclaim pass: beat's signed message taken
    by a signed worker, which sends a signed run_apply to itself."""
    stack = cluster.stack
    apply_id = new_apply(stack.db, 0.1)
    cluster.beats(1, env=secured.env)
    wait_state(stack.db, apply_id, "completed", timeout=RESULT_TIMEOUT)


# --- unsigned and foreign messages are refused ---------------------------------------------------


@pytest.mark.parametrize("sender", ["unsigned", "foreign"])
def test_unsigned_and_foreign_messages_are_refused_with_nothing_written(
    cluster: Cluster, keys: Keys, secured: Secured, sender: str, signed_worker: CeleryProcess
) -> None:
    stack, db = cluster.stack, cluster.stack.db
    issued = None if sender == "unsigned" else keys.rogue
    reason = "unsigned" if sender == "unsigned" else "outside LEASEHOLD_SECURITY_CERT_STORE"
    worker = signed_worker
    earlier = len(refusals(worker))  # the module's worker: refusals of this test only

    def refused() -> list[str]:
        return refusals(worker)[earlier:]

    running = int(
        send(stack, keys.client, SUBMIT, sleep_payload(30)).get(timeout=RESULT_TIMEOUT)["apply_id"]
    )
    wait_state(db, running, "running", timeout=RESULT_TIMEOUT)
    lease = dispatched_apply(db, 0.1)  # a lease the test holds: a forged run_apply carries it
    before = sorted(all_apply_ids(db))

    submitted = send(stack, issued, SUBMIT, sleep_payload(0.1))
    with pytest.raises(Exception, match=reason):
        submitted.get(timeout=RESULT_TIMEOUT)
    controlled = send(stack, issued, CONTROL, {"apply_id": running, "action": "cancel"})
    with pytest.raises(Exception, match=reason):
        controlled.get(timeout=RESULT_TIMEOUT)
    forged = send(
        stack,
        issued,
        RUN_APPLY,
        {"apply_id": lease.apply_id, "lease": lease.to_json()},
        queue=APPLIES_QUEUE,
    )
    with pytest.raises(Exception, match=reason):
        forged.get(timeout=RESULT_TIMEOUT)

    # Nothing written: no apply, no control request, the forged lease never redeemed.
    assert sorted(all_apply_ids(db)) == before
    assert requests_of(stack, running) == []
    assert row(db, running)["state"] == "running"
    assert (row(db, lease.apply_id)["state"], row(db, lease.apply_id)["lease_epoch"]) == (
        "dispatched",
        lease.epoch,
    )
    lines = refused()
    assert len(lines) == 3, lines
    assert all(reason in line for line in lines), lines
    assert worker.proc is not None
    assert worker.proc.poll() is None

    # Broadcasts (Celery's remote control) are signed too: a shutdown is not obeyed. A signed
    # doctor's inspection sent after it is answered, so the shutdown was taken and refused first.
    broadcast(stack, issued, "shutdown")
    wait_for("the broadcast's refusal", lambda: len(refused()) == 4, timeout=RESULT_TIMEOUT)
    assert reason in refused()[-1]
    doctor = dataclasses.replace(stack, env=stack.env | secured.env).cli("doctor", check=False)
    assert re.search(rf"^ok\s+workers\s+queue 'leasehold' .*{worker.name}@", doctor.stdout, re.M), (
        doctor.stdout
    )
    assert worker.proc.poll() is None

    # The same worker still serves the trusted client, and the held lease when it is sent signed.
    send(stack, keys.client, CONTROL, {"apply_id": running, "action": "cancel"}).get(
        timeout=RESULT_TIMEOUT
    )
    send(
        stack,
        keys.worker,
        RUN_APPLY,
        {"apply_id": lease.apply_id, "lease": lease.to_json()},
        queue=APPLIES_QUEUE,
    )
    wait_state(db, lease.apply_id, "completed", timeout=RESULT_TIMEOUT)
    wait_state(db, running, "cancelled", timeout=RESULT_TIMEOUT)


# --- secrets never leak --------------------------------------------------------------------------


def test_no_secret_in_any_log_output_or_task_event(
    cluster: Cluster,
    keys: Keys,
    secured: Secured,
    github: tuple[GitHubStandIn, str],
    signed_worker: CeleryProcess,
) -> None:
    stack, db = cluster.stack, cluster.stack.db
    worker = signed_worker
    earlier = len(refusals(worker))  # the module's worker: earlier tests' refusals are in its log
    # Beat starts while the apply runs; its first signed pass is awaited before its log is read.
    (beat,) = cluster.beats(1, env=secured.env, wait=False)
    tokens: set[str] = set()
    sampling = threading.Event()

    def sample() -> None:  # every lease token the store held while this ran
        while not sampling.is_set():
            with db.engine.connect() as conn:
                tokens.update(
                    t for t in conn.execute(select(applies_table.c.lease_token)).scalars() if t
                )
            sampling.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    outputs: list[str] = []
    with EventRecorder(stack.client) as recorder:
        payload = sleep_payload(0.5, 0.5) | {
            "repository": REPOSITORY,
            "pull_request": 8,
            "head_sha": SHA,
        }
        apply_id = int(
            send(stack, keys.client, SUBMIT, payload).get(timeout=RESULT_TIMEOUT)["apply_id"]
        )
        wait_state(db, apply_id, "completed", timeout=RESULT_TIMEOUT)
        refused = send(stack, keys.rogue, SUBMIT, payload)
        with pytest.raises(Exception, match="outside"):
            refused.get(timeout=RESULT_TIMEOUT)
        wait_for("the task events", lambda: len(recorder.events) > 5, timeout=RESULT_TIMEOUT)
    sampling.set()
    sampler.join(5)
    assert tokens, "no lease token was seen"
    # The CLI as an operator runs it, configured like the workers (with every secret).
    outputs += cli_outputs(
        stack,
        stack.env | secured.env,
        ("status",),
        ("status", str(apply_id)),
        ("logs", str(apply_id)),
        ("doctor",),
    )
    wait_log(beat, "Sending due task reclaim-stale-applies")
    wait_for(
        "this test's refusal in the worker's log",
        lambda: len(refusals(worker)) > earlier,
        timeout=RESULT_TIMEOUT,
    )

    secrets = dict(secured.secrets) | {f"lease token {t[:6]}": t for t in tokens}
    places = {str(p): p.read_text(errors="replace") for p in _logs(stack.folder)}
    places |= {f"cli output {i}": out for i, out in enumerate(outputs)}
    places |= {"task events": repr(recorder.events)}
    leaks = [
        f"{name} in {place}"
        for name, secret in secrets.items()
        for place, content in places.items()
        if secret in content
    ]
    assert not leaks, leaks
    # The outputs are not empty by accident: the apply and the refusal are in them.
    assert any(re.search(rf"\b{apply_id}\b", out) for out in outputs)
    assert any(REFUSED in content for content in places.values())


def _logs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.log") if p.is_file())
