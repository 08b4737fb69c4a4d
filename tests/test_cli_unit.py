"""The thin client (cli/) without a backhauld: parsing, rendering, error mapping.

Where a server is needed, a real HTTP server on 127.0.0.1 answers fixed JSON
(a far boundary we do not own here); the client, the CLI and the socket code
under test run for real.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from click.testing import CliRunner, Result

from cli import output
from cli.client import Address, Client, ClientError, InvalidArgument, normalize_path, parse_address
from cli.main import main

# --- a fixed-answer HTTP server ------------------------------------------------


class StubAPI:
    """Answers each (method, path) with a fixed response and records every request."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], tuple[int, dict[str, str], bytes]] = {}
        self.requests: list[dict[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                stub.requests.append(
                    {
                        "method": self.command,
                        "path": parts.path,
                        "query": {k: v[0] for k, v in parse_qs(parts.query).items()},
                        "authorization": self.headers.get("Authorization"),
                        "body": json.loads(raw) if raw else None,
                    }
                )
                missing = {"error": {"code": "not_found", "message": f"no route {parts.path}"}}
                status, headers, data = stub.routes.get(
                    (self.command, parts.path),
                    (404, {"Content-Type": "application/json"}, json.dumps(missing).encode()),
                )
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def json(self, method: str, path: str, body: Any, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.routes[(method, path)] = (status, {"Content-Type": "application/json"}, data)

    def raw(self, method: str, path: str, data: bytes, headers: dict[str, str]) -> None:
        self.routes[(method, path)] = (200, headers, data)

    def calls(self, method: str, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method and r["path"] == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def api() -> Iterator[StubAPI]:
    stub = StubAPI()
    yield stub
    stub.close()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    """A clean environment: no token or URL from the developer's shell, cwd in tmp."""
    monkeypatch.chdir(tmp_path)
    return {
        "BACKHAUL_URL": None,
        "BACKHAUL_TOKEN": None,
        "BACKHAUL_DATA_DIR": str(tmp_path / "no-data-dir"),
    }


def invoke(api: StubAPI, args: list[str], env: dict[str, str | None]) -> Result:
    return CliRunner().invoke(main, ["--server", api.url, *args], env=env)


def error_lines(result: Result) -> list[str]:
    return result.stderr.splitlines()


def target(
    id: int = 3,
    user: str = "root",
    host: str = "10.0.0.5",
    port: int = 22,
    path: str = "/srv/app",
    active: bool = True,
    created_at: str = "2026-11-25T10:00:00Z",
) -> dict[str, Any]:
    return {
        "id": id,
        "node_id": 1,
        "user": user,
        "host": host,
        "port": port,
        "address": f"{user}@{host}:{port}",
        "path": path,
        "every_minutes": 5,
        "keep": 10,
        "active": active,
        "created_at": created_at,
        "unregistered_at": None if active else "2026-11-26T00:00:00Z",
        "next_run_at": "2026-11-27T04:45:00Z",
        "last_run_at": "2026-11-27T04:40:00Z",
        "last_status": "success",
        "last_error_code": None,
        "archives_kept": 2,
        "bytes_kept": 2516582,
        "node_reachable": True,
    }


# --- address and path parsing ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("web1", Address(None, "web1", 22)),
        ("root@10.0.0.5", Address("root", "10.0.0.5", 22)),
        ("backup@node-1.example.com:2222", Address("backup", "node-1.example.com", 2222)),
        ("h:1", Address(None, "h", 1)),
        ("h:65535", Address(None, "h", 65535)),
        ("[::1]:2222", Address(None, "::1", 2222)),
        ("[::1]", Address(None, "::1", 22)),
        ("::1", Address(None, "::1", 22)),
        ("ops@[fe80::1]", Address("ops", "fe80::1", 22)),
        ("ops@[2001:db8::5]:2200", Address("ops", "2001:db8::5", 2200)),
        ("ops@2001:db8::5", Address("ops", "2001:db8::5", 22)),
        # The server stores hosts canonically and filters on them exactly.
        ("Web1.Example.COM.", Address(None, "web1.example.com", 22)),
        ("[2001:DB8:0::5]:22", Address(None, "2001:db8::5", 22)),
        ("0:0::1", Address(None, "::1", 22)),
    ],
)
def test_parse_address_accepts(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "code", "fragment"),
    [
        ("", "invalid_host", "empty"),
        ("@web1", "invalid_user", "empty user"),
        ("a@b@web1", "invalid_user", "more than one"),
        ("root@", "invalid_host", "empty host"),
        (":22", "invalid_host", "empty host"),
        ("web1:", "invalid_port", "empty port"),
        ("web1:0", "invalid_port", "1..65535"),
        ("web1:70000", "invalid_port", "1..65535"),
        ("web1:abc", "invalid_port", "number"),
        ("web1:-5", "invalid_port", "number"),
        ("[::1]:0", "invalid_port", "1..65535"),
        ("[::1", "invalid_host", "']'"),
        ("[::1]2222", "invalid_host", "after ']'"),
        ("[]:22", "invalid_host", "empty host"),
        ("[example.com]:22", "invalid_host", "IPv6"),
        ("::zz", "invalid_host", "IPv6"),
        ("web 1", "invalid_host", "spaces"),
        ("-oProxyCommand=x", "invalid_host", "invalid host"),
    ],
)
def test_parse_address_rejects(text: str, code: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_address(text)
    assert info.value.code == code
    assert fragment in info.value.message


@pytest.mark.parametrize("text", ["root@10.0.0.5:22", "[::1]:2222", "ops@[fe80::1]:22", "web1:2"])
def test_address_prints_back_as_parsed(text: str) -> None:
    assert str(parse_address(text)) == text


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/srv/app", "/srv/app"), ("/srv/app/", "/srv/app"), ("//srv//app/./x/..", "/srv/app")],
)
def test_normalize_path(path: str, expected: str) -> None:
    assert normalize_path(path) == expected


@pytest.mark.parametrize(
    ("path", "fragment"),
    [("srv/app", "absolute"), ("", "empty"), ("/srv/a\nb", "newline"), ("/a\0b", "NUL")],
)
def test_normalize_path_rejects(path: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        normalize_path(path)
    assert info.value.code == "invalid_path"
    assert fragment in info.value.message


# --- rendering -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1258291, "1.2 MiB"),
        (1048575, "1.0 MiB"),
        (5 * 1024**3, "5.0 GiB"),
        (5 * 1024**4, "5.0 TiB"),
        (None, "-"),
    ],
)
def test_human_size(size: int | None, text: str) -> None:
    assert output.human_size(size) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(3.42, "3.4s"), (42, "42s"), (125, "2m05s"), (3720, "1h02m"), (90000, "1d01h"), (None, "-")],
)
def test_human_duration(seconds: float | None, text: str) -> None:
    assert output.human_duration(seconds) == text


