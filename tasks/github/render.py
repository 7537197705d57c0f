"""What leasehold publishes on a pull request. Every body renders the *full* current state, so
any edit overwrites whatever an earlier (or a late, stale) edit said."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

CHECK_NAME: Final = "leasehold apply"
COMMENT_KIND: Final = "progress"
_MARKER_RE: Final = re.compile(r"<!-- leasehold apply=(\d+) epoch=(\d+) -->")
_BACKTICKS: Final = re.compile(r"`+")
_ICONS: Final = {
    "pending": "⏳",
    "dispatched": "📨",
    "running": "🔄",
    "stopped": "⏸️",
    "completed": "✅",
    "failed": "❌",
    "cancelled": "🚫",
}
CONCLUSIONS: Final = {"completed": "success", "failed": "failure", "cancelled": "cancelled"}


def marker(apply_id: int, epoch: int) -> str:
    return f"<!-- leasehold apply={apply_id} epoch={epoch} -->"


def marker_prefix(apply_id: int) -> str:
    """What identifies this apply's comment whatever the epoch (the space ends the id)."""
    return f"<!-- leasehold apply={apply_id} "


def parse_marker(body: str) -> tuple[int, int] | None:
    """(apply_id, epoch) of a body's marker, or None."""
    found = _MARKER_RE.search(body)
    return (int(found[1]), int(found[2])) if found else None


def external_id(apply_id: int) -> str:
    return f"leasehold-apply-{apply_id}"


def digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def render_comment(
    apply: Mapping[Any, Any],
    tasks: Sequence[Mapping[Any, Any]],
    *,
    epoch: int,
    state: str,
    error: str | None = None,
) -> str:
    lines = [
        marker(int(apply["id"]), epoch),
        f"### {_ICONS.get(state, '')} leasehold apply #{apply['id']}: **{state}**",
        "",
        f"`{apply['database_name']}` in `{apply['environment']}` · engine `{apply['engine']}` · "
        f"lease epoch {epoch}",
        "",
    ]
    if apply.get("requested_by"):
        lines += [f"Requested by {literal(str(apply['requested_by']))}", ""]
    lines += [
        "| # | table | state | progress |",
        "|---:|---|---|---:|",
    ]
    for task in tasks:
        lines.append(
            f"| {int(task['position']) + 1} | `{task['table_name']}` | {task['state']} | "
            f"{int(task['progress'])}% |"
        )
    error = error or apply.get("error")
    if error:
        lines += ["", block(str(error)[:500])]
    return "\n".join(lines) + "\n"


def literal(text: str) -> str:
    """Free text from other apps (who asked for an apply) as Markdown that shows it as it is and
    does nothing else: a code span, in which GitHub makes no mention (``@team`` pings nobody),
    no issue or commit link, no emphasis, link, image or HTML. Its fence is one backtick longer
    than the longest run of backticks in the text, so the text cannot close it; line breaks and
    other unprintable characters show as U+FFFD, so it cannot end the paragraph either. And
    ``<!`` gets a word joiner, so that the text never carries an apply's marker (which finds the
    apply's comment) or opens an HTML comment."""
    shown = "".join(c if c.isprintable() else "\ufffd" for c in text).replace("<!", "<\u2060!")
    fence = "`" * (max(map(len, _BACKTICKS.findall(shown)), default=0) + 1)
    # A space on each side keeps a leading or trailing backtick (or space) as it is: CommonMark
    # strips one space from each end of a code span that has both.
    pad = " " if shown[:1] in ("`", " ") or shown[-1:] in ("`", " ") else ""
    return f"{fence}{pad}{shown}{pad}{fence}"


def block(text: str) -> str:
    """Text of many lines that leasehold did not write (an error, which may quote the caller's DDL
    or a server's message) as a fenced code block: shown as it is, with no mention, link or HTML
    in it, and no line of it able to close the fence (one backtick longer than the longest run in
    the text) or to carry an apply's marker (``<!`` gets a word joiner, as in :func:`literal`)."""
    shown = text.replace("<!", "<\u2060!")
    fence = "`" * max(3, max(map(len, _BACKTICKS.findall(shown)), default=0) + 1)
    return f"{fence}text\n{shown}\n{fence}"


def render_summary(tasks: Sequence[Mapping[Any, Any]], *, state: str) -> str:
    done = sum(1 for task in tasks if task["state"] == "completed")
    return f"{state}: {done} of {len(tasks)} apply tasks completed"
