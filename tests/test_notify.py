"""Notifications reach a real HTTP receiver on loopback: webhooks on failure
(once, then at most every --notify-repeat), recovery and node changes;
Healthchecks-style pings; a dead receiver never slows a backup."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import LiveServer

from fixtures.sshd.launcher import SSHD
from orchestrator.notify import Message, Sender
from orchestrator.ssh import ServerKey


@dataclass
class Receiver:
    url: str
    posts: list[tuple[str, bytes]] = field(default_factory=list)
    fail_first: int = 0  # answer 500 to this many requests first

    def events(self) -> list[dict]:
        return [json.loads(body) for path, body in self.posts if path == "/hook"]

    def pings(self) -> list[str]:
        return [path for path, _ in self.posts if path.startswith("/ping")]

    def wait(self, predicate, timeout: float = 30.0, what: str = "a notification"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; got {self.posts}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if rec.fail_first > 0:
                rec.fail_first -= 1
                self.send_response(500)
            else:
                rec.posts.append((self.path, body))
                self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.url = f"http://127.0.0.1:{srv.server_address[1]}"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield rec
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def black_hole() -> Iterator[str]:
    """Accepts connections and never answers: the worst receiver."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    sock.close()


def run(srv: LiveServer, target_id: int) -> dict:
    r = srv.api("POST", f"/targets/{target_id}/run", params={"wait": "true"})
    assert r.status_code == 200, r.text
    return r.json()["run"]


def test_failure_repeat_recovery_and_pings(tmp_path: Path, server_key: ServerKey, node: SSHD,
                                           receiver: Receiver) -> None:
    srv = LiveServer(tmp_path / "srv", server_key, notify_url=receiver.url + "/hook",
                     notify_repeat=3).start()
    try:
        app = tmp_path / "app"
        app.mkdir()
        t = srv.register(node, app, every=600, ping_url=receiver.url + "/ping/app")
        receiver.wait(lambda: receiver.pings() == ["/ping/app"], what="the first ping")
        assert receiver.events() == []  # a good run is not news

        app.rmdir()
        first = run(srv, t["id"])
        receiver.wait(lambda: len(receiver.events()) == 1, what="the failure notice")
        event = receiver.events()[0]
        assert event["event"] == "run_failed"
        assert event["target"] == {"id": t["id"], "node": t["address"], "path": str(app)}
        assert event["run"]["id"] == first["id"]
        assert event["run"]["error_code"] == "path_not_found"
        assert str(app) in event["text"] and event["failures"] == 1
        receiver.wait(lambda: receiver.pings()[-1] == "/ping/app/fail", what="the /fail ping")

        run(srv, t["id"])  # fails again within the repeat window: no second notice
        receiver.wait(lambda: receiver.pings().count("/ping/app/fail") == 2, what="ping 2")
        assert len(receiver.events()) == 1
        time.sleep(3)  # the repeat window (3 s here, an hour by default) passes
        run(srv, t["id"])
        receiver.wait(lambda: len(receiver.events()) == 2, what="the repeated notice")
        assert receiver.events()[1]["event"] == "run_failed"

        app.mkdir()
        good = run(srv, t["id"])
        receiver.wait(lambda: len(receiver.events()) == 3, what="the recovery notice")
        recovered = receiver.events()[2]
        assert recovered["event"] == "run_recovered" and recovered["run"]["id"] == good["id"]
        receiver.wait(lambda: receiver.pings()[-1] == "/ping/app", what="the success ping")
        assert "WARNING" in srv.log() and f"run {first['id']} target {t['id']}" in srv.log()
    finally:
        srv.stop()


def test_node_unreachable_then_reachable(tmp_path: Path, server_key: ServerKey,
                                         own_node: SSHD, receiver: Receiver) -> None:
    srv = LiveServer(tmp_path / "srv", server_key, notify_url=receiver.url + "/hook").start()
    try:
        app = tmp_path / "app"
        app.mkdir()
        t = srv.register(own_node, app, every=600)
        srv.wait_for(lambda: srv.runs(t["id"]), 30, "the first run")
        own_node.kill_sessions()  # a node that goes down drops its connections too
        own_node.stop()
        failed = run(srv, t["id"])
        assert failed["error_code"] == "unreachable"
        receiver.wait(lambda: "node_unreachable" in [e["event"] for e in receiver.events()],
                      what="node_unreachable")
        down = next(e for e in receiver.events() if e["event"] == "node_unreachable")
        assert down["node"]["address"] == t["address"] and down["node"]["reachable"] is False
        own_node.start()
        receiver.wait(lambda: "node_reachable" in [e["event"] for e in receiver.events()],
                      what="node_reachable (after the probe)")
        kinds = [e["event"] for e in receiver.events()]
        assert kinds.count("node_unreachable") == 1 and kinds.count("node_reachable") == 1
    finally:
        srv.stop()


def test_a_dead_receiver_never_slows_backups(tmp_path: Path, server_key: ServerKey,
                                             node: SSHD, black_hole: str) -> None:
    srv = LiveServer(tmp_path / "srv", server_key, notify_url=black_hole,
                     notify_queue=1).start()
    try:
        app = tmp_path / "app"
        app.mkdir()
        t = srv.register(node, app, every=600, ping_url=black_hole)
        srv.wait_for(lambda: srv.runs(t["id"]), 30, "the first run")
        for _ in range(4):
            started = time.monotonic()
            assert run(srv, t["id"])["status"] == "unchanged"
            # the receiver holds each attempt for 10 s; the run does not wait for it
            assert time.monotonic() - started < 5
        srv.wait_for(lambda: "notification dropped" in srv.log(), 10, "a logged drop")
    finally:
        srv.stop()


def test_sender_retries_then_delivers(receiver: Receiver) -> None:
    receiver.fail_first = 2
    sender = Sender(max_queue=10, attempts=4, timeout=5, backoff=0.05)
    sender.start()
    try:
        assert sender.submit(Message(receiver.url + "/hook", b'{"event": "x"}',
                                     "application/json", "test"))
        receiver.wait(lambda: receiver.posts, what="the delivery after two 500s")
        assert receiver.events() == [{"event": "x"}]
        assert sender.delivered == 1 and sender.dropped == 0
    finally:
        sender.stop()


def test_sender_drops_when_full_and_says_so(black_hole: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    sender = Sender(max_queue=1, attempts=1, timeout=30)
    sender.start()
    try:
        results = [sender.submit(Message(black_hole, b"{}", "application/json", f"n{i}"))
                   for i in range(4)]
        # one in the sender's hands (maybe), one queued, the rest dropped at once
        assert results[:1] == [True] and results.count(False) >= 2
        assert sender.dropped == results.count(False)
        assert "notification dropped" in caplog.text
    finally:
        sender.stop(timeout=0.1)