@pytest.mark.parametrize(
    ("minutes", "text"),
    [
        (5, "every 5m"),
        (60, "every 1h"),
        (90, "every 1h30m"),
        (1440, "every 1d"),
        (1505, "every 1d1h5m"),
    ],
)
def test_every(minutes: int, text: str) -> None:
    assert output.every(minutes) == text


NOW = datetime(2026, 11, 27, 4, 40, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("2026-11-27T04:43:00Z", "in 3m"),
        ("2026-11-27T04:35:00Z", "5m ago"),
        ("2026-11-27T04:40:30Z", "in 30s"),
        ("2026-11-27T02:10:00Z", "2h ago"),
        ("2026-11-30T04:40:00Z", "in 3d"),
        ("2026-11-27T04:40:00Z", "now"),
        (None, "-"),
    ],
)
def test_relative_time(value: str | None, text: str) -> None:
    assert output.relative(value, NOW) == text


def test_times_are_shown_in_utc() -> None:
    assert output.utc_time("2026-11-27T05:40:00+01:00") == "2026-11-27 04:40"
    assert output.when("2026-11-27T04:43:10Z", NOW) == "2026-11-27 04:43 (in 3m)"
    assert output.when(None, NOW, missing="never") == "never"


def test_table_aligns_columns() -> None:
    text = output.table(
        ("ID", "NAME", "BYTES"), [(1, "a", 5), (123, "longer name", 123456)], right={0, 2}
    )
    assert text.splitlines() == [
        " ID  NAME          BYTES",
        "  1  a                 5",
        "123  longer name  123456",
    ]


