"""Typed leasehold settings, read from the Celery app's configuration (``celeryconfig``, the one
place that gives the defaults: nothing here has one, so nothing can drift from it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from leases import ReclaimPolicy


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str
    heartbeat_interval: float
    stale_after: float
    reclaim_interval: float
    dispatch_timeout: float
    max_reclaims: int
    effect_timeout: float
    effect_grace: float
    comment_interval: float
    checkpoint_interval: float
    target_retry: float
    apply_slots: int
    control_concurrency: int
    # Store connections the apply slots of one worker process share (its runs wait for one).
    database_connections: int
    github_api_url: str
    targets: dict[str, str] = field(repr=False)
    github_token: str | None = field(repr=False)
    github_app_id: str | None
    github_app_private_key: str | None = field(repr=False)
    github_app_installation_id: str | None

    @classmethod
    def from_conf(cls, conf: Any) -> Settings:
        return cls(
            database_url=conf.leasehold_database_url,
            heartbeat_interval=float(conf.leasehold_heartbeat_interval),
            stale_after=float(conf.leasehold_stale_after),
            reclaim_interval=float(conf.leasehold_reclaim_interval),
            dispatch_timeout=float(conf.leasehold_dispatch_timeout),
            max_reclaims=int(conf.leasehold_max_reclaims),
            effect_timeout=float(conf.leasehold_effect_timeout),
            effect_grace=float(conf.leasehold_effect_grace),
            comment_interval=float(conf.leasehold_comment_interval),
            checkpoint_interval=float(conf.leasehold_checkpoint_interval),
            target_retry=float(conf.leasehold_target_retry),
            apply_slots=int(conf.leasehold_worker_concurrency),
            control_concurrency=int(conf.leasehold_control_concurrency),
            database_connections=int(conf.leasehold_database_connections),
            github_api_url=str(conf.leasehold_github_api_url),
            targets=dict(conf.leasehold_targets),
            github_token=conf.leasehold_github_token,
            github_app_id=conf.leasehold_github_app_id,
            github_app_private_key=conf.leasehold_github_app_private_key,
            github_app_installation_id=conf.leasehold_github_app_installation_id,
        )

    @property
    def control_connections(self) -> int:
        """The pool of the control plane (tasks/runtime.py ``database``): one per control
        thread and one to spare (beat, the CLI); more are opened while they are all busy."""
        return self.control_concurrency + 1

    @property
    def reclaim_policy(self) -> ReclaimPolicy:
        return ReclaimPolicy(
            stale_after=self.stale_after,
            dispatch_timeout=self.dispatch_timeout,
            max_reclaims=self.max_reclaims,
        )
