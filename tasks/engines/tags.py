"""Statement tags: every DDL an engine runs starts with a comment naming its apply, apply task
and lease epoch, e.g. ``/* leasehold apply=12 task=34 epoch=5 */ ALTER TABLE ...``.

MariaDB and MySQL keep a statement's leading comment in ``information_schema.PROCESSLIST.INFO``,
so a holder (and an operator) can see which apply and which epoch a running statement belongs
to: the target-side fence of invariant 9 is built on it. Only numbers go into a tag, so a tag
can never end the comment early, and a tag is only read at the very start of a statement, so a
comment inside a submitted DDL cannot pose as one."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

_TAG: Final = re.compile(r"^/\* leasehold apply=(\d+) task=(\d+) epoch=(\d+) \*/")


@dataclass(frozen=True, slots=True)
class Tag:
    apply_id: int
    task_id: int
    epoch: int

    def __post_init__(self) -> None:
        if min(self.apply_id, self.task_id, self.epoch) < 0:
            raise ValueError(f"a statement tag takes no negative numbers: {self}")

    @property
    def comment(self) -> str:
        return f"/* leasehold apply={self.apply_id:d} task={self.task_id:d} epoch={self.epoch:d} */"

    def mark(self, sql: str) -> str:
        """``sql`` with this tag in front, as the target will show it."""
        return f"{self.comment} {sql}"


def apply_prefix(apply_id: int) -> str:
    """How every tagged statement of ``apply_id`` starts (with no ``%`` or ``_``, so it can be
    used in a ``LIKE`` pattern as it is). The trailing space keeps apply 12 from matching 123."""
    return f"/* leasehold apply={int(apply_id):d} "


def parse(info: str | None) -> Tag | None:
    """The tag at the start of a statement's text, or None (not ours, or not tagged)."""
    if not info:
        return None
    found = _TAG.match(info)
    if found is None:
        return None
    return Tag(apply_id=int(found[1]), task_id=int(found[2]), epoch=int(found[3]))
