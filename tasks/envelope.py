"""What a message must look like before a leasehold worker takes it: pure checks, no broker.

Two stages, because a message can be wrong at two depths:

- :func:`screen` (the **transport** stage): the bytes a kombu virtual transport (Redis, the
  embedded ``filesystem://``) pops from a queue must be a kombu envelope that kombu can turn into
  a message and acknowledge: UTF-8 JSON, an object, ``properties`` with a ``delivery_tag`` and a
  ``delivery_info`` naming an exchange and routing key, a body in a known ``body_encoding``. kombu
  itself raises out of the consumer on any of these (``JSONDecodeError``, ``KeyError``), which
  stops a Celery worker.
- :func:`examine` (the **consumer** stage, every transport): a kombu message must be a Celery
  task message leasehold can run: a task name and id, a body that decodes with an accepted
  content type to ``(args, kwargs, embed)`` (protocol 2) or a protocol 1 dict, a known task,
  and arguments that fit it (:mod:`tasks.admission`). Celery raises out of its consumer on some
  of these (a body ``[1, 2]``: ``ValueError: not enough values to unpack``).

A refusal is :class:`Refused`, whose message says why in words for an operator.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from kombu.exceptions import ContentDisallowed
from kombu.utils import json as kombu_json

from storage.errors import InvalidInput
from tasks import security

_loads: Callable[[str], Any] = kombu_json.loads  # kombu's, for its own type markers
MAX_TASK_NAME: Final = 255
MAX_TASK_ID: Final = 255


class Refused(InvalidInput):
    """A message leasehold will not take; its text says why."""


# --- the transport stage -----------------------------------------------------------------------


DecodeBody = Callable[[Any, "str | None"], Any]


def screen(raw: bytes, decode_body: DecodeBody) -> dict[str, Any]:
    """The kombu envelope in ``raw``, or :class:`Refused`. ``decode_body`` is the channel's own
    (``Channel.decode_body``), so that a body is refused exactly when kombu could not decode it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused(f"not UTF-8 text (byte {exc.start}): not a kombu message") from None
    try:
        # kombu's own decoder, with its type markers, as the transport would have used.
        envelope = _loads(text)
    except RecursionError:
        raise Refused("JSON nested too deeply") from None
    except (ValueError, TypeError) as exc:
        where = f" at char {exc.pos}" if hasattr(exc, "pos") else ""
        raise Refused(f"not JSON{where}: {getattr(exc, 'msg', exc)}") from None
    if not isinstance(envelope, dict):
        raise Refused(f"not a kombu envelope: a JSON {_json_kind(envelope)}, not an object")
    properties = envelope.get("properties")
    if not isinstance(properties, dict):
        raise Refused("not a kombu envelope: no 'properties' object")
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        raise Refused("not a kombu envelope: no 'properties.delivery_tag' string")
    info = properties.get("delivery_info")
    if (
        not isinstance(info, dict)
        or not isinstance(info.get("exchange"), str)
        or not isinstance(info.get("routing_key"), str)
    ):
        # kombu needs both to acknowledge the message and to give it back on a restart.
        raise Refused("not a kombu envelope: no 'properties.delivery_info' exchange/routing_key")
    headers = envelope.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise Refused(f"'headers' is a JSON {_json_kind(headers)}, not an object")
    for key in ("content-type", "content-encoding"):
        if envelope.get(key) is not None and not isinstance(envelope[key], str):
            raise Refused(f"{key!r} is not a string")
    body = envelope.get("body")
    if body is not None and not isinstance(body, str):
        raise Refused(f"'body' is a JSON {_json_kind(body)}, not a string")
    encoding = properties.get("body_encoding")
    if encoding is not None and not isinstance(encoding, str):
        raise Refused("'properties.body_encoding' is not a string")
    if body:
        try:
            decode_body(body, encoding)
        except (ValueError, TypeError, AttributeError, binascii.Error) as exc:
            # AttributeError: kombu looks an unknown encoding up as None and calls it.
            if isinstance(exc, AttributeError):
                raise Refused(f"unknown body_encoding {encoding!r}") from None
            raise Refused(f"body is not {encoding} ({exc})") from None
    return envelope


