"""SSH to the nodes: the server's own key, host-key pinning, a connection pool
and an exec helper that streams a command's stdout into a sink.

paramiko is used directly at the Transport level (no SSHClient) so the socket,
ciphers, window sizes and host-key decision are all ours. Every paramiko and
socket exception is translated into an ``orchestrator.errors`` class here.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from orchestrator import remote
from orchestrator.errors import (
    AuthFailed,
    ConnectionLost,
    HostKeyMismatch,
    NodeError,
    OutputTooLarge,
    RunTimeout,
    StreamIncomplete,
    Timeout,
    UnreachableNode,
)
from orchestrator.limits import DEFAULT_COMMAND_OUTPUT, Deadline
from orchestrator.sanitize import escape_controls

log = logging.getLogger(__name__)

# paramiko starts a client-side rekey every 512 MiB; one that lands near a
# channel's close deadlocks the transport (paramiko #822). Rekey at OpenSSH's
# AES limit instead; the server may still rekey, which is safe.
paramiko.packet.Packetizer.REKEY_BYTES = 2**36
paramiko.packet.Packetizer.REKEY_PACKETS = 2**31

PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                     "aes128-ctr", "aes256-ctr", "aes192-ctr")
# Measured on loopback: 4-8 MiB windows with large reads beat both the stock
# 2 MiB and >= 32 MiB windows (the latter were 3x slower).
WINDOW_SIZE = 8 * 1024 * 1024
MAX_PACKET = 256 * 1024
READ_SIZE = WINDOW_SIZE
# Output collected in memory (no sink) beyond this is refused: such commands
# print a digest or a compressed listing, never an archive.
# sshd's MaxSessions is 10 and opens were rejected at 8 concurrent channels.
CHANNELS_PER_TRANSPORT = 4


def key_fingerprint(key_bytes: bytes) -> str:
    """OpenSSH's ``SHA256:<base64, no padding>`` fingerprint of a public key blob."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key_bytes).digest()).decode().rstrip("=")


# -- the server's own key ------------------------------------------------------


class ServerKey:
    """The Ed25519 key backhauld logs in with; generated on first use (0600)."""

    def __init__(self, path: Path, comment: str = "backhaul") -> None:
        self.path = Path(path)
        self.comment = comment
        if not self.path.exists():
            self._generate()
        self.pkey = paramiko.Ed25519Key.from_private_key_file(str(self.path))

    def _generate(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption())
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @property
    def public_line(self) -> str:
        return f"{self.pkey.get_name()} {self.pkey.get_base64()} {self.comment}"

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.pkey.asbytes())


# -- host keys -----------------------------------------------------------------


@dataclass(frozen=True)
class NodeAddress:
    user: str
    host: str
    port: int

    def __str__(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{shown}:{self.port}"


class HostKeyVerifier(Protocol):
    def verify(self, node: NodeAddress, key_type: str, key_b64: str, fingerprint: str) -> None:
        """Accept (pinning on first contact) or raise ``HostKeyMismatch``."""


# -- connections -----------------------------------------------------------------


class CountingSocket:
    """A socket proxy that counts bytes both ways, so transfer is measured at the
    transport (what crosses the wire, encryption and framing included)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.bytes_in = 0
        self.bytes_out = 0

    def recv(self, n: int) -> bytes:
        data = self._sock.recv(n)
        self.bytes_in += len(data)
        return data

    def send(self, data: bytes) -> int:
        n = self._sock.send(data)
        self.bytes_out += n
        return n

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)
        self.bytes_out += len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@dataclass
class ExecResult:
    exit_status: int
    stderr: bytes
    stderr_truncated: bool
    stdout_bytes: int
    stderr_bytes: int
    stdout: bytes = b""  # only filled when no sink was given

    @property
    def stderr_text(self) -> str:
        """The node's stderr with control characters escaped (it is logged and
        stored as warnings, and a node may put terminal escapes in it)."""
        return escape_controls(self.stderr.decode("utf-8", "replace"), keep="\n\t")


class _StderrDrain(threading.Thread):
    """Reads a channel's stderr until EOF, keeping the head and the tail."""

    def __init__(self, chan: paramiko.Channel, limit: int) -> None:
        super().__init__(daemon=True, name="ssh-stderr")
        self.chan = chan
        self.limit = limit
        self.head = bytearray()
        self.tail = bytearray()
        self.truncated = False
        self.total = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        half = self.limit // 2
        try:
            while True:
                data = self.chan.recv_stderr(READ_SIZE)
                if not data:
                    return
                self.total += len(data)
                if len(self.head) < half:
                    take = half - len(self.head)
                    self.head += data[:take]
                    data = data[take:]
                if data:
                    self.tail += data
                    if len(self.tail) > half:
                        self.truncated = True
                        del self.tail[:-half]
        except BaseException as exc:  # noqa: BLE001 - reported by the reader
            self.error = exc

    def value(self) -> bytes:
        if self.truncated:
            return bytes(self.head) + b"\n[... stderr truncated ...]\n" + bytes(self.tail)
        return bytes(self.head + self.tail)


