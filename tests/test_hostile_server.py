"""A hostile client or node cannot slip past the server's checks: the token
is checked before any body is read, bodies are bounded, host keys are pinned
per host:port, the restricted key runs its commands with a clean
environment, and what backhauld creates is private to its user."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import stat
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import Engine, LiveServer, address

from cli.main import main as cli_main
from fixtures.sshd.launcher import SSHD
from orchestrator import remote
from orchestrator.guard import MAX_BODY, listen_warning
from orchestrator.ssh import ServerKey

pytestmark = pytest.mark.timeout(120)


# -- 4. the token before the body, bounded bodies --------------------------------------


def raw_request(srv: LiveServer, head: str, body: bytes = b"",
                timeout: float = 5.0) -> tuple[int, dict[str, str], dict]:
    """Send a request head (and the start of a body) on a raw socket and read
    the answer that comes back, without sending the rest of the body."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"connection closed without an answer: {data!r}"
            data += chunk
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(lines[0].split()[1]), headers, json.loads(rest[:length] or b"{}")


def post_head(path: str, *, token: str | None = None, length: int | None = None,
              host: str = "127.0.0.1") -> str:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines.append(f"Content-Length: {length}" if length is not None
                 else "Transfer-Encoding: chunked")
    return "\n".join(lines) + "\n"


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_a_huge_body_without_a_token_is_refused_before_it_is_read(live: LiveServer) -> None:
    status, headers, body = raw_request(
        live, post_head("/api/v1/targets", length=800 * 2**20), b"{" + b" " * 65536)
    assert status == 401
    assert body["error"]["code"] == "unauthorized"
    assert headers.get("www-authenticate") == "Bearer"


def test_a_chunked_body_without_a_token_is_refused_before_it_is_read(live: LiveServer) -> None:
    status, _, body = raw_request(live, post_head("/api/v1/targets"), chunk(b"{" * 4096))
    assert (status, body["error"]["code"]) == (401, "unauthorized")


def test_a_body_over_the_limit_is_refused_with_413(live: LiveServer) -> None:
    status, _, body = raw_request(live, post_head("/api/v1/targets", token=live.token,
                                                  length=MAX_BODY + 1), b"{")
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    assert str(MAX_BODY) in body["error"]["message"]


def test_a_chunked_body_is_refused_once_it_streams_past_the_limit(live: LiveServer) -> None:
    # Five 16 KiB chunks and no terminating chunk: the answer must come while
    # the body is still open.
    status, _, body = raw_request(live, post_head("/api/v1/targets", token=live.token),
                                  b"".join(chunk(b" " * 16384) for _ in range(5)))
    assert (status, body["error"]["code"]) == (413, "request_too_large")


def test_a_small_chunked_body_still_reaches_its_route(live: LiveServer) -> None:
    payload = json.dumps({"fingerprint": None}).encode()
    status, _, body = raw_request(live, post_head("/api/v1/nodes/999/trust", token=live.token),
                                  chunk(payload) + b"0\r\n\r\n")
    assert (status, body["error"]["code"]) == (404, "node_not_found")


# -- 8. schema behind the token, no Host-built redirects -------------------------------


def test_schema_and_docs_need_the_token(live: LiveServer) -> None:
    import httpx
    for path in ("/openapi.json", "/docs", "/redoc"):
        r = httpx.get(live.url + path)
        assert r.status_code == 401, (path, r.status_code)
        assert r.json()["error"]["code"] == "unauthorized"
    auth = {"Authorization": f"Bearer {live.token}"}
    r = httpx.get(live.url + "/openapi.json", headers=auth)
    assert r.status_code == 200 and "/api/v1/targets" in r.json()["paths"]
    for path in ("/docs", "/redoc"):
        assert httpx.get(live.url + path, headers=auth).status_code == 404
    assert httpx.get(live.url + "/health").status_code == 200


def test_no_redirect_is_built_from_the_host_header(live: LiveServer) -> None:
    import httpx
    r = httpx.get(live.url + "/api/v1/targets/", follow_redirects=False,
                  headers={"Authorization": f"Bearer {live.token}", "Host": "evil.example"})
    assert not 300 <= r.status_code < 400, r.headers
    assert "location" not in r.headers
    assert r.json()["error"]["code"] == "not_found"


# -- 8. modes of what backhauld creates ----------------------------------------------------


