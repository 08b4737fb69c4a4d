"""Hostile input: registration values, client addresses and a hostile node.

Each hostile value (``bench.reliability_hostile.CORPUS``) is sent alone, the
other fields valid, to a live backhauld whose node is a real sshd. It must be
refused with a 4xx in the one error shape that says what is wrong (and leave
nothing registered), or be stored and used safely: backed up under its own
name, then failing with ``path_not_found`` once its directory is gone. Every
value would create a canary file if any shell on the server or the node ran
it; none may appear.

A hostile node is a real sshd whose authorized_keys line forces a script that
answers backhaul's commands with a stream of our choosing: not gzip, cut
short, escaping its root. The engine must refuse each (``invalid_archive``),
listing nothing and leaving no temp file.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import Engine, LiveServer

from bench.reliability_hostile import (
    BASE,
    CORPUS,
    ApiClient,
    Hostile,
    canary_dirs,
    find_canaries,
    new_tag,
    probe_entry,
)
from cli.main import main as cli_main
from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey

pytestmark = pytest.mark.timeout(120)

# Corpus entries that break a promise today: the reason names the bug.
KNOWN_BUGS: dict[str, str] = {}  # corpus entry -> the bug that breaks it (strict xfail)


@pytest.fixture(scope="module")
def tag() -> str:
    return new_tag()


@pytest.fixture(scope="module")
def hostile_srv(tmp_path_factory: pytest.TempPathFactory, server_key: ServerKey,
                tag: str) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path_factory.mktemp("hostile") / "server", server_key,
                     connect_timeout=1)
    srv.start()
    yield srv
    srv.stop()
    # Background runs and probes are over: nothing they ran may have left a canary.
    assert find_canaries(tag, *canary_dirs(srv.data_dir.parent)) == []


@pytest.fixture(scope="module")
def api(hostile_srv: LiveServer) -> Iterator[ApiClient]:
    client = ApiClient(hostile_srv.url, hostile_srv.token)
    yield client
    client.close()


def counts(api: ApiClient) -> tuple[int, int]:
    targets = api.request("GET", "/targets", params={"all": "true"}).json()["targets"]
    nodes = api.request("GET", "/nodes").json()["nodes"]
    return len(targets), len(nodes)


def _corpus_params() -> list:
    return [pytest.param(e, id=e.name,
                         marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[e.name])]
                         if e.name in KNOWN_BUGS else [])
            for e in CORPUS]


def test_corpus_covers_every_field_and_attack() -> None:
    names = [e.name for e in CORPUS]
    assert len(names) == len(set(names)), "corpus names must be unique (they are test ids)"
    assert {e.field for e in CORPUS} >= {"host", "user", "port", "path", "every_minutes"}
    values = [e.value for e in CORPUS if isinstance(e.value, str)]
    for needle in ("$(", "`", ";", "\n", "\x00", "..", "-oProxyCommand=", "|"):
        assert any(needle in v for v in values), needle
    assert any(len(v) >= 5000 for v in values)
    assert any(not v.isascii() for v in values)


def test_canary_detector_sees_a_command_that_ran(tmp_path: Path, tag: str) -> None:
    """Without this, a canary check that can never fire would pass every test."""
    probe = Hostile("self-test", "path", "$(touch @C@)", "")
    rendered = probe.render(tag, str(tmp_path))
    subprocess.run(["sh", "-c", f"echo {rendered}"], check=True, capture_output=True)
    try:
        assert find_canaries(tag, *canary_dirs(tmp_path)) == [f"/tmp/{probe.canary(tag)}"]
    finally:
        os.unlink(f"/tmp/{probe.canary(tag)}")


def test_an_ordinary_value_is_accepted_and_backed_up(api: ApiClient, node: SSHD,
                                                     tmp_path: Path, tag: str) -> None:
    """The control: with these fixtures a plain value registers, backs up under
    its own name and then fails with path_not_found, so the corpus test's
    refusals and runs mean something."""
    out = probe_entry(api, Hostile("baseline", "path", f"{BASE}/plain", "control"), node,
                      tmp_path, tag)
    assert out.status == 201, (out.status, out.code, out.message)
    assert out.archive_top == ["plain"]
    assert [r[1:] for r in out.runs] in (
        [("success", None), ("failed", "path_not_found")],
        [("unchanged", None), ("failed", "path_not_found")])
    assert out.problems() == []


@pytest.mark.parametrize("entry", _corpus_params())
def test_hostile_value_is_refused_or_stored_safely(api: ApiClient, node: SSHD, tmp_path: Path,
                                                   tag: str, hostile_srv: LiveServer,
                                                   entry: Hostile) -> None:
    before = counts(api)
    out = probe_entry(api, entry, node, tmp_path / "entry", tag,
                      deep=[hostile_srv.data_dir, tmp_path])
    assert not out.unsafe_host, f"{entry.value!r} would be accepted as a non-loopback host"
    assert out.status < 500, (out.status, out.shape_problem)
    assert out.refused or out.accepted, (out.status, out.code, out.message)
    assert out.shape_problem is None
    if out.refused:
        assert out.says_what_is_wrong(), (out.code, out.message)
        assert counts(api) == before, "a refused registration left a target or node behind"
    else:
        assert out.run_problems() == []
    assert out.canaries == []


# -- the client ------------------------------------------------------------------------

CLI_ADDRESSES = [
    ("proxycommand", "-oProxyCommand=touch${IFS}@C@"),
    ("port-semicolon", "root@127.0.0.1:22;touch${IFS}@C@"),
    ("port-id", "root@127.0.0.1:22;id"),
    ("user-subshell", "$(touch${IFS}@C@)@{node}"),
    ("user-id", "$(id)@{node}"),
    ("user-backticks", "`touch${IFS}@C@`@{node}"),
    ("host-subshell", "$(touch${IFS}@C@)"),
    ("two-ports", "host:22:33"),
    ("unicode", "bäckup.invalid"),
    ("unicode-digits", "١٢٧.٠.٠.١"),
    ("bracket-injection", "[::1;touch${IFS}@C@]:22"),
    ("double-at", "root@@127.0.0.1"),
    ("port-range", "127.0.0.1:99999"),
    ("port-subshell", "127.0.0.1:$(touch${IFS}@C@)"),
    ("newline", "127.0.0.1\ntouch @C@"),
    ("empty", ""),
]


@pytest.mark.parametrize("as_option", [False, True], ids=["after--", "as-option"])
@pytest.mark.parametrize("name,address", CLI_ADDRESSES, ids=[n for n, _ in CLI_ADDRESSES])
def test_cli_register_refuses_hostile_addresses(api: ApiClient, hostile_srv: LiveServer,
                                                node: SSHD, tmp_path: Path, tag: str,
                                                name: str, address: str,
                                                as_option: bool) -> None:
    app = tmp_path / "app"
    app.mkdir()
    address = (Hostile(f"cli-{name}", "host", address, "").render(tag, str(tmp_path))
               .replace("{node}", f"{node.host}:{node.port}"))
    before = counts(api)
    head = ["--server", hostile_srv.url, "--token", hostile_srv.token, "register",
            "--every", "5"]
    argv = head + ([address, str(app)] if as_option else ["--", address, str(app)])
    result = CliRunner().invoke(cli_main, argv, env={"BACKHAUL_URL": None,
                                                     "BACKHAUL_TOKEN": None})
    assert result.exit_code in (1, 2), (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines()
              if line.lower().startswith(("error:", "backhaul: error:"))]
    assert len(errors) == 1, result.stderr
    assert result.stdout == ""
    assert counts(api) == before
    assert find_canaries(tag, *canary_dirs(tmp_path, hostile_srv.data_dir)) == []


# -- a hostile node ------------------------------------------------------------------------

HOSTILE_NODE_SCRIPT = """#!/bin/sh
# A hostile node: answers backhaul's commands, then sends PAYLOAD as the tar stream.
printf '%s\\n' "$SSH_ORIGINAL_COMMAND" >> {log}
case "$SSH_ORIGINAL_COMMAND" in
  *"command -v pigz"*) echo no ;;
  *"date +%s.%N"*) date +%s.%N
    printf '%s  -\\n' "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \\n')" ;;
  *sha256sum*) printf '%s  -\\n' "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \\n')" ;;
  *"sort -z | gzip"*) : | gzip ;;
  *"tar "*) cat {payload} ;;
  *"echo backhaul-ok"*) echo backhaul-ok ;;
  *) echo "hostile node: unexpected command" >&2; exit 127 ;;