class Connection:
    """One authenticated Transport to one node; opens a channel per command."""

    def __init__(self, node: NodeAddress, transport: paramiko.Transport,
                 sock: CountingSocket, io_timeout: float,
                 output_limit: int = DEFAULT_COMMAND_OUTPUT) -> None:
        self.node = node
        self.transport = transport
        self.sock = sock
        self.io_timeout = io_timeout
        # stdout kept of a command run without a sink (its answer is one line).
        self.output_limit = output_limit
        self.channels = threading.BoundedSemaphore(CHANNELS_PER_TRANSPORT)
        self.last_used = time.monotonic()
        self.in_use = 0
        self._pigz: bool | None = None
        self._python: bool | None = None
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self.transport.is_active()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.transport.close()

    def responsive(self, timeout: float = 5.0) -> bool:
        """Whether the peer still answers a channel open within ``timeout``."""
        try:
            chan = self.transport.open_session(timeout=min(timeout, self.io_timeout))
        except Exception:  # noqa: BLE001 - any failure means: do not reuse
            return False
        with contextlib.suppress(Exception):
            chan.close()
        return True

    def has_pigz(self, deadline: Deadline | None = None) -> bool:
        """Detected once per connection (so re-detected after a reconnect)."""
        if self._pigz is None:
            res = self.exec(remote.has_pigz_command(), what="pigz check", deadline=deadline)
            self._pigz = res.stdout.strip() == b"yes"
        return self._pigz

    def has_python(self) -> bool:
        """python3 on the node (batch hashing); detected once per connection."""
        if self._python is None:
            res = self.exec(remote.has_python_command(), what="python check")
            self._python = res.stdout.strip() == b"yes"
        return self._python

    def _open_channel(self) -> paramiko.Channel:
        delay = 0.05
        for attempt in range(6):
            try:
                return self.transport.open_session(timeout=self.io_timeout)
            except paramiko.ChannelException as exc:
                # sshd refused the open (MaxSessions): back off and retry.
                if attempt == 5:
                    raise UnreachableNode(str(self.node),
                                          f"channel open refused: {exc}") from exc
                time.sleep(delay)
                delay *= 2
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise UnreachableNode(str(self.node), f"connection lost: {exc}") from exc
        raise AssertionError("unreachable")

    def _incomplete(self, what: str) -> NodeError:
        if not self.transport.is_active():
            return ConnectionLost(str(self.node), what)
        return StreamIncomplete(str(self.node), what)

    def exec(self, command: str, *, sink: Callable[[bytes], None] | None = None,
             what: str = "command", stderr_limit: int = 64 * 1024,
             timeout: float | None = None, deadline: Deadline | None = None,
             stdin: bytes | None = None) -> ExecResult:
        """Run ``command``; stream stdout to ``sink`` (or collect it, at most
        ``output_limit`` bytes), drain stderr concurrently (bounded), and
        return the exit status. ``stdin`` is written whole and then closed
        (per-run data for fixed commands).

        Raises ``Timeout`` when no byte arrives for ``timeout`` seconds,
        ``RunTimeout`` when ``deadline`` passes, ``OutputTooLarge`` past the
        output cap, and ``StreamIncomplete`` when the channel ends without an
        exit status: a stream without its exit status is never to be trusted.
        """
        timeout = self.io_timeout if timeout is None else timeout
        with self.channels:
            with self._lock:
                self.in_use += 1
            try:
                return self._exec(command, sink, what, stderr_limit, timeout, deadline,
                                  stdin)
            finally:
                with self._lock:
                    self.in_use -= 1
                    self.last_used = time.monotonic()

    def _wait(self, timeout: float, deadline: Deadline | None, what: str) -> float:
        """Seconds the next wait may take: ``timeout``, cut to the deadline."""
        if deadline is None:
            return timeout
        left = deadline.remaining()
        if left <= 0:
            raise RunTimeout(str(self.node), what, deadline.seconds)
        return min(timeout, left)

    def _exec(self, command: str, sink: Callable[[bytes], None] | None, what: str,
              stderr_limit: int, timeout: float, deadline: Deadline | None,
              stdin: bytes | None = None) -> ExecResult:
        chan = self._open_channel()
        collected = bytearray()
        total = 0
        drain = _StderrDrain(chan, stderr_limit)
        try:
            chan.settimeout(timeout)
            try:
                chan.exec_command(command)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise UnreachableNode(str(self.node), f"exec failed: {exc}") from exc
            drain.start()
            if stdin is not None:
                # A thread, so a command that answers before reading all its
                # input cannot deadlock against our full send window.
                feeder = threading.Thread(target=_feed, args=(chan, stdin), daemon=True,
                                          name="ssh-stdin")
                feeder.start()
            while True:
                wait = self._wait(timeout, deadline, what)
                chan.settimeout(wait)
                try:
                    data = chan.recv(READ_SIZE)
                except TimeoutError as exc:
                    self._wait(timeout, deadline, what)  # the deadline, if that was it
                    raise Timeout(str(self.node), what, timeout) from exc
                except (paramiko.SSHException, EOFError, OSError) as exc:
                    raise self._incomplete(what) from exc
                if not data:
                    break
                total += len(data)
                if sink is None:
                    if self.output_limit and total > self.output_limit:
                        raise OutputTooLarge(str(self.node), what, self.output_limit)
                    collected += data
                else:
                    sink(data)
            drain.join(self._wait(timeout, deadline, what))
            if drain.is_alive():
                self._wait(timeout, deadline, what)
                raise Timeout(str(self.node), f"{what} (stderr)", timeout)
            if not chan.status_event.wait(self._wait(timeout, deadline, what)):
                self._wait(timeout, deadline, what)
                raise Timeout(str(self.node), f"{what} (exit status)", timeout)
            # paramiko also sets status_event when the channel closes without
            # an exit-status message, leaving exit_status at -1.
            if chan.exit_status < 0:
                raise self._incomplete(what)
            return ExecResult(chan.exit_status, drain.value(), drain.truncated, total,
                              drain.total, bytes(collected))
        finally:
            with contextlib.suppress(Exception):
                chan.close()

    def exec_with_input(self, command: str, chunks: Iterable[bytes], *,
                        what: str = "command", stderr_limit: int = 64 * 1024) -> ExecResult:
        """Run ``command`` with ``chunks`` as its stdin (a restore's archive),
        draining its stdout and stderr meanwhile; returns the exit status."""
        with self.channels:
            chan = self._open_channel()
            drain = _StderrDrain(chan, stderr_limit)
            out = bytearray()

            def read_stdout() -> None:
                with contextlib.suppress(Exception):
                    while data := chan.recv(READ_SIZE):
                        if len(out) < stderr_limit:
                            out.extend(data[: stderr_limit - len(out)])

            reader = threading.Thread(target=read_stdout, daemon=True, name="ssh-stdout")
            try:
                chan.settimeout(self.io_timeout)
                try:
                    chan.exec_command(command)
                except (paramiko.SSHException, EOFError, OSError) as exc:
                    raise UnreachableNode(str(self.node), f"exec failed: {exc}") from exc
                drain.start()
                reader.start()
                with self._lock:
                    self.in_use += 1  # the janitor must not close it mid-restore
                try:
                    for chunk in chunks:
                        chan.sendall(chunk)
                    chan.shutdown_write()
                except TimeoutError as exc:
                    raise Timeout(str(self.node), what, self.io_timeout) from exc
                except (paramiko.SSHException, EOFError, OSError):
                    pass  # the command ended early: its exit status says why
                finally:
                    with self._lock:
                        self.in_use -= 1
                        self.last_used = time.monotonic()
                if not chan.status_event.wait(self.io_timeout):
                    raise Timeout(str(self.node), f"{what} (exit status)", self.io_timeout)
                drain.join(self.io_timeout)
                reader.join(self.io_timeout)
                if chan.exit_status < 0:
                    raise self._incomplete(what)
                return ExecResult(chan.exit_status, drain.value(), drain.truncated, len(out),
                                  drain.total, bytes(out))
            finally:
                with contextlib.suppress(Exception):
                    chan.close()


