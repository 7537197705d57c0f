"""Typed leasehold settings, read from the Celery app's configuration (``celeryconfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from leases import ReclaimPolicy


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str
    heartbeat_interval: float = 5.0
    stale_after: float = 30.0
    reclaim_interval: float = 5.0
    dispatch_timeout: float = 600.0
    max_reclaims: int = 5
    effect_timeout: float = 10.0
    effect_grace: float = 12.0
    comment_interval: float = 10.0
    apply_slots: int = 4
    control_concurrency: int = 4
    github_api_url: str = "https://api.github.com"
    targets: dict[str, str] = field(default_factory=dict, repr=False)
    github_token: str | None = field(default=None, repr=False)
    github_app_id: str | None = None
    github_app_private_key: str | None = field(default=None, repr=False)
    github_app_installation_id: str | None = None

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
            apply_slots=int(conf.leasehold_worker_concurrency),
            control_concurrency=int(conf.leasehold_control_concurrency),
            github_api_url=str(conf.leasehold_github_api_url),
            targets=dict(conf.leasehold_targets),
            github_token=conf.leasehold_github_token,
            github_app_id=conf.leasehold_github_app_id,
            github_app_private_key=conf.leasehold_github_app_private_key,
            github_app_installation_id=conf.leasehold_github_app_installation_id,
        )

    @property
    def database_connections(self) -> int:
        """Connections a worker may use at once: a running apply's runner and heartbeat thread
        each, one per control thread, and one to spare (beat, the CLI)."""
        return 2 * self.apply_slots + self.control_concurrency + 1

    @property
    def reclaim_policy(self) -> ReclaimPolicy:
        return ReclaimPolicy(
            stale_after=self.stale_after,
            dispatch_timeout=self.dispatch_timeout,
            max_reclaims=self.max_reclaims,
        )
