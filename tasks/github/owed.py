"""What pull requests are still owed, settled by the reclaim pass: the stopped or final state of
an apply whose holder could not publish it (GitHub down for longer than the holder's own
attempts, or the worker killed right after the apply ended).

Each pass claims the owed publications that are due (``storage.publications``), oldest first,
and makes each under the apply's current lease (``tasks.github.publication``). A failed attempt
makes the next one due after a growing delay (up to ``tasks.github.publisher.MAX_BACKOFF``), and
ends the pass's publishing: while GitHub is down, a pass spends at most one call's timeout on
it, so that reclaims, dispatches and notifications (done before this) are never held up.
"""

from __future__ import annotations

import logging
from typing import Final

from leases.effects import claim_publication
from storage import applies, publications
from storage.database import Database
from tasks.github.client import GitHubClient
from tasks.github.effects import github_config
from tasks.github.publication import WINDOW_MARGIN, Publication
from tasks.github.publisher import settle
from tasks.settings import Settings

log = logging.getLogger(__name__)
PER_PASS: Final = 20


def publish_owed(db: Database, settings: Settings, *, limit: int = PER_PASS) -> int:
    """Publish what is owed and due, until one attempt fails. Returns how many were settled."""
    config = github_config(settings)
    if not config.enabled:
        return 0
    due = publications.owed(db, limit=limit)
    if not due:
        return 0
    settled = 0
    client = GitHubClient(config).open()
    try:
        for apply_id in due:
            owed = claim_publication(db, apply_id)
            if owed is None:
                continue  # a holder or another pass is at it
            row = applies.get(db, apply_id)
            publication = Publication(
                db,
                owed.lease,
                client,
                repository=str(row["repository"]),
                pull_request=int(row["pull_request"]),
                head_sha=str(row["head_sha"]),
                window=max(settings.effect_grace, settings.effect_timeout) + WINDOW_MARGIN,
            )
            outcome = settle(db, publication, attempts=owed.attempts)
            settled += outcome.published
            if outcome.retry_in is not None:
                break  # GitHub is failing: the rest waits for a later pass
    finally:
        client.close()
    if settled:
        log.info("published the owed state of %d applies", settled)
    return settled
