"""The client (``backhaul``) against a live ``backhauld`` and real sshd nodes.

Most tests drive ``cli.main.main`` through click's ``CliRunner`` against one
backhauld subprocess shared by the module (each test uses its own paths and
compares before/after, so they do not see each other's state); the last one
runs the installed console scripts as subprocesses.

Schedules here are ``--every 60`` with real minutes: the only scheduled run is
the one a registration starts at once, and the tests wait for it to finish
before they act, so a manual run never races it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from conftest import NO_ENV, LiveServer, addr, cli

from cli.main import main
from fixtures.server import free_port
from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey

VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"
COMMANDS = ("register", "unregister", "backups", "jobs", "history", "run", "download", "pubkey")
@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No token file or URL from the developer's shell or cwd can help a test pass."""
    monkeypatch.chdir(tmp_path)
    for name in NO_ENV:
        monkeypatch.delenv(name, raising=False)


def cli_env(srv: LiveServer, *args: str) -> Result:
    """The same, with the server and token from BACKHAUL_URL / BACKHAUL_TOKEN."""
    env = {**NO_ENV, "BACKHAUL_URL": srv.url, "BACKHAUL_TOKEN": srv.token}
    return CliRunner().invoke(main, list(args), env=env)


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.output
    return result.stdout


def one_error_line(result: Result) -> str:
    """The failure promise: exit 1, one line on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    assert isinstance(result.exception, SystemExit)  # no uncaught exception inside
    return lines[0]


def make_tree(root: Path, files: int = 4) -> Path:
    """Incompressible content, so an archive is some KiB and its size shows in KiB."""
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"f{i}.bin").write_bytes(os.urandom(5000))
    (root / "sub").mkdir()
    (root / "sub" / "note.txt").write_text("hello\n")
    return root


def all_targets(srv: LiveServer) -> list[dict[str, Any]]:
    r = srv.api("GET", "/targets", params={"all": "true"})
    assert r.status_code == 200, r.text
    return r.json()["targets"]


def target_of(srv: LiveServer, path: Path, active_only: bool = True) -> dict[str, Any]:
    r = srv.api("GET", "/targets", params={"path": str(path), "all": str(not active_only).lower()})
    (t,) = r.json()["targets"]
    return t


def backups_of(srv: LiveServer, target_id: int) -> list[dict[str, Any]]:
    r = srv.api("GET", f"/targets/{target_id}/backups")
    assert r.status_code == 200, r.text
    return r.json()["backups"]


def settled(srv: LiveServer, target_id: int, count: int = 1) -> list[dict[str, Any]]:
    """Wait until ``count`` runs of the target exist and none is still running."""
    def done() -> list[dict[str, Any]] | None:
        runs = srv.runs(target_id)
        if len(runs) >= count and all(r["status"] != "running" for r in runs):
            return runs
        return None

    return srv.wait_for(done, 30, f"{count} finished runs of target {target_id}")


def minute(ts: str) -> str:
    """An API time as the client's tables show it (UTC, to the minute)."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M")


