"""The GitHub stand-in, driven over real HTTP through githubkit: GitHub's paths, status codes and
JSON shapes (``.parsed_data`` validates them against githubkit's models), the request log, fault
injection and the gate, App installation tokens, and no token in anything it records."""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import httpx
import pytest
from githubkit import BaseAuthStrategy, GitHub, TokenAuthStrategy, UnauthAuthStrategy
from githubkit.cache import MemCacheStrategy
from githubkit.exception import (
    PrimaryRateLimitExceeded,
    RequestFailed,
    RequestTimeout,
    SecondaryRateLimitExceeded,
)
from githubkit_schemas.latest.models import CheckRun, InstallationToken, IssueComment

from tasks.testing.standin import GitHubStandIn
from tests.celery_fixtures import wait_until

OWNER, REPO, PR = "acme", "shop", 7
SHA = "a" * 40
COMMENTS_PATH = r"/issues/\d+/comments$"
EDIT_PATH = r"/issues/comments/\d+$"
A = TypeVar("A", bound=BaseAuthStrategy)

Client = Callable[..., GitHub[TokenAuthStrategy]]


def connect(url: str, auth: A, timeout: float = 5.0) -> GitHub[A]:
    """A githubkit client as leasehold builds one: no retries, no HTTP cache, own token cache."""
    return GitHub(
        auth,
        base_url=url,
        auto_retry=False,
        http_cache=False,
        trust_env=False,
        timeout=timeout,
        cache_strategy=MemCacheStrategy(),
    )


def ids_of(listed: Any) -> list[int]:
    """Ids of a list of parsed IssueComment or CheckRun models (mypy cannot see through
    githubkit's ``list`` method shadowing the builtin in these return types)."""
    assert all(isinstance(item, IssueComment | CheckRun) for item in listed)
    return [item.id for item in listed]


@pytest.fixture
def token() -> str:
    return "ghp_" + secrets.token_hex(16)


@pytest.fixture
def standin(token: str) -> Iterator[GitHubStandIn]:
    with GitHubStandIn([token]) as server:
        yield server


@pytest.fixture
def client(standin: GitHubStandIn, token: str) -> Client:
    def make(timeout: float = 5.0, auth: str | None = None) -> GitHub[TokenAuthStrategy]:
        return connect(standin.url, TokenAuthStrategy(auth or token), timeout)

    return make


@pytest.fixture
def gh(client: Client) -> Iterator[GitHub[TokenAuthStrategy]]:
    with client() as github:  # one connection pool for the test
        yield github


def status_of(exc: pytest.ExceptionInfo[RequestFailed]) -> int:
    return exc.value.response.status_code


# issue comments


def test_comments_create_list_edit(standin: GitHubStandIn, gh: GitHub[TokenAuthStrategy]) -> None:
    created = gh.rest.issues.create_comment(OWNER, REPO, PR, data={"body": "v1"})
    assert created.status_code == 201
    first = created.parsed_data
    assert isinstance(first, IssueComment)
    assert (first.body, first.user and first.user.login) == ("v1", standin.login)
    assert first.issue_url.endswith(f"/repos/{OWNER}/{REPO}/issues/{PR}")
    other = gh.rest.issues.create_comment(OWNER, REPO, PR, data={"body": "second"}).parsed_data
    gh.rest.issues.create_comment(OWNER, REPO, PR + 1, data={"body": "elsewhere"})

    listed = gh.rest.issues.list_comments(OWNER, REPO, PR, per_page=100, page=1)
    assert listed.status_code == 200
    assert "link" not in listed.headers
    assert ids_of(listed.parsed_data) == sorted([first.id, other.id])

    edited = gh.rest.issues.update_comment(OWNER, REPO, first.id, data={"body": "v2"})
    assert edited.status_code == 200
    assert (edited.parsed_data.id, edited.parsed_data.body) == (first.id, "v2")
    assert edited.parsed_data.updated_at >= first.created_at
    gh.rest.issues.update_comment(OWNER, REPO, first.id, data={"body": "v3"})
    got = gh.rest.issues.get_comment(OWNER, REPO, first.id).parsed_data
    assert got.body == "v3"
    assert standin.comment_history(first.id) == ["v1", "v2", "v3"]
    assert [c.body for c in standin.comments(OWNER, REPO, PR)] == ["v3", "second"]
    assert standin.comment_history(999) == []


