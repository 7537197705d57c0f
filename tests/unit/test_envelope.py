"""The checks a message passes before a worker takes it (``tasks/envelope.py``), one malformed
message at a time: the transport stage on raw bytes, the consumer stage on kombu messages built
in memory. The end-to-end proof, on real brokers and a real worker, is
``tests/e2e/test_poison.py``."""

from __future__ import annotations

import base64
import json
import uuid
from functools import partial
from typing import Any

import pytest
from kombu import message as kombu_message
from kombu.transport import virtual

from tasks.envelope import Call, Named, Refused, examine, named, screen

# kombu's own decoder of a virtual transport's bodies (its codecs are a class attribute).
decode_body = partial(virtual.Channel.decode_body, virtual.Channel)  # type: ignore[arg-type]
Message: Any = kombu_message.Message  # kombu is untyped
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def kombu_envelope(payload: bytes = b"[[], {}, {}]", **changes: Any) -> dict[str, Any]:
    envelope: dict[str, Any] = {
        "body": base64.b64encode(payload).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"task": "leasehold.get_apply", "id": "t-1"},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
            "delivery_info": {"exchange": "", "routing_key": "leasehold"},
        },
    }
    envelope.update(changes)
    return envelope


def raw(envelope: Any) -> bytes:
    return json.dumps(envelope).encode()


# --- the transport stage -------------------------------------------------------------------------


def test_a_kombu_envelope_passes_the_screen() -> None:
    sent = kombu_envelope()
    assert screen(raw(sent), decode_body) == sent


def test_an_envelope_with_a_plain_body_passes() -> None:
    sent = kombu_envelope()
    sent["body"] = "[[], {}, {}]"
    del sent["properties"]["body_encoding"]
    assert screen(raw(sent), decode_body) == sent


def _properties(**changes: Any) -> dict[str, Any]:
    properties = kombu_envelope()["properties"]
    properties.update(changes)
    return {k: v for k, v in properties.items() if v is not None}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe not text", "not UTF-8 text (byte 0)"),
        (b"hello", "not JSON at char 0: Expecting value"),
        (raw(kombu_envelope())[:60], "not JSON at char"),
        (b"[1, 2]", "not a kombu envelope: a JSON array, not an object"),
        (b'"text"', "a JSON string, not an object"),
        (b"null", "a JSON null, not an object"),
        (b'{"body": "x"}', "no 'properties' object"),
        (raw(kombu_envelope(properties=[])), "no 'properties' object"),
        (
            raw(kombu_envelope(properties=_properties(delivery_tag=None))),
            "no 'properties.delivery_tag' string",
        ),
        (
            raw(kombu_envelope(properties=_properties(delivery_info={"exchange": ""}))),
            "no 'properties.delivery_info' exchange/routing_key",
        ),
        (raw(kombu_envelope(headers=[1])), "'headers' is a JSON array, not an object"),
        (raw({**kombu_envelope(), "content-type": 7}), "'content-type' is not a string"),
        (raw(kombu_envelope(body={"a": 1})), "'body' is a JSON object, not a string"),
        (raw(kombu_envelope(body="%% not base64 %%")), "body is not base64"),
        (
            raw(kombu_envelope(properties=_properties(body_encoding="rot13"))),
            "unknown body_encoding 'rot13'",
        ),
        (
            raw(kombu_envelope(properties=_properties(body_encoding=5))),
            "'properties.body_encoding' is not a string",
        ),
        (b"[" * 100_000, "JSON nested too deeply"),
    ],
    ids=lambda v: v[:30] if isinstance(v, str) else None,
)
def test_what_kombu_could_not_take_is_refused_saying_why(data: bytes, reason: str) -> None:
    with pytest.raises(Refused) as refused:
        screen(data, decode_body)
    assert reason in str(refused.value)


# --- the consumer stage --------------------------------------------------------------------------


def message(
    body: bytes | str = b"",
    *,
    headers: Any = None,
    content_type: str = "application/json",
    content_encoding: str = "utf-8",
) -> Any:
    return Message(
        body=body,
        delivery_tag="tag-1",
        content_type=content_type,
        content_encoding=content_encoding,
        delivery_info={"exchange": "", "routing_key": "leasehold"},
        properties={},
        headers={"task": "leasehold.get_apply", "id": "t-1"} if headers is None else headers,
        accept={"application/json"},
    )


def call_body(args: list[Any], kwargs: dict[str, Any], embed: Any = EMBED) -> bytes:
    return json.dumps([args, kwargs, embed]).encode()


def test_a_protocol_2_call_is_read() -> None:
    assert examine(message(call_body([7], {"x": 1}))) == Call(
        task="leasehold.get_apply", task_id="t-1", args=[7], kwargs={"x": 1}
    )


def test_a_protocol_1_call_is_read() -> None:
    body = json.dumps({"task": "leasehold.get_apply", "id": "t-9", "args": [], "kwargs": {}})
    assert examine(message(body.encode(), headers={})) == Call(
        task="leasehold.get_apply", task_id="t-9", args=[], kwargs={}
    )


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        (message(b"[1, 2]"), "its body is a JSON array of 2 items, not [args, kwargs, embed]"),
        (message(b'"x"'), "its body is a JSON string, not [args, kwargs, embed]"),
        (
            message(call_body([], {}, embed=[1])),
            "its embedded options are a JSON array, not an object",
        ),
        (message(call_body([], {}), headers={}), "no task header, and its body is a JSON array"),
        (message(b'{"args": []}', headers={}), "no task name"),
        (
            message(b"\x80\x04K\x01.", content_type="application/x-python-serialize"),
            "content type 'application/x-python-serialize' is not accepted",
        ),
        (
            message(json.dumps([[], {}, {}]).encode("utf-16")),
            "body does not decode as 'application/json' (utf-8)",
        ),
        (message(b"[[], {}, {"), "body does not decode as 'application/json'"),
        (message(call_body([], {}), headers={"task": 5, "id": "t"}), "its task name is not"),
        (message(call_body([], {}), headers={"task": "", "id": "t"}), "its task name is not"),
        (message(call_body([], {}), headers={"task": "x"}), "its task id is not a string"),
        (message(json.dumps([{}, {}, None]).encode()), "its args are a JSON object, not an array"),
        (message(json.dumps([[], [], None]).encode()), "its kwargs are a JSON array"),
        (
            message(call_body([], {}), headers={"task": "x", "id": "t", "timelimit": "soon"}),
            "its timelimit is not [hard, soft] seconds",
        ),
    ],
)
def test_what_celery_could_not_run_is_refused_saying_why(sent: Any, reason: str) -> None:
    with pytest.raises(Refused) as refused:
        examine(sent)
    assert reason in str(refused.value)


def test_time_limits_in_seconds_are_accepted() -> None:
    sent = message(call_body([], {}), headers={"task": "x", "id": "t", "timelimit": [10, 5.5]})
    assert examine(sent).task == "x"


def test_named_reads_the_headers_without_the_body() -> None:
    assert named(message(b"not json at all")) == Named("leasehold.get_apply", "t-1")
    assert named(message(b"", headers={"task": 5})) == Named(None, None)
    odd = message(b"")
    odd.headers = [1]  # kombu itself cannot build such a message; Celery's hooks might see one
    assert named(odd) == Named(None, None)
    with pytest.raises(Refused, match="its headers are not an object"):
        examine(odd)
