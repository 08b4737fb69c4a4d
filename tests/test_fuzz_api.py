"""Property-based fuzz of the API that backhauld serves (schemathesis).

The schema is loaded from a live backhauld (``/openapi.json``); every
operation is fuzzed with positive and negative cases (derandomised, bounded)
and, for its integer and number parameters, at the 64-bit and float edges.
Promise: no 5xx, and every 4xx is exactly ``{"error": {"code", "message"}}``
with non-empty strings.

Network safety: registration makes the server SSH to the host in the body.
Generated hosts are rewritten to 127.0.0.N unless the server's validation
refuses them before any connection (``bench.reliability_hostile.loopback_host``),
so nothing outside loopback is ever contacted or resolved.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from conftest import LiveServer

from bench.reliability_hostile import (
    boundary_operation,
    error_shape_problem,
    fuzz_operation,
    loopback_host,
    operations,
)
from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

pytestmark = pytest.mark.timeout(120)

MAX_EXAMPLES = 15  # per operation and generation mode (positive, negative): 30 each

# Every operation the server serves, with the bug (if any) that breaks it today
# (None: none known; a bug found later goes here with a strict xfail).
OPERATIONS: list[tuple[str, str, str | None]] = [
    ("get", "/health", None),
    ("get", "/api/v1/pubkey", None),
    ("get", "/api/v1/nodes", None),
    ("post", "/api/v1/nodes/{node_id}/trust", None),
    ("post", "/api/v1/targets", None),
    ("get", "/api/v1/targets", None),
    ("get", "/api/v1/targets/{target_id}", None),
    ("delete", "/api/v1/targets/{target_id}", None),
    ("get", "/api/v1/targets/{target_id}/backups", None),
    ("post", "/api/v1/targets/{target_id}/run", None),
    ("get", "/api/v1/runs", None),
    ("get", "/api/v1/archives/{archive_id}", None),
    ("get", "/api/v1/archives/{archive_id}/download", None),
    ("get", "/metrics", None),
    ("get", "/api/v1/targets/{target_id}/options", None),
    ("patch", "/api/v1/targets/{target_id}/options", None),
    ("delete", "/api/v1/nodes/{node_id}", None),
    ("patch", "/api/v1/targets/{target_id}", None),
    ("post", "/api/v1/archives/verify", None),
    # A restore reaches only nodes in the catalog (host key pinned): fuzzed
    # hosts are loopback and fuzzed ports miss the one real node.
    ("post", "/api/v1/archives/{archive_id}/restore", None),
    ("get", "/api/v1/archives/{archive_id}/entries", None),
    ("get", "/api/v1/targets/{target_id}/find", None),
    ("post", "/api/v1/archives/{archive_id}/extract", None),
    ("get", "/api/v1/targets/{target_id}/progress", None),
]


@pytest.fixture(scope="module")
def fuzz_srv(tmp_path_factory: pytest.TempPathFactory, server_key: ServerKey,
             node: SSHD) -> Iterator[LiveServer]:
    """backhauld with one real target (id 1) and one archive, so the fuzzer
    reaches existing resources too; connects fail fast."""
    root = tmp_path_factory.mktemp("fuzz")
    srv = LiveServer(root / "server", server_key, connect_timeout=1, io_timeout=5)
    srv.start()
    app = root / "app"
    app.mkdir()
    (app / "file.txt").write_text("fuzz\n")
    srv.register(node, app, every=60)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def archive(fuzz_srv: LiveServer) -> dict[str, Any]:
    run = fuzz_srv.api("POST", "/targets/1/run", params={"wait": "true"}).json()["run"]
    assert run["status"] in ("success", "unchanged"), run
    backups = fuzz_srv.api("GET", "/targets/1/backups").json()["backups"]
    return backups[0]


@pytest.fixture(scope="module")
def openapi(fuzz_srv: LiveServer) -> dict[str, Any]:
    return httpx.get(fuzz_srv.url + "/openapi.json",
                     headers={"Authorization": f"Bearer {fuzz_srv.token}"}).json()


@pytest.fixture(scope="module")
def schema(fuzz_srv: LiveServer) -> Any:
    return schemathesis.openapi.from_url(fuzz_srv.url + "/openapi.json",
                                         headers={"Authorization": f"Bearer {fuzz_srv.token}"})


def api_client(srv: LiveServer) -> httpx.Client:
    # No kept-alive connections: after a 500 uvicorn drops the connection.
    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {srv.token}"},
                        timeout=30, limits=httpx.Limits(max_keepalive_connections=0))


def test_every_served_operation_is_fuzzed(openapi: dict[str, Any]) -> None:
    assert operations(openapi) == sorted((m, p) for m, p, _ in OPERATIONS)


@pytest.mark.parametrize("value", ["example.com", "8.8.8.8", "::ffff:8.8.8.8", "localhost",
                                   "10.0.0.1", "::2"])
def test_fuzzed_hosts_never_leave_loopback(value: str) -> None:
    rewritten = loopback_host(value)
    assert isinstance(rewritten, str) and rewritten.startswith("127.0.0."), rewritten


@pytest.mark.parametrize("value", ["127.0.0.9", "::1", "[::1]", "a b", "-oProxyCommand=x", 7,
                                   "0x08080808", "2130706433"])
def test_loopback_and_refused_hosts_are_kept_for_the_fuzzer(value: object) -> None:
    assert loopback_host(value) == value


@pytest.mark.parametrize("status,body,ok", [
    (422, b'{"error": {"code": "invalid_port", "message": "port must be 1-65535"}}', True),
    (404, b'{"detail": "Not Found"}', False),
    (422, b'{"error": {"code": "x", "message": ""}}', False),
    (409, b'{"error": {"code": "x", "message": "m", "extra": 1}}', False),
    (400, b"not json", False),
])
def test_error_shape_check_tells_the_shape_apart(status: int, body: bytes, ok: bool) -> None:
    """The fuzz verdict is only as good as this check: it must be able to fail."""
    assert (error_shape_problem(status, "application/json", body) is None) is ok


def test_download_random_ids(fuzz_srv: LiveServer, archive: dict[str, Any]) -> None:
    """Any id in SQLite's range: the archive's bytes, 404 for a positive id that
    is not an archive, 422 for one that cannot be an id; always the error shape."""
    client = api_client(fuzz_srv)
    seen: list[int] = []

    @hypothesis.settings(max_examples=60, derandomize=True, database=None, deadline=None)
    @hypothesis.given(st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1),
                                st.just(archive["id"])))
    def check(archive_id: int) -> None:
        seen.append(archive_id)
        r = client.get(f"/api/v1/archives/{archive_id}/download")
        if archive_id == archive["id"]:
            assert r.status_code == 200
            assert hashlib.sha256(r.content).hexdigest() == archive["sha256"]
            assert r.headers["x-backhaul-sha256"] == archive["sha256"]
        else:
            expected = (404, "archive_not_found") if archive_id >= 1 else (422,
                                                                          "invalid_request")
            assert (r.status_code, r.json()["error"]["code"]) == expected, r.text
            assert error_shape_problem(r.status_code, r.headers["content-type"],
                                       r.content) is None

    with client:
        check()
    assert archive["id"] in seen


def test_download_random_non_numeric_ids(fuzz_srv: LiveServer) -> None:
    client = api_client(fuzz_srv)

    @hypothesis.settings(max_examples=40, derandomize=True, database=None, deadline=None)
    @hypothesis.given(st.text(min_size=1, max_size=40).filter(lambda s: not s.isdigit()))
    def check(raw: str) -> None:
        r = client.get(f"/api/v1/archives/{quote(raw, safe='')}/download")
        assert r.status_code in (404, 405, 422), (raw, r.status_code, r.text)
        assert error_shape_problem(r.status_code, r.headers.get("content-type", ""),
                                   r.content) is None, (raw, r.text)

    with client:
        check()


@pytest.mark.parametrize("timeout", ["1e11", "1e308", "inf"])
def test_run_wait_with_a_huge_timeout(fuzz_srv: LiveServer, node: SSHD,
                                      tmp_path_factory: pytest.TempPathFactory,
                                      timeout: str) -> None:
    """The edge the fuzz cannot reach reliably: it needs an active target."""
    app = tmp_path_factory.mktemp("timeout-app")
    (app / "f").write_text("x")
    target = fuzz_srv.register(node, app, every=60)
    with api_client(fuzz_srv) as client:
        r = client.post(f"/api/v1/targets/{target['id']}/run",
                        params={"wait": "true", "timeout": timeout})
    assert r.status_code < 500, r.text
    assert error_shape_problem(r.status_code, r.headers["content-type"], r.content) is None


@pytest.mark.parametrize("method,path", [
    pytest.param(m, p, id=f"{m.upper()} {p}",
                 marks=[pytest.mark.xfail(strict=True, reason=bug)] if bug else [])
    for m, p, bug in OPERATIONS])
def test_fuzz_operation(fuzz_srv: LiveServer, archive: dict[str, Any], schema: Any,
                        openapi: dict[str, Any], method: str, path: str) -> None:
    stats = fuzz_operation(schema[path][method], fuzz_srv.url, fuzz_srv.token,
                           max_examples=MAX_EXAMPLES)
    stats.add(boundary_operation(openapi, method, path, fuzz_srv.url, fuzz_srv.token))
    assert stats.requests > 0
    assert stats.problems == [], "\n".join(stats.problems[:10])


def test_fuzz_left_no_trace_outside_loopback(fuzz_srv: LiveServer) -> None:
    """Every node the fuzzer made the server register is a loopback address."""
    for n in fuzz_srv.api("GET", "/nodes").json()["nodes"]:
        assert n["host"] == "::1" or n["host"].startswith("127."), n
