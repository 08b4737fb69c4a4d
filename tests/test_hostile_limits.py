"""A hostile node cannot exhaust the server: bounded inflation, capped command
output, a run deadline, a maximum archive size, escaped node text.

The node is a real sshd whose authorized_keys line forces a script that
plays backhaul's commands; each test drops a script for the command it wants
to misbehave (``<kind>.sh`` beside the forced command) and the payload the
``tar`` answer sends. Memory figures for the same attacks at full size
(a 4 GiB bomb, a 1.5 GB answer) are in ``bench/reliability_hostile.py``.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Engine, LiveServer

from fixtures.hostile_node import HostileNode
from orchestrator.backup import BackupEngine, CatalogHostKeys
from orchestrator.limits import RunLimits
from orchestrator.ssh import NodeAddress, ServerKey, SSHPool
from storage.archives import ArchiveStore
from storage.catalog import Catalog
from storage.errors import ArchiveTooLarge
from storage.limits import ArchiveLimits, MiB
from storage.verify import BoundedInflater, TarGzVerifier

pytestmark = pytest.mark.timeout(120)

@pytest.fixture(scope="module")
def hostile_sshd(tmp_path_factory: pytest.TempPathFactory,
                 server_key: ServerKey) -> Iterator[HostileNode]:
    with HostileNode(tmp_path_factory.mktemp("hostile-limits"), server_key.public_line,
                     host="127.0.0.6") as node:
        yield node


@pytest.fixture
def hnode(hostile_sshd: HostileNode) -> Iterator[HostileNode]:
    hostile_sshd.reset(good_archive())
    yield hostile_sshd
    hostile_sshd.reset(good_archive())


def limited_engine(data: Path, key: ServerKey, limits: RunLimits, *,
                   io_timeout: float = 15.0) -> Engine:
    data.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(data / "catalog.db")
    store = ArchiveStore(data / "archives")
    pool = SSHPool(key, CatalogHostKeys(catalog), connect_timeout=5, io_timeout=io_timeout,
                   output_limit=limits.command_output)
    return Engine(catalog, store, pool, BackupEngine(catalog, store, pool, limits=limits), data)


@pytest.fixture
def make(tmp_path: Path, server_key: ServerKey) -> Iterator:
    made: list[Engine] = []

    def build(limits: RunLimits = RunLimits(), **kw: float) -> Engine:
        e = limited_engine(tmp_path / f"data{len(made)}", server_key, limits, **kw)
        made.append(e)
        return e

    yield build
    for e in made:
        e.pool.close()
        e.catalog.close()


def good_archive(text: bytes = b"hello\n") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        d = tarfile.TarInfo("app")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(d)
        f = tarfile.TarInfo("app/file.txt")
        f.size = len(text)
        tar.addfile(f, io.BytesIO(text))
    return buf.getvalue()


def zero_bomb(size: int, level: int = 9) -> bytes:
    """A valid tar.gz of ``app/zeros``: ``size`` zero bytes, ~1000:1 in gzip."""
    z = zlib.compressobj(level, zlib.DEFLATED, 31)
    out = []
    d = tarfile.TarInfo("app")
    d.type, d.mode = tarfile.DIRTYPE, 0o755
    f = tarfile.TarInfo("app/zeros")
    f.size = size
    out.append(z.compress(d.tobuf(tarfile.GNU_FORMAT) + f.tobuf(tarfile.GNU_FORMAT)))
    block = b"\0" * MiB
    left = size
    while left:
        n = min(left, len(block))
        out.append(z.compress(block[:n]))
        left -= n
    out.append(z.compress(b"\0" * (-size % 512) + b"\0" * 1024))
    out.append(z.flush())
    return b"".join(out)


def run(eng: Engine, node: HostileNode) -> tuple:
    target = eng.register(node.sshd, "/srv/app")
    result = eng.engine.run(target.id, "manual")
    return target, result


def assert_nothing_kept(eng: Engine, target_id: int) -> None:
    assert eng.catalog.list_archives(target_id) == []
    assert eng.archive_files() == []
    assert eng.temp_files() == []


# -- 1. gzip bomb -----------------------------------------------------------------------


def test_bounded_inflater_never_holds_more_than_a_step() -> None:
    bomb = zero_bomb(256 * MiB)
    assert len(bomb) < 512 * 1024
    inflater = BoundedInflater(ArchiveLimits(0, 0, 0.0, 0), step=MiB)
    sizes = [len(c) for c in inflater.feed(bomb)] + [len(c) for c in inflater.finish()]
    assert max(sizes) <= MiB
    assert sum(sizes) == inflater.bytes_out > 256 * MiB
    assert inflater.bytes_in == len(bomb)


def test_bounded_inflater_reads_several_gzip_members() -> None:
    two = zlib.compress(b"a" * 5000, wbits=31) + zlib.compress(b"b" * 7, wbits=31)
    inflater = BoundedInflater(step=1000)
    out = b"".join(inflater.feed(two)) + b"".join(inflater.finish())
    assert out == b"a" * 5000 + b"b" * 7


def test_bomb_ratio_is_judged_on_consumed_input_not_on_the_read() -> None:
    """A bomb arriving in one read must not earn the ratio of its whole size."""
    bomb = zero_bomb(512 * MiB)
    verifier = TarGzVerifier("app", ArchiveLimits(max_ratio=1000.0, ratio_floor=8 * MiB))
    with pytest.raises(ArchiveTooLarge) as err:
        verifier.feed(bomb)
    assert verifier.raw_bytes < 64 * MiB
    assert "1000:1" in err.value.message


def test_gzip_bomb_is_refused_past_the_uncompressed_cap(make, hnode: HostileNode) -> None:
    eng = make(RunLimits(archive=ArchiveLimits(max_uncompressed=64 * MiB, max_ratio=0)))
    hnode.payload(zero_bomb(256 * MiB, level=6))
    target, result = run(eng, hnode)
    assert (result.status, result.error_code) == ("failed", "archive_too_large"), result
    assert "--max-uncompressed-size" in result.message
    assert_nothing_kept(eng, target.id)


def test_gzip_bomb_is_refused_by_the_default_ratio(make, hnode: HostileNode) -> None:
    eng = make()
    hnode.payload(zero_bomb(256 * MiB))
    target, result = run(eng, hnode)
    assert (result.status, result.error_code) == ("failed", "archive_too_large"), result
    assert "gzip bomb" in result.message
    assert_nothing_kept(eng, target.id)


def test_a_well_compressible_ordinary_archive_is_kept(make, hnode: HostileNode) -> None:
    """The control: text compressing ~100:1 is far from the default ratio."""
    eng = make()
    hnode.payload(good_archive(b"log line 42: all is well\n" * 400_000))
    target, result = run(eng, hnode)
    assert result.status == "success", result
    assert len(eng.catalog.list_archives(target.id)) == 1


# -- 2. command output ---------------------------------------------------------------------

FLOOD = "head -c 8388608 /dev/zero | tr '\\0' 'a'\n"


@pytest.mark.parametrize("kind", ["fingerprint", "pigz"])
def test_a_flooding_answer_fails_the_run(make, hnode: HostileNode, kind: str) -> None:
    eng = make(RunLimits(command_output=MiB))
    hnode.answer(kind, FLOOD)
    target, result = run(eng, hnode)
    assert (result.status, result.error_code) == ("failed", "output_too_large"), result
    assert (kind if kind != "pigz" else "pigz check") in result.message
    assert_nothing_kept(eng, target.id)


@pytest.mark.parametrize("kind", ["probe", "check"])
def test_a_flooding_probe_or_path_check_is_refused(make, hnode: HostileNode,
                                                   kind: str) -> None:
    from orchestrator.errors import OutputTooLarge
    eng = make(RunLimits(command_output=MiB))
    eng.catalog.ensure_node(hnode.sshd.user, hnode.sshd.host, hnode.sshd.port)
    hnode.answer(kind, FLOOD)
    addr = NodeAddress(hnode.sshd.user, hnode.sshd.host, hnode.sshd.port)
    with pytest.raises(OutputTooLarge):
        if kind == "probe":
            eng.engine.probe(addr)
        else:
            eng.engine.check_path(addr, "/srv/app")


# -- 3. deadline and archive size --------------------------------------------------------


def test_a_trickling_node_is_cut_at_the_run_deadline(make, hnode: HostileNode) -> None:
    eng = make(RunLimits(run_timeout=4), io_timeout=5)
    target, first = run(eng, hnode)
    assert first.status == "success", first
    kept = eng.archive_files()
    kept_bytes = kept[0].read_bytes()
    # A valid archive, one byte every half second: never silent for
    # io_timeout, done only after a minute.
    hnode.answer("tar", f"i=0; while :; do dd if={hnode.work}/payload.bin bs=1 skip=$i "
                        "count=1 2>/dev/null; i=$((i+1)); sleep 0.5; done\n")
    started = time.monotonic()
    result = eng.engine.run(target.id, "manual")
    took = time.monotonic() - started
    assert (result.status, result.error_code) == ("failed", "run_timeout"), result
    assert "--run-timeout" in result.message
    assert took < 4 + 3, took
    assert eng.archive_files() == kept and kept[0].read_bytes() == kept_bytes
    assert eng.temp_files() == []


def test_an_archive_past_the_size_cap_fails_and_keeps_the_old_one(make,
                                                                  hnode: HostileNode) -> None:
    eng = make(RunLimits(archive=ArchiveLimits(max_archive_size=MiB)))
    target, first = run(eng, hnode)
    assert first.status == "success", first
    kept = eng.archive_files()
    big = os.urandom(3 * MiB)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("app/big.bin")
        info.size = len(big)
        tar.addfile(info, io.BytesIO(big))
    hnode.payload(buf.getvalue())
    result = eng.engine.run(target.id, "manual")
    assert (result.status, result.error_code) == ("failed", "archive_too_large"), result
    assert "--max-archive-size" in result.message
    assert eng.archive_files() == kept
    assert len(eng.catalog.list_archives(target.id)) == 1
    assert eng.temp_files() == []


# -- 7. node text is escaped ---------------------------------------------------------------

ESCAPES = "\\033[2J\\033]0;pwned\\007\\r\\033[31mFAKE"


def test_node_stderr_is_escaped_in_warnings_messages_and_the_log(
        hnode: HostileNode, tmp_path: Path, server_key: ServerKey) -> None:
    srv = LiveServer(tmp_path / "server", server_key).start()
    try:
        hnode.answer("tar", f"cat {hnode.work}/payload.bin; printf '{ESCAPES}\\n' >&2; exit 1\n")
        t = srv.register(hnode.sshd, "/srv/app", every=60)
        srv.wait_for(lambda: srv.runs(t["id"]), 20, "the first run")
        warned = srv.api("POST", f"/targets/{t['id']}/run", params={"wait": "true"}).json()["run"]
        hnode.answer("tar", f"printf 'boom {ESCAPES}\\n' >&2; exit 2\n")
        failed = srv.api("POST", f"/targets/{t['id']}/run", params={"wait": "true"}).json()["run"]
        log = srv.log()
    finally:
        srv.stop()
    assert warned["status"] == "success" and "FAKE" in warned["warnings"], warned
    assert failed["status"] == "failed" and "FAKE" in failed["message"], failed
    for text in (warned["warnings"], failed["message"], log):
        assert "\x1b" not in text and "\r" not in text and "\x07" not in text
    assert "\\x1b[2J" in warned["warnings"] and "\\x1b[2J" in failed["message"]
    assert "\\x1b[2J" in log
