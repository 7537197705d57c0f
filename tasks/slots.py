"""Apply slots: a worker runs its applies on threads of their own, never on the threads that serve
the control plane, so that the brake works on a fleet whose every apply slot is busy.

One ``celery -A tasks worker`` process has two lanes:

- **the control lane**: Celery's own pool (``-c``, default ``LEASEHOLD_CONTROL_CONCURRENCY``)
  serves ``submit_apply``, ``control_apply``, ``get_apply`` and ``reclaim_stale_applies`` from
  ``LEASEHOLD_QUEUE``. No apply ever runs on it.
- **the apply lane**: ``LEASEHOLD_WORKER_CONCURRENCY`` apply slots, threads of this module's own
  pool, run ``run_apply`` messages from ``LEASEHOLD_APPLY_QUEUE``.

Celery hands every message it receives to its task's *strategy*, on the consumer thread, before
anything is acknowledged. ``run_apply``'s strategy (:func:`strategy`) admits a message only into a
free slot; the request then runs through Celery's own request machinery (task events, the result
backend, the ack when it starts) on that slot's thread. With no slot free the worker stops
consuming the apply queue and gives back, unacknowledged and unredeemed, any ``run_apply`` it had
already received; it consumes again as soon as a slot frees. Waiting applies therefore wait in the
broker, not behind a busy worker's prefetch, and start on the next free slot of any worker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.concurrency.base import apply_target
from celery.concurrency.thread import ApplyResult
from celery.concurrency.thread import TaskPool as ThreadPool
from celery.exceptions import TaskRevokedError
from celery.worker.control import inspect_command
from celery.worker.strategy import default as default_strategy

log = logging.getLogger(__name__)

# Message properties a forwarded run_apply keeps (the task id travels as correlation_id).
_FORWARDED_PROPERTIES = ("correlation_id", "reply_to", "priority", "delivery_mode")


class ApplySlots:
    """The apply slots of one worker process: how many are taken, and the threads they run on."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a worker needs at least one apply slot, not {size}")
        self.size = size
        self._lock = threading.Lock()
        self._busy = 0
        self.wake: Callable[[], None] | None = None  # told whenever a slot frees
        self.pool = _SlotPool(self, limit=size)

    @property
    def busy(self) -> int:
        with self._lock:
            return self._busy

    def take(self) -> bool:
        """Take a free slot; False (and nothing taken) when all are busy."""
        with self._lock:
            if self._busy >= self.size:
                return False
            self._busy += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            if self._busy <= 0:
                raise RuntimeError("an apply slot was given back that was never taken")
            self._busy -= 1
            wake = self.wake
        if wake is not None:
            wake()


class _SlotPool(ThreadPool):  # type: ignore[misc]
    """Celery's thread pool, giving its slot back when a request's thread is done with it."""

    def __init__(self, slots: ApplySlots, *, limit: int) -> None:
        super().__init__(limit=limit)
        self._slots = slots

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        **_: Any,
    ) -> ApplyResult:
        def run() -> Any:
            try:
                return apply_target(target, args, kwargs, callback, accept_callback)
            finally:
                self._slots.give_back()

        return ApplyResult(self.executor.submit(run))


