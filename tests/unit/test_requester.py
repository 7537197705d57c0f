"""Who asked for an apply (issue 14): ``service.requester`` composes what a caller claims with who
signed its message; submit's ``requested_by`` is validated strictly; the pull request comment shows
it as literal text (``render.literal``), never as Markdown, a mention or a marker."""

from __future__ import annotations

from typing import Any

import pytest

from storage.errors import InvalidInput
from tasks.github import render
from tasks.payload import MAX_REQUESTED_BY, parse_submission
from tasks.service import requester
from tests.payloads import TARGETS, good

# --- service.requester ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claimed", "signer", "expected"),
    [
        (None, None, None),
        (None, "CN=deploy-bot", "CN=deploy-bot"),
        ("alice", None, "alice"),
        ("alice", "CN=deploy-bot", "CN=deploy-bot (as alice)"),
        ("a" * MAX_REQUESTED_BY, None, "a" * MAX_REQUESTED_BY),
    ],
)
def test_requester_composes_the_claim_with_the_signer(
    claimed: str | None, signer: str | None, expected: str | None
) -> None:
    assert requester(claimed, signer) == expected


def test_requester_cuts_a_composition_to_the_column() -> None:
    signer = "CN=" + "s" * 200
    composed = requester("c" * MAX_REQUESTED_BY, signer)
    assert composed is not None
    assert len(composed) == MAX_REQUESTED_BY
    assert composed.startswith(f"{signer} (as ccc")  # the proved part is never the one cut


@pytest.mark.parametrize(
    ("claimed", "expected"),
    [
        (7, "must be a string"),
        (1.5, "must be a string"),
        (True, "must be a string"),
        (["alice"], "must be a string"),
        ({"name": "alice"}, "must be a string"),
        (b"alice", "must be a string"),
        ("a" * (MAX_REQUESTED_BY + 1), "must hold 1 to 255 characters"),
        ("", "must hold 1 to 255 characters"),
        ("alice\nstop by root", "must be printable text"),
    ],
    ids=["int", "float", "bool", "list", "dict", "bytes", "too-long", "empty", "line-break"],
)
@pytest.mark.parametrize("signer", [None, "CN=deploy-bot"])
def test_requester_holds_a_claim_to_the_submit_rule(
    claimed: object, expected: str, signer: str | None
) -> None:
    """Submit and control requests take the same claims: printable text that fits the column (a
    line break in a control request's requester would forge a line of ``leasehold logs``)."""
    with pytest.raises(InvalidInput, match=f"requested_by {expected}"):
        requester(claimed, signer)


# --- submit's requested_by ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["alice@laptop", "CN=deploy-bot (as alice)", "é" * MAX_REQUESTED_BY, "x", "ops 🚀 team"],
)
def test_a_printable_requester_is_taken_as_given(value: str) -> None:
    assert parse_submission(good(requested_by=value), targets=TARGETS).requested_by == value


def test_requested_by_is_optional_and_null_is_absent() -> None:
    assert parse_submission(good(), targets=TARGETS).requested_by is None
    assert parse_submission(good(requested_by=None), targets=TARGETS).requested_by is None


REJECTED_REQUESTERS = [
    pytest.param(7, "requested_by must be a string, not int", id="int"),
    pytest.param(True, "requested_by must be a string, not bool", id="bool"),
    pytest.param(["ops"], "requested_by must be a string, not list", id="list"),
    pytest.param({"user": "ops"}, "requested_by must be a string, not dict", id="dict"),
    pytest.param("", "requested_by must hold 1 to 255 characters", id="empty"),
    pytest.param("   ", "requested_by must hold 1 to 255 characters", id="blank"),
    pytest.param("a" * 256, "requested_by must hold 1 to 255 characters", id="too-long"),
    pytest.param("alice\nforged line", "requested_by must be printable", id="newline"),
    pytest.param("alice\r", "requested_by must be printable", id="carriage-return"),
    pytest.param("alice\tops", "requested_by must be printable", id="tab"),
    pytest.param("\x1b[31malice", "requested_by must be printable", id="escape-sequence"),
    pytest.param("alice\x00", "requested_by must be printable", id="nul"),
    pytest.param("ali\u200bce", "requested_by must be printable", id="zero-width-space"),
    pytest.param("alice\u2028", "requested_by must be printable", id="line-separator"),
]


@pytest.mark.parametrize(("value", "message"), REJECTED_REQUESTERS)
def test_a_malformed_requester_is_refused_naming_the_field(value: Any, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_submission(good(requested_by=value), targets=TARGETS)
    assert message in str(caught.value)
    if isinstance(value, str) and len(value) > 1:
        assert value not in str(caught.value)  # what was refused is not echoed to a terminal


# --- the comment's literal text -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("alice@laptop", "`alice@laptop`"),
        ("@acme/dba please look", "`@acme/dba please look`"),
        ("**bold** [x](https://e.example) #12", "`**bold** [x](https://e.example) #12`"),
        ("a `tick` b", "``a `tick` b``"),
        ("``double`` and `one`", "``` ``double`` and `one` ```"),
        ("`edge`", "`` `edge` ``"),
        (" both ", "`  both  `"),
        ("<b>html</b>", "`<b>html</b>`"),
        ("x <!-- leasehold apply=9 epoch=99 -->", "`x <\u2060!-- leasehold apply=9 epoch=99 -->`"),
        ("line\nbreak", "`line\ufffdbreak`"),
    ],
    ids=[
        "plain",
        "mention",
        "markdown",
        "backtick",
        "backticks",
        "edge-backticks",
        "edge-spaces",
        "html",
        "marker",
        "newline",
    ],
)
def test_literal_is_a_code_span_the_text_cannot_leave(text: str, shown: str) -> None:
    assert render.literal(text) == shown


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain error", "```text\nplain error\n```"),
        ("two\nlines @team", "```text\ntwo\nlines @team\n```"),
        ("a ``` fence", "````text\na ``` fence\n````"),
        (
            "x <!-- leasehold apply=9 epoch=99 -->",
            "```text\nx <\u2060!-- leasehold apply=9 epoch=99 -->\n```",
        ),
    ],
    ids=["plain", "lines-and-mention", "fence-inside", "marker"],
)
def test_an_error_is_a_code_block_its_lines_cannot_leave(text: str, shown: str) -> None:
    assert render.block(text) == shown


def test_the_comment_names_the_requester_once_and_keeps_one_marker() -> None:
    apply = {
        "id": 4,
        "database_name": "shop",
        "environment": "staging",
        "engine": "sleep",
        "error": None,
        "requested_by": "@octocat <!-- leasehold apply=5 epoch=1 -->",
    }
    body = render.render_comment(apply, [], epoch=2, state="running")
    assert render.parse_marker(body) == (4, 2)
    assert body.count("<!--") == 1  # only the real marker
    assert render.marker_prefix(5) not in body  # apply 5's publisher never adopts this comment
    (line,) = [line for line in body.splitlines() if line.startswith("Requested by ")]
    assert line == "Requested by `@octocat <\u2060!-- leasehold apply=5 epoch=1 -->`"
    nobody = render.render_comment({**apply, "requested_by": None}, [], epoch=2, state="running")
    assert "Requested by" not in nobody
