"""A node whose host key changed is refused until someone re-trusts it."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from conftest import LiveServer

from cli.main import main as cli_main
from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey


def test_changed_host_key_needs_an_explicit_trust(tmp_path: Path, server_key: ServerKey) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "f").write_text("x")
    with SSHD(tmp_path / "n", server_key.public_line, host="127.0.0.7") as sshd:
        srv = LiveServer(tmp_path / "srv", server_key).start()
        try:
            t = srv.register(sshd, app, every=60)
            # finished, so restarting sshd below cannot cut the first backup short
            srv.wait_for(lambda: [r for r in srv.runs(t["id"]) if r["status"] == "success"],
                         15, "first run")
            old = sshd.host_key_fingerprint
            assert srv.api("GET", "/nodes").json()["nodes"][0]["host_key_fingerprint"] == old
            sshd.regenerate_host_key()
            sshd.kill_sessions()
            sshd.restart()
            new = sshd.host_key_fingerprint
            assert new != old

            run = srv.api("POST", f"/targets/{t['id']}/run", params={"wait": "true"}).json()
            assert run["run"]["error_code"] == "host_key_mismatch"
            assert old in run["run"]["message"] and new in run["run"]["message"]
            assert "backhaul trust" in run["run"]["message"]
            node = srv.api("GET", "/nodes").json()["nodes"][0]
            assert node["host_key_fingerprint"] == old  # never replaced silently

            address = f"{sshd.user}@{sshd.host}:{sshd.port}"
            res = CliRunner().invoke(cli_main, ["--server", srv.url, "--token", srv.token,
                                                "trust", address, "--fingerprint", new])
            assert res.exit_code == 0, res.output
            (app / "g").write_text("changed")
            run = srv.api("POST", f"/targets/{t['id']}/run", params={"wait": "true"}).json()
            # trust also re-runs the node's failed targets at once, which may
            # already have backed the change up
            assert run["run"]["status"] in ("success", "unchanged"), run
            backups = srv.api("GET", f"/targets/{t['id']}/backups").json()["backups"]
            assert len(backups) == 2
            node = srv.api("GET", "/nodes").json()["nodes"][0]
            assert node["host_key_fingerprint"] == new and node["host_key_pinned"]
        finally:
            srv.stop()
