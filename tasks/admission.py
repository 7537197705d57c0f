"""Whether a decoded call fits its leasehold task: checked on the worker's consumer thread,
before the message is acknowledged or its task runs, and without the store.

Every task's arguments must bind to its signature; leasehold's own tasks then check the values
they would check first anyway, with the same functions (``service.require_id``,
``Lease.from_json``, ``payload.parse_submission``), so this is never stricter than the task
itself. What needs the store (does the apply exist, was this lease issued) stays the task's:
those are answers to a well-formed call, not malformed messages.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Final

from leases import Lease
from storage.errors import InvalidInput, InvalidLease
from storage.states import ControlAction
from tasks.envelope import Call, Refused
from tasks.payload import parse_submission
from tasks.service import require_id

Check = Callable[[inspect.BoundArguments, Mapping[str, str]], None]


def _run_apply(bound: inspect.BoundArguments, targets: Mapping[str, str]) -> None:
    apply_id = require_id(bound.arguments["apply_id"])
    held = Lease.from_json(bound.arguments["lease"])
    if held.apply_id != apply_id:
        raise InvalidLease(f"lease is for apply {held.apply_id}, not {apply_id}")


def _submit_apply(bound: inspect.BoundArguments, targets: Mapping[str, str]) -> None:
    parse_submission(bound.kwargs, targets=targets)


def _control_apply(bound: inspect.BoundArguments, targets: Mapping[str, str]) -> None:
    require_id(bound.arguments["apply_id"])
    action = bound.arguments["action"]
    if not isinstance(action, str) or action not in set(ControlAction):
        raise InvalidInput(f"action must be one of {', '.join(ControlAction)}; not {action!r}")


def _get_apply(bound: inspect.BoundArguments, targets: Mapping[str, str]) -> None:
    require_id(bound.arguments["apply_id"])


CHECKS: Final[Mapping[str, Check]] = {
    "leasehold.run_apply": _run_apply,
    "leasehold.submit_apply": _submit_apply,
    "leasehold.control_apply": _control_apply,
    "leasehold.get_apply": _get_apply,
}


class Admission:
    """The checks of one worker's tasks (``app.tasks``) and configured targets."""

    def __init__(self, tasks: Mapping[str, Any], targets: Mapping[str, str]) -> None:
        self._tasks = tasks
        self._targets = dict(targets)
        self._signatures: dict[str, inspect.Signature | None] = {}

    def known(self, name: str) -> bool:
        return name in self._tasks

    def admit(self, call: Call) -> None:
        """Nothing, or ``InvalidInput`` (a ``Refused`` for arguments that do not bind) saying
        what is wrong with the call, in the words the task itself would use."""
        signature = self._signature(call.task)
        if signature is None:
            return  # a task whose signature Python cannot read: its own body decides
        try:
            bound = signature.bind(*call.args, **call.kwargs)
        except TypeError as exc:
            raise Refused(f"arguments do not fit {call.task}({_names(signature)}): {exc}") from None
        check = CHECKS.get(call.task)
        if check is not None:
            check(bound, self._targets)

    def _signature(self, name: str) -> inspect.Signature | None:
        if name not in self._signatures:
            try:
                # A bound task's run is a bound method: its signature leaves out ``self``.
                self._signatures[name] = inspect.signature(self._tasks[name].run)
            except (TypeError, ValueError):
                self._signatures[name] = None
        return self._signatures[name]


def _names(signature: inspect.Signature) -> str:
    """``apply_id, lease`` or ``**payload``: the parameters, without their annotations."""
    bare = signature.replace(
        parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
        return_annotation=signature.empty,
    )
    return str(bare)[1:-1]