def test_comment_pagination_and_link_header(
    standin: GitHubStandIn, gh: GitHub[TokenAuthStrategy]
) -> None:
    ids = [
        gh.rest.issues.create_comment(OWNER, REPO, PR, data={"body": f"c{i}"}).parsed_data.id
        for i in range(5)
    ]
    page1 = gh.rest.issues.list_comments(OWNER, REPO, PR, per_page=2, page=1)
    assert ids_of(page1.parsed_data) == ids[:2]
    link = page1.headers["link"]
    assert 'page=2>; rel="next"' in link
    assert 'page=3>; rel="last"' in link
    assert link.startswith(f"<{standin.url}/repos/{OWNER}/{REPO}/issues/{PR}/comments?")
    page2 = gh.rest.issues.list_comments(OWNER, REPO, PR, per_page=2, page=2)
    assert 'rel="prev"' in page2.headers["link"]
    assert 'rel="first"' in page2.headers["link"]
    page3 = gh.rest.issues.list_comments(OWNER, REPO, PR, per_page=2, page=3)
    assert ids_of(page3.parsed_data) == ids[4:]
    assert 'rel="next"' not in page3.headers["link"]
    assert gh.rest.issues.list_comments(OWNER, REPO, PR, per_page=2, page=4).parsed_data == []
    # githubkit's paginator follows the Link header to the end
    paged: Any = gh.rest.paginate(
        gh.rest.issues.list_comments, owner=OWNER, repo=REPO, issue_number=PR, per_page=2
    )
    assert ids_of(list(paged)) == ids


def test_comment_errors(standin: GitHubStandIn, gh: GitHub[TokenAuthStrategy]) -> None:
    comment = gh.rest.issues.create_comment(OWNER, REPO, PR, data={"body": "x"}).parsed_data
    with pytest.raises(RequestFailed) as unknown:
        gh.rest.issues.update_comment(OWNER, REPO, 424242, data={"body": "y"})
    assert status_of(unknown) == 404
    assert unknown.value.response.json()["message"] == "Not Found"
    with pytest.raises(RequestFailed) as foreign:  # ids are per repository
        gh.rest.issues.update_comment(OWNER, "other", comment.id, data={"body": "y"})
    assert status_of(foreign) == 404
    with pytest.raises(RequestFailed) as no_body:
        gh.request("POST", f"/repos/{OWNER}/{REPO}/issues/{PR}/comments", json={})
    assert status_of(no_body) == 422
    with pytest.raises(RequestFailed) as too_long:
        gh.request("PATCH", f"/repos/{OWNER}/{REPO}/issues/comments/{comment.id}",
                   json={"body": "x" * 65537})  # fmt: skip
    assert status_of(too_long) == 422
    with pytest.raises(RequestFailed) as route:
        gh.request("GET", f"/repos/{OWNER}/{REPO}/pulls")
    assert status_of(route) == 404
    assert standin.comment_history(comment.id) == ["x"]
    assert [r.status for r in standin.requests()] == [201, 404, 404, 422, 422, 404]


# check runs