def test_table_cells_stay_on_one_line_without_trailing_spaces() -> None:
    text = output.table(("ID", "NOTE"), [(1, None), (22, "two\nlines")])
    assert text.splitlines() == ["ID  NOTE", "1   -", "22  two lines"]


# --- the CLI against a fixed-answer server ----------------------------------------


@pytest.mark.parametrize("position", ["before", "after"])
def test_json_flag_before_or_after_the_command(
    api: StubAPI, env: dict[str, str | None], position: str
) -> None:
    doc = {"targets": [target()]}
    api.json("GET", "/api/v1/targets", doc)
    args = ["--json", "jobs"] if position == "before" else ["jobs", "--json"]
    result = invoke(api, args, env)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == doc


def test_jobs_table_without_json(api: StubAPI, env: dict[str, str | None]) -> None:
    api.json("GET", "/api/v1/targets", {"targets": [target()]})
    result = invoke(api, ["jobs"], env)
    assert result.exit_code == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == [
        "ID", "NODE", "PATH", "EVERY", "NEXT", "RUN", "LAST", "RUN", "STATUS", "KEPT", "BYTES"
    ]  # fmt: skip
    assert "root@10.0.0.5:22" in row and "/srv/app" in row and "every 5m" in row
    assert "2026-11-27 04:45" in row and row.rstrip().endswith("2.4 MiB")
    # Every column starts where its header starts.
    for name, value in (("PATH", "/srv/app"), ("EVERY", "every 5m"), ("STATUS", "success")):
        assert header.index(name) == row.index(value)


def test_server_error_is_one_line_and_exit_1(api: StubAPI, env: dict[str, str | None]) -> None:
    message = "target root@10.0.0.5:22 /srv/app already exists"
    api.json(
        "POST", "/api/v1/targets", {"error": {"code": "target_exists", "message": message}}, 409
    )
    result = invoke(api, ["register", "root@10.0.0.5", "/srv/app", "--every", "5"], env)
    assert result.exit_code == 1
    assert error_lines(result) == [f"backhaul: error: [target_exists] {message}"]
    assert result.stdout == ""
    assert api.calls("POST", "/api/v1/targets")[0]["body"] == {
        "host": "10.0.0.5",
        "port": 22,
        "user": "root",
        "path": "/srv/app",
        "every_minutes": 5,
        "keep": 10,
        "host_key_fingerprint": None,
    }


def test_error_without_the_api_shape_is_still_one_line(
    api: StubAPI, env: dict[str, str | None]
) -> None:
    api.routes[("GET", "/api/v1/targets")] = (502, {}, b"<html>\n<b>Bad gateway</b>\n</html>")
    result = invoke(api, ["jobs"], env)
    assert result.exit_code == 1
    lines = error_lines(result)
    assert len(lines) == 1
    assert lines[0].startswith("backhaul: error: [http_502] HTTP 502")


def test_unexpected_answer_gives_one_line_not_a_traceback(
    api: StubAPI, env: dict[str, str | None]
) -> None:
    api.json("GET", "/api/v1/targets", {"targets": [{"id": 1, "every_minutes": "five"}]})
    result = invoke(api, ["jobs"], env)
    assert result.exit_code == 1
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("backhaul: error: [unexpected_error]")
    assert isinstance(result.exception, SystemExit)


def test_nothing_listening_is_one_line_naming_the_url(env: dict[str, str | None]) -> None:
    # A bound socket that never listens: connecting to it is refused.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        result = CliRunner().invoke(main, ["--server", url, "jobs"], env=env)
    assert result.exit_code == 1
    assert error_lines(result) == [
        f"backhaul: error: [server_unreachable] cannot reach backhauld at {url}: connection refused"
    ]
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_bad_server_url_is_reported(env: dict[str, str | None]) -> None:
    result = CliRunner().invoke(main, ["--server", "localhost:7710", "jobs"], env=env)
    assert result.exit_code == 1
    assert error_lines(result) == [
        "backhaul: error: [invalid_url] server URL must look like http://HOST:PORT, "
        "got 'localhost:7710'"
    ]


