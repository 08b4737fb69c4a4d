"""Per-target pre and post commands, run on the node over the run's own SSH
connection: the pre command before the fingerprint (e.g. a database dump into
the tree), the post command after the backup.

The command text is the operator's, run on the node as given (``sh -c``), by
design. It is still handled as data everywhere else: validated here, stored as
a bound parameter, quoted as one shell word by ``remote.hook_command``, hashed
into the restricted key's allowed list, and its stderr is bounded and has its
control characters escaped before it reaches the run log.
"""

from __future__ import annotations

import logging
import urllib.parse

from orchestrator import remote
from orchestrator.errors import (
    CommandRefused,
    InvalidCommand,
    InvalidUrl,
    NodeError,
    PreCommandFailed,
)
from orchestrator.ssh import Connection, ExecResult
from storage.catalog import Catalog, Target, TargetOptions

log = logging.getLogger(__name__)

MAX_COMMAND = 4096  # bytes of UTF-8
MAX_URL = 2048
STDERR_KEPT = 2048  # characters of a failed hook's stderr kept in the run log


def validate_command(text: str | None, what: str) -> str | None:
    """The command, or None for none (empty); raise ``InvalidCommand`` saying why."""
    if text is None or not text.strip():
        return None
    bad = next((c for c in text if (ord(c) < 0x20 and c not in "\t\n") or ord(c) == 0x7F),
               None)
    if bad is not None:
        raise InvalidCommand(f"{what} contains the control character {bad!r}")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidCommand(f"{what} is not valid UTF-8 text") from None
    if size > MAX_COMMAND:
        raise InvalidCommand(f"{what} is longer than {MAX_COMMAND} bytes")
    return text


def validate_url(url: str | None, what: str = "ping URL") -> str | None:
    if url is None or not url.strip():
        return None
    url = url.strip()
    if len(url) > MAX_URL or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidUrl(f"{what} is longer than {MAX_URL} characters or holds spaces "
                         "or control characters")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidUrl(f"{what} must be an http:// or https:// URL, got {url[:80]!r}")
    return url


def escape(text: str, limit: int = STDERR_KEPT) -> str:
    """One line of printable text: control characters as escapes, the tail
    kept when too long (the end of stderr says what went wrong)."""
    out = "".join(c if c.isprintable() else
                  {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c, f"\\x{ord(c):02x}")
                  if ord(c) < 0x100 else f"\\u{ord(c):04x}" for c in text.strip())
    return out if len(out) <= limit else "..." + out[-limit:]


class Hooks:
    def __init__(self, catalog: Catalog, *, timeout: float = 3600.0) -> None:
        self.catalog = catalog
        self.timeout = timeout

    def options(self, target: Target) -> TargetOptions | None:
        found = self.catalog.target_options([target.id]).get(target.id)
        if found is None or not (found.pre_command or found.post_command):
            return None
        return found

    def _exec(self, conn: Connection, command: str, what: str) -> ExecResult:
        # Hooks may be silent for long (a dump): the SSH read timeout is the
        # hook's own, with a margin for ``timeout -k`` to act first.
        return conn.exec(remote.hook_command(command, self.timeout), what=what,
                         timeout=self.timeout + 30, stderr_limit=64 * 1024)

    def pre(self, conn: Connection, target: Target, options: TargetOptions,
            run_id: int) -> ExecResult | None:
        """Run the pre command; raise ``PreCommandFailed`` when it fails (and is
        not optional)."""
        if not options.pre_command:
            return None
        res = self._exec(conn, options.pre_command, "pre command")
        if res.exit_status == 0:
            return res
        if res.exit_status == remote.EXIT_REFUSED and remote.REFUSED_MARK in res.stderr_text:
            raise CommandRefused(str(conn.node), target.path)
        error = PreCommandFailed(str(conn.node), res.exit_status, escape(res.stderr_text))
        if options.pre_optional:
            log.warning("run %s target %s node %s: optional %s; backing up anyway", run_id,
                        target.id, conn.node, error.message)
            return res
        raise error

    def post(self, conn: Connection, target: Target, options: TargetOptions,
             run_id: int) -> ExecResult | None:
        """Run the post command; a failure is logged, the backup stands."""
        if not options.post_command:
            return None
        try:
            res = self._exec(conn, options.post_command, "post command")
        except NodeError as exc:
            log.warning("run %s target %s node %s: post command failed: %s", run_id,
                        target.id, conn.node, exc.message)
            return None
        if res.exit_status != 0:
            log.warning("run %s target %s node %s: post command exited with status %d: %s",
                        run_id, target.id, conn.node, res.exit_status,
                        escape(res.stderr_text))
        return res
