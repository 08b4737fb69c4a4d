"""One delta backup: plan from the listings, fetch only what changed, compose
a new complete archive from the previous one, verify, hand it back.

The plan, per entry of the new listing (canonical order):

- ``copy``: its record (type, mode, owner, size, mtime, ctime, inode, path)
  is byte-identical to the one stored with the previous archive. ctime cannot
  be set from user space, so identical records mean identical content.
- ``tail``: a regular file that grew (old size >= TAIL_MIN): the node proves
  the old prefix by its hash and sends only the new bytes.
- ``blocks``: a large regular file otherwise changed (or only touched): the
  node sends block hashes, then only the blocks that differ.
- ``fetch``: everything else (new, retyped, re-owned, hard-linked, small)
  comes whole in one tar stream of just those names.

Every reassembled file must hash to what the node computed while sending the
pieces, else it is fetched whole (a second pass); every entry in the
composed archive must agree with the listing, or a warning says why (the
entry changed while the backup ran, as tar's own exit 1 reports).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from orchestrator import remote
from orchestrator.errors import RemoteCommandFailed
from orchestrator.ssh import ExecResult
from orchestrator.transfer.listing import TAR_TYPE, Record, parse_record_cached
from orchestrator.transfer.stream import Inflater, Spool
from storage.errors import InvalidArchive
from storage.tgz import (
    LARGE,
    ArchiveIndex,
    ArchiveReader,
    Composer,
    Entry,
    canonical_key,
    make_header,
)
from storage.tgz.format import HeaderInfo
from storage.tgz.scan import TarScanner

log = logging.getLogger(__name__)

TAIL_MIN = 64 * 1024  # below this a grown file is simply fetched whole
# A changed file in this size range is matched chunk by chunk against its old
# content (remote.CDC_SOURCE) when the node has python3: an edited line costs
# that chunk, not the file.
LINES_MIN = 2 * 1024
LINES_MAX = 8 * 1024 * 1024
_CDC: dict = {}
exec(remote.CDC_SOURCE, _CDC)  # the very text the node runs  # noqa: S102
cdc = _CDC["cdc"]
# A delta that would fetch more than this share of the tree's bytes is worth
# no more than a full: the engine makes it one.
FULL_FRACTION = 0.8
_HEX = frozenset(b"0123456789abcdef")
# Block hashes cross the wire cut to 8 bytes: a collision can only make a
# changed block look unchanged, and the whole-file sha256 catches that.
HASH_HEX = 16


class NeedFull(Exception):
    """This delta is not worth it (or not possible): do a full backup."""


class NodeIO(Protocol):
    """The engine's side of the connection: runs a fixed command with stdin,
    counts its bytes, throttles, and raises on a failed exit status."""

    path: str
    python: bool
    pigz: bool

    def exec(self, command: str, *, what: str, stdin: bytes | None = None,
             sink: Callable[[bytes], None] | None = None,
             ok: tuple[int, ...] = (0,)) -> ExecResult: ...


@dataclass
class Item:
    apath: str
    rec: Record
    old: Entry | None
    kind: str  # copy | fetch | tail | blocks | lines
    node_sha: str | None = None
    pieces: list[tuple[int, int, int]] = field(default_factory=list)  # (file off, spool off, n)
    want: list[int] = field(default_factory=list)  # blocks to ask for
    bs: int = 0
    refs: list[tuple[int, int, int]] = field(default_factory=list)  # lines: (old s, e, -1)
    # or (spool off, n, 1) per new chunk, in order


@dataclass
class Fetched:
    header: bytes
    d_off: int  # spool offset of the data
    info: HeaderInfo


@dataclass
class DeltaResult:
    index: ArchiveIndex
    warnings: list[str]
    stats: dict[str, int]


def archive_path(root: str, rel: bytes) -> str:
    name = rel.decode("utf-8", "surrogateescape")
    return f"{root}/{name}" if name else root


def _compatible(rec: Record, old: Entry) -> bool:
    if rec.type == "f":
        return old.type in ("0", "7", "1")
    return TAR_TYPE.get(rec.type) == old.type


class DeltaPlan:
    """What to do with each entry of the new listing."""

    def __init__(self, root: str, records: dict[bytes, bytes], prev: ArchiveIndex) -> None:
        self.root = root
        recs = [parse_record_cached(raw) for raw in records.values()]
        # tar leaves sockets out; so does the archive.
        recs = [r for r in recs if r.type != "s"]
        inodes = Counter(r.inode for r in recs if r.type == "f")
        items: list[Item] = []
        for r in recs:
            ap = archive_path(root, r.rel)
            old = prev.by_path(ap)
            items.append(Item(ap, r, old, self._classify(r, old, inodes[r.inode] > 1
                                                         if r.type == "f" else False)))
        items.sort(key=lambda it: canonical_key(it.apath))
        # Hard links: tar writes the first name of an inode as a file and the
        # rest as links to it, so a group is copied whole or fetched whole.
        touched = {it.rec.inode for it in items
                   if it.rec.type == "f" and inodes[it.rec.inode] > 1 and it.kind != "copy"}
        for it in items:
            if it.rec.type == "f" and it.rec.inode in touched:
                it.kind = "fetch"
        self.items = items
        self.records = {it.apath: it.rec.raw for it in items}

    @staticmethod
    def _classify(r: Record, old: Entry | None, shared: bool) -> str:
        if old is None or old.record is None or not _compatible(r, old):
            return "fetch"
        if old.record == r.raw:
            return "copy"
        if r.type != "f" or shared or old.type != "0" or old.sha256 is None:
            return "fetch"
        if old.uid != r.uid or old.gid != r.gid:
            return "fetch"  # tar's header names the owner: let the node's tar say it
        if r.size > old.size >= TAIL_MIN:
            return "tail"
        if old.size >= LARGE and r.size >= LARGE and old.block_size and old.block_hashes:
            return "blocks"
        if LINES_MIN <= old.size <= LINES_MAX and r.size <= LINES_MAX:
            return "lines"
        return "fetch"

    def wire_estimate(self) -> tuple[int, int]:
        """(bytes this delta would fetch at most, bytes of the whole tree)."""
        total = sum(it.rec.size for it in self.items if it.rec.type == "f")
        need = 0
        for it in self.items:
            if it.rec.type != "f":
                continue
            if it.kind == "fetch":
                need += it.rec.size
            elif it.kind == "tail" and it.old is not None:
                need += it.rec.size - it.old.size
            elif it.kind == "lines":
                need += it.rec.size // 4
        return need, total


class DeltaRun:
    def __init__(self, node: NodeIO, root: str, plan: DeltaPlan, prev_reader: ArchiveReader,
                 spool: Spool) -> None:
        self.node = node
        self.root = root
        self.plan = plan
        self.prev = prev_reader
        self.spool = spool
        self.fetched: dict[str, Fetched] = {}
        self.warnings: list[str] = []

    # -- refinements (tail, blocks) -----------------------------------------------

    def refine(self) -> None:
        tails = [it for it in self.plan.items if it.kind == "tail"]
        blocks = [it for it in self.plan.items if it.kind == "blocks"]
        if not self.node.python:
            for it in self.plan.items:
                if it.kind == "lines":
                    it.kind = "fetch"
        if not tails and not blocks and not any(it.kind == "lines" for it in self.plan.items):
            return
        for it in blocks:
            assert it.old is not None
            it.bs = it.old.block_size
        if self.node.python:
            if tails or blocks:
                self._py_round1(tails, blocks)
        else:
            for it in tails:
                self._sh_tail(it)
            for it in blocks:
                self._sh_hashes(it)
        if self.node.python:
            blocks = []  # the X requests of round 1 brought the changed blocks
        else:
            blocks = [it for it in blocks if it.kind == "blocks" and it.want]
        if self.node.python:
            # A grown file whose prefix changed may still share most chunks.
            for it in tails:
                if it.kind == "fetch" and it.old is not None and it.old.sha256 is not None \
                        and it.old.size <= LINES_MAX and it.rec.size <= LINES_MAX:
                    it.kind = "lines"
            self._py_round2(blocks, [it for it in self.plan.items if it.kind == "lines"])
        else:
            for it in blocks:
                self._sh_blocks(it)

    def _run_spooled(self, command: str, stdin: bytes, what: str) -> int:
        """Runs a refinement command; its inflated reply lands in the spool.
        Returns the spool offset where the reply starts."""
        start = self.spool.size
        inflater = Inflater(self.spool.append)
        self.node.exec(command, what=what, stdin=stdin, sink=inflater.feed)
        inflater.finish()
        return start

    def _py_round1(self, tails: list[Item], blocks: list[Item]) -> None:
        req = bytearray()
        for it in tails:
            assert it.old is not None and it.old.sha256 is not None
            req += b"T\0%s\0%d\0%s\0" % (self._name(it), it.old.size,
                                           it.old.sha256.hex().encode())
        n = HASH_HEX // 2
        for it in blocks:
            # The old block hashes go to the node, which sends the blocks that
            # differ: one exec and one pass over the file (it was hashes back,
            # then a second exec and pass for the blocks).
            assert it.old is not None
            req += b"X\0%s\0%d\0%s\0" % (self._name(it), it.bs,
                                           b"".join(h[:n] for h in it.old.block_hashes)
                                           .hex().encode())
        cur = _Cursor(self.spool, self._run_spooled(remote.py_refine_command(self.node.path),
                                                    gzip.compress(bytes(req), 1),
                                                    "tails and changed blocks"))
        for it in tails:
            self._tail_reply(it, cur, framed=True)
        for it in blocks:
            self._xblocks_reply(it, cur)
        cur.expect_end()

    def _xblocks_reply(self, it: Item, cur: _Cursor) -> None:
        head = cur.line()
        if head == b"gone":
            return self._race(it, "gone before its blocks were read")
        if head != b"ok":
            raise _bad(it, "a malformed block reply")
        last = -1
        pieces: list[tuple[int, int, int]] = []
        while True:
            line = cur.line()
            if line.startswith(b"E "):
                parts = line[2:].split(b" ")
                if len(parts) != 2:
                    raise _bad(it, "a malformed block reply")
                size = _int(it, parts[0])
                it.node_sha = _sha(it, parts[1])
                break
            parts = line.split(b" ")
            if len(parts) != 3 or parts[0] != b"K":
                raise _bad(it, "a malformed block reply")
            i, n = _int(it, parts[1]), _int(it, parts[2])
            if i <= last or not 0 < n <= it.bs:
                raise _bad(it, f"block {i} out of order or of a wrong size")
            last = i
            pieces.append((i, cur.take(n), n))
        if size != it.rec.size:
            return self._race(it, f"size {size} while the listing says {it.rec.size}")
        for i, _off, n in pieces:
            if i * it.bs >= size:
                raise _bad(it, f"block {i} beyond the end of its {size} bytes")
            if n != min(it.bs, size - i * it.bs):
                return self._race(it, "its blocks changed while they were read")
        it.want = [i for i, _, _ in pieces]
        it.pieces = [(i * it.bs, off, n) for i, off, n in pieces]
        return None

    def _py_round2(self, blocks: list[Item], lines: list[Item]) -> None:
        if not blocks and not lines:
            return
        req = bytearray()
        for it in blocks:
            req += b"B\0%s\0%d\0%s\0" % (self._name(it), it.bs,
                                           ",".join(map(str, it.want)).encode())
        olds: dict[str, list[tuple[int, int]]] = {}
        for it in lines:
            assert it.old is not None
            data = b"".join(self.prev.iter_data(it.old))
            chunks = cdc(data)
            olds[it.apath] = chunks
            sigs = b"".join(hashlib.sha256(data[s:e]).hexdigest()[:16].encode()
                            for s, e in chunks)
            req += b"L\0%s\0-\0%s\0" % (self._name(it), sigs)
        cur = _Cursor(self.spool, self._run_spooled(remote.py_refine_command(self.node.path),
                                                    gzip.compress(bytes(req), 1),
                                                    "changed blocks and chunks"))
        for it in blocks:
            self._blocks_reply(it, cur, framed=True)
        for it in lines:
            self._lines_reply(it, cur, olds[it.apath])
        cur.expect_end()

    def _lines_reply(self, it: Item, cur: _Cursor, old: list[tuple[int, int]]) -> None:
        head = cur.line()
        if head == b"gone":
            return self._race(it, "gone before its chunks were read")
        if head != b"ok":
            raise _bad(it, "a malformed chunk reply")
        size = 0
        while True:
            line = cur.line()
            if line.startswith(b"E "):
                it.node_sha = _sha(it, line[2:])
                break
            parts = line.split(b" ")
            if len(parts) != 2 or parts[0] not in (b"R", b"D"):
                raise _bad(it, "a malformed chunk reply")
            k = _int(it, parts[1])
            if parts[0] == b"R":
                if k >= len(old):
                    raise _bad(it, f"a reference to chunk {k} of {len(old)}")
                s, e = old[k]
                it.refs.append((s, e, -1))
                size += e - s
            else:
                it.refs.append((cur.take(k), k, 1))
                size += k
        if size != it.rec.size:
            it.refs = []
            return self._race(it, f"{size} bytes rebuilt, the listing says {it.rec.size}")
        return None

    def _sh_tail(self, it: Item) -> None:
        assert it.old is not None and it.old.sha256 is not None
        stdin = b"%d\n%s\n%s" % (it.old.size, it.old.sha256.hex().encode(), self._name(it))
        cur = _Cursor(self.spool, self._run_spooled(remote.sh_tail_command(self.node.path),
                                                    stdin, "tail"))
        self._tail_reply(it, cur, framed=False)

    def _sh_hashes(self, it: Item) -> None:
        stdin = b"%d\n%s" % (it.bs, self._name(it))
        cur = _Cursor(self.spool, self._run_spooled(remote.sh_hashes_command(self.node.path),
                                                    stdin, "block hashes"))
        self._hashes_reply(it, cur, framed=False)

    def _sh_blocks(self, it: Item) -> None:
        stdin = b"%d\n%s\n%s" % (it.bs, " ".join(map(str, it.want)).encode(), self._name(it))
        cur = _Cursor(self.spool, self._run_spooled(remote.sh_blocks_command(self.node.path),
                                                    stdin, "changed blocks"))
        self._blocks_reply(it, cur, framed=False)

    def _name(self, it: Item) -> bytes:
        return it.apath.encode("utf-8", "surrogateescape")

    def _race(self, it: Item, why: str) -> None:
        log.info("%s: %s; fetching it whole", it.apath, why)
        it.kind = "fetch"
        it.pieces = []
        it.want = []
        it.refs = []

    def _tail_reply(self, it: Item, cur: _Cursor, *, framed: bool) -> None:
        assert it.old is not None
        head = cur.line()
        if head in (b"gone", b"mismatch"):
            return self._race(it, f"tail refused ({head.decode()})")
        pos = it.old.size
        if framed:
            if head != b"ok":
                raise _bad(it, "a malformed tail reply")
            while True:
                line = cur.line()
                if line.startswith(b"E "):
                    it.node_sha = _sha(it, line[2:])
                    break
                if not line.startswith(b"D "):
                    raise _bad(it, "a malformed tail reply")
                n = _int(it, line[2:])
                it.pieces.append((pos, cur.take(n), n))
                pos += n
        else:
            if not head.startswith(b"ok "):
                raise _bad(it, "a malformed tail reply")
            it.node_sha = _sha(it, head[3:])
            n = cur.rest()
            it.pieces.append((pos, cur.take(n), n))
            pos += n
        if pos != it.rec.size:
            return self._race(it, f"tail ends at {pos}, the listing says {it.rec.size}")
        return None

    def _hashes_reply(self, it: Item, cur: _Cursor, *, framed: bool) -> None:
        assert it.old is not None
        head = cur.line()
        if head == b"gone":
            return self._race(it, "gone before its blocks were hashed")
        parts = head.split(b" ")
        if parts[0] != b"ok" or len(parts) != (3 if framed else 2):
            raise _bad(it, "a malformed block-hash reply")
        size = _int(it, parts[1])
        if framed:
            count = _int(it, parts[2])
            raw = cur.read(count * HASH_HEX)
            hashes = [raw[i:i + HASH_HEX] for i in range(0, len(raw), HASH_HEX)]
        else:
            hashes = []
            for line in cur.read(cur.rest()).split(b"\n"):
                if line:
                    hashes.append(line.split(b" ", 1)[0][:HASH_HEX])
        if len(hashes) != math.ceil(size / it.bs) or any(
                len(h) != HASH_HEX or not set(h) <= _HEX for h in hashes):
            raise _bad(it, f"a block list that disagrees with its size {size}")
        if size != it.rec.size:
            return self._race(it, f"size {size} while the listing says {it.rec.size}")
        old = it.old.block_hashes
        new = [bytes.fromhex(h.decode()) for h in hashes]
        n = HASH_HEX // 2
        it.want = [i for i, h in enumerate(new) if i >= len(old) or old[i][:n] != h]
        if not it.want:
            it.node_sha = None  # content unchanged; checked against the old hash below
            if size == it.old.size:
                it.node_sha = it.old.sha256.hex() if it.old.sha256 else None
        return None

    def _blocks_reply(self, it: Item, cur: _Cursor, *, framed: bool) -> None:
        head = cur.line()
        if head == b"gone":
            return self._race(it, "gone before its blocks were read")
        size = it.rec.size
        wanted = set(it.want)
        expect = {i: min(it.bs, size - i * it.bs) for i in it.want}
        if framed:
            if head != b"ok":
                raise _bad(it, "a malformed block reply")
            got: set[int] = set()
            short = False
            while True:
                line = cur.line()
                if line.startswith(b"E "):
                    it.node_sha = _sha(it, line[2:])
                    break
                parts = line.split(b" ")
                if len(parts) != 3 or parts[0] != b"K":
                    raise _bad(it, "a malformed block reply")
                i, n = _int(it, parts[1]), _int(it, parts[2])
                if i * it.bs >= size:
                    raise _bad(it, f"block {i} beyond the end of its {size} bytes")
                if i not in wanted or i in got or n > it.bs:
                    raise _bad(it, f"block {i} that was not asked for or is oversized")
                got.add(i)
                if n != expect[i]:
                    short = True
                it.pieces.append((i * it.bs, cur.take(n), n))
            if short or got != wanted:
                return self._race(it, "its blocks changed while they were read")
        else:
            if not head.startswith(b"ok "):
                raise _bad(it, "a malformed block reply")
            it.node_sha = _sha(it, head[3:])
            total = cur.rest()
            if total != sum(expect.values()):
                cur.take(total)
                return self._race(it, "its blocks changed while they were read")
            for i in it.want:
                it.pieces.append((i * it.bs, cur.take(expect[i]), expect[i]))
        it.pieces.sort()
        return None

    # -- the tar fetch ----------------------------------------------------------------

    def fetch(self, items: list[Item]) -> None:
        """One tar stream of just these names, spooled and split into entries."""
        if not items:
            return
        wanted = {it.apath for it in items}
        names = b"".join(self._name(it) + b"\0" for it in items)
        base = self.spool.size
        spool = self.spool
        got = self.fetched
        seen: set[str] = set()

        class Handler:
            def entry(self, info: HeaderInfo, header: bytes, h_off: int) -> None:
                if info.path not in wanted or info.path in seen:
                    raise InvalidArchive(f"the node sent {info.path[:200]!r}, which was not "
                                         "asked for (or twice)")
                if info.type == "1" and info.link not in seen:
                    raise InvalidArchive(f"the node sent a hard link {info.path[:200]!r} to "
                                         "a name outside this stream")
                seen.add(info.path)
                got[info.path] = Fetched(header, base + h_off + len(header), info)

            def data(self, chunk: bytes) -> None:
                pass

            def entry_end(self, padding: bytes) -> None:
                pass

        scanner = TarScanner(Handler())  # type: ignore[arg-type]

        def out(raw: bytes) -> None:
            spool.append(raw)
            scanner.feed(raw)

        inflater = Inflater(out)
        res = self.node.exec(remote.fetch_command(self.node.path, pigz=self.node.pigz),
                             what="tar", stdin=names, sink=inflater.feed, ok=(0, 1, 2))
        inflater.finish()
        scanner.finish()
        if res.exit_status == 2 and not _only_vanished(res.stderr_text):
            raise RemoteCommandFailed(str(self.node.path), "tar", 2, res.stderr_text)
        text = res.stderr_text.strip()
        if text:
            self.warnings.append(text)

    # -- compose and verify -------------------------------------------------------------

    def compose(self, out: Callable[[bytes], None], level: int | None,
                copied: Callable[[int, bytes], None] | None = None,
                ) -> tuple[ArchiveIndex, list[Item], dict[str, int]]:
        """Writes the new archive; returns its index, the reassembled files
        whose hash differs from the node's, and the composer's stats.
        ``copied(offset, data)`` receives the previous archive's members
        reused verbatim (the store writer's ``copy_range``), ``out`` the rest."""
        # The archive writer hashes the archive as it writes: once is enough.
        composer = Composer(out, self.prev, level=level, hash_archive=False, copied=copied)
        vanished = []
        run: list[Entry] = []  # consecutive unchanged entries: copied as whole members
        for it in self.plan.items:
            if it.kind == "copy":
                assert it.old is not None
                run.append(it.old)
                continue
            if run:
                composer.copy_run(run)
                run = []
            if it.kind == "fetch":
                fe = self.fetched.get(it.apath)
                if fe is None:
                    vanished.append(it.apath)
                    continue
                size = fe.info.size if fe.info.type not in "123456" else 0
                composer.add(fe.header, self.spool.chunks(fe.d_off, size))
            elif it.kind == "lines":
                assert it.old is not None
                header = make_header(it.old, size=it.rec.size, mtime=it.rec.mtime_s,
                                     mode=it.rec.mode)
                composer.add(header, self._rebuilt(it))
            else:
                assert it.old is not None
                header = make_header(it.old, size=it.rec.size, mtime=it.rec.mtime_s,
                                     mode=it.rec.mode)
                if it.kind == "blocks" and not it.pieces and it.rec.size == it.old.size:
                    composer.copy(it.old, header)  # touched only: same blocks, same bytes
                else:
                    composer.patch(it.old, header, it.rec.size, self._pieces(it))
        if run:
            composer.copy_run(run)
        index = composer.finish(self.plan.records)
        bad = []
        for it in self.plan.items:
            if it.kind in ("tail", "blocks", "lines"):
                e = index.by_path(it.apath)
                if e is None or e.sha256 is None or e.sha256.hex() != it.node_sha:
                    bad.append(it)
        self.vanished = vanished
        return index, bad, composer.stats()

    def _rebuilt(self, it: Item) -> Iterator[bytes]:
        assert it.old is not None
        old = b"".join(self.prev.iter_data(it.old))
        for a, b, kind in it.refs:
            if kind < 0:
                yield old[a:b]
            else:
                yield from self.spool.chunks(a, b)

    def _pieces(self, it: Item) -> Iterator[tuple[int, bytes]]:
        for file_off, spool_off, n in it.pieces:
            pos = 0
            for chunk in self.spool.chunks(spool_off, n):
                yield file_off + pos, chunk
                pos += len(chunk)

    def check(self, index: ArchiveIndex) -> None:
        """The composed archive against the node's listing: a copied entry
        that disagrees is a bug (refused); a fetched one changed while the
        backup ran (a warning, as tar's exit 1)."""
        for path in self.vanished:
            self.warnings.append(f"{path}: vanished before it could be read")
        by_path = {it.apath: it for it in self.plan.items}
        for e in index.entries:
            it = by_path.get(e.path)
            if it is None:
                raise InvalidArchive(f"the composed archive holds {e.path[:200]!r}, "
                                     "which the node did not list")
            why = _disagrees(it.rec, e)
            if why is None:
                continue
            if it.kind == "fetch":
                self.warnings.append(f"{e.path}: changed while the backup ran ({why})")
            else:
                raise InvalidArchive(f"the composed entry {e.path[:200]!r} disagrees with "
                                     f"the node's listing ({why})")


def _disagrees(rec: Record, e: Entry) -> str | None:
    if not _compatible(rec, e):
        return f"type {e.type} vs {rec.type}"
    if (e.mode & 0o7777) != rec.mode:
        return f"mode {e.mode & 0o7777:o} vs {rec.mode:o}"
    if rec.type == "f" and e.type != "1" and e.size != rec.size:
        return f"size {e.size} vs {rec.size}"
    if rec.type == "l" and e.link.encode("utf-8", "surrogateescape") != rec.link:
        return "link target"
    if rec.type in ("f", "l") and int(e.mtime) != rec.mtime_s:
        return f"mtime {int(e.mtime)} vs {rec.mtime_s}"
    return None


def _only_vanished(stderr: str) -> bool:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return bool(lines) and all(
        "No such file or directory" in ln or "Exiting with failure status" in ln
        or "file changed as we read it" in ln for ln in lines)


class _Cursor:
    """Reads a reply back from the spool."""

    def __init__(self, spool: Spool, start: int) -> None:
        self.spool = spool
        self.pos = start
        self.end = spool.size

    def line(self, limit: int = 200) -> bytes:
        data = self.spool.read(self.pos, min(limit, self.end - self.pos))
        nl = data.find(b"\n")
        if nl < 0:
            raise InvalidArchive("the node's reply is cut short or malformed")
        self.pos += nl + 1
        return data[:nl]

    def take(self, n: int) -> int:
        """Skips ``n`` payload bytes; returns their spool offset."""
        if n < 0 or self.pos + n > self.end:
            raise InvalidArchive("the node's reply is shorter than it announced")
        off = self.pos
        self.pos += n
        return off

    def read(self, n: int) -> bytes:
        return self.spool.read(self.take(n), n)

    def rest(self) -> int:
        return self.end - self.pos

    def expect_end(self) -> None:
        if self.pos != self.end:
            raise InvalidArchive("the node's reply holds more than was asked for")


def _bad(it: Item, what: str) -> InvalidArchive:
    return InvalidArchive(f"the node sent {what} for {it.apath[:200]!r}")


def _int(it: Item, raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 18:
        raise _bad(it, "a malformed number")
    return int(raw)


def _sha(it: Item, raw: bytes) -> str:
    raw = raw.strip()
    if len(raw) != 64 or not set(raw) <= _HEX:
        raise _bad(it, "a malformed sha256")
    return raw.decode()
