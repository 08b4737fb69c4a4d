"""The catalog contract: the same suite on SQLite and on a real PostgreSQL
(the ``catalog_url`` fixture runs each test on both)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_engine

from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey
from storage.catalog import Catalog, Node
from storage.errors import NotFound, TargetExists
from storage.monitoring import target_statuses

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def tick(self, seconds: float = 1) -> dt.datetime:
        self.now += dt.timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cat(catalog_url: str, clock: Clock) -> Iterator[Catalog]:
    c = Catalog(catalog_url, clock=clock)
    yield c
    c.close()


def node(cat: Catalog, host: str = "127.0.0.1", port: int = 22, user: str = "u") -> Node:
    return cat.ensure_node(user, host, port)


def backup(cat: Catalog, target_id: int, clock: Clock, size: int = 100,
           fingerprint: str = "f" * 64) -> int:
    run = cat.start_run(target_id, "manual")
    return cat.commit_archive(run, target_id, created_at=clock.tick(), size=size,
                              sha256="a" * 64, file_name=f"{target_id}/{run}.tar.gz",
                              fingerprint=fingerprint, bytes_transferred=size, warnings=None)


# -- nodes ----------------------------------------------------------------------


def test_nodes_are_unique_per_address_and_keep_their_fields(cat: Catalog, clock: Clock) -> None:
    a = node(cat)
    assert node(cat).id == a.id
    b = node(cat, "::1", 2222, "backup")
    assert b.id != a.id and b.address == "backup@[::1]:2222"
    assert a.created_at == T0 and a.created_at.tzinfo is dt.UTC
    assert a.reachable is None and a.probe_attempts == 0
    assert [n.id for n in cat.find_node(None, "127.0.0.1", 22)] == [a.id]
    assert cat.find_node("other", "127.0.0.1", 22) == []
    with pytest.raises(NotFound):
        cat.get_node(9999)


def test_host_keys_pin_once_and_can_be_expected(cat: Catalog) -> None:
    n = node(cat)
    assert cat.pin_host_key(n.id, "ssh-ed25519", "AAAA", "SHA256:one") is True
    assert cat.pin_host_key(n.id, "ssh-ed25519", "BBBB", "SHA256:two") is False
    assert cat.get_node(n.id).host_key_fingerprint == "SHA256:one"
    cat.expect_host_key(n.id, "SHA256:three")
    got = cat.get_node(n.id)
    assert (got.host_key_b64, got.host_key_fingerprint) == (None, "SHA256:three")
    cat.expect_host_key(n.id, None)
    cat.set_host_key_expected(n.id, "SHA256:four")
    cat.set_host_key_expected(n.id, "SHA256:five")  # one already expected: kept
    assert cat.get_node(n.id).host_key_fingerprint == "SHA256:four"


def test_reachability_and_probes(cat: Catalog, clock: Clock) -> None:
    n = node(cat)
    down = cat.node_unreachable(n.id, "refused", next_probe_at=clock.now + dt.timedelta(
        seconds=30), probe_attempts=1, code="unreachable")
    assert (down.reachable, down.unreachable_since, down.probe_attempts) == (False, T0, 1)
    clock.tick(60)
    again = cat.node_unreachable(n.id, "still refused", probe_attempts=2)
    assert again.unreachable_since == T0  # the first time it went away stays
    assert again.last_error == "still refused" and again.probe_attempts == 2
    cat.node_error(n.id, "host_key_mismatch", "key changed")
    assert cat.get_node(n.id).last_error_code == "host_key_mismatch"
    cat.node_reachable(n.id)
    up = cat.get_node(n.id)
    assert (up.reachable, up.unreachable_since, up.last_error, up.last_seen_at) == \
        (True, None, None, clock.now)


def test_forget_and_delete_nodes(cat: Catalog) -> None:
    used, unused = node(cat), node(cat, port=23)
    cat.add_target(used.id, "/srv", 5, 10)
    assert cat.delete_node_if_unused(used.id) is False
    assert cat.delete_node_if_unused(unused.id) is True
    with pytest.raises(NotFound):
        cat.get_node(unused.id)
    cat.forget_node(used.id)
    assert cat.list_nodes() == []
    assert [n.id for n in cat.list_nodes(include_forgotten=True)] == [used.id]
    assert node(cat).forgotten_at is None  # registering it again brings it back
    assert [n.id for n in cat.list_nodes()] == [used.id]


# -- targets --------------------------------------------------------------------


def test_one_active_registration_per_node_and_path(cat: Catalog, clock: Clock) -> None:
    n = node(cat)
    t = cat.add_target(n.id, "/srv/app", 5, 10)
    with pytest.raises(TargetExists) as err:
        cat.add_target(n.id, "/srv/app", 60, 3)
    assert err.value.target_id == t.id
    with pytest.raises(NotFound):
        cat.add_target(9999, "/srv/app", 5, 10)
    clock.tick()
    gone = cat.unregister_target(t.id)
    assert gone.unregistered_at == clock.now and not gone.active
    again = cat.add_target(n.id, "/srv/app", 60, 3)
    assert again.id != t.id and (again.every_minutes, again.keep) == (60, 3)
    assert [x.id for x in cat.list_targets()] == [again.id]
    assert [x.id for x in cat.list_targets(active_only=False)] == [t.id, again.id]


def test_target_filters_and_updates(cat: Catalog) -> None:
    a, b = node(cat), node(cat, "127.0.0.2", 2222, "backup")
    ta = cat.add_target(a.id, "/a", 5, 10)
    tb = cat.add_target(b.id, "/b", 5, 10)
    assert [t.id for t in cat.list_targets(node_id=b.id)] == [tb.id]
    assert [t.id for t in cat.list_targets(host="127.0.0.2", port=2222, user="backup")] \
        == [tb.id]
    assert [t.id for t in cat.list_targets(path="/a")] == [ta.id]
    assert cat.list_targets(host="127.0.0.9") == []
    changed = cat.update_target(ta.id, every_minutes=15, keep=2)
    assert (changed.every_minutes, changed.keep) == (15, 2)
    assert cat.get_target(ta.id).node.address == a.address


def test_failures_count_up_and_reset_on_success(cat: Catalog, clock: Clock) -> None:
    t = cat.add_target(node(cat).id, "/a", 5, 10)
    when = clock.now + dt.timedelta(minutes=1)
    assert cat.record_failure(t.id, when) == 1
    assert cat.record_failure(t.id, when) == 2
    assert cat.get_target(t.id).next_retry_at == when
    assert [x.id for x in cat.overdue_targets(t.node.id)] == [t.id]
    cat.set_next_retry(t.id, None)
    backup(cat, t.id, clock)
    got = cat.get_target(t.id)
    assert (got.failures, got.next_retry_at, got.last_fingerprint) == (0, None, "f" * 64)
    assert cat.overdue_targets(t.node.id) == []


def test_target_options(cat: Catalog) -> None:
    t = cat.add_target(node(cat).id, "/a", 5, 10)
    assert cat.target_options([t.id]) == {}
    set1 = cat.set_target_options(t.id, pre_command="pg_dump 'x y'", pre_optional=True)
    assert (set1.pre_command, set1.pre_optional, set1.post_command) == \
        ("pg_dump 'x y'", True, None)
    set2 = cat.set_target_options(t.id, ping_url="http://127.0.0.1:9/p")
    assert (set2.pre_command, set2.ping_url) == ("pg_dump 'x y'", "http://127.0.0.1:9/p")
    with pytest.raises(NotFound):
        cat.set_target_options(9999, pre_command="x")
    with pytest.raises(ValueError):
        cat.set_target_options(t.id, nonsense=1)


# -- runs and archives ----------------------------------------------------------------


def test_every_run_outcome_is_logged(cat: Catalog, clock: Clock) -> None:
    t = cat.add_target(node(cat).id, "/a", 5, 10)
    r1 = cat.start_run(t.id, "scheduled", scheduled_at=T0)
    clock.tick()
    cat.finish_unchanged(r1, t.id, "e" * 64, 120)
    r2 = cat.start_run(t.id, "manual")
    cat.fail_run(r2, "unreachable", "no route", bytes_transferred=5, warnings="w")
    aid = backup(cat, t.id, clock, size=3 * 2**40)  # bigger than 32 bits
    r4 = cat.start_run(t.id, "retry")
    runs = cat.list_runs(target_ids=[t.id])
    assert [r["id"] for r in runs][0] == r4
    by = {r["id"]: r for r in runs}
    assert (by[r1]["status"], by[r1]["scheduled_at"], by[r1]["bytes_transferred"]) == \
        ("unchanged", T0, 120)
    assert (by[r2]["status"], by[r2]["error_code"], by[r2]["warnings"]) == \
        ("failed", "unreachable", "w")
    success = next(r for r in runs if r["archive_id"] == aid)
    assert success["archive_size"] == 3 * 2**40 and success["status"] == "success"
    assert cat.count_runs(t.id) == 4
    assert [r["id"] for r in cat.list_runs(status="failed")] == [r2]
    assert [r["id"] for r in cat.list_runs(node_ids=[t.node.id], limit=1)] == [r4]
    assert cat.get_run(r2)["path"] == "/a"
    with pytest.raises(NotFound):
        cat.get_run(9999)
    assert cat.interrupt_running() == [r4]
    assert cat.get_run(r4)["status"] == "interrupted"
    assert cat.interrupt_running() == []
    summary = cat.target_summaries([t.id])[t.id]
    assert summary["last_status"] == "interrupted"
    assert summary["archives_kept"] == 1
    assert summary["bytes_kept"] == 3 * 2**40 and type(summary["bytes_kept"]) is int


def test_archives_rotate_verify_and_span_registrations(cat: Catalog, clock: Clock) -> None:
    n = node(cat)
    first = cat.add_target(n.id, "/a", 5, 10)
    a1, a2 = backup(cat, first.id, clock), backup(cat, first.id, clock)
    cat.unregister_target(first.id)
    second = cat.add_target(n.id, "/a", 5, 10)
    a3 = backup(cat, second.id, clock)
    assert [a["id"] for a in cat.list_archives(first.id)] == [a2, a1]
    assert [a["id"] for a in cat.list_archives_of_path(n.id, "/a")] == [a3, a2, a1]
    cat.mark_archives_deleted([a1])
    cat.mark_archives_deleted([a2], reason="purged")
    cat.mark_archives_deleted([a1], reason="purged")  # already gone: unchanged
    assert cat.get_archive(a1)["deleted_reason"] == "rotated"
    assert [a["id"] for a in cat.list_archives(first.id, retained_only=True)] == []
    assert cat.retained_file_names() == {cat.get_archive(a3)["file_name"]}
    with pytest.raises(NotFound):
        cat.get_archive(9999)
    # scrub: due by age, the longest unchecked first
    assert [a["id"] for a in cat.archives_due_for_scrub(clock.tick())] == [a3]
    cat.record_verification(a3, "corrupt", "sha256 differs")
    got = cat.get_archive(a3)
    assert (got["verify_status"], got["verify_error"], got["verified_at"]) == \
        ("corrupt", "sha256 differs", clock.now)
    assert cat.archives_due_for_scrub(clock.now - dt.timedelta(seconds=1)) == []
    rid = cat.record_check_run(second.id, "scrub", archive_id=a3, started_at=clock.now,
                               ok=False, message="CORRUPT")
    assert cat.get_run(rid)["error_code"] == "archive_corrupt"


def test_the_catalog_knows_its_size(cat: Catalog) -> None:
    before = cat.size_bytes()
    assert before > 0
    n = node(cat)
    for i in range(300):
        cat.add_target(n.id, f"/{'x' * 200}/{i}", 5, 10)
    assert cat.size_bytes() > before


def test_status_page_rows(cat: Catalog, clock: Clock) -> None:
    t = cat.add_target(node(cat).id, "/a", 5, 10)
    backup(cat, t.id, clock, size=2**33)
    r = cat.start_run(t.id, "manual")
    cat.fail_run(r, "timeout", "slow")
    (row,) = target_statuses(cat)
    assert (row.id, row.last_status, row.archives_kept, row.bytes_kept) == \
        (t.id, "failed", 1, 2**33)
    assert row.runs == {"success": 1, "failed": 1}


def test_scrub_claims_lease_archives(cat: Catalog, clock: Clock) -> None:
    t = cat.add_target(node(cat).id, "/a", 5, 10)
    a1, a2 = backup(cat, t.id, clock), backup(cat, t.id, clock)
    hour = dt.timedelta(hours=1)
    first = cat.claim_scrub(clock.tick(), lease=hour, limit=1)
    assert [a["id"] for a in first] == [a1]  # the longest unchecked first
    assert [a["id"] for a in cat.claim_scrub(clock.now, lease=hour)] == [a2]
    assert cat.claim_scrub(clock.now, lease=hour) == []  # both leased
    checked = clock.tick()
    cat.record_verification(a1, "ok", None)  # checked: the lease ends with it
    clock.tick(2 * 3600)  # a2's claimer died: its lease ran out
    assert [a["id"] for a in cat.claim_scrub(checked, lease=hour)] == [a2]
    assert [a["id"] for a in cat.claim_scrub(clock.tick(), lease=hour)] == [a1]


# -- the backup engine on each catalog ------------------------------------------------


def test_backup_flow_on_each_catalog(catalog_url: str, tmp_path: Path, server_key: ServerKey,
                                     node: SSHD) -> None:
    """A real backup through the engine: full, unchanged, changed, rotation."""
    e = make_engine(tmp_path / "data", server_key, catalog_url=catalog_url)
    try:
        tree = tmp_path / "tree"
        tree.mkdir()
        (tree / "a.txt").write_text("alpha\n")
        t = e.register(node, tree, keep=1)
        assert e.engine.run(t.id).status == "success"
        assert e.engine.run(t.id).status == "unchanged"
        (tree / "b.txt").write_text("beta\n")
        assert e.engine.run(t.id).status == "success"
        kept = e.catalog.list_archives(t.id, retained_only=True)
        assert len(kept) == 1 and len(e.catalog.list_archives(t.id)) == 2
        assert [p.name for p in e.archive_files()] == [Path(kept[0]["file_name"]).name]
    finally:
        e.pool.close()
        e.catalog.close()