def test_register_success_prints_confirmation_and_warnings(
    api: StubAPI, env: dict[str, str | None]
) -> None:
    api.json(
        "POST",
        "/api/v1/targets",
        {"target": target(), "warnings": ["pigz not found", "node not reachable yet"]},
        201,
    )
    result = invoke(
        api,
        ["register", "root@10.0.0.5:22", "/srv/app", "--every", "5", "--host-key", "SHA256:abc+/1"],
        env,
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "registered 3: root@10.0.0.5:22 /srv/app every 5m (keep 10)\n"
    assert error_lines(result) == ["warning: pigz not found", "warning: node not reachable yet"]
    assert api.calls("POST", "/api/v1/targets")[0]["body"]["host_key_fingerprint"] == (
        "SHA256:abc+/1"
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["root@h", "/srv", "--every", "0"], "at least 1"),
        (["root@h", "/srv", "--every", "5", "--keep", "0"], "at least 1"),
        (["root@h", "srv/app", "--every", "5"], "absolute"),
        (["root@h:70000", "/srv", "--every", "5"], "1..65535"),
        (["root@h", "/srv", "--every", "5", "--host-key", "md5:aa"], "SHA256:"),
        (["root@h", "/srv"], "--every"),
    ],
)
def test_register_usage_errors_exit_2_before_any_request(
    api: StubAPI, env: dict[str, str | None], args: list[str], fragment: str
) -> None:
    result = invoke(api, ["register", *args], env)
    assert result.exit_code == 2
    assert fragment in result.stderr
    assert api.requests == []


def test_token_sources_in_order(api: StubAPI, env: dict[str, str | None], tmp_path: Path) -> None:
    api.json("GET", "/api/v1/targets", {"targets": []})
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "api-token").write_text("file-token\n")
    env = {**env, "BACKHAUL_DATA_DIR": str(data_dir)}
    assert invoke(api, ["jobs"], env).exit_code == 0
    assert invoke(api, ["jobs"], {**env, "BACKHAUL_TOKEN": "env-token"}).exit_code == 0
    result = invoke(api, ["--token", "flag-token", "jobs"], {**env, "BACKHAUL_TOKEN": "env-token"})
    assert result.exit_code == 0
    assert [r["authorization"] for r in api.requests] == [
        "Bearer file-token",
        "Bearer env-token",
        "Bearer flag-token",
    ]


def test_missing_token_is_hinted_on_401(
    api: StubAPI, env: dict[str, str | None], tmp_path: Path
) -> None:
    api.json(
        "GET",
        "/api/v1/targets",
        {"error": {"code": "unauthorized", "message": "missing bearer token"}},
        401,
    )
    result = invoke(api, ["jobs"], env)
    assert result.exit_code == 1
    assert api.requests[0]["authorization"] is None
    (line,) = error_lines(result)
    assert line == (
        "backhaul: error: [unauthorized] missing bearer token "
        f"(no token given and none readable in {tmp_path / 'no-data-dir' / 'api-token'})"
    )


def test_backups_resolves_the_active_target(api: StubAPI, env: dict[str, str | None]) -> None:
    api.json(
        "GET",
        "/api/v1/targets",
        {
            "targets": [
                target(id=2, active=False, created_at="2026-11-20T00:00:00Z"),
                target(id=5, path="/srv/other"),  # as if the server ignored a filter
                target(id=7, active=True, created_at="2026-11-25T00:00:00Z"),
                target(id=9, active=False, created_at="2026-11-26T00:00:00Z"),
            ]
        },
    )
    sha = "ab" * 32
    api.json(
        "GET",
        "/api/v1/targets/7/backups",
        {
            "target": target(id=7),
            "backups": [
                {"id": 41, "created_at": "2026-11-27T04:40:00Z", "size": 1258291,
                 "sha256": sha, "file_name": "a.tar.gz", "retained": True},
                {"id": 40, "created_at": "2026-11-27T04:35:00Z", "size": 512,
                 "sha256": sha, "file_name": "b.tar.gz", "retained": False},
            ],
        },
    )  # fmt: skip
    result = invoke(api, ["backups", "root@10.0.0.5", "/srv/app/"], env)
    assert result.exit_code == 0, result.stderr
    assert api.calls("GET", "/api/v1/targets")[0]["query"] == {
        "host": "10.0.0.5",
        "port": "22",
        "path": "/srv/app",
        "user": "root",
        "all": "true",
    }
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["CREATED", "SIZE", "BYTES", "STATE", "SHA256", "ID"]
    assert lines[1].split() == [
        "2026-11-27",
        "04:40:00",
        "1.2",
        "MiB",
        "1258291",
        "kept",
        sha[:12],
        "41",
    ]
    assert lines[2].split() == [
        "2026-11-27", "04:35:00", "512", "B", "512", "rotated", sha[:12], "40"
    ]  # fmt: skip
    assert lines[-1] == "root@10.0.0.5:22 /srv/app: 2 backups made, 1 kept (1.2 MiB)"