def test_everything_backhauld_creates_is_private(live: LiveServer, node: SSHD,
                                                 tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "f").write_text("x")
    t = live.register(node, app, every=60)
    run = live.api("POST", f"/targets/{t['id']}/run", params={"wait": "true"}).json()["run"]
    assert run["status"] in ("success", "unchanged"), run
    paths = [live.data_dir, *live.data_dir.rglob("*")]
    names = {p.name for p in paths}
    assert {"catalog.db", "jobs.db", "archives", "api-token"} <= names
    assert any(p.name.endswith(".tar.gz") for p in paths)
    loose = {str(p.relative_to(live.data_dir.parent)): oct(stat.S_IMODE(p.stat().st_mode))
             for p in paths if stat.S_IMODE(p.stat().st_mode) & 0o077}
    assert loose == {}


# -- 8. / suspected: the restricted line ---------------------------------------------------


def test_a_restricted_line_without_a_node_is_refused(live: LiveServer) -> None:
    r = live.api("GET", "/pubkey", params={"restricted": "true"})
    assert r.status_code == 422, r.text
    assert "any command" in r.json()["error"]["message"]
    res = CliRunner().invoke(cli_main, ["--server", live.url, "--token", live.token,
                                        "pubkey", "--restricted"])
    assert res.exit_code == 1
    assert res.stdout == "" and "USER@HOST:PORT" in res.stderr


def test_a_restricted_line_without_a_user_holds_only_that_users_paths(
        live: LiveServer, node: SSHD, tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    theirs.mkdir()
    live.register(node, mine, every=60)
    r = live.api("POST", "/targets", json={"host": node.host, "port": node.port,
                                           "user": "someoneelse", "path": str(theirs),
                                           "every_minutes": 60})
    assert r.status_code == 201, r.text
    line = live.api("GET", "/pubkey", params={"restricted": "true", "host": node.host,
                                              "port": node.port}).json()
    line = line["authorized_keys_line"]

    def allowed(path: Path) -> bool:
        return hashlib.sha256(remote.tar_command(str(path)).encode()).hexdigest() in line

    assert allowed(mine) and not allowed(theirs)
    r = live.api("GET", "/pubkey", params={"restricted": "true", "host": node.host,
                                           "port": node.port, "user": "nobody2"})
    assert r.status_code == 404 and "someoneelse" in r.json()["error"]["message"]


# -- 9. the restricted key's guard cleans the environment --------------------------------


def test_restricted_key_ignores_environment_sent_by_the_client(
        eng: Engine, server_key: ServerKey, tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "data.txt").write_text("payload")
    canary = tmp_path / "PWNED"
    env = {"TAR_OPTIONS": f'--checkpoint=1 --checkpoint-action="exec=touch {canary}"'}
    with SSHD(tmp_path / "node", [server_key.public_line], host="127.0.0.10",
              extra_config=["AcceptEnv TAR_OPTIONS"]) as sshd:
        eng.register(sshd, app)

        def tar_with_env() -> tuple[int, bytes]:
            conn = eng.pool.connection(address(sshd))
            chan = conn.transport.open_session(timeout=10)
            chan.settimeout(30)
            chan.update_environment(env)
            chan.exec_command(remote.tar_command(str(app)))
            data = b""
            while chunk := chan.recv(1 << 20):
                data += chunk
            status = chan.recv_exit_status()
            chan.close()
            return status, data

        # The control: with an unrestricted key this node runs the action.
        status, _ = tar_with_env()
        assert status == 0 and canary.exists(), "the node did not accept TAR_OPTIONS"
        canary.unlink()

        sshd.set_authorized_keys([remote.restricted_key_line(server_key.public_line,
                                                             [str(app)])])
        eng.pool.discard(address(sshd))  # the forced command applies from the next login
        status, data = tar_with_env()
        assert status == 0
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            assert "app/data.txt" in tar.getnames()
        assert not canary.exists(), "TAR_OPTIONS from the client reached the allowed tar"


# -- suspected: listening beyond loopback ----------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "backup.example.com"])
def test_listening_beyond_loopback_warns_and_names_a_reverse_proxy(host: str) -> None:
    warning = listen_warning(host)
    assert warning is not None and "reverse proxy" in warning and host in warning


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "::1", "[::1]", "localhost"])
def test_listening_on_loopback_does_not_warn(host: str) -> None:
    assert listen_warning(host) is None


