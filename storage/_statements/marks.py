"""Marks: when each background duty last ran."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, Update, select

from storage import clock
from storage.tables import marks


def touch_mark(name: str, *, detail: str | None) -> Update:
    return marks.update().where(marks.c.name == name).values(at=clock.now(), detail=detail)


def mark_row(name: str) -> Select[Any]:
    return select(marks.c.at, marks.c.detail, clock.age_of(marks.c.at).label("age")).where(
        marks.c.name == name
    )
