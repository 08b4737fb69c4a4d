"""Remake catalog_release{1,2}.sql: catalogs written by the catalog code of
releases 1 (commit ad314b5, schema_version 1) and 2 (commit 98e420a,
schema_version 2), dumped as SQL. Run from the repository root (needs its git
history): ``python tests/data/make_release_catalogs.py``."""

from __future__ import annotations

import datetime as dt
import importlib.util
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RELEASES = {1: "ad314b5", 2: "98e420a"}


def load(commit: str):  # noqa: ANN201 - an old module
    src = subprocess.run(["git", "show", f"{commit}:storage/catalog.py"], cwd=ROOT,
                         capture_output=True, check=True, text=True).stdout
    f = Path(tempfile.mkdtemp()) / f"catalog_{commit}.py"
    f.write_text(src)
    spec = importlib.util.spec_from_file_location(f"old_catalog_{commit}", f)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make(release: int, commit: str) -> Path:
    old = load(commit)
    db = Path(tempfile.mkdtemp()) / "catalog.db"
    t0 = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)
    c = old.Catalog(db, clock=lambda: t0)
    n = c.ensure_node("backup", "127.0.0.1", 2222)
    c.pin_host_key(n.id, "ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIExample", "SHA256:example")
    t = c.add_target(n.id, "/srv/data", 60, 10)
    t2 = c.add_target(n.id, "/etc", 1440, 3)
    r = c.start_run(t.id, "scheduled", scheduled_at=t0)
    a = c.commit_archive(r, t.id, created_at=t0, size=1234, sha256="ab" * 32,
                         file_name="1/20261120T120000Z-1.tar.gz", fingerprint="cd" * 32,
                         bytes_transferred=1200, warnings=None)
    r2 = c.start_run(t2.id, "manual")
    c.fail_run(r2, "unreachable", "no route")
    c.unregister_target(t2.id)
    if release == 2:
        c.set_target_options(t.id, pre_command="pg_dump -f /srv/data/db.sql",
                             ping_url="http://127.0.0.1:9/ping")
        c.record_verification(a, "ok", None)
    c.close()
    con = sqlite3.connect(db)
    assert con.execute("SELECT version FROM schema_version").fetchone()[0] == release
    out = ROOT / "tests" / "data" / f"catalog_release{release}.sql"
    head = (f"-- A catalog written by release {release} (storage/catalog.py at {commit}, "
            f"schema_version {release}).\n")
    out.write_text(head + "\n".join(con.iterdump()) + "\n")
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    for rel, sha in RELEASES.items():
        print(make(rel, sha))
