"""The sshd fixture against the real OpenSSH server and client.

Every ssh call runs with ``-F /dev/null``, an explicit identity and known_hosts
file, ``IdentitiesOnly=yes`` and no agent: nothing here reads ``~/.ssh``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures.sshd import keys
from fixtures.sshd.launcher import (
    PLACEHOLDERS,
    SSHD,
    TEMPLATE_PATH,
    SSHDError,
    free_port,
    render_config,
    wait_for_banner,
)

FIXTURE_DIR = TEMPLATE_PATH.parent
REPO_ROOT = FIXTURE_DIR.parent.parent


@dataclass(frozen=True)
class ClientKey:
    path: Path
    public: str


@pytest.fixture
def client_key(tmp_path: Path) -> ClientKey:
    path = tmp_path / "client" / "id_ed25519"
    path.parent.mkdir()
    return ClientKey(path, keys.generate_ed25519(path))


@pytest.fixture
def ssh_env(tmp_path: Path) -> dict[str, str]:
    """The environment for ssh: no agent, no askpass, a throwaway HOME."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"SSH_AUTH_SOCK", "SSH_AGENT_PID", "SSH_ASKPASS", "DISPLAY"}
    }
    home = tmp_path / "home"
    home.mkdir()
    env["HOME"] = str(home)
    return env


@pytest.fixture
def node(tmp_path: Path, client_key: ClientKey) -> Iterator[SSHD]:
    with SSHD(tmp_path / "node", client_key.public) as started:
        yield started


def known_hosts(tmp_path: Path, *nodes: SSHD) -> Path:
    path = tmp_path / f"known_hosts-{time.monotonic_ns()}"
    path.write_text("".join(n.known_hosts_line + "\n" for n in nodes))
    return path


def ssh_argv(
    key: ClientKey, known: Path, user: str, host: str, port: int, command: str
) -> list[str]:
    return [
        "ssh",
        "-F",
        "/dev/null",
        "-i",
        str(key.path),
        "-p",
        str(port),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={known}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=10",
        f"{user}@{host}",
        command,
    ]


def node_ssh_argv(node: SSHD, key: ClientKey, known: Path, command: str) -> list[str]:
    assert node.port is not None
    return ssh_argv(key, known, node.user, node.host, node.port, command)


