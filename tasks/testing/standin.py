"""A GitHub stand-in: a real HTTP server on 127.0.0.1 speaking the slice of GitHub's REST API
that leasehold calls (issue comments, check runs, App installation tokens), with GitHub's paths,
status codes and JSON shapes. It records every request, keeps every version of every comment and
check run, and injects faults (``tasks.testing.standin_faults``). Tests and ``leasehold demo``
use it.

    with GitHubStandIn(tokens=["t0k3n"]) as gh:
        GitHub(TokenAuthStrategy("t0k3n"), base_url=gh.url, ...)

Run it by hand: ``python -m tasks.testing.standin --port 0 --token X`` prints its URL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from tasks.testing.standin_faults import Faults, Gate
from tasks.testing.standin_store import (
    ApiError,
    CheckRun,
    Comment,
    RecordedRequest,
    Store,
    now,
)
from tasks.testing.standin_wire import (
    Handler,
    Server,
    comment_json,
    jwt_issuer,
    paginate,
    run_json,
    ts,
)

__all__ = ["ApiError", "CheckRun", "Comment", "Gate", "GitHubStandIn", "RecordedRequest"]

Answer = tuple[int, dict[str, str], Any]
OWNER_REPO = r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)"


class GitHubStandIn(Faults):
    """See the module docstring. Fault injection (``add_latency``, ``fail_next``,
    ``rate_limit_next``, ``hold``, ``clear_faults``) comes from :class:`Faults`."""

    def __init__(
        self,
        tokens: Iterable[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        login: str = "leasehold-standin",
        app_id: int | str | None = None,
        installation_token_ttl: float = 3600.0,
        verbose: bool = False,
    ) -> None:
        super().__init__()
        self._tokens = set(tokens)
        self._address = (host, port)
        self.login = login
        self.app_id = None if app_id is None else str(app_id)  # None: any issuer
        self.installation_token_ttl = installation_token_ttl
        self.verbose = verbose
        self._store = Store()
        self._issued: dict[str, tuple[float, str]] = {}  # token -> (expiry, installation id)
        self._presented: set[str] = set()  # raw Authorization values; never logged
        self._auth_lock = threading.Lock()
        self._server: Server | None = None
        self._base = ""  # kept after stop() for requests still being answered
        self._thread: threading.Thread | None = None
        pattern: list[tuple[str, str, Callable[..., Answer]]] = [
            ("POST", OWNER_REPO + r"/issues/(?P<number>\d+)/comments$", self._create_comment),
            ("GET", OWNER_REPO + r"/issues/(?P<number>\d+)/comments$", self._list_comments),
            ("GET", OWNER_REPO + r"/issues/comments/(?P<item_id>\d+)$", self._get_comment),
            ("PATCH", OWNER_REPO + r"/issues/comments/(?P<item_id>\d+)$", self._edit_comment),
            ("POST", OWNER_REPO + r"/check-runs$", self._create_run),
            ("GET", OWNER_REPO + r"/check-runs/(?P<item_id>\d+)$", self._get_run),
            ("PATCH", OWNER_REPO + r"/check-runs/(?P<item_id>\d+)$", self._update_run),
            ("GET", OWNER_REPO + r"/commits/(?P<ref>[^/]+)/check-runs$", self._list_runs),
            ("POST", r"^/app/installations/(?P<item_id>\d+)/access_tokens$", self._issue_token),
        ]
        self._routes = [(m, re.compile(p), f) for m, p, f in pattern]

    # lifecycle
    @property
    def url(self) -> str:
        """Base URL for githubkit's ``base_url`` (no trailing slash)."""
        if self._server is None:
            raise RuntimeError("the GitHub stand-in is not started")
        return self._base

    def start(self) -> GitHubStandIn:
        if self._server is None:
            self._server = Server(self._address, self)
            host, port = self._server.server_address[:2]
            self._base = f"http://{host!s}:{port}"
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="github-standin",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Release every gate, stop serving, drop open connections. Idempotent."""
        server, self._server = self._server, None
        self.clear_faults()
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with server.connections_lock:
            for conn in list(server.open_connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> GitHubStandIn:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # what happened
    def requests(self) -> list[RecordedRequest]:
        """Every request so far, in arrival order (a copy)."""
        return self._store.requests()

    def comments(self, owner: str, repo: str, number: int) -> list[Comment]:
        """The current version of each comment on the issue or pull request, by id."""
        return self._store.comments(owner, repo, number)

    def comment_history(self, comment_id: int) -> list[str]:
        """Every body the comment ever had, in order, starting with its creation."""
        return [version.body for version in self._store.comment_history(comment_id)]

    def comment_versions(self, comment_id: int) -> list[Comment]:
        """Like :meth:`comment_history`, with each version's timestamps and author."""
        return self._store.comment_history(comment_id)

    def check_runs(
        self,
        owner: str | None = None,
        repo: str | None = None,
        head_sha: str | None = None,
        name: str | None = None,
    ) -> list[CheckRun]:
        """The current version of each matching check run, by id."""
        return self._store.check_runs(owner, repo, head_sha, name)

    def check_run_history(self, run_id: int) -> list[CheckRun]:
        """Every version of the check run, in order, starting with its creation."""
        return self._store.check_run_history(run_id)

    def secret_recorded(self, secret: str) -> bool:
        """Whether ``secret`` appears in anything the stand-in keeps or shows (log, comments,
        check runs). Tests assert this is False for tokens."""
        return self._store.contains(secret)

    def credential_presented(self, secret: str) -> bool:
        """Whether some request's ``Authorization`` header carried ``secret`` (so that a
        ``secret_recorded(...) is False`` check is not vacuous)."""
        with self._auth_lock:
            return any(secret in value for value in self._presented)

    def _history(self) -> dict[str, Any]:
        """Every comment's bodies and every check run's states, in order (``/_standin/history``)."""
        comments = [
            {"id": c.id, "issue": f"{c.owner}/{c.repo}#{c.issue_number}",
             "bodies": self.comment_history(c.id)}
            for c in self._store.all_comments()
        ]  # fmt: skip
        runs = [
            {"id": r.id, "name": r.name, "head_sha": r.head_sha, "external_id": r.external_id,
             "states": [[v.status, v.conclusion] for v in self.check_run_history(r.id)]}
            for r in self.check_runs()
        ]  # fmt: skip
        return {"comments": comments, "check_runs": runs, "requests": len(self.requests())}

    # serving
    def _identify(self, header: str | None, path: str) -> str:
        if not header:
            return "none"
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        with self._auth_lock:
            self._presented.add(header)
            if scheme.lower() not in ("token", "bearer") or not value:
                return "invalid"
            if value in self._tokens:
                return "token"
            expiry = self._issued.get(value, (0.0, ""))[0]
            if expiry > time.time():
                return "installation"
        issuer = jwt_issuer(value) if scheme.lower() == "bearer" else None
        if issuer is not None and path.startswith("/app/"):
            return "app" if self.app_id in (None, issuer) else "invalid"
        return "invalid"

    def serve(self, handler: Handler) -> None:
        """Answer one request (called by the server's handler threads)."""
        split = urlsplit(handler.path)
        path, query = split.path, dict(parse_qsl(split.query, keep_blank_values=True))
        raw = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        if path == "/_standin/history":  # not GitHub: for people watching a demo by hand
            self._send(handler, 200, {}, self._history())
            return
        try:
            body: Any = json.loads(raw) if raw else None
            bad_json = False
        except ValueError:
            body, bad_json = None, True
        auth = self._identify(handler.headers.get("Authorization"), path)
        seq = self._store.arrive(handler.command, path, query, body, auth)
        fault: str | None = None
        gate: Gate | None = None
        if delay := self._latency_for(handler.command, path):
            fault = "latency"
            time.sleep(delay)
        try:
            if auth in ("none", "invalid"):
                raise ApiError(
                    401, "Requires authentication" if auth == "none" else "Bad credentials"
                )
            if canned := self._canned_for(handler.command, path):
                fault = canned[0]
                raise canned[1]
            if bad_json:
                raise ApiError(400, "Problems parsing JSON")
            if gate := self._gate_for(handler.command, path):
                fault = "held"
                if gate.apply == "on_release":
                    gate._block()
            status, headers, payload = self._dispatch(handler.command, path, query, body, auth)
        except ApiError as error:
            status, headers, payload = error.status, error.headers, error.body
        if gate and gate.apply == "on_arrival":
            gate._block()
        self._store.answer(seq, status, fault)
        try:
            self._send(handler, status, headers, payload)
        finally:
            if gate:
                gate._done()

    @staticmethod
    def _send(handler: Handler, status: int, headers: dict[str, str], payload: Any) -> None:
        data = json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json; charset=utf-8")
            handler.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(data)
            handler.wfile.flush()
        except OSError:  # the client went away (timed out, or the stand-in is stopping)
            handler.close_connection = True

    def _dispatch(
        self, method: str, path: str, query: dict[str, str], body: Any, auth: str
    ) -> Answer:
        for route_method, pattern, handler in self._routes:
            if route_method == method and (match := pattern.match(path)):
                params = {k: unquote(v) for k, v in match.groupdict().items()}
                return handler(query=query, body=body, auth=auth, **params)
        raise ApiError(404, "Not Found")

    def _author(self, auth: str) -> str:
        return f"standin-app-{self.app_id or 'app'}[bot]" if auth == "installation" else self.login

    # endpoints
    def _create_comment(
        self, owner: str, repo: str, number: str, body: Any, auth: str, **_: Any
    ) -> Answer:
        created = self._store.create_comment(owner, repo, int(number), body, self._author(auth))
        return 201, {}, comment_json(created, self._base)

    def _list_comments(
        self, owner: str, repo: str, number: str, query: dict[str, str], **_: Any
    ) -> Answer:
        found = self._store.comments(owner, repo, int(number))
        shown, headers = paginate(
            found, query, f"{self._base}/repos/{owner}/{repo}/issues/{number}/comments"
        )
        return 200, headers, [comment_json(c, self._base) for c in shown]

    def _get_comment(self, owner: str, repo: str, item_id: str, **_: Any) -> Answer:
        return 200, {}, comment_json(self._store.get_comment(owner, repo, int(item_id)), self._base)

    def _edit_comment(self, owner: str, repo: str, item_id: str, body: Any, **_: Any) -> Answer:
        edited = self._store.edit_comment(owner, repo, int(item_id), body)
        return 200, {}, comment_json(edited, self._base)

    def _create_run(self, owner: str, repo: str, body: Any, **_: Any) -> Answer:
        return 201, {}, run_json(self._store.create_run(owner, repo, body), self._base)

    def _get_run(self, owner: str, repo: str, item_id: str, **_: Any) -> Answer:
        return 200, {}, run_json(self._store.get_run(owner, repo, int(item_id)), self._base)

    def _update_run(self, owner: str, repo: str, item_id: str, body: Any, **_: Any) -> Answer:
        updated = self._store.update_run(owner, repo, int(item_id), body)
        return 200, {}, run_json(updated, self._base)

    def _list_runs(
        self, owner: str, repo: str, ref: str, query: dict[str, str], **_: Any
    ) -> Answer:
        """``ref`` matches a run's ``head_sha``; ``filter=latest`` (the default) keeps the most
        recent run of each name, ``all`` keeps every run."""
        if query.get("filter", "latest") not in ("latest", "all"):
            raise ApiError(
                422, "Validation Failed", errors=[{"field": "filter", "code": "invalid"}]
            )
        runs = self._store.check_runs(owner, repo, ref, query.get("check_name"))
        if "status" in query:
            runs = [r for r in runs if r.status == query["status"]]
        if query.get("filter", "latest") == "latest":
            runs = list({r.name: r for r in runs}.values())  # by id: the last of a name wins
        shown, headers = paginate(
            runs, query, f"{self._base}/repos/{owner}/{repo}/commits/{ref}/check-runs"
        )
        listed = [run_json(r, self._base) for r in shown]
        return 200, headers, {"total_count": len(runs), "check_runs": listed}

    def _issue_token(self, item_id: str, auth: str, **_: Any) -> Answer:
        if auth != "app":
            raise ApiError(401, "A JSON web token could not be decoded")
        token = "ghs_" + secrets.token_urlsafe(27)
        expires = now() + timedelta(seconds=self.installation_token_ttl)
        with self._auth_lock:
            self._issued[token] = (expires.timestamp(), item_id)
        answer = {
            "token": token,
            "expires_at": ts(expires),
            "repository_selection": "all",
            "permissions": {"issues": "write", "checks": "write", "pull_requests": "write"},
        }
        return 201, {}, answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the GitHub stand-in until interrupted.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--token",
        action="append",
        default=[],
        help="an accepted token (repeatable; default: $LEASEHOLD_GITHUB_TOKEN)",
    )
    parser.add_argument("--app-id", default=None, help="accept App JWTs only from this issuer")
    parser.add_argument("--quiet", action="store_true", help="do not log request lines")
    args = parser.parse_args(argv)
    if not args.token and os.environ.get("LEASEHOLD_GITHUB_TOKEN"):
        args.token = [os.environ["LEASEHOLD_GITHUB_TOKEN"]]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    standin = GitHubStandIn(args.token, host=args.host, port=args.port, app_id=args.app_id,
                            verbose=not args.quiet)  # fmt: skip
    with standin:
        print(standin.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