def test_resolve_checks_every_field_of_what_the_server_returns(api: StubAPI) -> None:
    # All active: a match on a field the client forgot to check makes it ambiguous.
    decoys = [
        target(id=1, host="10.0.0.6"),
        target(id=2, port=2222),
        target(id=4, user="backup"),
        target(id=5, path="/srv/app/sub"),
    ]
    api.json("GET", "/api/v1/targets", {"targets": [*decoys, target(id=7)]})
    client = Client(api.url, "t")
    assert client.resolve("root@10.0.0.5", "/srv/app")["id"] == 7
    with pytest.raises(ClientError) as info:
        client.resolve("10.0.0.5", "/srv/app")  # root@ and backup@ both match
    assert info.value.code == "ambiguous_target"
    assert "root@10.0.0.5:22" in info.value.message and "backup@10.0.0.5:22" in info.value.message


def test_unregistered_target_stays_queryable_newest_first(
    api: StubAPI, env: dict[str, str | None]
) -> None:
    api.json(
        "GET",
        "/api/v1/targets",
        {
            "targets": [
                target(id=2, active=False, created_at="2026-11-20T00:00:00Z"),
                target(id=9, active=False, created_at="2026-11-26T00:00:00Z"),
            ]
        },
    )
    api.json("GET", "/api/v1/targets/9/backups", {"target": target(id=9), "backups": []})
    result = invoke(api, ["backups", "root@10.0.0.5", "/srv/app"], env)
    assert result.exit_code == 0, result.stderr
    assert api.calls("GET", "/api/v1/targets/9/backups")
    assert result.stdout == "no backups of root@10.0.0.5:22 /srv/app yet\n"


def test_unknown_target_names_address_and_path(api: StubAPI, env: dict[str, str | None]) -> None:
    api.json("GET", "/api/v1/targets", {"targets": []})
    result = invoke(api, ["run", "root@[::1]:2222", "/srv/app", "--wait"], env)
    assert result.exit_code == 1
    assert error_lines(result) == [
        "backhaul: error: [target_not_found] no target root@[::1]:2222 /srv/app"
    ]


def test_run_wait_failed_exits_1_with_the_reason(api: StubAPI, env: dict[str, str | None]) -> None:
    api.json("GET", "/api/v1/targets", {"targets": [target()]})
    failed = {"id": 17, "status": "failed", "error_code": "auth_failed",
              "message": "permission denied (publickey)", "warnings": []}  # fmt: skip
    api.json("POST", "/api/v1/targets/3/run", {"run": failed})
    result = invoke(api, ["run", "root@10.0.0.5", "/srv/app", "--wait", "--timeout", "60"], env)
    assert result.exit_code == 1
    assert result.stderr == "failed: auth_failed: permission denied (publickey)\n"
    assert api.calls("POST", "/api/v1/targets/3/run")[0]["query"] == {
        "wait": "true",
        "timeout": "60",
    }


def test_run_wait_success_and_unchanged_exit_0(api: StubAPI, env: dict[str, str | None]) -> None:
    api.json("GET", "/api/v1/targets", {"targets": [target()]})
    for status in ("success", "unchanged"):
        done = {
            "id": 18,
            "status": status,
            "archive_id": 42,
            "bytes_transferred": 2048,
            "duration_seconds": 1.5,
            "warnings": ["tar: file changed as we read it"],
        }
        api.json("POST", "/api/v1/targets/3/run", {"run": done})
        result = invoke(api, ["run", "root@10.0.0.5", "/srv/app", "--wait"], env)
        assert result.exit_code == 0, result.stderr
        assert result.stdout.startswith(f"{status}: root@10.0.0.5:22 /srv/app: run 18")
        assert result.stderr == "warning: tar: file changed as we read it\n"