def test_check_run_create_list_update_complete(
    standin: GitHubStandIn, gh: GitHub[TokenAuthStrategy]
) -> None:
    created = gh.rest.checks.create(
        OWNER,
        REPO,
        data={"name": "leasehold", "head_sha": SHA, "external_id": "leasehold-apply-1",
              "status": "in_progress", "output": {"title": "t", "summary": "s"}},
    )  # fmt: skip
    assert created.status_code == 201
    run = created.parsed_data
    assert isinstance(run, CheckRun)
    assert (run.status, run.conclusion, run.completed_at) == ("in_progress", None, None)
    assert run.external_id == "leasehold-apply-1"
    assert run.started_at is not None
    gh.rest.checks.create(OWNER, REPO, data={"name": "lint", "head_sha": SHA})
    gh.rest.checks.create(OWNER, REPO, data={"name": "leasehold", "head_sha": "b" * 40})

    listed = gh.rest.checks.list_for_ref(
        OWNER, REPO, SHA, check_name="leasehold", filter_="all", per_page=100
    ).parsed_data
    assert listed.total_count == 1
    assert [r.id for r in listed.check_runs] == [run.id]
    everything = gh.rest.checks.list_for_ref(OWNER, REPO, SHA, filter_="all").parsed_data
    assert sorted(r.name for r in everything.check_runs) == ["leasehold", "lint"]

    progress = gh.rest.checks.update(
        OWNER, REPO, run.id, data={"output": {"title": "t", "summary": "50%"}}
    ).parsed_data
    assert (progress.status, progress.output.summary) == ("in_progress", "50%")
    done = gh.rest.checks.update(
        OWNER, REPO, run.id, data={"status": "completed", "conclusion": "success"}
    )
    assert done.status_code == 200
    assert done.parsed_data.status == "completed"
    assert done.parsed_data.conclusion == "success"
    assert done.parsed_data.completed_at is not None
    history = standin.check_run_history(run.id)
    assert [(v.status, v.conclusion) for v in history] == [
        ("in_progress", None), ("in_progress", None), ("completed", "success"),
    ]  # fmt: skip
    assert [r.id for r in standin.check_runs(OWNER, REPO, head_sha=SHA, name="leasehold")] == [
        run.id
    ]


def test_check_run_filter_latest_and_pagination(gh: GitHub[TokenAuthStrategy]) -> None:
    ids = [
        gh.rest.checks.create(
            OWNER, REPO, data={"name": "leasehold", "head_sha": SHA}
        ).parsed_data.id
        for _ in range(3)
    ]
    latest = gh.rest.checks.list_for_ref(OWNER, REPO, SHA, check_name="leasehold").parsed_data
    assert [r.id for r in latest.check_runs] == [ids[-1]]
    first = gh.rest.checks.list_for_ref(OWNER, REPO, SHA, filter_="all", per_page=2)
    assert first.parsed_data.total_count == 3
    assert [r.id for r in first.parsed_data.check_runs] == ids[:2]
    assert 'rel="next"' in first.headers["link"]


def test_check_run_conclusion_rules(standin: GitHubStandIn, gh: GitHub[TokenAuthStrategy]) -> None:
    run = gh.rest.checks.create(OWNER, REPO, data={"name": "n", "head_sha": SHA}).parsed_data
    assert run.status == "queued"
    path = f"/repos/{OWNER}/{REPO}/check-runs/{run.id}"
    with pytest.raises(RequestFailed) as no_conclusion:
        gh.request("PATCH", path, json={"status": "completed"})
    assert status_of(no_conclusion) == 422
    with pytest.raises(RequestFailed) as bad:
        gh.request("PATCH", path, json={"conclusion": "great"})
    assert status_of(bad) == 422
    assert len(standin.check_run_history(run.id)) == 1  # refused updates change nothing
    # a conclusion alone completes the run, as on GitHub
    done = gh.rest.checks.update(OWNER, REPO, run.id, data={"conclusion": "cancelled"})
    assert (done.parsed_data.status, done.parsed_data.conclusion) == ("completed", "cancelled")
    with pytest.raises(RequestFailed) as unknown:
        gh.rest.checks.update(OWNER, REPO, 31337, data={"conclusion": "success"})
    assert status_of(unknown) == 404
    with pytest.raises(RequestFailed) as no_sha:
        gh.request("POST", f"/repos/{OWNER}/{REPO}/check-runs", json={"name": "n"})
    assert status_of(no_sha) == 422


# auth


