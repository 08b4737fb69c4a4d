"""The read-only status page at ``/``: server-rendered HTML (Jinja2 templates,
inline CSS), no JavaScript, no build step and nothing fetched from elsewhere,
so it works offline.

Auth is the API token, typed into a login form once: the form posts it, the
server answers with an HttpOnly, SameSite=Strict cookie holding an HMAC of the
token (not the token), and the token never appears in a URL.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from storage.catalog import format_address
from storage.monitoring import GOOD, TargetStatus, target_statuses

if TYPE_CHECKING:
    from orchestrator.server import Server

COOKIE = "backhaul_session"
MAX_LOGIN_BODY = 4096
FAILURES_SHOWN = 20

# Nothing but this page's own inline CSS and form posts back to itself.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                   autoescape=select_autoescape(default=True), trim_blocks=True,
                   lstrip_blocks=True)


def session_value(token: str) -> str:
    """What the cookie holds: derived from the token, useless as a bearer token."""
    return hmac.new(token.encode(), b"backhaul status page session", hashlib.sha256).hexdigest()


def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = int(max(0, seconds))
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h ago"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m ago"
    if s >= 60:
        return f"{s // 60}m ago"
    return f"{s}s ago"


def size_text(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def when_text(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "-"


def lateness(t: TargetStatus, now: dt.datetime, minute_seconds: float) -> str:
    """``ok`` within 1.5 intervals of the last good run, ``late`` within 3, else ``overdue``."""
    if t.last_success_at is None:
        return "overdue"
    ratio = (now - t.last_success_at).total_seconds() / (t.every_minutes * minute_seconds)
    return "ok" if ratio <= 1.5 else "late" if ratio <= 3 else "overdue"


def group_of(t: TargetStatus) -> str:
    if t.last_status in ("failed", "interrupted"):
        return "failing"
    if t.last_success_at is None:
        return "never"
    return "good" if t.last_status in GOOD else "failing"


class StatusPage:
    def __init__(self, server: Server) -> None:
        self.server = server

    def progress(self, t: TargetStatus) -> int | None:
        """Bytes received so far by the run in flight (the engine's counter:
        the store may be object storage, with no temp file to measure)."""
        now = self.server.engine.progress(t.id)
        return None if now is None else now[1]

    def context(self) -> dict[str, Any]:
        server = self.server
        now = server.clock()
        minute = server.settings.minute_seconds
        next_runs = server.scheduler.next_runs()
        groups: dict[str, list[dict[str, Any]]] = {"failing": [], "never": [], "good": []}
        for t in target_statuses(server.catalog):
            running = server.engine.is_running(t.id)
            age = (now - t.last_success_at).total_seconds() if t.last_success_at else None
            groups[group_of(t)].append({
                "t": t, "running": running, "progress": self.progress(t) if running else None,
                "age": age_text(age), "lateness": lateness(t, now, minute),
                "every": _every(t.every_minutes),
                "next_run": when_text(next_runs.get(t.id)),
            })
        nodes = [{"n": n, "last_seen": age_text((now - n.last_seen_at).total_seconds())
                  if n.last_seen_at else "never"} for n in server.catalog.list_nodes()]
        failures = server.catalog.list_runs(status="failed", limit=FAILURES_SHOWN)
        return {"groups": groups, "nodes": nodes, "failures": failures, "now": when_text(now),
                "size": size_text, "when": when_text, "addr": format_address,
                "total": sum(map(len, groups.values()))}


def _every(minutes: int) -> str:
    if minutes % 1440 == 0:
        return f"{minutes // 1440} d"
    if minutes % 60 == 0:
        return f"{minutes // 60} h"
    return f"{minutes} min"


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=HEADERS)


def router(server: Server) -> APIRouter:
    r = APIRouter(include_in_schema=False)
    page = StatusPage(server)
    expected = session_value(server.token)
    token = server.token.encode()

    def logged_in(request: Request) -> bool:
        given = request.cookies.get(COOKIE, "")
        return secrets.compare_digest(given.encode(), expected.encode())

    def login_page(message: str | None = None, status: int = 200) -> HTMLResponse:
        return _html(_env.get_template("login.html").render(message=message), status)

    @r.get("/", response_class=HTMLResponse)
    def status_page(request: Request) -> Response:
        if not logged_in(request):
            return login_page()
        return _html(_env.get_template("status.html").render(**page.context()))

    @r.post("/login")
    async def login(request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BODY:
                return login_page("The form was too large.", 413)
        fields = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        given = (fields.get("token") or [""])[0].strip().encode()
        if not secrets.compare_digest(given, token):
            return login_page("Wrong token. It is in <data-dir>/api-token on the server.", 401)
        response = RedirectResponse("/", status_code=303, headers=HEADERS)
        response.set_cookie(COOKIE, expected, httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")
        return response

    @r.post("/logout")
    def logout() -> Response:
        response = RedirectResponse("/", status_code=303, headers=HEADERS)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    return r