def test_run_without_wait_queues(api: StubAPI, env: dict[str, str | None]) -> None:
    api.json("GET", "/api/v1/targets", {"targets": [target()]})
    api.json("POST", "/api/v1/targets/3/run", {"target_id": 3, "queued": True}, 202)
    result = invoke(api, ["run", "root@10.0.0.5", "/srv/app"], env)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "queued a backup of root@10.0.0.5:22 /srv/app (target 3)\n"
    assert api.calls("POST", "/api/v1/targets/3/run")[0]["query"] == {}


def test_run_timeout_needs_wait(api: StubAPI, env: dict[str, str | None]) -> None:
    result = invoke(api, ["run", "root@10.0.0.5", "/srv/app", "--timeout", "5"], env)
    assert result.exit_code == 2
    assert api.requests == []


def test_history_of_a_node_filters_by_host_port_and_user(
    api: StubAPI, env: dict[str, str | None]
) -> None:
    runs = [
        {"id": 2, "address": "root@web1:2222", "path": "/srv/app", "status": "failed",
         "started_at": "2026-11-27T04:40:00Z", "trigger": "schedule", "bytes_transferred": 0,
         "duration_seconds": 0.5, "error_code": "host_key_mismatch", "message": "key changed"},
        {"id": 1, "address": "backup@web1:2222", "path": "/data", "status": "success",
         "started_at": "2026-11-27T04:35:00Z", "trigger": "manual", "bytes_transferred": 2048,
         "duration_seconds": 3.0, "error_code": None, "message": None},
    ]  # fmt: skip
    api.json("GET", "/api/v1/runs", {"runs": runs[:1]})  # the server filters by user
    result = invoke(api, ["history", "root@web1:2222", "--limit", "5"], env)
    assert result.exit_code == 0, result.stderr
    assert api.requests[0]["query"] == {
        "host": "web1",
        "port": "2222",
        "user": "root",
        "limit": "5",
    }
    header, row = result.stdout.splitlines()
    assert row.split()[:7] == [
        "2", "2026-11-27", "04:40", "root@web1:2222", "/srv/app", "failed", "schedule"
    ]  # fmt: skip
    assert row.endswith("host_key_mismatch: key changed")
    assert header.index("ERROR") == row.index("host_key_mismatch")


def test_history_of_a_target_asks_by_node_and_path(
    api: StubAPI, env: dict[str, str | None]
) -> None:
    # by node and path, not target id: every registration of that path is listed
    api.json("GET", "/api/v1/targets", {"targets": [target(id=3)]})
    api.json("GET", "/api/v1/runs", {"runs": []})
    result = invoke(api, ["history", "root@10.0.0.5", "/srv/app"], env)
    assert result.exit_code == 0, result.stderr
    assert api.calls("GET", "/api/v1/runs")[0]["query"] == {
        "host": "10.0.0.5", "port": "22", "user": "root", "path": "/srv/app", "limit": "50"
    }  # fmt: skip
    assert result.stdout == "no runs\n"


def test_pubkey_prints_the_authorized_keys_line(api: StubAPI, env: dict[str, str | None]) -> None:
    line = 'restrict,command="..." ssh-ed25519 AAAAC3Nz backhaul@server'
    api.json(
        "GET",
        "/api/v1/pubkey",
        {
            "public_key": "ssh-ed25519 AAAAC3Nz",
            "fingerprint": "SHA256:x",
            "authorized_keys_line": line,
        },
    )
    result = invoke(api, ["pubkey", "--restricted"], env)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == line + "\n"
    assert api.requests[0]["query"] == {"restricted": "true"}


def test_trust_finds_the_node_by_address(api: StubAPI, env: dict[str, str | None]) -> None:
    node = {"id": 4, "user": "root", "host": "::1", "port": 2222, "address": "root@[::1]:2222",
            "host_key_fingerprint": "SHA256:old"}  # fmt: skip
    other = {**node, "id": 5, "port": 22, "address": "root@[::1]:22"}
    api.json("GET", "/api/v1/nodes", {"nodes": [other, node]})
    api.json("POST", "/api/v1/nodes/4/trust", {"node": {**node, "host_key_fingerprint": None}})
    result = invoke(api, ["trust", "[::1]:2222"], env)
    assert result.exit_code == 0, result.stderr
    assert api.calls("POST", "/api/v1/nodes/4/trust")[0]["body"] == {}
    assert "root@[::1]:2222 (was SHA256:old)" in result.stdout


