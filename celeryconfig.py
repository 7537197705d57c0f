"""Celery settings, from ``LEASEHOLD_*`` environment variables (12-factor).

The defaults need no server: a SQLite database file, kombu's ``filesystem://`` transport and a
SQLite result backend, all under the working directory (``var/``). Production sets
``LEASEHOLD_DATABASE_URL=mysql+mysqldb://...``, ``LEASEHOLD_BROKER_URL=redis://...`` and
``LEASEHOLD_RESULT_BACKEND=redis://...``.

Ack policy: tasks are acknowledged when a worker receives them (Celery's default,
``task_acks_late = False``), deliberately. The database is the truth and the broker a doorbell:
a message lost with a dying worker only delays its apply, because reclaim re-dispatches a
``running`` apply whose heartbeat went stale and a ``dispatched`` one nobody redeemed within
``LEASEHOLD_DISPATCH_TIMEOUT``. Late acks would add nothing but redeliveries of hours-long tasks
past the Redis visibility timeout (harmless, since redemption is a compare-and-swap, but noisy),
and late acks with ``task_reject_on_worker_lost`` would requeue a worker-killing message forever.

Imports nothing of leasehold's; ``tasks.settings`` reads the ``leasehold_*`` values below.
"""

from __future__ import annotations

import json
import os
import re
import ssl
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


class LeaseholdConfigError(ValueError):
    """A LEASEHOLD_* variable is malformed or contradicts another one."""


_env = os.environ
# LEASEHOLD_DATABASE_CONNECTIONS' default: one per apply slot, up to this many (bench/scale.py).
_DATABASE_CONNECTIONS_CAP = 32
_var = Path(_env.get("LEASEHOLD_VAR_DIR", "var")).absolute()


def _number(name: str, default: float, *, integer: bool = False) -> float:
    raw = _env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number of seconds"
        raise LeaseholdConfigError(f"{name}={raw!r} is not {kind}") from None
    if value < 0 or value != value or value in (float("inf"),):
        raise LeaseholdConfigError(f"{name}={raw!r} must be a finite number >= 0")
    return value


def _queue_name(name: str, default: str) -> str:
    raw = _env.get(name)
    if raw is None or raw.strip() == "":
        return default
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,200}", raw):
        raise LeaseholdConfigError(
            f"{name}={raw!r} is not a queue name (letters, digits, '_', '.', ':', '-')"
        )
    return raw