esac
"""


@pytest.fixture(scope="module")
def hostile_node(tmp_path_factory: pytest.TempPathFactory,
                 server_key: ServerKey) -> Iterator[SSHD]:
    work = tmp_path_factory.mktemp("hostile-node")
    script = work / "answer.sh"
    script.write_text(HOSTILE_NODE_SCRIPT.format(log=work / "commands.log",
                                                 payload=work / "payload.bin"))
    script.chmod(0o755)
    line = f'command="{script}",no-pty,no-port-forwarding {server_key.public_line}'
    with SSHD(work / "sshd", [line], host="127.0.0.3") as sshd:
        yield sshd


def _targz(members: list[tuple[str, bytes | None]], *,
           fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar.gz of (name, data) members; data None makes a directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _hardlink_out() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        d = tarfile.TarInfo("app")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(d)
        link = tarfile.TarInfo("app/passwd")
        link.type, link.linkname = tarfile.LNKTYPE, "../../etc/passwd"
        tar.addfile(link)
    return buf.getvalue()


def _symlink_then(member: str, *, link: str = "app/l", to: str = "/etc",
                  data: bytes | None = b"evil") -> bytes:
    """``link -> to``, then ``member`` (a file, or with data None a directory)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        d = tarfile.TarInfo("app")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(d)
        s = tarfile.TarInfo(link)
        s.type, s.linkname = tarfile.SYMTYPE, to
        tar.addfile(s)
        m = tarfile.TarInfo(member)
        if data is None:
            m.type = tarfile.DIRTYPE
            tar.addfile(m)
        else:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return buf.getvalue()


