"""The worker's consumer, guarded: no message, however malformed, stops it or comes back forever.

Celery's consumer hands every message to ``on_task_received`` (``create_task_handler``), which
finds the task's strategy and lets it build a request; an exception there is not caught and stops
the worker (a body ``[1, 2]``: ``ValueError: not enough values to unpack`` in ``Request``), and on
Redis the unacknowledged message is given back on the way down, to stop the next worker too.

:class:`GuardedConsumer` (``worker_consumer``, set in ``tasks/app.py``) wraps that handler, so it
works alike on every transport and for every task, whatever its strategy (``run_apply``'s apply
lane, Celery's default for the others):

1. before any strategy sees it, the message is decoded and checked (``tasks/envelope.py``
   :func:`~tasks.envelope.examine`: protocol, content type, ``(args, kwargs, embed)``; then
   ``tasks/admission.py``: a known task, arguments that fit it). A check that itself breaks
   passes the message on: the guard is never stricter than the task;
2. what fails is **refused**: copied to the broker's dead letters (``tasks/deadletter.py``), one
   log line, acknowledged (never requeued), and, when it names a task id, answered in the result
   backend with the error its caller would have got from the task (``FAILURE``); nothing is
   written to leasehold's store;
3. an exception that still escapes Celery's handler or a strategy (a case no check foresaw)
   refuses the message the same way instead of stopping the worker. Connection errors are not
   caught: they are Celery's, to reconnect, and the broker then gives the message back.

Celery's own refusal hooks (``on_decode_error``: a body kombu cannot decompress or decode, the
place where AMQP's undecodable bytes arrive; ``on_unknown_message``, ``on_unknown_task``,
``on_invalid_task``: e.g. an ``eta`` that is not a date) refuse the same way; Celery's versions
log the whole body, lease token included.

Bytes that are not even a kombu envelope never reach a consumer: on Redis and the embedded broker
the transport's channel refuses them (``tasks/broker.py``). On AMQP the broker frames every
message, so whatever a producer wrote arrives as a message body here.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from typing import Any, Final

from celery.exceptions import NotRegistered, SecurityError
from celery.utils.objects import Bunch
from celery.worker.consumer import Consumer
from kombu.utils import json as kombu_json

from storage.errors import InvalidInput
from tasks import deadletter, security
from tasks.admission import Admission
from tasks.envelope import Named, examine, named

log = logging.getLogger(__name__)
_dumps: Callable[[Any], str] = kombu_json.dumps  # kombu's, for its own type markers


RECONNECT_MAX: Final = 3.0  # seconds between a worker's attempts to reach a lost broker


class GuardedConsumer(Consumer):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        targets = getattr(self.app.conf, "leasehold_targets", None) or {}
        self.admission = Admission(self.app.tasks, targets)
        # Errors that mean the broker connection broke: Celery reconnects, the broker redelivers.
        self.fatal_errors: tuple[type[BaseException], ...] = tuple(self.connection_errors) + tuple(
            self.channel_errors
        )

    def ensure_connected(self, conn: Any) -> Any:
        """Celery reconnects to a lost broker with kombu's default waits (2 s, growing by 2 s to
        30 s), so after a long outage a worker may take half a minute more to come back. Apply
        work waits for it (dispatches owed during the outage are re-sent as soon as it does), so
        retry at most every RECONNECT_MAX seconds instead; a reconnect costs one TCP connect."""
        ensure = conn.ensure_connection

        def quicker(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("interval_start", 1)
            kwargs.setdefault("interval_step", 1)
            kwargs.setdefault("interval_max", RECONNECT_MAX)
            return ensure(*args, **kwargs)

        conn.ensure_connection = quicker
        return super().ensure_connected(conn)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], None]:
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> None:
            # Headers are not signed: whatever a sender wrote under this name is dropped, and only
            # a signature the worker verified puts a signer there.
            if isinstance(message.headers, dict):
                message.headers.pop(security.SIGNER_HEADER, None)
            try:
                call = examine(message)
                if security.signing() is not None and isinstance(message.headers, dict):
                    message.headers[security.SIGNER_HEADER] = security.signer_of(message.body)
                known = self.admission.known(call.task)
                if known:
                    self.admission.admit(call)
            except SecurityError as exc:
                self.refuse(message, f"signature refused: {exc}", answer=exc)
                return
            except InvalidInput as exc:  # Refused, and the tasks' own argument errors
                self.refuse(message, str(exc), answer=exc)
                return
            except Exception:
                # A check that broke on this message is not a verdict on it: Celery and the
                # task decide, as they would without the guard (and step 3 still holds).
                log.warning("could not examine a message; passing it on", exc_info=True)
                known = True
            if not known:
                self.refuse(
                    message,
                    f"unknown task {call.task!r}: not a task of this worker",
                    answer=NotRegistered(call.task),
                )
                return
            try:
                handle(message)
            except self.fatal_errors:
                raise
            except Exception as exc:
                log.debug("Celery could not take a message", exc_info=True)
                self.refuse(message, f"Celery could not take it: {type(exc).__name__}: {exc}")

        return on_task_received

    # --- Celery's own refusal hooks ---------------------------------------------------------

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        # Remote-control broadcasts arrive here too: unsigned or foreign ones when signing is on.
        why = security.describe_refusal(message.content_type, exc)
        self.refuse(message, why or f"undecodable: {type(exc).__name__}: {exc}")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.refuse(message, "not a task message: no task name")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        task = named(message).task
        self.refuse(message, f"unknown task {task!r}", answer=NotRegistered(task))

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self.refuse(message, f"invalid task message: {exc}", answer=exc)

    # --- refusing ---------------------------------------------------------------------------

    def refuse(self, message: Any, reason: str, *, answer: BaseException | None = None) -> None:
        """Dead-letter ``message``, acknowledge it, and answer its sender if it named a task id.

        Raises only the broker's connection errors (from keeping the copy or acknowledging),
        leaving the message to the broker's redelivery."""
        what = named(message)
        delivery = message.delivery_info if isinstance(message.delivery_info, dict) else {}
        letter = deadletter.DeadLetter.of(
            received(message),
            reason=reason,
            stage="consumer",
            queue=delivery.get("routing_key"),
            task=what.task,
            task_id=what.task_id,
        )
        self._keep(message, letter)
        if not message.acknowledged:
            message.ack_log_error(log, self.connection_errors)
        if answer is not None and what.task_id is not None:
            self._answer(message, what, answer)

    def _keep(self, message: Any, letter: deadletter.DeadLetter) -> None:
        store = getattr(message.channel, "dead_letters", None)
        if store is not None:  # the transport's own: tasks/broker.py
            deadletter.keep(letter, store, fatal=self.fatal_errors)
            return
        with self.app.connection_for_write() as connection:  # AMQP: a queue of its own
            deadletter.keep(letter, deadletter.QueueStore(connection), fatal=self.fatal_errors)

    def _answer(self, message: Any, what: Named, error: BaseException) -> None:
        """What Celery's ``on_unknown_task`` does: the sender's result is a FAILURE saying why,
        so a caller waiting on it learns at once. Best effort: the dead letter is kept."""
        properties = message.properties if isinstance(message.properties, dict) else {}
        headers = message.headers if isinstance(message.headers, dict) else {}
        request = Bunch(
            name=what.task,
            chord=None,
            root_id=headers.get("root_id"),
            correlation_id=properties.get("correlation_id"),
            reply_to=properties.get("reply_to"),
            errbacks=None,
        )
        try:
            self.app.backend.mark_as_failure(what.task_id, error, request=request)
        except Exception as exc:
            log.warning(
                "could not record the refusal of %s in the result backend: %s",
                what.task_id,
                deadletter.redact(repr(exc)),
            )


def received(message: Any) -> bytes:
    """A message as the consumer received it, as bytes: a virtual transport's envelope as it was
    popped (kombu keeps it as ``_raw``), else (AMQP) the same kind of envelope rebuilt from the
    message's parts, its body base64 as kombu's virtual transports write it."""
    raw = getattr(message, "_raw", None)
    if isinstance(raw, dict):
        envelope = raw
    else:
        body = message.body
        if isinstance(body, str):
            body = body.encode("utf-8")
        delivery = message.delivery_info if isinstance(message.delivery_info, dict) else {}
        properties = dict(message.properties) if isinstance(message.properties, dict) else {}
        properties["body_encoding"] = "base64"
        properties["delivery_info"] = {
            "exchange": delivery.get("exchange"),
            "routing_key": delivery.get("routing_key"),
        }
        envelope = {
            "body": base64.b64encode(body or b"").decode("ascii"),
            "content-type": message.content_type,
            "content-encoding": message.content_encoding,
            "headers": message.headers,
            "properties": properties,
        }
    try:
        return _dumps(envelope).encode("utf-8")
    except (TypeError, ValueError):
        return repr(envelope).encode("utf-8")  # a header kombu cannot write back as JSON
