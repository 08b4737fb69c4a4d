"""While a transfer goes on, the API says how many bytes the run has received
so far, and `backhaul run --wait` shows it on a terminal (only there)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LiveServer

from cli.main import main
from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey

NO_ENV = {"BACKHAUL_URL": None, "BACKHAUL_TOKEN": None, "BACKHAUL_DATA_DIR": None}


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory, server_key: ServerKey) -> Iterator[LiveServer]:
    """A server whose transfers crawl at 1 MiB/s, so a run lasts a few seconds."""
    s = LiveServer(tmp_path_factory.mktemp("progress") / "server", server_key, bwlimit="1MiB")
    s.start()
    yield s
    s.stop()


def test_the_api_reports_bytes_so_far_of_a_running_run(slow: LiveServer, node: SSHD,
                                                       tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "noise.bin").write_bytes(os.urandom(4 << 20))
    t = slow.register(node, app, every=60)  # its first run starts at once

    def progress() -> dict:
        r = slow.api("GET", f"/targets/{t['id']}/progress")
        assert r.status_code == 200, r.text
        return r.json()

    samples = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        p = progress()
        if p["running"]:
            samples.append(p)
        elif samples:
            break
        time.sleep(0.2)
    seen = [p["bytes_so_far"] for p in samples if p["bytes_so_far"]]
    assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] > seen[0], samples
    runs = [r for r in slow.runs(t["id"]) if r["status"] == "success"]
    assert runs and {p["run_id"] for p in samples} == {runs[0]["id"]}
    assert seen[-1] <= runs[0]["bytes_transferred"]
    assert progress() == {"target_id": t["id"], "running": False, "run_id": None,
                          "bytes_so_far": None}
    assert slow.api("GET", "/targets/999999/progress").status_code == 404


def test_run_wait_shows_progress_on_a_terminal_only(slow: LiveServer, node: SSHD,
                                                    tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "a.txt").write_text("a\n")
    t = slow.register(node, app, every=60)
    slow.wait_for(lambda: [r for r in slow.runs(t["id"]) if r["status"] == "success"], 30,
                  "the first backup")
    addr = f"{node.user}@{node.host}:{node.port}"
    backhaul = Path(sys.executable).parent / "backhaul"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    env.update(BACKHAUL_URL=slow.url, BACKHAUL_TOKEN=slow.token)

    (app / "noise.bin").write_bytes(os.urandom(3 << 20))
    main_fd, sub_fd = pty.openpty()
    proc = subprocess.run([backhaul, "run", addr, str(app), "--wait"], env=env,
                          stdout=subprocess.PIPE, stderr=sub_fd, timeout=120)
    os.close(sub_fd)
    shown = b""
    try:
        while chunk := os.read(main_fd, 65536):
            shown += chunk
    except OSError:  # EIO once the terminal's other end is closed
        pass
    os.close(main_fd)
    assert proc.returncode == 0, shown
    assert b"received so far" in shown and b"MiB received so far" in shown, shown
    assert proc.stdout.startswith(b"success: "), proc.stdout
    assert b"received so far" not in proc.stdout

    (app / "noise.bin").write_bytes(os.urandom(2 << 20))
    res = CliRunner().invoke(main, ["--server", slow.url, "--token", slow.token, "run", addr,
                                    str(app), "--wait"], env=NO_ENV)
    assert res.exit_code == 0, res.output
    assert res.stderr == "" and res.stdout.startswith("success: ")
