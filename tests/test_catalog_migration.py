"""An older catalog is upgraded in place when the server opens it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from storage.catalog import SCHEMA_VERSION, Catalog

ADDED = {"nodes": ("last_error_code", "forgotten_at"),
         "archives": ("deleted_reason", "verified_at", "verify_status", "verify_error")}


def test_a_version_1_catalog_gains_the_new_columns(tmp_path: Path) -> None:
    db = tmp_path / "catalog.db"
    cat = Catalog(db)
    n = cat.ensure_node("u", "127.0.0.1", 22)
    cat.close()
    with sqlite3.connect(db) as conn:  # make it look like a version-1 catalog
        for table, cols in ADDED.items():
            for col in cols:
                conn.execute(f"ALTER TABLE {table} DROP COLUMN {col}")
        conn.execute("UPDATE schema_version SET version = 1")
    cat = Catalog(db)
    try:
        assert cat.get_node(n.id).address == "u@127.0.0.1:22"
        assert cat.forget_node(n.id).forgotten_at is not None
    finally:
        cat.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        for table, cols in ADDED.items():
            have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            assert set(cols) <= have
