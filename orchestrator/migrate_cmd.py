"""``backhauld migrate [--catalog-url URL]``: upgrade the catalog's schema to
this code's head revision and say what was done. backhauld does the same at
every start; the command lets an operator do it ahead of a rollout, or check a
catalog without starting a server.

``backhauld migrate --from-data-dir DIR --catalog-url URL --store-url URL``
instead copies an embedded install into PostgreSQL + S3
(``orchestrator/migrate_copy.py``)."""

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
        description="Upgrade the catalog's schema to this backhaul's (Alembic). With "
                    "--from-data-dir: copy an embedded install (SQLite catalog + archive "
                    "directory) into the catalog of --catalog-url (e.g. PostgreSQL) and the "
                    "store of --store-url (e.g. S3), leaving the source untouched.")
    parser.add_argument("--catalog-url", default=None, metavar="URL",
                        help=f"catalog database (env {ENV_PREFIX}CATALOG_URL; default "
                             "catalog.db in the data dir); with --from-data-dir, the "
                             "destination catalog the install is copied into")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help=f"data directory (env {ENV_PREFIX}DATA_DIR, "
                             "default ./backhaul-data)")
    copy = parser.add_argument_group(
        "copying an embedded install (--catalog-url and --store-url name the destination)")
    copy.add_argument("--from-data-dir", default=None, metavar="DIR",
                      help="data dir of the install to copy (its catalog.db, archives/ and "
                           "jobs.db); no backhauld may run on it")
    copy.add_argument("--from-catalog-url", default=None, metavar="URL",
                      help="the source catalog when it is not DIR/catalog.db (sqlite:///FILE)")
    copy.add_argument("--store-url", default=None, metavar="URL",
                      help=f"destination archive store, s3://BUCKET/PREFIX (env "
                           f"{ENV_PREFIX}STORE_URL); credentials from the standard AWS "
                           "variables or credentials file")
    copy.add_argument("--store-endpoint", default=None, metavar="URL",
                      help=f"S3 endpoint URL (env {ENV_PREFIX}STORE_ENDPOINT)")
    copy.add_argument("--store-region", default=None, metavar="REGION",
                      help=f"S3 region (env {ENV_PREFIX}STORE_REGION)")
    copy.add_argument("--resume", action="store_true",
                      help="finish an interrupted copy of the same install: archives "
                           "already copied are skipped, the catalog is copied afresh")
    args = parser.parse_args(list(argv))
    if args.from_data_dir is not None:
        return _copy(args)
    given = [f for f, v in (("--from-catalog-url", args.from_catalog_url),
                            ("--store-url", args.store_url),
                            ("--store-endpoint", args.store_endpoint),
                            ("--store-region", args.store_region),
                            ("--resume", args.resume)) if v]
    if given:
        parser.error(f"{given[0]} goes with --from-data-dir (copying an install)")
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


def _copy(args: argparse.Namespace) -> int:
    """``--from-data-dir``: copy the install; one line and exit 1 on any error."""
    import logging
    import os

    from sqlalchemy.exc import SQLAlchemyError

    from orchestrator.migrate_copy import CopyPlan, MigrateError, copy_install, human
    from storage.dialect import DatabaseUnavailable, describe, normalise_url, redacted
    from storage.errors import StorageError

    os.umask(0o077)
    # Progress is ours; library chatter (Alembic, botocore) stays out of it.
    logging.basicConfig(level=logging.WARNING, format="migrate: %(levelname)s %(message)s")
    for noisy in ("alembic", "botocore", "boto3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def env(name: str) -> str:
        return os.environ.get(ENV_PREFIX + name, "")

    plan = CopyPlan(
        from_data_dir=Path(args.from_data_dir),
        from_catalog_url=args.from_catalog_url or "",
        catalog_url=args.catalog_url or env("CATALOG_URL"),
        store_url=args.store_url or env("STORE_URL"),
        store_endpoint=args.store_endpoint or env("STORE_ENDPOINT"),
        store_region=args.store_region or env("STORE_REGION"),
        resume=args.resume)
    try:
        report = copy_install(plan, sys.stderr)
    except (MigrateError, StorageError, DatabaseUnavailable) as exc:
        print(f"backhauld migrate: error: {exc.message}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        print(f"backhauld migrate: error: database error: {describe(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"backhauld migrate: error: {exc}", file=sys.stderr)
        return 1
    rows = ", ".join(f"{n} {name}" for name, n in report.rows.items())
    jobs = "" if report.jobs is None else f", {report.jobs} scheduler jobs"
    where = redacted(normalise_url(plan.catalog_url))
    print(f"copied {plan.from_data_dir} to catalog {where} and store "
          f"{plan.store_url}: {report.copied} archives copied ({human(report.bytes_copied)}), "
          f"{report.skipped} already there, {len(report.failed)} not copied; "
          f"catalog rows: {rows}{jobs}")
    if report.failed:
        for aid, why in report.failed:
            print(f"backhauld migrate: error: archive {aid} not copied: {why}", file=sys.stderr)
        print(f"backhauld migrate: error: {len(report.failed)} archives were not copied "
              "(listed in the new catalog as corrupt; the originals stay in the source)",
              file=sys.stderr)
        return 1
    return 0
