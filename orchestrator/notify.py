"""Telling operators: JSON webhooks (``--notify-url``) and Healthchecks-style
per-target pings (``register --ping-url``).

``Notifier`` decides *what* to send after each run and node change:

- a failure: the first after a good run, then at most every ``notify_repeat``
  seconds per target (a target failing every minute must not flood a channel);
- a recovery: the first good run after failures;
- a node that becomes unreachable, or reachable again;
- the target's ping URL on every good run, ``<ping URL>/fail`` on a failure.

``Sender`` delivers them from one background thread with retries and a bounded
queue. Submitting never blocks: a dead or slow receiver costs a backup nothing,
and a notification the full queue cannot take is dropped and logged.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage.catalog import Catalog, Node, Target
from storage.errors import StorageError

if TYPE_CHECKING:
    from orchestrator.backup import RunResult

log = logging.getLogger(__name__)

USER_AGENT = "backhaul-notify/1"


def redact(url: str) -> str:
    """A URL as logs may show it: ping URLs carry their secret in the path."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/..."


@dataclass(frozen=True)
class Message:
    url: str
    body: bytes
    content_type: str
    what: str  # for the log: "run_failed for target 3", "ping /fail for target 3"


class Sender:
    """One daemon thread POSTing queued messages, each retried with backoff."""

    def __init__(self, *, max_queue: int = 1000, attempts: int = 4, timeout: float = 10.0,
                 backoff: float = 1.0) -> None:
        self.queue: queue.Queue[Message | None] = queue.Queue(maxsize=max_queue)
        self.attempts = attempts
        self.timeout = timeout
        self.backoff = backoff
        self.dropped = 0
        self.delivered = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="notify-sender", daemon=True)
        self._thread.start()

    def submit(self, msg: Message) -> bool:
        try:
            self.queue.put_nowait(msg)
            return True
        except queue.Full:
            self.dropped += 1
            log.warning("notification dropped (%d waiting, queue full): %s to %s",
                        self.queue.qsize(), msg.what, redact(msg.url))
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """Give queued messages ``timeout`` seconds, then leave (the thread is a daemon)."""
        self._stopping.set()
        if self._thread is None:
            return
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout)
        left = self.queue.qsize()
        if left:
            log.warning("%d notifications not sent at shutdown", left)

    def _loop(self) -> None:
        while True:
            msg = self.queue.get()
            if msg is None:
                return
            try:
                self._deliver(msg)
            except Exception:  # noqa: BLE001 - the sender thread must not die
                log.exception("sending %s failed", msg.what)

    def _deliver(self, msg: Message) -> None:
        error = ""
        for attempt in range(self.attempts):
            if attempt and self._stopping.wait(self.backoff * 2 ** (attempt - 1)):
                break
            req = urllib.request.Request(msg.url, data=msg.body, method="POST", headers={
                "Content-Type": msg.content_type, "User-Agent": USER_AGENT})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    r.read(1024)
                self.delivered += 1
                return
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}"
                if 400 <= exc.code < 500 and exc.code not in (408, 429):
                    break  # the receiver refuses this message; retrying will not help
            except (TimeoutError, urllib.error.URLError, OSError) as exc:
                error = str(getattr(exc, "reason", exc))
        self.dropped += 1
        log.warning("notification dropped after %d attempts: %s to %s: %s", attempt + 1,
                    msg.what, redact(msg.url), error)


