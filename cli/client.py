"""A tiny HTTP/JSON client for backhauld's API (docs/API.md), standard library only.

Every failure reaches the caller as one ``ClientError(code, message, status)``:
the server's ``{"error": {"code", "message"}}`` shape, an unreachable server
(``server_unreachable``), or a local check (``invalid_*``, ``checksum_mismatch``).
``http.client``, ``hashlib`` and ``tempfile`` are imported where they are used so
that ``backhaul --help`` does not pay for them.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote, urlencode, urlsplit

if TYPE_CHECKING:
    import http.client

DEFAULT_URL = "http://127.0.0.1:7710"
DEFAULT_TIMEOUT = 30.0
DEFAULT_PORT = 22
CHUNK_SIZE = 1024 * 1024
USER_AGENT = "backhaul-cli"

JSONDict = dict[str, Any]
ProgressCallback = Callable[[int, "int | None"], None]


class ClientError(Exception):
    """Any failure the client reports: a stable ``code``, a one-line ``message``."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class InvalidArgument(ClientError, ValueError):
    """A value rejected before anything is sent (same codes as the server's)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message, None)


# --- addresses and paths ------------------------------------------------------

_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_PORT = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Address:
    """``[USER@]HOST[:PORT]``; ``user`` is None when not given (the server's default)."""

    user: str | None
    host: str
    port: int = DEFAULT_PORT

    @property
    def host_port(self) -> str:
        return format_host_port(self.host, self.port)

    def __str__(self) -> str:
        return f"{self.user}@{self.host_port}" if self.user else self.host_port


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def canonical_host(host: str) -> str:
    """The form the server stores (and filters on exactly): IPs compressed, names lowercased."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.rstrip(".").lower()


def _is_ipv6(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _parse_port(text: str, address: str) -> int:
    if not text:
        raise InvalidArgument("invalid_port", f"empty port in {address!r}")
    if not _PORT.fullmatch(text):
        raise InvalidArgument("invalid_port", f"port must be a number, got {text!r} in {address!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise InvalidArgument("invalid_port", f"port must be 1..65535, got {port} in {address!r}")
    return port


def parse_address(address: str) -> Address:
    """Parse ``[USER@]HOST[:PORT]``; IPv6 as ``[::1]:2222`` or bare ``::1`` (port 22).

    The host comes back in the server's canonical form (see ``canonical_host``) so
    that it can be used as an exact filter.
    """
    if not address:
        raise InvalidArgument("invalid_host", "address is empty; expected [USER@]HOST[:PORT]")
    if any(ch.isspace() for ch in address) or "\0" in address:
        raise InvalidArgument("invalid_host", f"address must not contain spaces: {address!r}")
    user: str | None = None
    rest = address
    if "@" in address:
        user, _, rest = address.rpartition("@")
        if not user:
            raise InvalidArgument("invalid_user", f"empty user before '@' in {address!r}")
        if "@" in user:
            raise InvalidArgument("invalid_user", f"more than one '@' in {address!r}")
    port = DEFAULT_PORT
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise InvalidArgument("invalid_host", f"missing ']' in {address!r}")
        host, after = rest[1:end], rest[end + 1 :]
        if not host:
            raise InvalidArgument("invalid_host", f"empty host in {address!r}")
        if not _is_ipv6(host):
            raise InvalidArgument(
                "invalid_host", f"only an IPv6 address goes in brackets, got {host!r}"
            )
        if after:
            if not after.startswith(":"):
                raise InvalidArgument(
                    "invalid_host", f"unexpected {after!r} after ']' in {address!r}"
                )
            port = _parse_port(after[1:], address)
        return Address(user, canonical_host(host), port)
    if rest.count(":") >= 2:
        if not _is_ipv6(rest):
            raise InvalidArgument(
                "invalid_host",
                f"{rest!r} is not an IPv6 address; write it as [ADDRESS]:PORT",
            )
        return Address(user, canonical_host(rest), port)
    host, colon, port_text = rest.partition(":")
    if not host:
        raise InvalidArgument("invalid_host", f"empty host in {address!r}")
    if colon:
        port = _parse_port(port_text, address)
    if not _HOSTNAME.fullmatch(host):
        raise InvalidArgument("invalid_host", f"invalid host name {host!r}")
    return Address(user, canonical_host(host), port)


def normalize_path(path: str) -> str:
    """Check a remote path is absolute and safe; return it normalised (no trailing /)."""
    if not path:
        raise InvalidArgument("invalid_path", "path is empty")
    if "\0" in path or "\n" in path or "\r" in path:
        raise InvalidArgument("invalid_path", "path must not contain NUL or newline characters")
    if not path.startswith("/"):
        raise InvalidArgument("invalid_path", f"path must be absolute (start with /), got {path!r}")
    norm = posixpath.normpath(path)
    # POSIX lets normpath keep a leading '//'; the server treats it as '/'.
    return "/" + norm.lstrip("/")


def _same_host(a: str, b: str) -> bool:
    if a.lower() == b.lower():
        return True
    if ":" in a and ":" in b and _is_ipv6(a) and _is_ipv6(b):
        import ipaddress

        return ipaddress.IPv6Address(a) == ipaddress.IPv6Address(b)
    return False


def _normalized_sha256(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip().lower()
    return value.removeprefix("sha256:") or None


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- the client ---------------------------------------------------------------


class _DefaultTimeout:
    """Marker for 'the client's timeout'; None means no socket timeout at all."""


_DEFAULT_TIMEOUT = _DefaultTimeout()


@dataclass(frozen=True)
class DownloadResult:
    size: int
    sha256: str


class Client:
    """backhauld's HTTP/JSON API; each method returns the route's JSON object unchanged."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(
                "invalid_url",
                f"server URL must look like http://HOST:PORT, got {base_url!r}",
            )
        try:
            self._port = parts.port
        except ValueError:
            raise ClientError("invalid_url", f"bad port in server URL {base_url!r}") from None
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._prefix = parts.path
        if token is not None:
            token = token.strip()
            if not token or any(ch.isspace() or ord(ch) < 32 for ch in token):
                raise ClientError("invalid_token", "the API token is empty or contains whitespace")
        self.token = token
        self.timeout = timeout

    # -- routes ---------------------------------------------------------------

    def health(self) -> JSONDict:
        return self._json("GET", "/health")

    def get_pubkey(self, restricted: bool = False, address: Address | None = None) -> JSONDict:
        query: dict[str, Any] = {"restricted": restricted or None}
        if address is not None:
            query.update(host=address.host, port=address.port, user=address.user)
        return self._json("GET", "/api/v1/pubkey", query)

    def list_nodes(self) -> JSONDict:
        return self._json("GET", "/api/v1/nodes")

    def forget_node(self, node_id: int) -> JSONDict:
        return self._json("DELETE", f"/api/v1/nodes/{_seg(node_id)}")

    def edit_target(
        self, target_id: int, every_minutes: int | None = None, keep: int | None = None
    ) -> JSONDict:
        body = {"every_minutes": every_minutes, "keep": keep}
        return self._json("PATCH", f"/api/v1/targets/{_seg(target_id)}", body=body)

    def trust_node(self, node_id: int, fingerprint: str | None = None) -> JSONDict:
        body = {"fingerprint": fingerprint} if fingerprint else {}
        return self._json("POST", f"/api/v1/nodes/{_seg(node_id)}/trust", body=body)

    def register(
        self,
        host: str,
        port: int,
        user: str | None,
        path: str,
        every_minutes: int,
        keep: int = 10,
        host_key_fingerprint: str | None = None,
        **options: Any,
    ) -> JSONDict:
        """``options``: pre_command, post_command, pre_optional, ping_url (sent when given)."""
        body = {
            "host": host,
            "port": port,
            "user": user,
            "path": path,
            "every_minutes": every_minutes,
            "keep": keep,
            "host_key_fingerprint": host_key_fingerprint,
            **{k: v for k, v in options.items() if v is not None},
        }
        return self._json("POST", "/api/v1/targets", body=body)

    def set_target_options(self, target_id: int, **options: Any) -> JSONDict:
        """Change some of pre_command, post_command, pre_optional, ping_url ("" removes)."""
        return self._json("PATCH", f"/api/v1/targets/{target_id}/options", body=options)

    def list_targets(self, **filters: Any) -> JSONDict:
        """Filters: host, port, user, path, all (True includes unregistered targets)."""
        return self._json("GET", "/api/v1/targets", filters)

    def get_target(self, target_id: int) -> JSONDict:
        return self._json("GET", f"/api/v1/targets/{_seg(target_id)}")

    def unregister(self, target_id: int, purge: bool = False) -> JSONDict:
        return self._json("DELETE", f"/api/v1/targets/{_seg(target_id)}", {"purge": purge or None})

    def backups(self, target_id: int) -> JSONDict:
        return self._json("GET", f"/api/v1/targets/{_seg(target_id)}/backups")

    def run(self, target_id: int, wait: bool = False, timeout: float | None = None,
            full: bool = False) -> JSONDict:
        query: dict[str, Any] = {}
        if full:
            query["full"] = True
        http_timeout: float | None | _DefaultTimeout = _DEFAULT_TIMEOUT
        if wait:
            query["wait"] = True
            if timeout is not None:
                query["timeout"] = f"{timeout:g}"
                # The server answers 504 after `timeout`; leave it room to say so.
                http_timeout = timeout + max(self.timeout, 30.0)
            else:
                http_timeout = None  # the server's own wait limit applies
        return self._json(
            "POST", f"/api/v1/targets/{_seg(target_id)}/run", query, timeout=http_timeout
        )

    def runs(
        self,
        target_id: int | None = None,
        limit: int | None = 50,
        host: str | None = None,
        port: int | None = None,
        path: str | None = None,
        user: str | None = None,
    ) -> JSONDict:
        query = {
            "target_id": target_id,
            "host": host,
            "port": port,
            "user": user,
            "path": path,
            "limit": limit,
        }
        return self._json("GET", "/api/v1/runs", query)

    def verify(self, archive_ids: list[int] | None) -> JSONDict:
        body: dict[str, Any] = {"archive_ids": archive_ids} if archive_ids else {"all": True}
        # Reading every archive takes as long as the store is big: no socket timeout.
        return self._json("POST", "/api/v1/archives/verify", body=body, timeout=None)

    def restore_to_node(
        self,
        archive_id: int,
        address: Address,
        dest: str,
        only: list[str] | None = None,
        force: bool = False,
    ) -> JSONDict:
        body = {
            "host": address.host,
            "port": address.port,
            "user": address.user,
            "dest": dest,
            "only": list(only or []),
            "force": force,
        }
        # The server streams the whole archive before it answers: no socket timeout.
        return self._json(
            "POST", f"/api/v1/archives/{_seg(archive_id)}/restore", body=body, timeout=None
        )

    def get_archive(self, archive_id: int) -> JSONDict:
        return self._json("GET", f"/api/v1/archives/{_seg(archive_id)}")

    def progress(self, target_id: int) -> JSONDict:
        return self._json("GET", f"/api/v1/targets/{_seg(target_id)}/progress")

    def list_entries(self, archive_id: int, path: str | None = None) -> JSONDict:
        return self._json("GET", f"/api/v1/archives/{_seg(archive_id)}/entries", {"path": path})

    def find(self, target_id: int, pattern: str) -> JSONDict:
        # Reads the index of every kept archive: allow for a slow store.
        return self._json(
            "GET", f"/api/v1/targets/{_seg(target_id)}/find", {"pattern": pattern}, timeout=None
        )

    def stream_extract(self, archive_id: int, only: list[str]) -> tuple[Any, Any]:
        """Open a tar.gz of just the ``only`` entries: ``(connection, response)``."""
        path = f"/api/v1/archives/{_seg(archive_id)}/extract"
        return self._open("POST", path, None, {"only": list(only)}, self.timeout, accept="*/*")

    def download(
        self,
        archive_id: int,
        out_stream: BinaryIO,
        progress_cb: ProgressCallback | None = None,
        expected_sha256: str | None = None,
    ) -> DownloadResult:
        """Stream an archive into ``out_stream`` and verify it against X-Backhaul-SHA256.

        ``progress_cb(bytes_so_far, total_or_None)`` is called after every chunk.
        On a mismatch the bytes are already written: ``download_to_path`` is the
        variant that never leaves them behind.
        """
        import hashlib
        import http.client

        path = f"/api/v1/archives/{_seg(archive_id)}/download"
        conn, resp = self._open("GET", path, None, None, self.timeout, accept="*/*")
        digest = hashlib.sha256()
        received = 0
        try:
            header_sha = _normalized_sha256(resp.getheader("X-Backhaul-SHA256"))
            length = resp.getheader("Content-Length")
            total = int(length) if length and length.isdigit() else None
            while True:
                try:
                    chunk = resp.read(CHUNK_SIZE)
                except http.client.IncompleteRead:
                    chunk = b""
                except (OSError, http.client.HTTPException) as exc:
                    raise self._unreachable(exc, self.timeout) from None
                if not chunk:
                    break
                digest.update(chunk)
                out_stream.write(chunk)
                received += len(chunk)
                if progress_cb is not None:
                    progress_cb(received, total)
        finally:
            conn.close()
        if total is not None and received != total:
            raise ClientError(
                "download_incomplete",
                f"archive {archive_id}: the connection closed after {received} of {total} bytes",
            )
        actual = digest.hexdigest()
        wanted = [s for s in (header_sha, _normalized_sha256(expected_sha256)) if s]
        if not wanted:
            raise ClientError(
                "bad_response",
                f"archive {archive_id}: the server sent no X-Backhaul-SHA256 header to verify",
            )
        for expected in wanted:
            if expected != actual:
                raise ClientError(
                    "checksum_mismatch",
                    f"archive {archive_id}: received data has sha256 {actual}, "
                    f"the server announced {expected}",
                )
        return DownloadResult(received, actual)

    def stream_archive(self, archive_id: int) -> tuple[Any, Any, int | None, str | None]:
        """Open the archive's download for reading: ``(connection, response,
        length or None, announced sha256 or None)``; close the connection when done."""
        path = f"/api/v1/archives/{_seg(archive_id)}/download"
        conn, resp = self._open("GET", path, None, None, self.timeout, accept="*/*")
        length = resp.getheader("Content-Length")
        total = int(length) if length and length.isdigit() else None
        return conn, resp, total, _normalized_sha256(resp.getheader("X-Backhaul-SHA256"))

    def download_to_path(
        self,
        archive_id: int,
        path: str,
        progress_cb: ProgressCallback | None = None,
        expected_sha256: str | None = None,
    ) -> DownloadResult:
        """Download into ``path`` via a temp file in the same directory, renamed when verified."""
        import tempfile

        directory = os.path.dirname(os.path.abspath(path))
        name = os.path.basename(path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=directory)
        except OSError as exc:
            raise ClientError(
                "write_failed", f"cannot create a file in {directory}: {exc.strerror or exc}"
            ) from None
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    result = self.download(archive_id, out, progress_cb, expected_sha256)
                except ClientError as exc:
                    raise ClientError(
                        exc.code, f"{exc.message}; {path} not written", exc.status
                    ) from None
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            _remove(tmp)
            raise ClientError(
                "write_failed", f"cannot write {path}: {exc.strerror or exc}"
            ) from None
        except BaseException:
            _remove(tmp)
            raise
        return result

    def resolve(self, address: str | Address, path: str) -> JSONDict:
        """The target for ``[USER@]HOST[:PORT]`` + PATH: the active one, else the newest.

        Unregistered targets are included so their backups stay reachable.
        """
        addr = parse_address(address) if isinstance(address, str) else address
        norm = normalize_path(path)
        filters: dict[str, Any] = {"host": addr.host, "port": addr.port, "path": norm, "all": True}
        if addr.user:
            filters["user"] = addr.user
        targets = self.list_targets(**filters).get("targets") or []
        # Re-check locally: picking the wrong target would be worse than none
        # (unregister --purge acts on what this returns).
        matches = [
            t
            for t in targets
            if _same_host(str(t.get("host", "")), addr.host)
            and t.get("port") == addr.port
            and t.get("path") == norm
            and (addr.user is None or t.get("user") == addr.user)
        ]
        if not matches:
            raise ClientError("target_not_found", f"no target {addr} {norm}", 404)
        active = [t for t in matches if t.get("active")]
        if len(active) > 1:
            names = ", ".join(str(t.get("address")) for t in active)
            raise ClientError(
                "ambiguous_target",
                f"several targets match {addr} {norm} ({names}); give USER@ to choose",
            )
        if active:
            return active[0]
        return max(matches, key=lambda t: (str(t.get("created_at") or ""), t.get("id") or 0))

    def find_node(self, address: str | Address) -> JSONDict:
        """The node for ``[USER@]HOST[:PORT]`` (any user when none is given, if only one)."""
        addr = parse_address(address) if isinstance(address, str) else address
        nodes = self.list_nodes().get("nodes") or []
        matches = [
            n
            for n in nodes
            if _same_host(str(n.get("host", "")), addr.host)
            and n.get("port") == addr.port
            and (addr.user is None or n.get("user") == addr.user)
        ]
        if not matches:
            raise ClientError("node_not_found", f"no node {addr}", 404)
        if len(matches) > 1:
            names = ", ".join(str(n.get("address")) for n in matches)
            raise ClientError(
                "ambiguous_node", f"several nodes match {addr} ({names}); give USER@ to choose"
            )
        return matches[0]

    # -- transport ------------------------------------------------------------

    def _json(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        timeout: float | None | _DefaultTimeout = _DEFAULT_TIMEOUT,
    ) -> JSONDict:
        if isinstance(timeout, _DefaultTimeout):
            timeout = self.timeout
        conn, resp = self._open(method, path, query, body, timeout)
        try:
            raw = self._read_all(resp, timeout)
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            raise ClientError(
                "bad_response",
                f"backhauld at {self.base_url} sent a non-JSON answer to {method} {path}",
                resp.status,
            ) from None
        if not isinstance(doc, dict):
            raise ClientError(
                "bad_response", f"unexpected answer to {method} {path}: {raw[:80]!r}", resp.status
            )
        return doc

    def _open(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None,
        body: Any,
        timeout: float | None,
        accept: str = "application/json",
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        import http.client

        target = self._prefix + path
        params = _query(query)
        if params:
            target += "?" + params
        headers = {"Accept": accept, "User-Agent": USER_AGENT}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn_class = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = conn_class(self._host, self._port, timeout=timeout)
        try:
            conn.request(method, target, body=data, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._unreachable(exc, timeout) from None
        if resp.status >= 400:
            try:
                raw = self._read_all(resp, timeout)
            except ClientError:
                raw = b""
            finally:
                conn.close()
            raise self._http_error(resp.status, resp.reason, raw)
        return conn, resp

    def _read_all(self, resp: http.client.HTTPResponse, timeout: float | None) -> bytes:
        import http.client

        try:
            return resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc, timeout) from None

    def _unreachable(self, exc: BaseException, timeout: float | None) -> ClientError:
        import http.client
        import socket

        if isinstance(exc, TimeoutError | socket.timeout):
            reason = f"timed out after {timeout:g}s" if timeout else "timed out"
        elif isinstance(exc, ConnectionRefusedError):
            reason = "connection refused"
        elif isinstance(exc, socket.gaierror):
            reason = f"cannot resolve {self._host!r} ({exc.strerror or exc})"
        elif isinstance(exc, http.client.IncompleteRead):
            reason = "the answer was cut short"
        elif isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError):
            reason = "the connection was closed without an answer"
        elif isinstance(exc, http.client.HTTPException):
            reason = f"not an HTTP answer ({type(exc).__name__})"
        elif isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        else:
            reason = str(exc) or type(exc).__name__
        return ClientError(
            "server_unreachable", f"cannot reach backhauld at {self.base_url}: {_one_line(reason)}"
        )

    def _http_error(self, status: int, reason: str, raw: bytes) -> ClientError:
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        error = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(error, dict) and error.get("code"):
            message = str(error.get("message") or reason or f"HTTP {status}")
            return ClientError(str(error["code"]), _one_line(message), status)
        # Not the API's error shape (a proxy, or a framework default): keep what we can.
        if isinstance(doc, dict) and "detail" in doc:
            detail = doc["detail"]
            text = detail if isinstance(detail, str) else json.dumps(detail)
        else:
            text = raw[:200].decode("utf-8", "replace")
        message = f"HTTP {status} {reason}" + (f": {text}" if text.strip() else "")
        return ClientError(f"http_{status}", _one_line(message), status)


def _seg(value: object) -> str:
    return quote(str(value), safe="")


def _query(query: Mapping[str, Any] | None) -> str:
    if not query:
        return ""
    pairs = []
    for key, value in query.items():
        if value is None:
            continue
        if isinstance(value, list):  # a repeated parameter
            pairs.extend((key, str(v)) for v in value)
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        pairs.append((key, str(value)))
    return urlencode(pairs)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
