"""Every server setting in one table: (name, default, help).

Each setting is read from the flag ``--name-with-dashes``, else from the env
var ``BACKHAUL_NAME``, else its default. The README's settings table is checked
against this one by a test, so the two cannot drift.
"""

from __future__ import annotations

import argparse
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "BACKHAUL_"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?\s*(/s)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``50MiB``, ``20M``, ``1.5G``, ``0`` -> bytes (binary multiples)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 0, 500K, 50MiB, 1G)")
    mult = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen wants HOST:PORT with a port 1-65535, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"must be a number >= 0, got {text!r}")
    return value


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {text!r}")
        return text
    return parse


def _urls(text: str) -> list[str]:
    """Space- or comma-separated http(s) URLs (one flag may also be repeated)."""
    out = []
    for url in re.split(r"[\s,]+", text.strip()):
        if not url:
            continue
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        out.append(url)
    return out


def _database_url(text: str) -> str:
    text = text.strip()
    if text and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", text):
        raise ValueError("must be sqlite:///FILE or postgresql+psycopg://USER@HOST:PORT/DB "
                         "(the URL is not shown: it may hold a password)")
    return text


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    help: str
    parse: Callable[[str], Any] = str
    # The flag may be given several times; the values are joined with spaces
    # before ``parse`` (which then returns a list).
    multiple: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def _store_url(value: str) -> str:
    """A directory, ``file://DIR`` or ``s3://BUCKET[/PREFIX]`` (no credentials in it)."""
    if value.startswith("s3://"):
        from storage.stores.s3 import parse_store_url
        parse_store_url(value)  # ValueError: one line from the parser
    elif "://" in value and not value.startswith("file://"):
        raise ValueError(f"store URL {value!r}: give s3://BUCKET/PREFIX or a directory")
    return value


SETTINGS: tuple[Setting, ...] = (
    Setting("data_dir", "./backhaul-data",
            "directory for the catalog, job store, archives, SSH key and API token",
            lambda s: Path(s)),
    Setting("catalog_url", "", "catalog database: `postgresql+psycopg://USER@HOST:PORT/DB` "
            "(the job store then sits in the same database) or `sqlite:///FILE`; empty: "
            "`catalog.db` in the data dir. Give a password in the env var, not the flag "
            "(`ps` shows flags), or leave it out and use `~/.pgpass`", _database_url),
    Setting("store_url", "", "archive store: `s3://BUCKET/PREFIX` (S3-compatible object "
            "storage; credentials only from the standard AWS variables or credentials file, "
            "never a flag) or a directory; empty: `archives` in the data dir", _store_url),
    Setting("store_endpoint", "", "S3 endpoint URL for an `s3://` store, e.g. "
            "`http://127.0.0.1:8333` (empty: AWS's own)"),
    Setting("store_region", "", "S3 region for an `s3://` store (empty: the AWS config's)"),
    Setting("listen", "127.0.0.1:7710", "HOST:PORT the HTTP/JSON API listens on", parse_listen),
    Setting("workers", "8", "backups running at once, over all nodes", _positive_int),
    Setting("per_node", "2", "backups running at once on one node", _positive_int),
    Setting("retry_min", "15", "first retry delay after a failed run, in seconds",
            _positive_float),
    Setting("retry_max", "300", "longest retry/probe delay (exponential backoff cap), seconds",
            _positive_float),
    Setting("default_user", "", "SSH user when a target names none (empty: the user "
            "running backhauld, as ssh does)"),
    Setting("bwlimit", "0", "bandwidth cap shared by all transfers, e.g. 50MiB (0 = none)",
            parse_size),
    Setting("compressor", "auto", "`auto`: pigz on nodes that have it (detected once per "
            "connection), else gzip; `gzip`: always gzip", _choice("auto", "gzip")),
    # 0: a composed (delta) archive is verified against the node before it is
    # kept (listing + a sha256 per reassembled file) and unchanged entries are
    # recognised by their ctime, which user space cannot set back; a periodic
    # full would only re-send what is already proven.
    Setting("full_every", "0", "every Nth backup of a target is a true full one instead of "
            "a delta (0 = only when needed: first backup, `run --full`, or a delta that "
            "would cost more)", _non_negative_int),
    Setting("node_python", "auto", "`auto`: use python3 on nodes that have it for block "
            "hashing (detected once per connection); `off`: coreutils only",
            _choice("auto", "off")),
    Setting("connect_timeout", "10", "seconds to connect, read the banner and authenticate",
            _positive_float),
    Setting("io_timeout", "60", "seconds without a byte from a node before a run fails "
            "with `timeout`", _positive_float),
    Setting("run_timeout", "21600", "wall-clock seconds one run may take before it fails "
            "with `run_timeout` (0 = none): a node trickling its stream cannot hold a worker "
            "forever", _non_negative_float),
    Setting("max_archive_size", "1TiB", "largest archive (compressed) one run may write; "
            "past it the run fails with `archive_too_large` (0 = none)", parse_size),
    Setting("max_uncompressed_size", "16TiB", "largest size an archive may inflate to; "
            "past it the run fails with `archive_too_large` (0 = none)", parse_size),
    Setting("max_compression_ratio", "1000", "largest inflated:compressed ratio, judged past "
            "64 MiB inflated (gzip of all zeros is ~1030, of text 3-20); past it the run "
            "fails with `archive_too_large` as a gzip bomb (0 = none)", _non_negative_float),
    Setting("max_command_output", "1MiB", "most stdout kept of a command whose answer is "
            "one line (fingerprint, probe, pigz and path checks); past it the run fails with "
            "`output_too_large`", parse_size),
    Setting("idle_timeout", "300", "seconds an unused SSH connection stays open",
            _positive_float),
    Setting("db_busy_timeout", "30", "seconds a catalog write waits for a lock held by "
            "another process before the run fails (and is retried)", _positive_float),
    Setting("shutdown_grace", "30", "seconds in-flight runs get to finish on SIGTERM",
            _positive_float),
    Setting("minute_seconds", "60", "length of a schedule 'minute' in seconds (lower it "
            "only to make tests and demos fast)", _positive_float),
    Setting("scrub_every", "30", "days between re-reads of each kept archive (sha256, gzip, "
            "tar), spread out one archive at a time; results go to the run log and "
            "`backups` (0 = never)", _non_negative_float),
    Setting("log_format", "text", "log lines as `text` or `json`", _choice("text", "json")),
    Setting("log_level", "INFO", "DEBUG, INFO, WARNING or ERROR",
            _choice("DEBUG", "INFO", "WARNING", "ERROR")),
    Setting("notify_url", "", "URL to POST a JSON notification to when a target fails "
            "(first failure, then at most every `--notify-repeat`), recovers, or its node "
            "becomes unreachable/reachable; repeat the flag, or space/comma-separate in the "
            "env var", _urls, multiple=True),
    Setting("notify_repeat", "3600", "seconds before a target that keeps failing is "
            "notified again", _positive_float),
    Setting("notify_queue", "1000", "notifications waiting to be sent; beyond that new ones "
            "are dropped (and logged) so a dead receiver never holds up backups",
            _positive_int),
    Setting("hook_timeout", "3600", "seconds a target's pre or post command may run on the "
            "node before it is killed and counts as failed", _positive_float),
    # Scale-out (orchestrator/roles.py): every role but `all` needs a PostgreSQL catalog.
    Setting("role", "all", "`all`: one process does everything (the default); `scheduler`: "
            "the elected scheduler (a second one waits as standby) that queues due runs; "
            "`worker`: executes queued runs; `api`: the HTTP API only. Every role serves "
            "the API", _choice("all", "scheduler", "worker", "api")),
    Setting("heartbeat", "5", "seconds between a worker's heartbeats in the run queue",
            _positive_float),
    Setting("stall_timeout", "30", "seconds without a heartbeat after which a worker is "
            "taken for dead: the leader records its runs interrupted and queues them again",
            _positive_float),
    Setting("leader_check", "1", "seconds between the leader's checks of its lock "
            "connection, and between a standby's attempts to take it", _positive_float),
    Setting("sync_every", "2", "seconds between the leader's reads of the catalog for "
            "targets registered, edited or removed through other processes", _positive_float),
)