def test_requests_without_valid_auth_get_401(standin: GitHubStandIn, client: Client) -> None:
    anonymous = connect(standin.url, UnauthAuthStrategy())
    with pytest.raises(RequestFailed) as missing:
        anonymous.rest.issues.create_comment(OWNER, REPO, PR, data={"body": "x"})
    assert status_of(missing) == 401
    error = missing.value.response.json()
    assert error["message"] == "Requires authentication"
    assert error["status"] == "401"
    assert error["documentation_url"].startswith("https://docs.github.com/")
    wrong_token = client(auth="ghp_wrong")
    with pytest.raises(RequestFailed) as wrong:
        wrong_token.rest.issues.list_comments(OWNER, REPO, PR)
    assert status_of(wrong) == 401
    assert wrong.value.response.json()["message"] == "Bad credentials"
    assert [(r.auth, r.auth_present, r.status) for r in standin.requests()] == [
        ("none", False, 401), ("invalid", True, 401),
    ]  # fmt: skip
    assert standin.comments(OWNER, REPO, PR) == []


def test_app_installation_token_flow(standin: GitHubStandIn) -> None:
    pytest.importorskip("jwt", reason="githubkit[auth-app] (PyJWT) is not installed")
    rsa = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
    serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
    from githubkit import AppAuthStrategy, AppInstallationAuthStrategy

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    installation = connect(standin.url, AppInstallationAuthStrategy(4242, pem, 99))
    comment = installation.rest.issues.create_comment(OWNER, REPO, PR, data={"body": "hi"})
    assert comment.status_code == 201
    assert comment.parsed_data.user
    assert comment.parsed_data.user.type == "Bot"
    installation.rest.issues.update_comment(OWNER, REPO, comment.parsed_data.id, data={"body": "2"})
    seen = [(r.method, r.path, r.auth, r.status) for r in standin.requests()]
    assert seen[0] == ("POST", "/app/installations/99/access_tokens", "app", 201)
    assert [s[2:] for s in seen[1:]] == [("installation", 201), ("installation", 200)]  # cached

    app = connect(standin.url, AppAuthStrategy(4242, pem))
    issued = app.rest.apps.create_installation_access_token(99)
    assert issued.status_code == 201
    assert isinstance(issued.parsed_data, InstallationToken)
    assert issued.parsed_data.expires_at.endswith("Z")
    plain = connect(standin.url, TokenAuthStrategy(issued.parsed_data.token))
    assert plain.rest.issues.list_comments(OWNER, REPO, PR).status_code == 200
    assert not standin.secret_recorded(issued.parsed_data.token)
    assert standin.credential_presented(issued.parsed_data.token)
    with pytest.raises(RequestFailed) as token_for_token:  # a token is not an App JWT
        plain.rest.apps.create_installation_access_token(99)
    assert status_of(token_for_token) == 401


def test_app_jwt_from_another_app_is_refused(token: str) -> None:
    with GitHubStandIn([token], app_id=1) as standin:
        not_a_jwt = connect(standin.url, TokenAuthStrategy("a.b.c"))
        with pytest.raises(RequestFailed) as refused:
            not_a_jwt.request("POST", "/app/installations/1/access_tokens")
        assert status_of(refused) == 401


# the request log and secrets


def test_requests_are_recorded_in_order_without_the_token(
    standin: GitHubStandIn, gh: GitHub[TokenAuthStrategy], token: str
) -> None:
    comment = gh.rest.issues.create_comment(OWNER, REPO, PR, data={"body": "a"}).parsed_data
    gh.rest.issues.list_comments(OWNER, REPO, PR, per_page=100, page=1)
    gh.rest.issues.update_comment(OWNER, REPO, comment.id, data={"body": "b"})
    log = standin.requests()
    assert [(r.seq, r.method, r.status) for r in log] == [(0, "POST", 201), (1, "GET", 200),
                                                          (2, "PATCH", 200)]  # fmt: skip
    assert log[0].path == f"/repos/{OWNER}/{REPO}/issues/{PR}/comments"
    assert log[0].body == {"body": "a"}
    assert log[1].body is None
    assert log[1].query == {"per_page": "100", "page": "1"}
    assert all(r.auth == "token" and r.answered_at and r.answered_at >= r.received_at for r in log)
    assert log[0].received_at <= log[1].received_at <= log[2].received_at
    assert standin.credential_presented(token)
    assert not standin.secret_recorded(token)
    assert token not in repr(log)
    # the check is not vacuous: a token leaked into a body is found
    gh.rest.issues.create_comment(OWNER, REPO, PR, data={"body": f"oops {token}"})
    assert standin.secret_recorded(token)


