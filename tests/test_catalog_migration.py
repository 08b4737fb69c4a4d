"""Catalog schema migrations (Alembic): a new catalog gets exactly the schema
the code declares on both engines; catalogs written by releases 1 and 2
(checked-in dumps made with their code, see tests/data/) upgrade in place; a
catalog newer than the code is refused in one line."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from fixtures.postgres import PostgresCluster
from storage import migrations
from storage.catalog import Catalog, metadata
from storage.errors import CatalogTooNew

DATA = Path(__file__).parent / "data"
# What release 1 lacked: schema 2's columns, the target options table, an index.
ADDED_IN_2 = {"nodes": {"last_error_code", "forgotten_at"},
              "archives": {"deleted_reason", "verified_at", "verify_status", "verify_error"}}


def schema_drift(cat: Catalog) -> list:
    # The run queue's tables (revision 0004, PostgreSQL) are Procrastinate's
    # schema, not the catalog's metadata: tests/test_dispatch_queue.py checks them.
    def ours(name: str | None, type_: str, parents: dict) -> bool:
        return not (type_ == "table" and (name or "").startswith("procrastinate_"))
    with cat.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"include_name": ours}),
                                metadata)


def load_release(tmp_path: Path, release: int) -> Path:
    db = tmp_path / f"release{release}.db"
    with sqlite3.connect(db) as conn:
        conn.executescript((DATA / f"catalog_release{release}.sql").read_text())
    return db


def test_a_new_catalog_has_exactly_the_declared_schema(catalog_url: str) -> None:
    cat = Catalog(catalog_url)
    try:
        assert schema_drift(cat) == []
        with cat.engine.connect() as conn:
            assert migrations.current(conn) == migrations.head()
            assert conn.execute(sa.text("SELECT version FROM schema_version")).scalars().all() \
                == [100]
    finally:
        cat.close()


@pytest.mark.parametrize("release", [1, 2])
def test_a_release_catalog_upgrades_in_place(tmp_path: Path, release: int) -> None:
    db = load_release(tmp_path, release)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (release,)
        missing = {t: cols - {r[1] for r in conn.execute(f"PRAGMA table_info({t})")}
                   for t, cols in ADDED_IN_2.items()}
        assert any(missing.values()) == (release == 1)
    cat = Catalog(db)
    try:
        assert schema_drift(cat) == []
        # every row the old release wrote is still there and usable
        (node,) = cat.list_nodes()
        assert node.address == "backup@127.0.0.1:2222"
        assert node.host_key_fingerprint == "SHA256:example"
        (target,) = cat.list_targets()
        assert (target.path, target.every_minutes, target.keep) == ("/srv/data", 60, 10)
        assert [t.path for t in cat.list_targets(active_only=False)] == ["/srv/data", "/etc"]
        (archive,) = cat.list_archives(target.id)
        assert (archive["size"], archive["sha256"]) == (1234, "ab" * 32)
        assert archive["verify_status"] == ("ok" if release == 2 else None)
        assert {r["status"] for r in cat.list_runs()} == {"success", "failed"}
        opts = cat.target_options([target.id])
        assert (target.id in opts) == (release == 2)
        # and the new columns work
        assert cat.forget_node(node.id).forgotten_at is not None
        assert cat.set_target_options(target.id, post_command="true").post_command == "true"
    finally:
        cat.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() \
            == [(migrations.head(),)]
        # releases 1 and 2 refuse any version above theirs: they will not open it now
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(100,)]


def test_opening_an_upgraded_catalog_again_changes_nothing(tmp_path: Path) -> None:
    db = load_release(tmp_path, 1)
    first = Catalog(db)
    assert first.upgrade() == (migrations.head(), migrations.head())
    first.close()
    assert Catalog(db).upgrade() == (migrations.head(), migrations.head())


def _stamp_future(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'f00dfeed'"))
    engine.dispose()


def test_a_catalog_newer_than_the_code_is_refused(catalog_url: str) -> None:
    Catalog(catalog_url).close()
    _stamp_future(catalog_url)
    with pytest.raises(CatalogTooNew) as err:
        Catalog(catalog_url)
    assert "f00dfeed" in err.value.message and "upgrade backhaul" in err.value.message
    assert err.value.code == "catalog_too_new"


def test_an_unknown_pre_alembic_version_is_refused(tmp_path: Path) -> None:
    db = load_release(tmp_path, 2)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE schema_version SET version = 7")
    with pytest.raises(CatalogTooNew, match="schema_version 7"):
        Catalog(db)


def _migrate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", "migrate", *args],
                          capture_output=True, text=True, timeout=60)


def test_backhauld_migrate_upgrades_then_has_nothing_to_do(pg: PostgresCluster) -> None:
    url = pg.create_database()
    first = _migrate("--catalog-url", url)
    assert first.returncode == 0, first.stderr
    assert f"to schema revision {migrations.head()}" in first.stdout
    assert pg.password not in first.stdout + first.stderr
    again = _migrate("--catalog-url", url)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_backhauld_migrate_upgrades_a_release_1_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    load_release(tmp_path, 1).rename(data / "catalog.db")
    done = _migrate("--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    assert "upgraded from no revision" in done.stdout
    cat = Catalog(data / "catalog.db", migrate=False)
    try:
        assert schema_drift(cat) == []
    finally:
        cat.close()


def test_backhauld_migrate_refuses_a_newer_catalog_in_one_line(catalog_url: str) -> None:
    Catalog(catalog_url).close()
    _stamp_future(catalog_url)
    done = _migrate("--catalog-url", catalog_url)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "newer than this backhaul" in done.stderr


def test_an_installed_package_carries_every_migration() -> None:
    """The revisions are package data: a file the patterns miss would be
    missing from a wheel, and a catalog could not be brought to head."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parent.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["storage.migrations"]
    here = root / "storage" / "migrations"
    files = [p.relative_to(here).as_posix() for p in here.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    assert "versions/0001_baseline.py" in files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert missing == []


@pytest.mark.parametrize("release", [1, 2])
def test_an_earlier_release_refuses_a_migrated_catalog(tmp_path: Path, release: int) -> None:
    """The fence works on the real code of those releases (from git history):
    once Alembic manages a catalog, release 1 or 2 started on it by mistake
    stops instead of writing to a schema it does not know."""
    sys.path.insert(0, str(DATA))
    try:
        import make_release_catalogs as releases
    finally:
        sys.path.remove(str(DATA))
    commit = releases.RELEASES[release]
    known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"],
                           cwd=releases.ROOT, capture_output=True)
    if known.returncode != 0:
        pytest.skip(f"release {release}'s commit {commit} is not in this clone's history")
    old = releases.load(commit)
    db = load_release(tmp_path, release)
    Catalog(db).close()
    with pytest.raises(Exception, match="newer than this backhaul") as err:
        old.Catalog(db)
    assert err.value.__class__.__name__ == "CatalogError"