_BY_NAME = {s.name: s for s in SETTINGS}


class Settings:
    """Resolved settings; attribute access by name (``settings.data_dir``)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def replace(self, **changes: Any) -> Settings:
        unknown = set(changes) - set(_BY_NAME)
        if unknown:
            raise KeyError(f"unknown settings: {sorted(unknown)}")
        return Settings({**self._values, **changes})

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    @classmethod
    def load(cls, argv: Sequence[str] | None = None,
             env: Mapping[str, str] | None = None) -> Settings:
        """Flags win over env vars, env vars over defaults. Raises ``ValueError``
        naming the setting on a bad value."""
        env = os.environ if env is None else env
        parser = build_parser()
        args = vars(parser.parse_args(list(argv or [])))
        values: dict[str, Any] = {}
        for s in SETTINGS:
            raw = args.get(s.name)
            if isinstance(raw, list):  # a repeated flag
                raw = " ".join(raw)
            source = s.flag
            if raw is None:
                raw, source = env.get(s.env), s.env
            if raw is None:
                raw, source = s.default, "default"
            try:
                values[s.name] = s.parse(raw)
            except ValueError as exc:
                raise ValueError(f"{source}: {exc}") from None
        return cls(values)

    @classmethod
    def defaults(cls, **changes: Any) -> Settings:
        return cls.load([], env={}).replace(**changes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backhauld",
        description="backhaul's backup server: schedules registered (node, path) targets, "
                    "pulls tar.gz archives over SSH when the tree changed, keeps the newest "
                    "and logs every run.",
        epilog="Every flag can also be set with the env var BACKHAUL_<NAME> "
               "(e.g. BACKHAUL_DATA_DIR).")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    for s in SETTINGS:
        parser.add_argument(s.flag, dest=s.name, default=None, metavar=s.name.upper(),
                            action="append" if s.multiple else "store",
                            help=f"{s.help} (env {s.env}, default {s.default or 'empty'})")
    return parser