def test_a_loopback_server_logs_no_exposure_warning(live: LiveServer) -> None:
    assert "beyond loopback" not in live.log()
    assert "API listening on http://127.0.0.1" in live.log()


# -- 5. host keys belong to host:port --------------------------------------------------------


def _replace_host_key(sshd: SSHD) -> tuple[str, str]:
    old = sshd.host_key_fingerprint
    sshd.regenerate_host_key()
    sshd.kill_sessions()
    sshd.restart()
    return old, sshd.host_key_fingerprint


def test_another_user_on_the_same_host_port_cannot_pin_another_key(
        eng: Engine, server_key: ServerKey, tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "f").write_text("x")
    with SSHD(tmp_path / "node", [server_key.public_line], host="127.0.0.11") as sshd:
        mine = eng.register(sshd, app)
        assert eng.engine.run(mine.id).status == "success"
        old, new = _replace_host_key(sshd)
        ghost = eng.catalog.ensure_node("ghost", sshd.host, sshd.port)
        target = eng.catalog.add_target(ghost.id, str(app), 5, 10)
        result = eng.engine.run(target.id)
        assert result.error_code == "host_key_mismatch", result
        assert old in result.message and new in result.message
        assert eng.catalog.get_node(ghost.id).host_key_b64 is None


def test_an_ipv4_mapped_address_is_the_same_host(eng: Engine, server_key: ServerKey,
                                                 tmp_path: Path) -> None:
    """A row written as ::ffff:a.b.c.d (as registration stored it before) is
    held to the key pinned for a.b.c.d."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "f").write_text("x")
    with SSHD(tmp_path / "node", [server_key.public_line], host="127.0.0.12") as sshd:
        mine = eng.register(sshd, app)
        assert eng.engine.run(mine.id).status == "success"
        _replace_host_key(sshd)
        mapped = eng.catalog.ensure_node(sshd.user, f"::ffff:{sshd.host}", sshd.port)
        target = eng.catalog.add_target(mapped.id, str(app), 5, 10)
        result = eng.engine.run(target.id)
        assert result.error_code == "host_key_mismatch", result
        assert eng.catalog.list_archives(target.id) == []


def test_registration_writes_a_mapped_address_as_ipv4(live: LiveServer, node: SSHD,
                                                      tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    first = live.register(node, app, every=60)
    r = live.api("POST", "/targets", json={"host": f"::ffff:{node.host}", "port": node.port,
                                           "user": node.user, "path": str(app),
                                           "every_minutes": 60})
    assert r.status_code == 409 and r.json()["error"]["code"] == "target_exists", r.text
    assert f"(target {first['id']})" in r.json()["error"]["message"]


def test_trust_changes_the_pin_for_every_user_on_the_host_port(
        server_key: ServerKey, tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "f").write_text("x")
    with SSHD(tmp_path / "node", [server_key.public_line], host="127.0.0.13") as sshd:
        srv = LiveServer(tmp_path / "srv", server_key).start()
        try:
            t = srv.register(sshd, app, every=60)
            srv.wait_for(lambda: srv.runs(t["id"]), 15, "the first run")
            r = srv.api("POST", "/targets", json={"host": sshd.host, "port": sshd.port,
                                                  "user": "ghost", "path": str(app),
                                                  "every_minutes": 60})
            assert r.status_code == 201, r.text  # auth fails: registered with a warning
            old, new = _replace_host_key(sshd)
            run = srv.api("POST", f"/targets/{t['id']}/run", params={"wait": "true"}).json()
            assert run["run"]["error_code"] == "host_key_mismatch"
            address = f"{sshd.user}@{sshd.host}:{sshd.port}"
            res = CliRunner().invoke(cli_main, ["--server", srv.url, "--token", srv.token,
                                                "trust", address, "--fingerprint", new])
            assert res.exit_code == 0, res.output
            (app / "g").write_text("changed")
            run = srv.api("POST", f"/targets/{t['id']}/run", params={"wait": "true"}).json()
            assert run["run"]["status"] in ("success", "unchanged"), run
            nodes = srv.api("GET", "/nodes").json()["nodes"]
            assert {n["user"]: n["host_key_fingerprint"] for n in nodes} == {
                sshd.user: new, "ghost": new}
        finally:
            srv.stop()