# --- download -------------------------------------------------------------------

ARCHIVE = b"\x1f\x8b fake tar.gz payload " * 5000


def serve_archive(api: StubAPI, announced_sha: str) -> None:
    real_sha = hashlib.sha256(ARCHIVE).hexdigest()
    backup = {"id": 12, "file_name": "app-20261127T044000Z.tar.gz", "sha256": real_sha,
              "size": len(ARCHIVE), "retained": True}  # fmt: skip
    api.json("GET", "/api/v1/archives/12", {"backup": backup})
    api.raw(
        "GET",
        "/api/v1/archives/12/download",
        ARCHIVE,
        {"Content-Type": "application/gzip", "X-Backhaul-SHA256": announced_sha},
    )


def test_download_to_the_archive_file_name(
    api: StubAPI, env: dict[str, str | None], tmp_path: Path
) -> None:
    serve_archive(api, hashlib.sha256(ARCHIVE).hexdigest())
    result = invoke(api, ["download", "12"], env)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "app-20261127T044000Z.tar.gz").read_bytes() == ARCHIVE
    assert result.stdout.startswith("saved archive 12 to app-20261127T044000Z.tar.gz (")
    assert sorted(os.listdir(tmp_path)) == ["app-20261127T044000Z.tar.gz"]


def test_download_to_stdout(api: StubAPI, env: dict[str, str | None]) -> None:
    serve_archive(api, hashlib.sha256(ARCHIVE).hexdigest())
    result = invoke(api, ["download", "12", "-o", "-"], env)
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes == ARCHIVE


@pytest.mark.parametrize("out", [None, "copy.tar.gz"])
def test_download_checksum_mismatch_leaves_no_file(
    api: StubAPI, env: dict[str, str | None], tmp_path: Path, out: str | None
) -> None:
    serve_archive(api, "0" * 64)
    result = invoke(api, ["download", "12", *(["-o", out] if out else [])], env)
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert line.startswith("backhaul: error: [checksum_mismatch] archive 12:")
    assert os.listdir(tmp_path) == []  # neither the file nor a temp file


def test_download_does_not_replace_a_file_it_named_itself(
    api: StubAPI, env: dict[str, str | None], tmp_path: Path
) -> None:
    serve_archive(api, hashlib.sha256(ARCHIVE).hexdigest())
    existing = tmp_path / "app-20261127T044000Z.tar.gz"
    existing.write_bytes(b"precious")
    result = invoke(api, ["download", "12"], env)
    assert result.exit_code == 1
    assert "[file_exists]" in result.stderr
    assert existing.read_bytes() == b"precious"


def test_client_download_reports_a_short_body(api: StubAPI) -> None:
    # The server promises more bytes than it sends: a truncated archive is an error.
    data = b"only part"
    api.routes[("GET", "/api/v1/archives/3/download")] = (
        200,
        {"Content-Length": "100", "X-Backhaul-SHA256": hashlib.sha256(data).hexdigest()},
        data,
    )

    class Sink:
        def __init__(self) -> None:
            self.data = b""

        def write(self, chunk: bytes) -> int:
            self.data += chunk
            return len(chunk)

    with pytest.raises(ClientError) as info:
        Client(api.url, "t").download(3, Sink())  # type: ignore[arg-type]
    assert info.value.code == "download_incomplete"


# --- process-level behaviour -------------------------------------------------------


def test_importing_the_client_loads_no_server_code(tmp_path: Path) -> None:
    code = (
        "import cli.main, sys, json; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'paramiko', 'apscheduler', 'sqlalchemy', 'fastapi', 'uvicorn', 'orchestrator', "
        "'storage'})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_ctrl_c_exits_130_quietly(tmp_path: Path) -> None:
    # A server that accepts the connection and never answers: the client blocks in recv.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(30)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
        proc = subprocess.Popen(
            [sys.executable, "-c", "from cli.main import main; main()", "--server", url, "jobs"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            conn, _ = server.accept()
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    assert chunk, "client closed the connection"
                    request += chunk
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130
    assert err.strip() == b"", err
    assert out == b""
