"""Per-target pre/post commands run on the node over the run's connection:
pre before the fingerprint, post after the backup; a failing pre fails the run
with pre_command_failed (unless optional); timeouts apply; the restricted key
allows exactly the registered commands."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LiveServer

from cli.main import main as cli_main
from fixtures.sshd.launcher import SSHD
from orchestrator import remote
from orchestrator.ssh import ServerKey


def run(srv: LiveServer, target_id: int) -> dict:
    r = srv.api("POST", f"/targets/{target_id}/run", params={"wait": "true"})
    assert r.status_code == 200, r.text
    return r.json()["run"]


def members(srv: LiveServer, archive_id: int) -> dict[str, bytes]:
    r = srv.api("GET", f"/archives/{archive_id}/download")
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_pre_lands_in_the_tree_and_post_runs_after(live: LiveServer, node: SSHD,
                                                   tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    post_log = tmp_path / "post.log"
    pre = f"date +%s%N > {app}/dump.sql"
    post = f"ls {app} >> {post_log}"
    t = live.register(node, app, every=600, pre_command=pre, post_command=post)
    live.wait_for(lambda: [r for r in live.runs(t["id"]) if r["status"] == "success"], 30,
                  "the first run")
    first = live.api("GET", f"/targets/{t['id']}/backups").json()["backups"][0]
    # The dump is in the archive: the pre command ran before the fingerprint.
    assert "app/dump.sql" in members(live, first["id"])
    second = run(live, t["id"])
    assert second["status"] == "success"  # each dump differs, so each run has a change
    dumps = [members(live, a["id"])["app/dump.sql"]
             for a in live.api("GET", f"/targets/{t['id']}/backups").json()["backups"]]
    assert len(set(dumps)) == 2
    live.wait_for(lambda: post_log.exists() and post_log.read_text().count("dump.sql") == 2,
                  10, "two post runs")
    opts = live.api("GET", f"/targets/{t['id']}/options").json()["options"]
    assert opts == {"pre_command": pre, "post_command": post, "pre_optional": False,
                    "ping_url": None}


def test_failing_pre_fails_the_run_with_its_stderr(live: LiveServer, node: SSHD,
                                                   tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    post_log = tmp_path / "post.log"
    t = live.register(node, app, every=600, post_command=f"echo post >> {post_log}")
    live.wait_for(lambda: live.runs(t["id"]), 30, "the first run")
    r = live.api("PATCH", f"/targets/{t['id']}/options", json={
        "pre_command": "printf 'dump failed: \\033[31mdisk full\\n' >&2; exit 3"})
    assert r.status_code == 200, r.text
    before = len(live.api("GET", f"/targets/{t['id']}/backups").json()["backups"])
    (app / "new").write_text("a change that must not be backed up after a failed pre")
    failed = run(live, t["id"])
    assert failed["status"] == "failed" and failed["error_code"] == "pre_command_failed"
    assert "exited with status 3" in failed["message"]
    assert "dump failed: \\x1b[31mdisk full" in failed["message"]
    assert "\x1b" not in failed["message"] and "\n" not in failed["message"]
    assert len(live.api("GET", f"/targets/{t['id']}/backups").json()["backups"]) == before
    # Logged once at WARNING with run id, target and node.
    lines = [x for x in live.log().splitlines()
             if f"run {failed['id']} target {t['id']} node {t['address']}" in x]
    assert len(lines) == 1 and " WARNING " in lines[0] and "pre_command_failed" in lines[0]

    # Optional: the same failure is logged and the backup goes on.
    live.api("PATCH", f"/targets/{t['id']}/options", json={"pre_optional": True})
    ok = run(live, t["id"])
    assert ok["status"] == "success", ok
    assert "optional pre command" in live.log()


def test_hook_timeout(tmp_path: Path, server_key: ServerKey, node: SSHD) -> None:
    srv = LiveServer(tmp_path / "srv", server_key, hook_timeout=1).start()
    try:
        app = tmp_path / "app"
        app.mkdir()
        t = srv.register(node, app, every=600)
        srv.wait_for(lambda: srv.runs(t["id"]), 30, "the first run")
        srv.api("PATCH", f"/targets/{t['id']}/options", json={"pre_command": "sleep 60"})
        started = time.monotonic()
        failed = run(srv, t["id"])
        assert failed["error_code"] == "pre_command_failed"
        assert "timed out" in failed["message"]
        assert time.monotonic() - started < 30
    finally:
        srv.stop()


def test_commands_are_stored_and_sent_as_given(live: LiveServer, node: SSHD,
                                               tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    out = tmp_path / "out.txt"
    pre = f"""printf '%s\\n' "it's \\"quoted\\"; \\$(not run) `echo ok`" > {out}"""
    t = live.register(node, app, every=600, pre_command=pre)
    live.wait_for(lambda: out.exists(), 30, "the pre command")
    assert out.read_text() == "it's \"quoted\"; $(not run) ok\n"
    assert live.api("GET", f"/targets/{t['id']}/options").json()["options"]["pre_command"] \
        == pre
    for body, code in (({"pre_command": "a\x00b"}, "invalid_command"),
                       ({"post_command": "echo \x1b[2J"}, "invalid_command"),
                       ({"post_command": "x" * 5000}, "invalid_request"),
                       ({"ping_url": "ftp://example.org/x"}, "invalid_url"),
                       ({"ping_url": "http://127.0.0.1/a b"}, "invalid_url")):
        r = live.api("PATCH", f"/targets/{t['id']}/options", json=body)
        assert r.status_code == 422 and r.json()["error"]["code"] == code, (body, r.text)


def test_restricted_key_allows_the_hook_commands(tmp_path: Path, server_key: ServerKey,
                                                 own_node: SSHD) -> None:
    srv = LiveServer(tmp_path / "srv", server_key).start()
    try:
        app = tmp_path / "app"
        app.mkdir()
        marker = tmp_path / "pre-ran"
        t = srv.register(own_node, app, every=600, pre_command=f"touch {marker}",
                         post_command="true")

        def restricted() -> str:
            r = srv.api("GET", "/pubkey", params={"restricted": "true", "host": own_node.host,
                                                  "port": own_node.port,
                                                  "user": own_node.user})
            return r.json()["authorized_keys_line"]

        line = restricted()
        hook = remote.hook_command(f"touch {marker}", 3600)
        assert remote.allowed_commands([str(app)], [hook])[-1] == hook
        own_node.set_authorized_keys([line])
        own_node.kill_sessions()
        marker.unlink(missing_ok=True)
        assert run(srv, t["id"])["status"] in ("success", "unchanged")
        assert marker.exists()

        # A command the key was not issued for is refused on the node.
        srv.api("PATCH", f"/targets/{t['id']}/options", json={"pre_command": "id"})
        refused = run(srv, t["id"])
        assert refused["error_code"] == "command_refused"
        own_node.set_authorized_keys([restricted()])
        own_node.kill_sessions()  # sshd applies a key's command= at login
        again = run(srv, t["id"])
        assert again["status"] in ("success", "unchanged"), again
    finally:
        srv.stop()


@pytest.mark.parametrize("optional", [False, True])
def test_cli_register_sends_hooks_and_ping_url(live: LiveServer, node: SSHD, tmp_path: Path,
                                               optional: bool) -> None:
    app = tmp_path / "app"
    app.mkdir()
    argv = ["--server", live.url, "--token", live.token, "register",
            f"{node.user}@{node.host}:{node.port}", str(app), "--every", "600",
            "--pre", "echo 'pre; $HOME'", "--post", "echo post",
            "--ping-url", "http://127.0.0.1:9/ping"] + (["--pre-optional"] if optional else [])
    result = CliRunner().invoke(cli_main, argv)
    assert result.exit_code == 0, result.output
    tid = live.api("GET", "/targets").json()["targets"][0]["id"]
    opts = live.api("GET", f"/targets/{tid}/options").json()["options"]
    assert opts == {"pre_command": "echo 'pre; $HOME'", "post_command": "echo post",
                    "pre_optional": optional, "ping_url": "http://127.0.0.1:9/ping"}