class Notifier:
    """Turns runs and node changes into messages for ``Sender``. Never raises."""

    def __init__(self, catalog: Catalog, sender: Sender, urls: list[str], *,
                 repeat_seconds: float = 3600.0,
                 clock: Callable[[], dt.datetime] | None = None) -> None:
        self.catalog = catalog
        self.sender = sender
        self.urls = list(urls)
        self.repeat = dt.timedelta(seconds=repeat_seconds)
        self.clock = clock or catalog.clock
        self._lock = threading.Lock()
        self._last_failure_notice: dict[int, dt.datetime] = {}
        self._node_reachable: dict[int, bool | None] = {}
        self.host = socket.gethostname()

    # -- decisions ---------------------------------------------------------------

    def after_run(self, target: Target, result: RunResult) -> None:
        """``target`` as read before the run: its ``failures`` say whether it was failing."""
        try:
            self._after_run(target, result)
        except (StorageError, Exception):  # noqa: BLE001 - never fail a run over a notice
            log.exception("notifying about run %s failed", result.run_id)

    def _after_run(self, target: Target, result: RunResult) -> None:
        good = result.status in ("success", "unchanged")
        failed = result.status == "failed"
        if not (good or failed):
            return  # interrupted by a stopping server: says nothing about the target
        self._ping(target, result, good)
        now = self.clock()
        event = None
        with self._lock:
            if good:
                self._last_failure_notice.pop(target.id, None)
                if target.failures:
                    event = "run_recovered"
            else:
                last = self._last_failure_notice.get(target.id)
                if target.failures == 0 or last is None or now - last >= self.repeat:
                    self._last_failure_notice[target.id] = now
                    event = "run_failed"
        if event:
            self._webhook(event, self._text(event, target, result),
                          target=_target_json(target), run=_run_json(result),
                          failures=0 if good else target.failures + 1)
        if result.node_unreachable:
            self.node_changed(target.node, False, result.message, known=target.node.reachable)
        elif good:
            self.node_changed(target.node, True, known=target.node.reachable)

    def node_changed(self, node: Node, reachable: bool, reason: str | None = None, *,
                     known: bool | None = None) -> None:
        """Send ``node_unreachable``/``node_reachable`` when the state really
        changed (concurrent runs on one node report it once)."""
        try:
            with self._lock:
                before = self._node_reachable.get(node.id, known)
                self._node_reachable[node.id] = reachable
            if before is reachable or (before is None and reachable):
                return  # unchanged, or a first contact that worked: nothing to tell
            event = "node_reachable" if reachable else "node_unreachable"
            text = (f"backhaul: node {node.address} is reachable again" if reachable else
                    f"backhaul: node {node.address} is unreachable: {reason or 'no answer'}")
            self._webhook(event, text, node={"id": node.id, "address": node.address,
                                             "reachable": reachable, "error": reason})
        except Exception:  # noqa: BLE001
            log.exception("notifying about node %s failed", node.id)

    # -- messages ----------------------------------------------------------------

    def _text(self, event: str, target: Target, result: RunResult) -> str:
        where = f"{target.node.address} {target.path}"
        if event == "run_recovered":
            return f"backhaul: {where} backed up again (run {result.run_id}, {result.status})"
        return (f"backhaul: backup of {where} failed (run {result.run_id}): "
                f"{result.error_code}: {result.message}")

    def _webhook(self, event: str, text: str, **fields: Any) -> None:
        if not self.urls:
            return
        body = json.dumps({"event": event, "text": text, "server": self.host,
                           "time": _iso(self.clock()), **fields}).encode()
        for url in self.urls:
            self.sender.submit(Message(url, body, "application/json", f"{event} ({text})"))

    def _ping(self, target: Target, result: RunResult, good: bool) -> None:
        options = self.catalog.target_options([target.id]).get(target.id)
        if options is None or not options.ping_url:
            return
        url = options.ping_url.rstrip("/") + ("" if good else "/fail")
        body = (f"run {result.run_id} {result.status}"
                + (f": {result.error_code}: {result.message}" if not good else "")).encode()
        self.sender.submit(Message(url, body[:10_000], "text/plain; charset=utf-8",
                                   f"ping{'' if good else ' /fail'} for target {target.id}"))


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _target_json(t: Target) -> dict[str, Any]:
    return {"id": t.id, "node": t.node.address, "path": t.path}


def _run_json(r: RunResult) -> dict[str, Any]:
    return {"id": r.run_id, "status": r.status, "error_code": r.error_code,
            "message": r.message, "bytes_transferred": r.bytes_transferred,
            "duration_seconds": round(r.duration, 3)}
