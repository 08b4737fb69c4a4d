"""``backhauld migrate [--catalog-url URL]``: upgrade the catalog's schema to
this code's head revision and say what was done. backhauld does the same at
every start; the command lets an operator do it ahead of a rollout, or check a
catalog without starting a server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from orchestrator.settings import ENV_PREFIX


def migrate(argv: Sequence[str]) -> int:
    import os

    parser = argparse.ArgumentParser(
        prog="backhauld migrate",
        description="Upgrade the catalog's schema to this backhaul's (Alembic).")
    parser.add_argument("--catalog-url", default=None, metavar="URL",
                        help=f"catalog database (env {ENV_PREFIX}CATALOG_URL; default "
                             "catalog.db in the data dir)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help=f"data directory (env {ENV_PREFIX}DATA_DIR, "
                             "default ./backhaul-data)")
    args = parser.parse_args(list(argv))
    url = args.catalog_url or os.environ.get(ENV_PREFIX + "CATALOG_URL") or ""
    if not url:
        data_dir = Path(args.data_dir or os.environ.get(ENV_PREFIX + "DATA_DIR")
                        or "./backhaul-data")
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        url = str(data_dir / "catalog.db")
    os.umask(0o077)

    from storage.catalog import Catalog
    from storage.dialect import redacted
    from storage.errors import StorageError

    try:
        catalog = Catalog(url, migrate=False)
        try:
            before, now = catalog.upgrade()
        finally:
            catalog.close()
    except StorageError as exc:
        print(f"backhauld migrate: error: {exc.message}", file=sys.stderr)
        return 1
    where = redacted(catalog.url)
    if before == now:
        print(f"catalog {where} is at schema revision {now}: nothing to do")
    else:
        was = before or "no revision (new, or made before Alembic)"
        print(f"catalog {where} upgraded from {was} to schema revision {now}")
    return 0