class ApplyLane:
    """Admission of ``run_apply`` messages into a worker's apply slots.

    Everything but :meth:`_wake` runs on the worker's consumer thread, the only thread that may
    touch the task consumer.
    """

    def __init__(self, app: Any, slots: ApplySlots, queue: str) -> None:
        self.app = app
        self.slots = slots
        self.queue = queue
        self.consumer: Any = None  # celery.worker.consumer.Consumer, bound by the strategy
        self.bounced = 0  # received with every slot busy: requeued
        self.moved = 0  # received from another queue: moved to the apply queue
        self.refused = 0  # carried an ETA: dropped
        self._started = 0
        self._paused = False
        slots.wake = self._wake

    # --- the strategy ------------------------------------------------------------------------

    def strategy(self, task: Any, consumer: Any, **kwargs: Any) -> Callable[..., None]:
        self.consumer = consumer
        handle = default_strategy(task, self.app, _LaneConsumer(consumer, self), **kwargs)

        def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any) -> None:
            errors = consumer.connection_errors
            if _eta(message, body):
                # An ETA would keep the message unacknowledged in this worker until then, past a
                # broker's delivery timeout. leasehold never sends one; reclaim re-dispatches.
                log.warning(
                    "refused run_apply %s with an ETA: applies are dispatched by leasehold only",
                    (message.headers or {}).get("id"),
                )
                self.refused += 1
                message.ack_log_error(log, errors)
                return
            if (message.delivery_info or {}).get("routing_key") != self._queue().routing_key:
                self._move_to_apply_queue(message)
                return
            if not self.slots.take():
                # Back to the broker, where a worker with a free slot takes it; and stop taking
                # more until a slot here is free.
                self.bounced += 1
                self.pause()
                message.reject_log_error(log, errors, requeue=True)
                return
            started = self._started
            try:
                handle(message, body, ack, reject, callbacks)
            finally:
                if self._started == started:  # revoked, expired or refused: nothing runs
                    self.slots.give_back()

        return on_message

    def _execute(self, request: Any) -> None:
        """Run an admitted request on its slot (Celery's ``on_task_request`` for this lane)."""
        self._started += 1
        try:
            request.execute_using_pool(self.slots.pool)
        except TaskRevokedError:
            self.slots.give_back()  # revoked before it started: Celery has recorded it
        except BaseException:
            self.slots.give_back()  # never reached the slot's thread (a pool shutting down)
            raise

    # --- consuming the apply queue only while a slot is free ---------------------------------

    def _move_to_apply_queue(self, message: Any) -> None:
        """A run_apply sent to another queue (by an older leasehold, or by hand) is moved to the
        apply queue, the only way into a slot: run from the control queue, it could not wait
        there for a slot without coming straight back to a busy worker."""
        errors = self.consumer.connection_errors
        try:
            self._forward(message)
        except Exception:
            log.exception("could not move run_apply to %s; requeued where it was", self.queue)
            message.reject_log_error(log, errors, requeue=True)
        else:
            log.info("moved a run_apply sent to another queue to %s", self.queue)
            self.moved += 1
            message.ack_log_error(log, errors)

    def _forward(self, message: Any) -> None:
        queue = self._queue()
        properties = {k: v for k, v in message.properties.items() if k in _FORWARDED_PROPERTIES}
        with self.app.producer_or_acquire() as producer:
            producer.publish(
                message.body,
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                declare=[queue],
                headers=message.headers,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                retry=True,
                **properties,
            )

    def pause(self) -> None:
        consumer = self._task_consumer()
        if consumer is None or not consumer.consuming_from(self.queue):
            return
        self._paused = True
        consumer.cancel_by_queue(self.queue)
        log.info(
            "all %d apply slots busy: not taking applies from %s until one is free",
            self.slots.size,
            self.queue,
        )
        # A slot that freed after take() failed but before _paused was set woke nobody.
        self.resume()

    def resume(self) -> None:
        consumer = self._task_consumer()
        if consumer is None or self.slots.busy >= self.slots.size:
            return
        self._paused = False
        if consumer.consuming_from(self.queue) or self.queue not in self._consumed_queues():
            return  # already (e.g. a new consumer after a reconnect), or not this worker's (-Q)
        consumer.add_queue(self._queue())
        consumer.consume()
        log.info("an apply slot is free: taking applies from %s again", self.queue)

    def _wake(self) -> None:
        """A slot freed (on its thread): have the consumer thread take applies again."""
        consumer = self.consumer
        if consumer is None or not self._paused:
            return
        consumer.call_soon(self.resume)  # with an event loop (Redis, RabbitMQ), this wakes it
        # Celery's blocking loop (the embedded broker) runs it only between waits of up to 2 s;
        # the embedded broker's transport can end the current wait at once (tasks/broker.py).
        wake = getattr(getattr(consumer.connection, "transport", None), "wake", None)
        if callable(wake):
            wake()

    def _task_consumer(self) -> Any:
        return None if self.consumer is None else self.consumer.task_consumer

    def _queue(self) -> Any:
        return self.app.amqp.queues[self.queue]

    def _consumed_queues(self) -> Any:
        return self.app.amqp.queues.consume_from

    def info(self) -> dict[str, Any]:
        consumer = self._task_consumer()
        return {
            "queue": self.queue,
            "size": self.slots.size,
            "busy": self.slots.busy,
            "consuming": bool(consumer is not None and consumer.consuming_from(self.queue)),
            "bounced": self.bounced,
            "moved": self.moved,
            "refused": self.refused,
        }


class _LaneConsumer:
    """The worker's consumer as Celery's default strategy sees it, but with this lane's pool and
    admission (and no rate limits, which would hand requests to the control pool)."""

    disable_rate_limits = True

    def __init__(self, consumer: Any, lane: ApplyLane) -> None:
        self._consumer = consumer
        self.pool = lane.slots.pool
        self.on_task_request = lane._execute

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def _eta(message: Any, body: Any) -> bool:
    """The message asks to run later: ``eta`` in its headers (protocol 2) or body (protocol 1)."""
    if (message.headers or {}).get("eta"):
        return True
    return isinstance(body, dict) and bool(body.get("eta"))


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., None]:
    """``run_apply``'s Celery strategy: admission into an apply slot."""
    lane: ApplyLane | None = getattr(consumer.controller, "leasehold_lane", None)
    if lane is None:  # a worker built without leasehold's bootstep
        return default_strategy(task, app, consumer, **kwargs)  # type: ignore[no-any-return]
    return lane.strategy(task, consumer, **kwargs)


class ApplyLaneStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Creates the worker's apply slots before its consumer starts; at a warm shutdown, waits
    for the applies (asked to hand themselves back) to finish."""

    label = "leasehold apply slots"

    def __init__(self, w: Any, **kwargs: Any) -> None:
        w.leasehold_lane = None
        super().__init__(w, **kwargs)

    def create(self, w: Any) -> Any:
        conf = w.app.conf
        slots = ApplySlots(int(conf.leasehold_worker_concurrency))
        w.leasehold_lane = ApplyLane(w.app, slots, str(conf.leasehold_apply_queue))
        return slots.pool


@inspect_command()  # type: ignore[untyped-decorator]
def apply_slots(state: Any, **kwargs: Any) -> dict[str, Any]:
    """leasehold: this worker's apply slots (size, busy) and whether it takes applies now."""
    lane: ApplyLane | None = getattr(state.consumer.controller, "leasehold_lane", None)
    if lane is None:
        return {"error": "this worker has no leasehold apply lane"}
    return lane.info()
