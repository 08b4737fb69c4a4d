"""The status page at / in a real headless Chromium (DevTools protocol), and
its login flow over plain HTTP. Chromium reaches nothing but the server."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import LiveServer

from fixtures.chromium import CHROMIUM, Chromium
from fixtures.server import free_port
from fixtures.sshd.launcher import SSHD
from orchestrator.web import COOKIE

HEADERS = ["Node", "Path", "Every", "Last success", "Last status", "Archives", "Size",
           "Next run", "Progress"]


@pytest.fixture
def browser(live: LiveServer, tmp_path: Path) -> Iterator[Chromium]:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (scripts/bootstrap.sh)")
    chrome = Chromium(tmp_path / "profile", allowed_port=live.port).start()
    yield chrome
    chrome.stop()


@pytest.fixture
def canary() -> Iterator[tuple[int, list[str]]]:
    """Another HTTP server on loopback that the browser must not reach."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"canary reached")

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1], hits
    srv.shutdown()
    srv.server_close()


def targets_in_three_states(live: LiveServer, node: SSHD, tmp_path: Path) -> dict[str, dict]:
    good, gone = tmp_path / "good", tmp_path / "gone"
    for d in (good, gone):
        d.mkdir()
        (d / "f").write_text("x")
    out = {"good": live.register(node, good, every=600),
           "failing": live.register(node, gone, every=600)}
    for t in out.values():
        live.wait_for(lambda t=t: live.runs(t["id"]), 30, "the first run")
    (gone / "f").unlink()
    gone.rmdir()
    r = live.api("POST", f"/targets/{out['failing']['id']}/run", params={"wait": "true"})
    assert r.json()["run"]["error_code"] == "path_not_found"
    # A node that does not answer: registered anyway, never backed up.
    r = live.api("POST", "/targets", json={"host": "127.0.0.1", "port": free_port(),
                                           "user": node.user, "path": "/srv/never",
                                           "every_minutes": 600})
    assert r.status_code == 201, r.text
    out["never"] = r.json()["target"]
    return out


def rows(browser: Chromium, table: str) -> list[dict]:
    return browser.evaluate(f"""Array.from(document.querySelectorAll(
        '#{table} tbody tr[data-target-id]')).map(tr => ({{
            id: tr.dataset.targetId,
            cells: Array.from(tr.cells).map(td => td.textContent.trim())}}))""")