def test_concurrent_requests_are_all_recorded(
    standin: GitHubStandIn, gh: GitHub[TokenAuthStrategy]
) -> None:
    def post(worker: int) -> None:
        for i in range(5):
            gh.rest.issues.create_comment(OWNER, REPO, PR, data={"body": f"{worker}-{i}"})

    threads = [threading.Thread(target=post, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    comments = standin.comments(OWNER, REPO, PR)
    assert len({c.id for c in comments}) == len(comments) == 40
    assert sorted(r.seq for r in standin.requests()) == list(range(40))


# faults


def test_injected_5xx_then_success(standin: GitHubStandIn, gh: GitHub[TokenAuthStrategy]) -> None:
    standin.fail_next(2, status=502, method="POST", path=COMMENTS_PATH)
    for _ in range(2):
        with pytest.raises(RequestFailed) as failed:
            gh.rest.issues.create_comment(OWNER, REPO, PR, data={"body": "x"})
        assert status_of(failed) == 502
    gh.rest.issues.list_comments(OWNER, REPO, PR)  # another method is not affected
    assert gh.rest.issues.create_comment(OWNER, REPO, PR, data={"body": "x"}).status_code == 201
    assert len(standin.comments(OWNER, REPO, PR)) == 1  # failed answers applied nothing
    assert [(r.status, r.fault) for r in standin.requests()] == [
        (502, "fail"), (502, "fail"), (200, None), (201, None),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="5xx"):
        standin.fail_next(1, status=404)


@pytest.mark.parametrize(
    ("kind", "status", "error"),
    [
        ("secondary", 403, SecondaryRateLimitExceeded),
        ("primary", 403, PrimaryRateLimitExceeded),
        ("429", 429, SecondaryRateLimitExceeded),
    ],
)
def test_rate_limit_answers_carry_headers(
    standin: GitHubStandIn,
    gh: GitHub[TokenAuthStrategy],
    kind: str,
    status: int,
    error: type[SecondaryRateLimitExceeded | PrimaryRateLimitExceeded],
) -> None:
    standin.rate_limit_next(1, kind=kind, retry_after=7, method="PATCH")  # type: ignore[arg-type]
    comment = gh.rest.issues.create_comment(OWNER, REPO, PR, data={"body": "a"}).parsed_data
    with pytest.raises(error) as limited:
        gh.rest.issues.update_comment(OWNER, REPO, comment.id, data={"body": "b"})
    headers = limited.value.response.headers
    assert limited.value.response.status_code == status
    assert timedelta(seconds=5) <= limited.value.retry_after <= timedelta(seconds=8)
    if kind == "primary":
        assert headers["x-ratelimit-remaining"] == "0"
        assert 0 < int(headers["x-ratelimit-reset"]) - time.time() <= 8
    else:
        assert headers["retry-after"] == "7"
    assert standin.comment_history(comment.id) == ["a"]
    gh.rest.issues.update_comment(OWNER, REPO, comment.id, data={"body": "b"})
    assert standin.comment_history(comment.id) == ["a", "b"]
    assert standin.requests()[1].fault == f"rate_limit:{kind}"


def test_latency_delays_the_answer(standin: GitHubStandIn, client: Client) -> None:
    impatient, gh = client(timeout=0.1), client()
    standin.add_latency(0.5, method="GET", count=1)
    with pytest.raises(RequestTimeout):
        impatient.rest.issues.list_comments(OWNER, REPO, PR)
    # The delayed request is answered (to nobody) once its latency is served: the rule is used.
    wait_until(lambda: standin.requests()[0].status is not None, what="the delayed answer")
    assert standin.requests()[0].fault == "latency"
    gh.rest.issues.list_comments(OWNER, REPO, PR)
    assert [r.fault for r in standin.requests()] == ["latency", None]  # not delayed: used up
    standin.add_latency(0.2, path=COMMENTS_PATH)
    started = time.monotonic()
    gh.rest.issues.list_comments(OWNER, REPO, PR)
    assert time.monotonic() - started >= 0.2
    assert standin.requests()[-1].fault == "latency"


def test_gate_holds_a_request_until_released(
    standin: GitHubStandIn, gh: GitHub[TokenAuthStrategy]
) -> None:
    comment = gh.rest.issues.create_comment(OWNER, REPO, PR, data={"body": "old"}).parsed_data
    gate = standin.hold("PATCH", EDIT_PATH)
    answers: list[int] = []
    caller = threading.Thread(
        target=lambda: answers.append(
            gh.rest.issues.update_comment(OWNER, REPO, comment.id, data={"body": "new"}).status_code
        )
    )
    caller.start()
    assert gate.wait_arrived(timeout=5)
    held = standin.requests()[-1]
    assert (held.method, held.status, held.answered_at) == ("PATCH", None, None)
    assert standin.comment_history(comment.id) == ["old"]  # not applied while held
    assert caller.is_alive()
    assert not gate.wait_answered(timeout=0.05)
    gh.rest.issues.list_comments(OWNER, REPO, PR)  # other requests pass meanwhile
    gate.release()
    caller.join(timeout=5)
    assert answers == [200]
    assert gate.answered == 1
    assert standin.comment_history(comment.id) == ["old", "new"]
    assert (standin.requests()[1].status, standin.requests()[1].fault) == (200, "held")
    # after release the gate lets everything through
    gh.rest.issues.update_comment(OWNER, REPO, comment.id, data={"body": "newer"})


@pytest.mark.parametrize("apply", ["on_arrival", "on_release"])
def test_gate_models_a_call_that_lands_after_the_client_timed_out(
    standin: GitHubStandIn, gh: GitHub[TokenAuthStrategy], client: Client, apply: str
) -> None:
    comment = gh.rest.issues.create_comment(OWNER, REPO, PR, data={"body": "old"}).parsed_data
    gate = standin.hold("PATCH", EDIT_PATH, apply=apply, count=1)  # type: ignore[arg-type]
    impatient = client(timeout=0.3)
    with pytest.raises(RequestTimeout):
        impatient.rest.issues.update_comment(OWNER, REPO, comment.id, data={"body": "stale"})
    assert gate.arrived == 1
    assert standin.requests()[-1].status is None
    landed = ["old", "stale"] if apply == "on_arrival" else ["old"]
    assert standin.comment_history(comment.id) == landed
    gate.release()
    assert gate.wait_answered(timeout=5)
    assert standin.comment_history(comment.id) == ["old", "stale"]
    assert standin.requests()[-1].status == 200


def test_stop_releases_held_requests(token: str) -> None:
    standin = GitHubStandIn([token]).start()
    gate = standin.hold("*", ".*")
    impatient = connect(standin.url, TokenAuthStrategy(token), timeout=0.2)
    with pytest.raises(RequestTimeout):
        impatient.rest.issues.list_comments(OWNER, REPO, PR)
    assert gate.wait_arrived(timeout=5)
    standin.stop()
    assert gate.released
    assert gate.wait_answered(timeout=5)
    standin.stop()  # idempotent
    with pytest.raises(RuntimeError, match="not started"):
        _ = standin.url


def test_standalone_cli_prints_its_url(token: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tasks.testing.standin", "--port", "0", "--token", token, "--quiet"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        gh = connect(url, TokenAuthStrategy(token))
        comment = gh.rest.issues.create_comment(OWNER, REPO, 1, data={"body": "x"}).parsed_data
        gh.rest.issues.update_comment(OWNER, REPO, comment.id, data={"body": "y"})
        # a person trying the demo by hand can watch each comment's history
        history = httpx.get(f"{url}/_standin/history", trust_env=False).json()
        assert history["comments"] == [
            {"id": comment.id, "issue": f"{OWNER}/{REPO}#1", "bodies": ["x", "y"]}
        ]
        assert history["requests"] == 2
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
        if process.stdout is not None:
            process.stdout.close()