def _json_kind(value: object) -> str:
    names = {
        dict: "object",
        list: "array",
        tuple: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


# --- the consumer stage ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """A task message, decoded: what Celery will run."""

    task: str
    task_id: str
    args: list[Any] | tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Named:
    """What a message says it is, as far as it could be read (for the dead letter)."""

    task: str | None = None
    task_id: str | None = None


def named(message: Any) -> Named:
    """The task name and id a message carries, without decoding its body unless it must (a
    protocol 1 message, whose body was decoded already)."""
    headers = message.headers if isinstance(message.headers, Mapping) else {}
    task, task_id = headers.get("task"), headers.get("id")
    if task is None:
        cached = getattr(message, "_decoded_cache", None)
        if isinstance(cached, Mapping):
            task, task_id = cached.get("task"), cached.get("id")
    return Named(
        task=task if isinstance(task, str) else None,
        task_id=task_id if isinstance(task_id, str) else None,
    )


def examine(message: Any) -> Call:
    """The call in a kombu message, or :class:`Refused`. Decodes the body (with the consumer's
    ``accept`` list, which kombu set on the message); kombu memoizes it, so Celery does not
    decode it again."""
    headers = message.headers
    if not isinstance(headers, Mapping):
        raise Refused("its headers are not an object")
    try:
        payload = message.decode()
    except ContentDisallowed:
        raise Refused(
            security.describe_refusal(message.content_type, None)
            or f"content type {message.content_type!r} is not accepted (leasehold takes JSON only)"
        ) from None
    except Exception as exc:
        cause = exc.__cause__ or exc.__context__ or exc
        raise Refused(
            security.describe_refusal(message.content_type, cause)
            or f"body does not decode as {message.content_type!r} "
            f"({message.content_encoding or 'no content-encoding'}): "
            f"{type(cause).__name__}: {cause}"
        ) from None
    if "task" in headers:  # protocol 2 (or a hybrid: protocol 2 headers, protocol 1 body)
        task, task_id, limits = headers["task"], headers.get("id"), headers.get("timelimit")
        if isinstance(payload, Mapping) and "args" in payload:
            args, kwargs = payload.get("args", ()), payload.get("kwargs", {})
        elif isinstance(payload, list | tuple) and len(payload) == 3:
            args, kwargs, embed = payload
            if embed is not None and not isinstance(embed, Mapping):
                raise Refused(f"its embedded options are a JSON {_json_kind(embed)}, not an object")
        else:
            raise Refused(
                f"its body is a JSON {_json_kind(payload)}"
                + (f" of {len(payload)} items" if isinstance(payload, list | tuple) else "")
                + ", not [args, kwargs, embed]"
            )
    else:  # protocol 1: everything in the body
        if not isinstance(payload, Mapping):
            raise Refused(f"no task header, and its body is a JSON {_json_kind(payload)}")
        if "task" not in payload:
            raise Refused("no task name: neither a 'task' header nor a protocol 1 body")
        task, task_id, limits = payload["task"], payload.get("id"), payload.get("timelimit")
        args, kwargs = payload.get("args", ()), payload.get("kwargs", {})
    if not isinstance(task, str) or not 0 < len(task) <= MAX_TASK_NAME:
        raise Refused(f"its task name is not a string of 1 to {MAX_TASK_NAME} characters")
    if not isinstance(task_id, str) or not 0 < len(task_id) <= MAX_TASK_ID:
        raise Refused(f"its task id is not a string of 1 to {MAX_TASK_ID} characters")
    if not isinstance(args, list | tuple):
        raise Refused(f"its args are a JSON {_json_kind(args)}, not an array")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise Refused(f"its kwargs are a JSON {_json_kind(kwargs)}, not an object")
    if limits is not None and not _time_limits(limits):
        raise Refused("its timelimit is not [hard, soft] seconds")
    return Call(task=task, task_id=task_id, args=args, kwargs=kwargs)


def _time_limits(value: object) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in value
        )
    )
