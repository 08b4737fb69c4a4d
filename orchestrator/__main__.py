"""backhauld: read settings, build the Server, serve the API until SIGTERM/SIGINT."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from orchestrator.sanitize import SafeFormatter
from orchestrator.settings import Settings, build_parser


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("paramiko", "apscheduler", "alembic", "botocore", "boto3", "procrastinate"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["migrate"]:
        from orchestrator.migrate_cmd import migrate
        return migrate(argv[1:])
    if "--version" in argv:
        from orchestrator.server import __version__
        print(f"backhauld {__version__}")
        return 0
    try:
        settings = Settings.load(argv)
    except ValueError as exc:
        build_parser().error(str(exc))
    setup_logging(settings.log_format, settings.log_level)
    # Everything backhauld creates (catalog, job store, archives, their
    # directories, SQLite's -wal/-shm files) is private to its user.
    os.umask(0o077)

    import uvicorn

    from orchestrator.api import create_app
    from orchestrator.errors import ServerError
    from orchestrator.guard import listen_warning
    from orchestrator.server import Server
    from storage.dialect import DatabaseUnavailable
    from storage.errors import StorageError

    server = None
    try:
        server = Server(settings)
        server.start()
    except (ServerError, StorageError, DatabaseUnavailable) as exc:
        # Bad configuration (a database that cannot be reached or refuses us,
        # a catalog newer than this code): one line, nothing left running.
        if server is not None:
            server.stop()
        print(f"backhauld: error: {exc.message}", file=sys.stderr)
        return 1
    host, port = settings.listen
    exposed = listen_warning(host)
    if exposed:
        logging.getLogger(__name__).warning("%s", exposed)
    config = uvicorn.Config(create_app(server), host=host, port=port, log_config=None,
                            access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    logging.getLogger(__name__).info("API listening on http://%s:%d (token in %s)",
                                     host, port, server.data_dir / "api-token")
    # uvicorn re-raises the signal it caught once it has shut down; with these
    # handlers in place that lands here instead of killing us before stop().
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _note_signal)
    try:
        uvicorn.Server(config).run()
    finally:
        server.stop()
    return 0


def _note_signal(sig: int, _frame: object) -> None:
    logging.getLogger(__name__).info("signal %d: stopping", sig)


if __name__ == "__main__":
    sys.exit(main())