def _targets(raw: str | None) -> dict[str, str]:
    """A JSON object of target name -> SQLAlchemy URL, inline or in a file. URLs never come from
    messages: a submitted apply names a target, and only names listed here can run."""
    if raw is None or raw.strip() == "":
        return {}
    text = raw
    if not raw.lstrip().startswith(("{", "[")):  # inline JSON; anything else names a file
        try:
            text = Path(raw).read_text()
        except OSError as exc:
            raise LeaseholdConfigError(f"LEASEHOLD_TARGETS: cannot read {raw!r}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise LeaseholdConfigError(f"LEASEHOLD_TARGETS is not JSON: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise LeaseholdConfigError("LEASEHOLD_TARGETS must be a JSON object of name -> URL")
    return data


# --- leasehold's own settings ---------------------------------------------------------------------
leasehold_database_url = (
    _env.get("LEASEHOLD_DATABASE_URL") or f"sqlite:///{Path.cwd() / 'leasehold.sqlite3'}"
)
leasehold_stale_after = _number("LEASEHOLD_STALE_AFTER", 30.0)
if leasehold_stale_after <= 0:
    raise LeaseholdConfigError("LEASEHOLD_STALE_AFTER must be greater than 0")
# Defaults that follow stale_after, so that changing it alone works: six heartbeats in one
# stale_after, and a GitHub call bounded well under it (at the defaults: 5 s, 10 s, 12 s).
leasehold_heartbeat_interval = _number(
    "LEASEHOLD_HEARTBEAT_INTERVAL", min(5.0, leasehold_stale_after / 6)
)
leasehold_reclaim_interval = _number("LEASEHOLD_RECLAIM_INTERVAL", 5.0)
leasehold_dispatch_timeout = _number("LEASEHOLD_DISPATCH_TIMEOUT", 600.0)
leasehold_max_reclaims = int(_number("LEASEHOLD_MAX_RECLAIMS", 5, integer=True))
leasehold_effect_timeout = _number("LEASEHOLD_EFFECT_TIMEOUT", min(10.0, leasehold_stale_after / 3))
leasehold_effect_grace = _number("LEASEHOLD_EFFECT_GRACE", leasehold_effect_timeout + 2.0)
leasehold_comment_interval = _number("LEASEHOLD_COMMENT_INTERVAL", 10.0)
# At most one progress checkpoint (and one Flower progress report) per running apply per interval:
# a worker's per-apply cost (issue 13). A handed-over or reclaimed apply resumes from its last one.
leasehold_checkpoint_interval = _number("LEASEHOLD_CHECKPOINT_INTERVAL", 5.0)
if leasehold_checkpoint_interval < 0:
    raise LeaseholdConfigError("LEASEHOLD_CHECKPOINT_INTERVAL must not be negative")
# How long a task keeps retrying a target it cannot reach (a failover, a restart) before the
# apply fails; 0 fails at the first lost connection.
leasehold_target_retry = _number("LEASEHOLD_TARGET_RETRY", 300.0)
if leasehold_target_retry < 0:
    raise LeaseholdConfigError("LEASEHOLD_TARGET_RETRY must not be negative")
leasehold_github_api_url = _env.get("LEASEHOLD_GITHUB_API_URL") or "https://api.github.com"
# Secrets: Celery censors settings named like *TOKEN*/*KEY* in `celery inspect conf`, and
# leasehold never logs them.
leasehold_github_token = _env.get("LEASEHOLD_GITHUB_TOKEN") or None
leasehold_github_app_id = _env.get("LEASEHOLD_GITHUB_APP_ID") or None
leasehold_github_app_private_key = _env.get("LEASEHOLD_GITHUB_APP_PRIVATE_KEY") or None
leasehold_github_app_installation_id = _env.get("LEASEHOLD_GITHUB_APP_INSTALLATION_ID") or None
_app_parts = (
    leasehold_github_app_id,
    leasehold_github_app_private_key,
    leasehold_github_app_installation_id,
)
if any(_app_parts) and not all(_app_parts):
    raise LeaseholdConfigError(
        "GitHub App auth needs LEASEHOLD_GITHUB_APP_ID, LEASEHOLD_GITHUB_APP_PRIVATE_KEY (PEM text "
        "or a file path) and LEASEHOLD_GITHUB_APP_INSTALLATION_ID together"
    )
# Signed messages (tasks/security.py, docs/security.md): a private key and its certificate (PEM
# text or file paths) to sign with, and the certificates whose signatures are accepted (PEM text of
# one or more, a file, a directory or a glob). All three or none: a worker that signs but accepts
# anything, or accepts signatures it cannot make, would be a half-closed door.
leasehold_security_key = _env.get("LEASEHOLD_SECURITY_KEY") or None
leasehold_security_certificate = _env.get("LEASEHOLD_SECURITY_CERTIFICATE") or None
leasehold_security_cert_store = _env.get("LEASEHOLD_SECURITY_CERT_STORE") or None
_security_parts = {
    "LEASEHOLD_SECURITY_KEY": leasehold_security_key,
    "LEASEHOLD_SECURITY_CERTIFICATE": leasehold_security_certificate,
    "LEASEHOLD_SECURITY_CERT_STORE": leasehold_security_cert_store,
}
if any(_security_parts.values()) and not all(_security_parts.values()):
    _missing = sorted(name for name, value in _security_parts.items() if not value)
    raise LeaseholdConfigError(
        f"signed messages need LEASEHOLD_SECURITY_KEY, LEASEHOLD_SECURITY_CERTIFICATE and "
        f"LEASEHOLD_SECURITY_CERT_STORE together; missing {', '.join(_missing)}"
    )
leasehold_var_dir = str(_var)
leasehold_targets = _targets(_env.get("LEASEHOLD_TARGETS"))
# Two lanes per worker (tasks/slots.py): apply slots run run_apply from the apply queue; Celery's
# own pool (-c) serves the control plane (submit, control, status, reclaim) from the other queue.
leasehold_queue = _queue_name("LEASEHOLD_QUEUE", "leasehold")
leasehold_apply_queue = _queue_name("LEASEHOLD_APPLY_QUEUE", "leasehold.applies")
leasehold_worker_concurrency = int(_number("LEASEHOLD_WORKER_CONCURRENCY", 4, integer=True))
leasehold_control_concurrency = int(_number("LEASEHOLD_CONTROL_CONCURRENCY", 4, integer=True))
# Store connections a worker process's apply slots share (tasks/runtime.py): a run waits for a
# free one instead of opening more, so that hundreds of slots neither exceed the server's
# max_connections nor run hundreds of transactions at once on one interpreter lock (issue 13).
# The heartbeat and the control plane have connections of their own, never waiting behind runs.
leasehold_database_connections = int(
    _number(
        "LEASEHOLD_DATABASE_CONNECTIONS",
        min(leasehold_worker_concurrency, _DATABASE_CONNECTIONS_CAP),
        integer=True,
    )
)


def _shown(name: str, value: float) -> str:
    """A setting in a refusal, saying whether the user set it: a default that follows another
    variable must not be blamed as if it had been set."""
    origin = "set" if (_env.get(name) or "").strip() else "default"
    return f"{name} ({value:g}s, {origin})"


for _name, _value in (
    ("LEASEHOLD_HEARTBEAT_INTERVAL", leasehold_heartbeat_interval),
    ("LEASEHOLD_RECLAIM_INTERVAL", leasehold_reclaim_interval),
    ("LEASEHOLD_DISPATCH_TIMEOUT", leasehold_dispatch_timeout),
    ("LEASEHOLD_EFFECT_TIMEOUT", leasehold_effect_timeout),
):
    if _value <= 0:
        raise LeaseholdConfigError(f"{_name} must be greater than 0")
if leasehold_heartbeat_interval >= leasehold_stale_after:
    raise LeaseholdConfigError(
        f"{_shown('LEASEHOLD_HEARTBEAT_INTERVAL', leasehold_heartbeat_interval)} must be shorter "
        f"than {_shown('LEASEHOLD_STALE_AFTER', leasehold_stale_after)}: every healthy worker "
        "would be reclaimed"
    )
if leasehold_effect_timeout >= leasehold_stale_after:
    raise LeaseholdConfigError(
        f"{_shown('LEASEHOLD_EFFECT_TIMEOUT', leasehold_effect_timeout)} must be well under "
        f"{_shown('LEASEHOLD_STALE_AFTER', leasehold_stale_after)}"
    )
if leasehold_effect_grace <= leasehold_effect_timeout:
    raise LeaseholdConfigError(
        f"{_shown('LEASEHOLD_EFFECT_GRACE', leasehold_effect_grace)} must be longer than "
        f"{_shown('LEASEHOLD_EFFECT_TIMEOUT', leasehold_effect_timeout)}"
    )
for _name, _count in (
    ("LEASEHOLD_WORKER_CONCURRENCY", leasehold_worker_concurrency),
    ("LEASEHOLD_CONTROL_CONCURRENCY", leasehold_control_concurrency),
    ("LEASEHOLD_DATABASE_CONNECTIONS", leasehold_database_connections),
):
    if _count < 1:
        raise LeaseholdConfigError(f"{_name} must be at least 1")
if leasehold_queue == leasehold_apply_queue:
    raise LeaseholdConfigError(
        f"LEASEHOLD_QUEUE and LEASEHOLD_APPLY_QUEUE must differ (both {leasehold_queue!r}): "
        "applies would take the threads the control plane needs"
    )
if leasehold_dispatch_timeout <= leasehold_reclaim_interval:
    raise LeaseholdConfigError(
        f"{_shown('LEASEHOLD_DISPATCH_TIMEOUT', leasehold_dispatch_timeout)} must be longer than "
        f"{_shown('LEASEHOLD_RECLAIM_INTERVAL', leasehold_reclaim_interval)}"
    )

# --- Celery ---------------------------------------------------------------------------------------
broker_url = _env.get("LEASEHOLD_BROKER_URL") or "filesystem://"
# amqps:// with a private CA, a client certificate or a host-name check: py-amqp takes these only
# from Celery's broker_use_ssl (kombu would pass ssl_* query parameters to py-amqp as they are,
# which refuses them), so the rediss:// names in the query are moved there (docs/security.md).
_amqps_files = {"ssl_ca_certs": "ca_certs", "ssl_certfile": "certfile", "ssl_keyfile": "keyfile"}
_cert_reqs = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
_amqps = urlsplit(broker_url) if broker_url.startswith("amqps://") else None
_amqps_query = parse_qsl(_amqps.query, keep_blank_values=True) if _amqps else []
if _amqps is not None and any(k in (*_amqps_files, "ssl_cert_reqs") for k, _ in _amqps_query):
    _ssl_query = {k: v for k, v in _amqps_query if k in (*_amqps_files, "ssl_cert_reqs")}
    _reqs = _ssl_query.get("ssl_cert_reqs", "required")
    if _reqs.lower().removeprefix("cert_") not in _cert_reqs:
        raise LeaseholdConfigError(
            f"LEASEHOLD_BROKER_URL: ssl_cert_reqs={_reqs!r} is not required, optional or none"
        )
    if ";" in broker_url:
        raise LeaseholdConfigError(
            "LEASEHOLD_BROKER_URL: ssl_* parameters need a single amqps:// URL, not a list"
        )
    broker_use_ssl: dict[str, object] = {
        _amqps_files[k]: v for k, v in _ssl_query.items() if k in _amqps_files and v
    }
    broker_use_ssl["cert_reqs"] = _cert_reqs[_reqs.lower().removeprefix("cert_")]
    if broker_use_ssl["cert_reqs"] != ssl.CERT_NONE:
        # py-amqp checks the host name whenever server_hostname is set (and must not with
        # CERT_NONE); kombu would put 127.0.0.1 for "localhost" if left to it.
        broker_use_ssl["server_hostname"] = _amqps.hostname
    broker_url = urlunsplit(
        _amqps._replace(query=urlencode([(k, v) for k, v in _amqps_query if k not in _ssl_query]))
    )
if broker_url.startswith("filesystem://"):
    _queue = _var / "broker" / "queue"
    _processed = _var / "broker" / "processed"
    for _folder in (_queue, _processed):
        _folder.mkdir(parents=True, exist_ok=True)
    broker_transport_options = {
        "data_folder_in": str(_queue),
        "data_folder_out": str(_queue),
        "processed_folder": str(_processed),
        "store_processed": False,
        # kombu polls the folder; its default of 1 s would add up to a second to every hop.
        "polling_interval": 0.1,
        "control_folder": str(_var / "broker" / "control"),
        # Messages the workers refused (tasks/deadletter.py), kept for an operator.
        "dead_letter_folder": str(_var / "broker" / "dead"),
    }
result_backend = _env.get("LEASEHOLD_RESULT_BACKEND") or f"db+sqlite:///{_var / 'results.sqlite3'}"
if result_backend.startswith("db+sqlite:///"):
    _var.mkdir(parents=True, exist_ok=True)
for _name, _url in (
    ("LEASEHOLD_BROKER_URL", broker_url),
    ("LEASEHOLD_RESULT_BACKEND", result_backend),
):
    # kombu takes a rediss:// URL without ssl_cert_reqs as "verify nothing" (a warning only):
    # encrypted, but to whoever answers. Say it, or say none on purpose.
    if _url.startswith("rediss://") and "ssl_cert_reqs=" not in _url:
        raise LeaseholdConfigError(
            f"{_name} is rediss:// without ssl_cert_reqs: add ssl_cert_reqs=required (and "
            "ssl_ca_certs=<CA file> for a private CA), or ssl_cert_reqs=none to accept any "
            "certificate (docs/security.md)"
        )

accept_content = ["json"]
task_serializer = "json"
result_serializer = "json"
event_serializer = "json"
result_accept_content = ["json"]

task_default_queue = leasehold_queue
task_queues = {
    name: {"exchange": name, "exchange_type": "direct", "routing_key": name}
    for name in (leasehold_queue, leasehold_apply_queue)
}
task_routes = {"leasehold.run_apply": {"queue": leasehold_apply_queue}}
task_track_started = True
task_acks_late = False
task_reject_on_worker_lost = False
worker_prefetch_multiplier = 1
# Threads, not prefork: a warm shutdown must reach the running applies (to hand them back), and
# SIGSTOP of the worker must freeze its heartbeat too. Applies spend their time waiting on I/O.
# This pool is the control lane only (-c overrides it); applies run on the apply slots.
worker_pool = "threads"
worker_concurrency = leasehold_control_concurrency
worker_send_task_events = True
task_send_sent_event = True
worker_hijack_root_logger = False
broker_connection_retry_on_startup = True
result_expires = 7 * 24 * 3600

beat_schedule = {
    "reclaim-stale-applies": {
        "task": "leasehold.reclaim_stale_applies",
        "schedule": leasehold_reclaim_interval,
        # A pass that waited longer than one interval in the queue is superseded by the next.
        "options": {"expires": leasehold_reclaim_interval},
    },
}
beat_schedule_filename = str(_var / "celerybeat-schedule")
