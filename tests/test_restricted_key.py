"""A key restricted with `backhaul pubkey --restricted NODE` can back up the
node's registered paths and nothing else."""

from __future__ import annotations

from pathlib import Path

from conftest import Engine, address

from fixtures.sshd.launcher import SSHD
from orchestrator import remote
from orchestrator.ssh import ServerKey


def test_restricted_key_backs_up_registered_paths_only(eng: Engine, server_key: ServerKey,
                                                       tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "data.txt").write_text("payload")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_text("do not read")
    line = remote.restricted_key_line(server_key.public_line, [str(app)])
    assert line.startswith('restrict,command="')
    with SSHD(tmp_path / "node", [line], host="127.0.0.4") as sshd:
        allowed = eng.register(sshd, app)
        assert eng.engine.run(allowed.id).status == "success"
        assert eng.engine.run(allowed.id).status == "unchanged"

        other = eng.register(sshd, secret)
        refused = eng.engine.run(other.id)
        assert refused.status == "failed" and refused.error_code == "command_refused"
        assert "pubkey --restricted" in refused.message
        assert eng.catalog.list_archives(other.id) == []

        conn = eng.pool.connection(address(sshd))
        for cmd in ("id", f"cat {secret}/key", "sh -c id",
                    remote.tar_command(str(app)) + "; id",
                    remote.tar_command(str(secret))):
            res = conn.exec(cmd, what="attempt")
            assert res.exit_status == remote.EXIT_REFUSED, cmd
            assert b"uid=" not in res.stdout and b"do not read" not in res.stdout
            assert remote.REFUSED_MARK in res.stderr_text


def test_api_serves_the_restricted_line_for_a_node(live, node: SSHD, tmp_path: Path) -> None:
    import hashlib
    app = tmp_path / "app"
    app.mkdir()
    live.register(node, app, every=60)
    r = live.api("GET", "/pubkey", params={"restricted": "true", "host": node.host,
                                          "port": node.port, "user": node.user})
    assert r.status_code == 200, r.text
    line = r.json()["authorized_keys_line"]
    assert line.startswith('restrict,command="') and line.endswith(r.json()["public_key"])
    assert hashlib.sha256(remote.tar_command(str(app)).encode()).hexdigest() in line
    r = live.api("GET", "/pubkey", params={"restricted": "true", "host": "127.0.0.99"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "node_not_found"
    # Without a node a `restrict` line could still run anything: refused.
    r = live.api("GET", "/pubkey", params={"restricted": "true"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
