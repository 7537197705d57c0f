"""Statement tags: rendered in front of every DDL, read back from a process list's INFO."""

from __future__ import annotations

import pytest

from tasks.engines import EngineContext, TargetStatement
from tasks.engines.tags import Tag, apply_prefix, parse
from tests.engine_doubles import Recorder, spec


def test_a_tag_is_a_leading_comment() -> None:
    tag = Tag(apply_id=12, task_id=34, epoch=5)
    assert tag.comment == "/* leasehold apply=12 task=34 epoch=5 */"
    assert tag.mark("ALTER TABLE big ADD COLUMN extra INT") == (
        "/* leasehold apply=12 task=34 epoch=5 */ ALTER TABLE big ADD COLUMN extra INT"
    )
    assert parse(tag.mark("ALTER TABLE big ADD COLUMN extra INT")) == tag


def test_the_context_tags_with_its_apply_and_epoch_and_the_tasks_id() -> None:
    ctx = EngineContext(progress=Recorder(), apply_id=12, epoch=5)
    assert ctx.tag(spec(task_id=34)) == Tag(apply_id=12, task_id=34, epoch=5)


@pytest.mark.parametrize(
    "info",
    [
        None,
        "",
        "ALTER TABLE big ADD COLUMN extra INT",
        # Only at the very start: a comment inside a submitted DDL cannot pose as a tag.
        "ALTER TABLE big /* leasehold apply=1 task=2 epoch=3 */ ADD COLUMN extra INT",
        " /* leasehold apply=1 task=2 epoch=3 */ DO 1",
        "/* leasehold apply=1 task=2 */ DO 1",
        "/* leasehold apply=x task=2 epoch=3 */ DO 1",
        "/* leasehold apply=-1 task=2 epoch=3 */ DO 1",
    ],
)
def test_anything_else_is_not_a_tag(info: str | None) -> None:
    assert parse(info) is None


def test_the_apply_prefix_matches_one_apply_only() -> None:
    prefix = apply_prefix(7)
    assert Tag(7, 1, 1).mark("DO 1").startswith(prefix)
    for other in (70, 77, 17):
        assert not Tag(other, 1, 1).mark("DO 1").startswith(prefix)
    # A LIKE pattern as it is: no wildcard in it.
    assert "%" not in prefix
    assert "_" not in prefix


def test_a_tag_takes_no_negative_numbers() -> None:
    with pytest.raises(ValueError, match="negative"):
        Tag(apply_id=1, task_id=-2, epoch=3)


def test_a_statement_describes_itself_for_the_apply_log() -> None:
    running = TargetStatement(
        connection_id=81, tag=Tag(12, 34, 4), seconds=12.34, progress=37.6, query_id=9
    )
    assert running.describe() == (
        "statement of epoch 4 (task 34, connection 81) running for 12.3 s, 38% done"
    )
    unknown = TargetStatement(connection_id=81, tag=Tag(12, 34, 4), seconds=2.0)
    assert unknown.describe().endswith("running for 2.0 s")