def size_text(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    assert size < 1024 * 1024, "the test trees are meant to give KiB-sized archives"
    return f"{size / 1024:.1f} KiB"


def row_with(table: str, *needles: str) -> str:
    rows = [line for line in table.splitlines() if all(n in line for n in needles)]
    assert len(rows) == 1, (needles, table)
    return rows[0]


# --- the whole life of a target, through the client ---------------------------------


def test_register_jobs_run_backups_history_download_unregister(
    srv: LiveServer, node: SSHD, tmp_path: Path
) -> None:
    app = make_tree(tmp_path / "app")
    out = ok(cli(srv, "register", addr(node), str(app), "--every", "60"))
    t = target_of(srv, app)
    assert out == f"registered {t['id']}: {addr(node)} {app} every 1h (keep 10)\n"
    assert (t["address"], t["every_minutes"], t["keep"]) == (addr(node), 60, 10)
    first = settled(srv, t["id"])  # registration starts the first backup at once
    assert first[0]["status"] == "success", first

    # jobs: one row with id, node, path and the next run the server planned.
    t = target_of(srv, app)
    assert t["next_run_at"]
    table = ok(cli(srv, "jobs"))
    assert table.splitlines()[0].split()[:3] == ["ID", "NODE", "PATH"]
    row = row_with(table, str(app))
    assert row.split()[:3] == [str(t["id"]), addr(node), str(app)]
    assert f"{minute(t['next_run_at'])} (in " in row
    assert "every 1h" in row and "success" in row

    # --json before or after the command: the API's answer, unchanged.
    for args in (["jobs", "--json"], ["--json", "jobs"]):
        printed = json.loads(ok(cli(srv, *args)))
        assert printed == srv.api("GET", "/targets").json()
    assert json.loads(ok(cli_env(srv, "jobs", "--json"))) == srv.api("GET", "/targets").json()

    # run --wait: a new archive, since the tree changed.
    (app / "new.txt").write_text("changed\n")
    before = backups_of(srv, t["id"])
    out = ok(cli(srv, "run", addr(node), str(app), "--wait"))
    after = backups_of(srv, t["id"])
    assert len(after) == len(before) + 1
    newest = after[0]
    run = srv.runs(t["id"])[0]
    assert (run["status"], run["trigger"], run["archive_id"]) == ("success", "manual", newest["id"])
    assert out.startswith(f"success: {addr(node)} {app}: run {run['id']}, archive {newest['id']} ("
                          f"{size_text(newest['size'])} stored), ")

    # backups: date, human size and "kept" for every archive, via the env vars this time.
    table = ok(cli_env(srv, "backups", addr(node), str(app)))
    for b in after:
        row = row_with(table, minute(b["created_at"]), b["sha256"][:12])
        assert size_text(b["size"]) in row and str(b["size"]) in row
        assert row.split()[-2:] == [b["sha256"][:12], str(b["id"])]
        assert " kept " in row
    assert f"{len(after)} backups made, {len(after)} kept" in table

    # history of the target: both runs, newest first.
    table = ok(cli(srv, "history", addr(node), str(app)))
    lines = table.splitlines()[1:]
    assert [line.split()[0] for line in lines] == [str(r["id"]) for r in srv.runs(t["id"])]
    assert "success" in lines[0] and "manual" in lines[0] and "schedule" in lines[1]

    # download: the bytes the server holds, a readable tar.gz of the tree.
    dest = tmp_path / "got.tar.gz"
    out = ok(cli(srv, "download", str(newest["id"]), "-o", str(dest)))
    assert out.startswith(f"saved archive {newest['id']} to {dest} ")
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == newest["sha256"]
    assert dest.stat().st_size == newest["size"]
    with tarfile.open(dest, "r:gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
        member = next(m for m in tar.getmembers() if m.name.endswith("new.txt"))
        assert tar.extractfile(member).read() == b"changed\n"
    assert {"f0.bin", "f3.bin", "note.txt", "new.txt"} <= names
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []

    # unregister: gone from jobs, its archives stay listed.
    out = ok(cli(srv, "unregister", addr(node), str(app)))
    assert out.startswith(f"unregistered {t['id']}: {addr(node)} {app}")
    assert target_of(srv, app, active_only=False)["active"] is False
    assert str(app) not in ok(cli(srv, "jobs"))
    table = ok(cli(srv, "backups", addr(node), str(app)))
    for b in after:
        assert " kept " in row_with(table, str(b["id"]), b["sha256"][:12])
    assert [b["id"] for b in backups_of(srv, t["id"])] == [b["id"] for b in after]


def test_pubkey_prints_the_servers_key_line(srv: LiveServer, server_key: ServerKey) -> None:
    out = ok(cli(srv, "pubkey"))
    line = out.rstrip("\n")
    assert "\n" not in line and line.startswith("ssh-ed25519 ")
    assert line == srv.api("GET", "/pubkey").json()["authorized_keys_line"]
    assert line.split()[:2] == server_key.public_line.split()[:2]
    assert json.loads(ok(cli(srv, "pubkey", "--json"))) == srv.api("GET", "/pubkey").json()


def test_nodes_shows_the_pinned_host_key(srv: LiveServer, node: SSHD, tmp_path: Path) -> None:
    app = make_tree(tmp_path / "app")
    ok(cli(srv, "register", addr(node), str(app), "--every", "60"))
    settled(srv, target_of(srv, app)["id"])
    row = row_with(ok(cli(srv, "nodes")), addr(node))
    assert node.host_key_fingerprint.startswith("SHA256:")
    assert node.host_key_fingerprint in row.split()
    assert "yes" in row.split()  # reachable
    (api_node,) = [n for n in srv.api("GET", "/nodes").json()["nodes"]
                   if n["address"] == addr(node)]
    assert api_node["host_key_fingerprint"] == node.host_key_fingerprint


# --- errors: exit 1, one line, nothing changed -----------------------------------------


def test_duplicate_registration(srv: LiveServer, node: SSHD, tmp_path: Path) -> None:
    app = make_tree(tmp_path / "app")
    t = srv.register(node, app, every=60)
    settled(srv, t["id"])
    before = all_targets(srv)
    line = one_error_line(cli(srv, "register", addr(node), str(app), "--every", "5"))
    assert line.startswith("backhaul: error: [target_exists] ")
    assert str(app) in line
    assert all_targets(srv) == before


@pytest.mark.parametrize(
    ("address", "path", "every", "fragment"),
    [
        (None, "relative/path", "5", "path must be absolute"),
        ("{user}@{host}:0", None, "5", "port must be 1..65535, got 0"),
        ("{user}@{host}:70000", None, "5", "port must be 1..65535, got 70000"),
        (None, None, "0", "must be at least 1, got 0"),
    ],
    ids=["relative-path", "port-0", "port-70000", "every-0"],
)
def test_invalid_registration_is_refused_before_anything_is_sent(
    srv: LiveServer, node: SSHD, tmp_path: Path,
    address: str | None, path: str | None, every: str, fragment: str,
) -> None:
    # The client checks these itself and reports them as click usage errors
    # (exit 2, "Usage: ..." then one "Error: ..." line): see the report on
    # tests/test_cli_unit.py::test_register_usage_errors_exit_2_before_any_request.
    app = make_tree(tmp_path / "app")
    where = (address or "{user}@{host}:{port}").format(user=node.user, host=node.host,
                                                       port=node.port)
    before = all_targets(srv)
    nodes_before = srv.api("GET", "/nodes").json()
    result = cli(srv, "register", where, path or str(app), "--every", every)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.output and result.stdout == ""
    assert isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert all_targets(srv) == before
    assert srv.api("GET", "/nodes").json() == nodes_before


@pytest.mark.parametrize("command", ["unregister", "backups", "run"])
def test_unknown_target(srv: LiveServer, node: SSHD, tmp_path: Path, command: str) -> None:
    missing = tmp_path / "never-registered"
    before = all_targets(srv)
    line = one_error_line(cli(srv, command, addr(node), str(missing)))
    assert line == f"backhaul: error: [target_not_found] no target {addr(node)} {missing}"
    assert all_targets(srv) == before


@pytest.mark.parametrize("command", [["jobs"], ["pubkey"], ["register", "x@h:22", "/srv/a",
                                                            "--every", "5"]])
def test_wrong_token(srv: LiveServer, command: list[str]) -> None:
    before = all_targets(srv)
    line = one_error_line(cli(srv, *command, token="not-the-token"))
    assert line.startswith("backhaul: error: [unauthorized] ")
    assert all_targets(srv) == before


def test_run_wait_of_a_deleted_path_fails_with_its_code(
    srv: LiveServer, node: SSHD, tmp_path: Path
) -> None:
    app = make_tree(tmp_path / "app")
    t = srv.register(node, app, every=60)
    settled(srv, t["id"])
    shutil.rmtree(app)
    before = backups_of(srv, t["id"])
    result = cli(srv, "run", addr(node), str(app), "--wait")
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("failed: path_not_found: ")
    # A failed run may be retried on the schedule's backoff: pick the manual one.
    run = next(r for r in srv.runs(t["id"]) if r["trigger"] == "manual")
    assert (run["status"], run["error_code"]) == ("failed", "path_not_found")
    assert backups_of(srv, t["id"]) == before
    assert srv.api("DELETE", f"/targets/{t['id']}").status_code == 200  # stop the retries


def test_server_not_running(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, ["--server", url, "--token", "t", "jobs"], env=NO_ENV)
    line = one_error_line(result)
    assert line.startswith(f"backhaul: error: [server_unreachable] cannot reach backhauld at {url}")


# --- the installed console scripts -----------------------------------------------------


def test_installed_console_scripts(tmp_path: Path, server_key: ServerKey, node: SSHD) -> None:
    backhauld, backhaul = VENV_BIN / "backhauld", VENV_BIN / "backhaul"
    assert backhauld.is_file() and backhaul.is_file()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}

    result = subprocess.run([backhaul, "--help"], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    section = result.stdout.split("Commands:", 1)[1]
    listed = [line.split()[0] for line in section.splitlines() if line.strip()]
    assert set(COMMANDS) <= set(listed), result.stdout

    data = tmp_path / "data"
    (data / "ssh").mkdir(parents=True)
    shutil.copy(server_key.path, data / "ssh" / "id_ed25519")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "backhauld.log", "wb")
    proc = subprocess.Popen([backhauld, "--data-dir", str(data), "--listen", f"127.0.0.1:{port}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "backhauld.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "backhauld.log").read_text()
            time.sleep(0.05)

        client_env = {**env, "BACKHAUL_TOKEN": (data / "api-token").read_text().strip()}

        def backhaul_run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([backhaul, "--server", url, *args], env=client_env,
                                  capture_output=True, text=True, timeout=60, cwd=tmp_path)

        jobs = backhaul_run("jobs")
        assert jobs.returncode == 0, jobs.stderr
        assert jobs.stdout.startswith("no targets registered")

        app = make_tree(tmp_path / "app")
        reg = backhaul_run("register", addr(node), str(app), "--every", "60")
        assert reg.returncode == 0, reg.stderr
        assert reg.stdout.startswith("registered 1: ")
        (app / "new.txt").write_text("changed\n")
        ran = backhaul_run("run", addr(node), str(app), "--wait")
        assert ran.returncode == 0, (ran.stdout, ran.stderr)
        assert ran.stdout.startswith(("success: ", "unchanged: "))
        listed = backhaul_run("backups", addr(node), str(app))
        assert listed.returncode == 0 and " kept " in listed.stdout, listed.stderr
        assert "Traceback" not in jobs.stderr + reg.stderr + ran.stderr + listed.stderr

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "backhauld.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