def run_ssh(
    node: SSHD, key: ClientKey, known: Path, env: dict[str, str], command: str = "echo hello"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        node_ssh_argv(node, key, known, command),
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


def served_host_key(node: SSHD) -> str:
    """The ed25519 key line the running sshd actually presents (ssh-keyscan)."""
    out = subprocess.run(
        ["ssh-keyscan", "-t", "ed25519", "-p", str(node.port), node.host],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    lines = [line for line in out.splitlines() if line and not line.startswith("#")]
    assert len(lines) == 1, out
    return " ".join(lines[0].split()[1:3])


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def connection_refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# -- the basics ---------------------------------------------------------------


def test_ssh_client_runs_a_command(
    node: SSHD, client_key: ClientKey, ssh_env: dict[str, str], tmp_path: Path
) -> None:
    result = run_ssh(node, client_key, known_hosts(tmp_path, node), ssh_env, "echo hello; id -un")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"hello\n{node.user}\n"
    if os.geteuid() == 0:
        assert node.user == "root"
    assert "Accepted publickey for " + node.user in node.log_text()


def test_only_the_authorized_key_gets_in(
    node: SSHD, ssh_env: dict[str, str], tmp_path: Path
) -> None:
    stranger_path = tmp_path / "stranger"
    stranger = ClientKey(stranger_path, keys.generate_ed25519(stranger_path))
    result = run_ssh(node, stranger, known_hosts(tmp_path, node), ssh_env)
    assert result.returncode == 255
    assert "Permission denied (publickey)" in result.stderr


def test_host_key_fingerprint_is_what_sshd_serves_and_ssh_keygen_prints(
    node: SSHD, tmp_path: Path
) -> None:
    served = served_host_key(node)
    assert served == node.host_key_line
    assert node.host_key_line.startswith("ssh-ed25519 AAAA")
    printed = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", "-"],
        input=served + "\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert printed[1] == node.host_key_fingerprint
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", node.host_key_fingerprint)


def test_two_nodes_on_two_loopback_addresses_same_port(
    tmp_path: Path, client_key: ClientKey, ssh_env: dict[str, str]
) -> None:
    # The same port on both addresses proves each sshd binds only its own.
    port = free_port("127.0.0.2")
    a = SSHD(tmp_path / "a", client_key.public, host="127.0.0.2", port=port)
    b = SSHD(tmp_path / "b", [client_key.public], host="127.0.0.3", port=port)
    with a, b:
        assert (a.port, b.port) == (port, port)
        assert a.host_key_fingerprint != b.host_key_fingerprint
        for n in (a, b):
            result = run_ssh(
                n, client_key, known_hosts(tmp_path, n), ssh_env, "echo $SSH_CONNECTION"
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout.split()[2:] == [n.host, str(port)]
        # Each presents its own host key: b's key is wrong for a.
        wrong = tmp_path / "wrong"
        wrong.write_text(f"[{a.host}]:{port} {b.host_key_line}\n")
        result = run_ssh(a, client_key, wrong, ssh_env)
        assert result.returncode == 255
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in result.stderr


def test_many_simultaneous_connections_are_all_admitted(
    node: SSHD, client_key: ClientKey, ssh_env: dict[str, str], tmp_path: Path
) -> None:
    # sshd's default MaxStartups (10:30:100) dropped 6 of 20 concurrent logins here.
    known = known_hosts(tmp_path, node)
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(
            pool.map(lambda i: run_ssh(node, client_key, known, ssh_env, f"echo {i}"), range(20))
        )
    failures = [r.stderr for r in results if r.returncode != 0]
    assert failures == []
    assert sorted(int(r.stdout) for r in results) == list(range(20))


# -- lifecycle ----------------------------------------------------------------


def test_restart_keeps_port_and_host_key(
    node: SSHD, client_key: ClientKey, ssh_env: dict[str, str], tmp_path: Path
) -> None:
    known = known_hosts(tmp_path, node)
    port, fingerprint, old_pid = node.port, node.host_key_fingerprint, node.pid
    node.restart()
    assert node.pid != old_pid
    assert (node.port, node.host_key_fingerprint) == (port, fingerprint)
    assert served_host_key(node) == node.host_key_line
    result = run_ssh(node, client_key, known, ssh_env)
    assert result.returncode == 0, result.stderr


def test_regenerate_host_key_takes_effect_at_restart(
    node: SSHD, client_key: ClientKey, ssh_env: dict[str, str], tmp_path: Path
) -> None:
    old_line, old_fingerprint = node.host_key_line, node.host_key_fingerprint
    known_old = known_hosts(tmp_path, node)

    new_line = node.regenerate_host_key()
    assert new_line != old_line
    assert node.host_key_line == old_line  # still the one being served
    assert served_host_key(node) == old_line

    node.restart()
    assert node.host_key_line == new_line
    assert node.host_key_fingerprint != old_fingerprint
    assert node.host_key_fingerprint == keys.fingerprint(new_line)
    assert served_host_key(node) == new_line
    result = run_ssh(node, client_key, known_old, ssh_env)
    assert result.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in result.stderr


def test_stop_closes_the_port_and_is_idempotent(node: SSHD) -> None:
    pid, port = node.pid, node.port
    assert pid is not None and port is not None
    node.stop()
    assert node.pid is None and not node.running
    assert not process_alive(pid)
    assert connection_refused(node.host, port)
    assert not node.pidfile_path.exists()
    node.stop()


def test_start_on_a_busy_port_fails_with_the_log(tmp_path: Path, client_key: ClientKey) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = SSHD(tmp_path / "node", client_key.public, port=port)
        started = time.monotonic()
        with pytest.raises(SSHDError, match="Address already in use"):
            node.start(timeout=10)
        assert time.monotonic() - started < 5  # it noticed sshd died, no full timeout
        assert not node.running


# -- sessions -----------------------------------------------------------------


def start_sleeping_session(
    node: SSHD, client_key: ClientKey, known: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[str], int]:
    """An ssh session running ``sleep 30``; returns it and the remote sleep's PID."""
    proc = subprocess.Popen(
        node_ssh_argv(node, client_key, known, "echo $$; exec sleep 30"),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip().isdigit(), proc.stderr.read() if proc.stderr else line
    return proc, int(line)


def test_kill_sessions_cuts_a_running_session(
    node: SSHD, client_key: ClientKey, ssh_env: dict[str, str], tmp_path: Path
) -> None:
    known = known_hosts(tmp_path, node)
    proc, sleep_pid = start_sleeping_session(node, client_key, known, ssh_env)
    try:
        sessions = node.session_pids()
        assert sessions
        started = time.monotonic()
        killed = node.kill_sessions()
        assert set(sessions) <= set(killed) and sleep_pid in killed
        assert proc.wait(timeout=10) == 255
        assert time.monotonic() - started < 10
        assert wait_until(lambda: not process_alive(sleep_pid))
        assert node.session_pids() == []
        # The listener is untouched.
        assert run_ssh(node, client_key, known, ssh_env).stdout == "hello\n"
    finally:
        proc.kill()
        proc.wait()


def test_stop_leaves_open_sessions_running(
    node: SSHD, client_key: ClientKey, ssh_env: dict[str, str], tmp_path: Path
) -> None:
    proc, sleep_pid = start_sleeping_session(node, client_key, known_hosts(tmp_path, node), ssh_env)
    sessions = node.session_pids()
    try:
        node.stop()
        assert all(process_alive(pid) for pid in sessions)
        assert process_alive(sleep_pid)
        assert proc.poll() is None
    finally:
        # These sshd children are ours; the listener that could find them is gone.
        for pid in [*sessions, sleep_pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait()


def test_authorized_keys_can_be_replaced_while_running(
    node: SSHD, client_key: ClientKey, ssh_env: dict[str, str], tmp_path: Path
) -> None:
    known = known_hosts(tmp_path, node)
    other_path = tmp_path / "other"
    other = ClientKey(other_path, keys.generate_ed25519(other_path))
    node.set_authorized_keys([other.public])
    assert run_ssh(node, client_key, known, ssh_env).returncode == 255
    assert run_ssh(node, other, known, ssh_env).returncode == 0


# -- helpers ------------------------------------------------------------------


def test_generate_ed25519_writes_a_private_key_ssh_keygen_reads(tmp_path: Path) -> None:
    path = tmp_path / "key"
    public = keys.generate_ed25519(path)
    assert path.stat().st_mode & 0o777 == 0o600
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert derived.split()[:2] == public.split()
    assert (tmp_path / "key.pub").read_text().strip() == public


def test_wait_for_banner_ignores_a_listener_that_is_not_sshd() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with pytest.raises(TimeoutError):
            wait_for_banner("127.0.0.1", port, timeout=0.5)


def test_template_placeholders_match_the_launcher_and_the_entrypoint() -> None:
    template = TEMPLATE_PATH.read_text()
    assert set(re.findall(r"\{(\w+)\}", template)) == set(PLACEHOLDERS)
    rendered = render_config(template, **{name: f"/x/{name}" for name in PLACEHOLDERS})
    assert "{" not in rendered and "}" not in rendered
    entrypoint = (FIXTURE_DIR / "node-entrypoint.sh").read_text()
    for name in PLACEHOLDERS:
        assert f"s|{{{name}}}|" in entrypoint, name
    with pytest.raises(ValueError):
        render_config(template, **{name: 'a "quoted" path' for name in PLACEHOLDERS})


def test_shell_scripts_parse() -> None:
    for script in ("node-entrypoint.sh", "writer.sh"):
        subprocess.run(["sh", "-n", str(FIXTURE_DIR / script)], check=True)


def test_writer_keeps_changing_the_tree(tmp_path: Path) -> None:
    app = tmp_path / "app"
    env = {**os.environ, "WRITER_DIR": str(app), "WRITER_INTERVAL": "0.05", "WRITER_MAX_FILES": "5"}
    proc = subprocess.Popen(["sh", str(FIXTURE_DIR / "writer.sh")], env=env)
    log = app / "logs" / "app.log"
    try:
        assert wait_until(lambda: log.exists() and log.read_text().count("round") >= 12)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    blobs = list((app / "data").glob("blob-*.bin"))
    # At most MAX_FILES kept, plus one if it was stopped mid-round.
    assert 0 < len(blobs) <= 6
    assert not (app / "data" / "blob-1.bin").exists()
    assert "revision=" in (app / "config" / "app.conf").read_text()


# -- the CLI used by the demo -------------------------------------------------


def test_cli_starts_a_node_and_stops_it_on_sigterm(
    tmp_path: Path, client_key: ClientKey, ssh_env: dict[str, str]
) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fixtures.sshd",
            "start",
            "--dir",
            str(tmp_path / "cli-node"),
            "--authorized-key",
            str(client_key.path) + ".pub",
            "--host",
            "127.0.0.2",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        info = json.loads(line)
        assert set(info) >= {"host", "port", "user", "pid", "host_key_fingerprint"}
        assert info["host"] == "127.0.0.2"
        assert info["host_key_fingerprint"] == keys.fingerprint(info["host_key"])
        known = tmp_path / "known_cli"
        known.write_text(f"[127.0.0.2]:{info['port']} {info['host_key']}\n")
        result = subprocess.run(
            ssh_argv(client_key, known, info["user"], "127.0.0.2", info["port"], "echo hello"),
            env=ssh_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (result.returncode, result.stdout) == (0, "hello\n"), result.stderr

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not process_alive(info["pid"])
        assert connection_refused("127.0.0.2", info["port"])
    finally:
        # SIGTERM first: the CLI stops its sshd; SIGKILL would orphan it.
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
