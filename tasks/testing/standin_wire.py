"""The GitHub stand-in's wire: a threading HTTP server, GitHub's JSON shapes for comments, check
runs and users (they validate against githubkit's models), page/per_page with a ``Link`` header,
and reading an App JWT."""

from __future__ import annotations

import base64
import binascii
import json
import socket
import sys
import threading
import time
import zlib
from collections.abc import Mapping
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlencode

from tasks.testing.standin_store import JSON, CheckRun, Comment


def ts(at: datetime | None) -> str | None:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ") if at else None


def user_json(login: str, api: str) -> JSON:
    uid = zlib.crc32(login.encode())
    url = f"{api}/users/{login}"
    return {
        "login": login, "id": uid, "node_id": f"U_standin{uid}", "gravatar_id": "",
        "avatar_url": f"{api}/avatars/{login}", "url": url, "html_url": f"{api}/{login}",
        "followers_url": f"{url}/followers", "following_url": f"{url}/following{{/other_user}}",
        "gists_url": f"{url}/gists{{/gist_id}}", "starred_url": f"{url}/starred{{/owner}}{{/repo}}",
        "subscriptions_url": f"{url}/subscriptions", "organizations_url": f"{url}/orgs",
        "repos_url": f"{url}/repos", "events_url": f"{url}/events{{/privacy}}",
        "received_events_url": f"{url}/received_events",
        "type": "Bot" if login.endswith("[bot]") else "User", "site_admin": False,
    }  # fmt: skip


def comment_json(c: Comment, api: str) -> JSON:
    repo = f"{api}/repos/{c.owner}/{c.repo}"
    return {
        "id": c.id, "node_id": f"IC_standin{c.id}", "url": f"{repo}/issues/comments/{c.id}",
        "html_url": f"{api}/{c.owner}/{c.repo}/issues/{c.issue_number}#issuecomment-{c.id}",
        "issue_url": f"{repo}/issues/{c.issue_number}", "body": c.body,
        "user": user_json(c.user, api), "created_at": ts(c.created_at),
        "updated_at": ts(c.updated_at), "author_association": "NONE",
        "performed_via_github_app": None,
    }  # fmt: skip


def run_json(r: CheckRun, api: str) -> JSON:
    url = f"{api}/repos/{r.owner}/{r.repo}/check-runs/{r.id}"
    return {
        "id": r.id, "node_id": f"CR_standin{r.id}", "head_sha": r.head_sha, "name": r.name,
        "external_id": r.external_id, "url": url, "details_url": r.details_url,
        "html_url": f"{api}/{r.owner}/{r.repo}/runs/{r.id}", "status": r.status,
        "conclusion": r.conclusion, "started_at": ts(r.started_at),
        "completed_at": ts(r.completed_at),
        "output": {"title": r.output_title, "summary": r.output_summary, "text": r.output_text,
                   "annotations_count": 0, "annotations_url": f"{url}/annotations"},
        "check_suite": {"id": zlib.crc32(f"{r.owner}/{r.repo}@{r.head_sha}".encode())},
        "app": None, "pull_requests": [],
    }  # fmt: skip


def paginate(
    items: list[Any], query: Mapping[str, str], url: str
) -> tuple[list[Any], dict[str, str]]:
    """GitHub's page/per_page slicing and its ``Link`` header (prev, next, last, first)."""

    def number(key: str, default: int) -> int:
        try:
            return int(query.get(key, default))
        except ValueError:
            return default

    per_page, page = min(max(number("per_page", 30), 1), 100), max(number("page", 1), 1)
    last = max(1, -(-len(items) // per_page))

    def link(to: int, rel: str) -> str:
        return f'<{url}?{urlencode({**query, "per_page": per_page, "page": to})}>; rel="{rel}"'

    links = [link(page - 1, "prev")] if page > 1 else []
    if page < last:
        links += [link(page + 1, "next"), link(last, "last")]
    if page > 1:
        links.append(link(1, "first"))
    headers = {"Link": ", ".join(links)} if links else {}
    return items[(page - 1) * per_page : page * per_page], headers


def jwt_issuer(value: str) -> str | None:
    """The ``iss`` of an unexpired, well-formed three-part JWT (signature not verified)."""
    parts = value.split(".")
    if len(parts) != 3:
        return None
    try:
        decoded = [json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in parts[:2]]
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    header, claims = decoded
    if not isinstance(header, dict) or not isinstance(claims, dict) or "alg" not in header:
        return None
    if not isinstance(claims.get("exp"), int | float) or claims["exp"] < time.time():
        return None
    return str(claims.get("iss")) if claims.get("iss") is not None else None


class Serving(Protocol):
    verbose: bool

    def serve(self, handler: Handler) -> None: ...


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], standin: Serving) -> None:
        super().__init__(address, Handler)
        self.standin = standin
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client that went away is not news
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else the body's own write waits ~40 ms for a delayed ACK
    server: Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.open_connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.open_connections.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self.server.standin.serve(self)

    do_POST = do_PATCH = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:  # request lines carry no secrets
        if self.server.standin.verbose:
            super().log_message(format, *args)
