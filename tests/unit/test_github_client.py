"""leasehold's GitHub client against the stand-in: adoption looks past the first page, and
GitHub's answers become leasehold's errors (retryable with the wait GitHub asked for, or not)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tasks.github.client import GitHubClient, GitHubConfig, GitHubRejected, GitHubRetryable
from tasks.testing.standin import GitHubStandIn


@pytest.fixture
def token() -> str:
    return "ghp_" + secrets.token_hex(20)


@pytest.fixture
def client(token: str) -> Iterator[tuple[GitHubStandIn, GitHubClient]]:
    with GitHubStandIn([token]) as github:
        gh = GitHubClient(GitHubConfig(api_url=github.url, token=token, timeout=5)).open()
        try:
            yield github, gh
        finally:
            gh.close()


def test_find_comment_reads_every_page(client: tuple[GitHubStandIn, GitHubClient]) -> None:
    _, gh = client
    for i in range(150):  # a busy pull request: the marker is on the second page
        gh.create_comment("acme/shop", 1, f"review comment {i}")
    wanted = gh.create_comment("acme/shop", 1, "<!-- leasehold apply=7 epoch=3 -->\nbody")
    assert gh.find_comment("acme/shop", 1, "<!-- leasehold apply=7 ") == wanted
    assert gh.find_comment("acme/shop", 1, "<!-- leasehold apply=70 ") is None


@pytest.mark.parametrize(("kind", "status"), [("secondary", 403), ("primary", 403), ("429", 429)])
def test_rate_limits_are_retryable_with_the_wait_github_asked_for(
    client: tuple[GitHubStandIn, GitHubClient], kind: str, status: int
) -> None:
    github, gh = client
    github.rate_limit_next(1, kind=kind, retry_after=7)  # type: ignore[arg-type]
    with pytest.raises(GitHubRetryable) as caught:
        gh.create_comment("acme/shop", 1, "x")
    assert caught.value.retry_after is not None
    assert 0 < caught.value.retry_after <= 8.5  # x-ratelimit-reset is whole epoch seconds
    assert github.requests()[-1].status == status
    assert gh.create_comment("acme/shop", 1, "x") > 0  # and then it goes through


def test_5xx_is_retryable_and_4xx_is_not(client: tuple[GitHubStandIn, GitHubClient]) -> None:
    github, gh = client
    github.fail_next(1, status=502)
    with pytest.raises(GitHubRetryable):
        gh.create_comment("acme/shop", 1, "x")
    with pytest.raises(GitHubRejected):
        gh.edit_comment("acme/shop", 999_999, "no such comment")