def test_status_page_in_chromium(live: LiveServer, node: SSHD, browser: Chromium,
                                 tmp_path: Path) -> None:
    t = targets_in_three_states(live, node, tmp_path)

    browser.navigate(live.url + "/")
    assert browser.evaluate("document.querySelector('h1').textContent") == "backhaul"
    assert browser.evaluate("document.querySelectorAll('tr[data-target-id]').length") == 0
    browser.submit_and_wait("""document.querySelector('input[name=token]').value = 'wrong';
                               document.querySelector('form').submit()""")
    assert "Wrong token" in browser.evaluate("document.body.textContent")

    browser.submit_and_wait(f"""document.querySelector('input[name=token]').value =
                                {json.dumps(live.token)};
                                document.querySelector('form').submit()""")
    assert browser.evaluate("location.href") == live.url + "/"
    assert browser.evaluate("document.querySelector('h1').textContent") == "backhaul status"
    headings = browser.evaluate(
        "Array.from(document.querySelectorAll('h2')).map(h => h.firstChild.textContent.trim())")
    assert headings == ["Failing", "Never backed up", "Good", "Nodes", "Recent failures"]
    for table in ("targets-good", "targets-failing", "targets-never"):
        assert browser.evaluate(f"Array.from(document.querySelectorAll('#{table} th'))"
                                ".map(th => th.textContent)") == HEADERS
    assert browser.evaluate("Array.from(document.querySelectorAll('#nodes-table th'))"
                            ".map(th => th.textContent)") == [
        "Node", "Reachable", "Last seen", "Host key", "Last error"]

    good = rows(browser, "targets-good")
    assert [r["id"] for r in good] == [str(t["good"]["id"])]
    cells = dict(zip(HEADERS, good[0]["cells"], strict=True))
    assert cells["Node"] == t["good"]["address"] and cells["Path"] == t["good"]["path"]
    assert cells["Last status"] in ("success", "unchanged")
    assert cells["Every"] == "10 h" and cells["Archives"] == "1"
    assert cells["Last success"].endswith("ago")
    failing = rows(browser, "targets-failing")
    assert [r["id"] for r in failing] == [str(t["failing"]["id"])]
    assert "failed path_not_found" in failing[0]["cells"][4]
    never = rows(browser, "targets-never")
    assert [r["id"] for r in never] == [str(t["never"]["id"])]
    assert never[0]["cells"][3] == "never"
    failures = browser.evaluate("document.querySelector('#failures-table').textContent")
    assert "path_not_found" in failures and t["failing"]["path"] in failures
    nodes = browser.evaluate("document.querySelector('#nodes-table').textContent")
    assert t["never"]["address"] in nodes and "SHA256:" in nodes

    shot = browser.screenshot(tmp_path / "status.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

    # The session cookie: HttpOnly (scripts cannot read it), SameSite=Strict,
    # and not the token itself.
    assert browser.evaluate("document.cookie") == ""
    cookies = {c["name"]: c for c in browser.call("Network.getCookies")["cookies"]}
    assert cookies[COOKIE]["httpOnly"] is True
    assert cookies[COOKIE]["sameSite"] == "Strict"
    assert live.token not in cookies[COOKIE]["value"]


def test_chromium_reaches_nothing_but_the_server(live: LiveServer, browser: Chromium,
                                                 canary: tuple[int, list[str]]) -> None:
    port, hits = canary
    args = browser.args()
    assert "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1" in args
    assert f"--proxy-bypass-list=<-loopback>;127.0.0.1:{live.port}" in args
    assert "--disable-background-networking" in args and "--no-first-run" in args
    cmdline = Path(f"/proc/{browser.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert all(a.encode() in cmdline for a in args[1:])

    assert not browser.navigate(live.url + "/").get("errorText")
    for url in (f"http://127.0.0.1:{port}/", f"http://localhost:{port}/",
                "http://example.com/", "https://www.google.com/"):
        browser.navigate(url)
        assert "canary reached" not in (browser.evaluate("document.body.innerText") or "")
    assert hits == []
    # The outside names went to the proxy that goes nowhere, not to the network.
    seen = " ".join(browser.proxy.requests)
    assert f"127.0.0.1:{port}" in seen and "example.com" in seen


def test_login_sets_a_strict_httponly_cookie(live: LiveServer) -> None:
    page = httpx.get(live.url + "/", timeout=10)
    assert page.status_code == 200 and 'name="token"' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    # A token in the URL is not a login.
    assert 'name="token"' in httpx.get(live.url + "/", params={"token": live.token},
                                       timeout=10).text
    bad = httpx.post(live.url + "/login", data={"token": "nope"}, timeout=10)
    assert bad.status_code == 401 and COOKIE not in bad.headers.get("set-cookie", "")
    big = httpx.post(live.url + "/login", content=b"token=" + b"a" * 10_000,
                     headers={"content-type": "application/x-www-form-urlencoded"},
                     timeout=10)
    assert big.status_code == 413
    ok = httpx.post(live.url + "/login", data={"token": live.token}, timeout=10)
    assert ok.status_code == 303 and ok.headers["location"] == "/"
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert live.token not in cookie
    session = ok.cookies[COOKIE]
    page = httpx.get(live.url + "/", cookies={COOKIE: session}, timeout=10)
    assert "backhaul status" in page.text and 'name="token"' not in page.text
    forged = session[:-1] + ("1" if session.endswith("0") else "0")  # never the same
    assert 'name="token"' in httpx.get(live.url + "/", cookies={COOKIE: forged},
                                       timeout=10).text
    out = httpx.post(live.url + "/logout", cookies={COOKIE: session}, timeout=10)
    assert out.status_code == 303 and f'{COOKIE}=""' in out.headers["set-cookie"]