def _feed(chan: paramiko.Channel, data: bytes) -> None:
    with contextlib.suppress(Exception):  # the reader sees the command fail
        chan.sendall(data)
        chan.shutdown_write()


# -- the pool ----------------------------------------------------------------------


@dataclass
class _Slot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    conn: Connection | None = None


class SSHPool:
    """One Transport per (user, host, port), reused by every run on that node,
    reconnected when dead and closed when idle."""

    def __init__(self, key: ServerKey, verifier: HostKeyVerifier, *,
                 connect_timeout: float = 10.0, io_timeout: float = 60.0,
                 idle_timeout: float = 300.0,
                 output_limit: int = DEFAULT_COMMAND_OUTPUT) -> None:
        self.key = key
        self.verifier = verifier
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.idle_timeout = idle_timeout
        self.output_limit = output_limit
        self._slots: dict[NodeAddress, _Slot] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _slot(self, node: NodeAddress) -> _Slot:
        with self._lock:
            if self._closed:
                raise UnreachableNode(str(node), "the server is shutting down")
            return self._slots.setdefault(node, _Slot())

    @contextlib.contextmanager
    def session(self, node: NodeAddress) -> Iterator[Connection]:
        """A live connection to ``node``. A connection that dies while in use is
        dropped so the next session reconnects."""
        conn = self.connection(node)
        try:
            yield conn
        except NodeError as exc:
            # A command that timed out may sit on a hung connection (a frozen
            # peer): keep the connection only if it still opens a channel.
            if not conn.alive or (isinstance(exc, (Timeout, StreamIncomplete))
                                  and not conn.responsive()):
                self.discard(node, conn)
            raise

    def connection(self, node: NodeAddress) -> Connection:
        slot = self._slot(node)
        with slot.lock:
            if slot.conn is not None and slot.conn.alive:
                slot.conn.last_used = time.monotonic()
                return slot.conn
            if slot.conn is not None:
                slot.conn.close()
                slot.conn = None
            slot.conn = self._connect(node)
            return slot.conn

    def discard(self, node: NodeAddress, conn: Connection | None = None) -> None:
        slot = self._slot(node)
        with slot.lock:
            if slot.conn is not None and (conn is None or slot.conn is conn):
                slot.conn.close()
                slot.conn = None

    def close_idle(self) -> int:
        """Close connections idle for longer than ``idle_timeout``; returns how many."""
        now = time.monotonic()
        closed = 0
        with self._lock:
            slots = list(self._slots.items())
        for _node, slot in slots:
            with slot.lock:
                c = slot.conn
                if c is not None and (not c.alive or (
                        c.in_use == 0 and now - c.last_used > self.idle_timeout)):
                    c.close()
                    slot.conn = None
                    closed += 1
        return closed

    def open_count(self) -> int:
        with self._lock:
            return sum(1 for s in self._slots.values() if s.conn is not None and s.conn.alive)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            slots = list(self._slots.values())
        for slot in slots:
            with slot.lock:
                if slot.conn is not None:
                    slot.conn.close()
                    slot.conn = None

    def __enter__(self) -> SSHPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self, node: NodeAddress) -> Connection:
        address = str(node)
        try:
            raw = socket.create_connection((node.host, node.port), timeout=self.connect_timeout)
        except TimeoutError as exc:
            raise UnreachableNode(address, f"connect timed out after "
                                           f"{self.connect_timeout:g} s") from exc
        except OSError as exc:
            raise UnreachableNode(address, exc.strerror or str(exc)) from exc
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock = CountingSocket(raw)
        t = paramiko.Transport(sock, default_window_size=WINDOW_SIZE,
                               default_max_packet_size=MAX_PACKET)
        try:
            opts = t.get_security_options()
            offered = [c for c in PREFERRED_CIPHERS if c in opts.ciphers]
            opts.ciphers = offered + [c for c in opts.ciphers if c not in offered]
            t.banner_timeout = self.connect_timeout
            t.handshake_timeout = self.connect_timeout
            t.auth_timeout = self.connect_timeout
            try:
                t.start_client(timeout=self.connect_timeout)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                # paramiko's message may quote the node's banner: node text.
                raise UnreachableNode(address, "SSH handshake failed: "
                                      + escape_controls(str(exc))) from exc
            hk = t.get_remote_server_key()
            self.verifier.verify(node, hk.get_name(), hk.get_base64(),
                                 key_fingerprint(hk.asbytes()))
            try:
                t.auth_publickey(node.user, self.key.pkey)
            except paramiko.AuthenticationException as exc:
                raise AuthFailed(address, str(exc)) from exc
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise UnreachableNode(address, f"authentication interrupted: {exc}") from exc
            if not t.is_authenticated():
                raise AuthFailed(address)
        except BaseException:
            t.close()
            raw.close()
            raise
        log.debug("connected to %s (cipher %s)", address,
                  t.remote_cipher if hasattr(t, "remote_cipher") else "?")
        return Connection(node, t, sock, self.io_timeout, self.output_limit)


class StaticHostKeys:
    """A verifier over an in-memory map, for callers without a catalog (tests,
    the benchmark): pins on first contact, refuses a changed key."""

    def __init__(self, pinned: dict[NodeAddress, str] | None = None) -> None:
        self.pinned = dict(pinned or {})
        self._lock = threading.Lock()

    def verify(self, node: NodeAddress, key_type: str, key_b64: str, fingerprint: str) -> None:
        with self._lock:
            expected = self.pinned.setdefault(node, fingerprint)
        if expected != fingerprint:
            raise HostKeyMismatch(str(node), expected, fingerprint)
