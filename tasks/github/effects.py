"""Choosing the GitHub effects of a run: a fenced publisher, or none at all."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from leases import Lease
from storage.database import Database
from tasks.effects import Effects, NoEffects
from tasks.github.client import GitHubClient, GitHubConfig
from tasks.github.publisher import Publisher
from tasks.interrupts import Interrupts
from tasks.settings import Settings


def github_config(settings: Settings) -> GitHubConfig:
    return GitHubConfig(
        api_url=settings.github_api_url,
        token=settings.github_token,
        app_id=settings.github_app_id,
        private_key=settings.github_app_private_key,
        installation_id=settings.github_app_installation_id,
        timeout=settings.effect_timeout,
    )


def github_effects(
    db: Database,
    lease: Lease,
    interrupts: Interrupts,
    apply: Mapping[Any, Any],
    settings: Settings,
    *,
    reclaimed: bool,
) -> Effects:
    """No GitHub settings, or an apply without a pull request: no effects, and the apply still
    runs. A lease that came from a reclaim waits ``effect_grace`` before its first call (a clean
    handover or a first dispatch had nothing in flight, so it need not)."""
    config = github_config(settings)
    if not (config.enabled and apply["repository"] and apply["pull_request"] and apply["head_sha"]):
        return NoEffects()
    return Publisher(
        db,
        lease,
        GitHubClient(config).open(),
        interrupts,
        repository=str(apply["repository"]),
        pull_request=int(apply["pull_request"]),
        head_sha=str(apply["head_sha"]),
        comment_interval=settings.comment_interval,
        effect_timeout=settings.effect_timeout,
        effect_grace=settings.effect_grace,
        reclaimed=reclaimed,
    )