def _after_end(extra: bytes, *, same_member: bool) -> bytes:
    """A complete archive of ``app``, then ``extra`` tar bytes after its end
    marker: in the same gzip member, or in a second one."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.GNU_FORMAT) as tar:
        d = tarfile.TarInfo("app")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(d)
        f = tarfile.TarInfo("app/ok")
        f.size = 2
        tar.addfile(f, io.BytesIO(b"ok"))
    whole = tar_bytes.getvalue()
    if same_member:
        return gzip.compress(whole + extra)
    return gzip.compress(whole) + gzip.compress(extra)


def _evil_member() -> bytes:
    info = tarfile.TarInfo("../../tmp/evil")
    info.size = 4
    return info.tobuf(tarfile.GNU_FORMAT) + b"evil".ljust(512, b"\0") + b"\0" * 1024


def _huge_longname() -> bytes:
    """A member whose GNU long name is 16 MiB: the verifier would buffer it whole."""
    return _targz([("app", None), ("app/" + "a" * (16 * 2**20), b"x")])


def _payloads() -> dict[str, bytes]:
    big = os.urandom(256 * 1024)  # incompressible: half the gzip is half the tar
    whole = _targz([("app", None), ("app/a.bin", big), ("app/b.bin", big[::-1])])
    return {
        "not-gzip": b"this is not gzip\n" + os.urandom(4096),
        "truncated": whole[: len(whole) // 2],
        "dotdot-member": _targz([("app", None), ("app/ok", b"ok"), ("../evil", b"evil")]),
        "absolute-member": _targz([("app", None), ("/etc/evil", b"evil")]),
        "other-root": _targz([("otherdir", None), ("otherdir/file", b"data")]),
        "inner-dotdot": _targz([("app", None), ("app/../../evil", b"evil")]),
        "gnu-longname-dotdot": _targz([("app", None),
                                       ("app/" + "x" * 120 + "/../../../evil", b"evil")]),
        "pax-path-dotdot": _targz([("app", None), ("app/" + "é" * 60 + "/../../evil", b"e")],
                                  fmt=tarfile.PAX_FORMAT),
        "gzip-not-tar": gzip.compress(b"hello, not a tar archive\n" * 100),
        "no-members": gzip.compress(b"\0" * 1024),
        "trailing-garbage": whole + b"garbage after the gzip stream",
        "hardlink-outside": _hardlink_out(),
        "through-own-symlink": _symlink_then("app/l/evil"),
        "through-own-symlink-dir": _symlink_then("app/l/sub", data=None),
        "through-own-symlink-dotslash": _symlink_then("app/./l//evil"),
        "replaces-own-symlink": _symlink_then("app/l", to="/etc/passwd"),
        "hardlink-through-own-symlink": _hardlink_through_symlink(),
        "member-after-end-second-gzip": _after_end(_evil_member(), same_member=False),
        "member-after-end-same-gzip": _after_end(_evil_member(), same_member=True),
        "huge-longname-header": _huge_longname(),
    }


def _hardlink_through_symlink() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        d = tarfile.TarInfo("app")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(d)
        s = tarfile.TarInfo("app/l")
        s.type, s.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(s)
        h = tarfile.TarInfo("app/shadow")
        h.type, h.linkname = tarfile.LNKTYPE, "app/l/shadow"
        tar.addfile(h)
    return buf.getvalue()


PAYLOADS = _payloads()
PAYLOAD_BUGS: dict[str, str] = {}  # payload -> the bug that lets it through (strict xfail)


def _run_hostile_node(eng: Engine, node: SSHD, payload: bytes) -> tuple:
    (node.workdir.parent / "payload.bin").write_bytes(payload)
    target = eng.register(node, "/srv/app")
    result = eng.engine.run(target.id, "manual")
    return result, eng.catalog.list_archives(target.id)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=[pytest.mark.xfail(strict=True, reason=PAYLOAD_BUGS[n])]
                 if n in PAYLOAD_BUGS else []) for n in PAYLOADS])
def test_hostile_node_stream_is_refused(eng: Engine, hostile_node: SSHD, name: str) -> None:
    result, listed = _run_hostile_node(eng, hostile_node, PAYLOADS[name])
    assert (result.status, result.error_code) == ("failed", "invalid_archive"), result
    assert result.message
    assert listed == []
    assert eng.archive_files() == []
    assert eng.temp_files() == []


def test_hostile_node_zero_padding_after_the_end_is_kept(eng: Engine,
                                                         hostile_node: SSHD) -> None:
    """Only data after the end marker is refused: zero padding, even in a
    second gzip member, is what tar and cat'ed streams produce, and is kept."""
    padded = _after_end(b"\0" * 10240, same_member=False)
    result, listed = _run_hostile_node(eng, hostile_node, padded)
    assert result.status == "success", result
    assert len(listed) == 1


def test_hostile_node_control_a_wellformed_stream_is_kept(eng: Engine,
                                                         hostile_node: SSHD) -> None:
    """The same forced-command node with a well-formed archive of ``app``: kept.
    Proves the refusals above come from the stream, not from the fixture. A
    symlink pointing outside the tree is ordinary in a backup and is kept too."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, kind in (("app", tarfile.DIRTYPE), ("app/file.txt", tarfile.REGTYPE),
                           ("app/passwd", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            data = b"hello\n" if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    good = buf.getvalue()
    result, listed = _run_hostile_node(eng, hostile_node, good)
    assert result.status == "success", result
    assert len(listed) == 1 and len(eng.archive_files()) == 1
    # Re-framed into member-aligned gzip on the way in: the same tar entries.
    def members(data: bytes) -> list[tuple]:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            return [(m.name, m.type, m.linkname,
                     tar.extractfile(m).read() if m.isfile() else None) for m in tar]
    assert members(eng.archive_files()[0].read_bytes()) == members(good)
    assert eng.temp_files() == []
