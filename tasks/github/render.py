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
        lines += ["", f"> {str(error)[:500]}"]
    return "\n".join(lines) + "\n"


def render_summary(tasks: Sequence[Mapping[Any, Any]], *, state: str) -> str:
    done = sum(1 for task in tasks if task["state"] == "completed")
    return f"{state}: {done} of {len(tasks)} apply tasks completed"
