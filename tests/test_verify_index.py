"""`backhaul verify` checks each archive's index against the archive: a
damaged, missing or wrong index of a good archive is rebuilt and reported;
that of a corrupt archive is reported, never rebuilt from the bad bytes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from conftest import LiveServer
from test_verify_cmd import cli, file_of, flip_byte, three_archives

from fixtures.sshd.launcher import SSHD
from storage.tgz import ArchiveIndex


def index_of(archive: Path) -> Path:
    return archive.with_name(archive.name[: -len(".tar.gz")] + ".index")


def verify(srv: LiveServer, *ids: int) -> dict[int, dict]:
    answer = srv.api("POST", "/archives/verify", json={"archive_ids": list(ids)}).json()
    return {c["archive_id"]: c for c in answer["results"]}


def test_a_damaged_or_missing_index_is_rebuilt_and_reported(live: LiveServer, node: SSHD,
                                                            tmp_path: Path) -> None:
    _t, backups = three_archives(live, node, tmp_path / "app")
    garbled, missing, wrong = (file_of(live, b) for b in backups)
    want = {p: index_of(p).read_bytes() for p in (garbled, missing, wrong)}
    ids = [b["id"] for b in backups]

    fine = verify(live, *ids)
    assert all((c["status"], c["index_ok"], c["index_rebuilt"]) == ("ok", True, False)
               for c in fine.values()), fine

    index_of(garbled).write_bytes(b"\x1f\x8b" + bytes(100))
    index_of(missing).unlink()
    # parses and tiles, but places an entry's header where another header is
    idx = ArchiveIndex.loads(want[wrong])
    a, b = idx.entries[0], idx.entries[1]
    idx.entries[0] = dataclasses.replace(a, header_sha256=b.header_sha256)
    index_of(wrong).write_bytes(idx.dumps())

    res = cli(live, "--json", "verify", *map(str, ids))
    assert res.exit_code == 0, res.output
    got = {c["archive_id"]: c for c in json.loads(res.stdout)["results"]}
    for aid, why in zip(ids, ("damaged", "missing", "not where the index says"), strict=True):
        c = got[aid]
        assert (c["status"], c["index_ok"], c["index_rebuilt"]) == ("ok", False, True), c
        assert why in c["note"] and "rebuilt from the archive" in c["note"], c
        assert c["error"] is None
    for p in (garbled, missing, wrong):  # whole again, as the archive says (the node's
        # listing records are not in the archive: a rebuilt index has none)
        assert ArchiveIndex.loads(index_of(p).read_bytes()).entries == [
            dataclasses.replace(e, record=None)
            for e in ArchiveIndex.loads(want[p]).entries]

    again = verify(live, *ids)
    assert all((c["index_ok"], c["index_rebuilt"], c["note"]) == (True, False, None)
               for c in again.values()), again

    index_of(missing).unlink()
    res = cli(live, "verify", str(ids[1]))
    assert res.exit_code == 0, res.output
    assert " rebuilt " in res.stdout.splitlines()[1]
    assert f"note: archive {ids[1]}: index: the index is missing" in res.stderr


def test_the_index_of_a_corrupt_archive_is_reported_not_rebuilt(live: LiveServer, node: SSHD,
                                                                tmp_path: Path) -> None:
    _t, (_a, _b, cut) = three_archives(live, node, tmp_path / "app")
    archive = file_of(live, cut)
    flip_byte(archive)
    before = index_of(archive).read_bytes()
    c = verify(live, cut["id"])[cut["id"]]
    assert (c["status"], c["index_ok"], c["index_rebuilt"]) == ("corrupt", False, False), c
    assert "index: the index names another archive sha256" in c["error"]
    assert index_of(archive).read_bytes() == before
