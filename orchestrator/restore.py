"""Restore onto a node: the server streams a stored archive over SSH into
``tar xzf -`` there (``backhaul restore ID --to-node NODE --dest PATH``).

The destination is a new directory unless ``force``; the archive's top
directory is stripped so the destination becomes the backed-up tree. GNU tar
on the node does the extraction: it refuses absolute names and '..', and does
not write through symlinks it extracted (extracting into a fresh directory
as a non-root user, it refused the CVE-2025-4517-style archives too).

A node whose key is restricted with ``backhaul pubkey --restricted`` allows
only the backup commands, so a restore there is refused with a message that
says what to do instead.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from orchestrator import remote, validation
from orchestrator.browse import open_listing, relative_members, selected_stream, selection
from orchestrator.errors import (
    ArchiveGone,
    DestExists,
    RemoteCommandFailed,
    RestoreError,
    RestoreRefused,
)
from orchestrator.ssh import NodeAddress, SSHPool
from orchestrator.verify_cmd import archive_root
from storage.catalog import Catalog
from storage.errors import StorageError
from storage.stores.base import Store

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class NodeRestore:
    archive_id: int
    address: str
    dest: str
    members: list[str]
    bytes_sent: int

    def as_json(self) -> dict[str, Any]:
        return {"archive_id": self.archive_id, "address": self.address, "dest": self.dest,
                "only": self.members, "bytes_sent": self.bytes_sent}


def restore_to_node(catalog: Catalog, store: Store, pool: SSHPool, *,
                    archive_id: int, user: str, host: str, port: int, dest: str,
                    only: list[str], force: bool) -> NodeRestore:
    archive = catalog.get_archive(archive_id)
    if archive["deleted_at"] is not None:
        raise ArchiveGone(f"archive {archive_id} was rotated out; nothing to restore")
    file_name = archive["file_name"]
    if not store.exists(file_name):
        raise ArchiveGone(f"archive {archive_id} is listed but its file is gone from the store")
    host, port, user = validation.host(host), validation.port(port), validation.user(user)
    dest = remote.validate_path(dest)
    if not catalog.find_node(user, host, port):
        raise RestoreError(f"{user}@{host}:{port} is not a node backhaul knows (its host key "
                           "is pinned on a registration); register a target on it first")
    target = catalog.get_target(archive["target_id"])
    members = relative_members(only, target.path)
    root = archive_root(catalog, archive)
    strip = 0 if _holds_one_file(store, file_name) else 1
    node = NodeAddress(user, host, port)
    address = str(node)
    sent = 0

    def whole() -> Iterator[bytes]:
        return store.iter_bytes(file_name, CHUNK)

    source = whole
    if members:
        # Only the gzip members holding the selection, through the index.
        listed = open_listing(catalog, store, archive_id)
        picked, _hit = selection(listed, members)
        if not picked:
            raise RestoreError(f"not in archive {archive_id}: {', '.join(only)}")

        def source() -> Iterator[bytes]:
            return selected_stream(store, listed, picked)

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for data in source():
            sent += len(data)
            yield data

    with pool.session(node) as conn:
        prep = conn.exec(remote.restore_prepare_command(dest, force=force),
                         what="restore preparation")
        _check(prep.exit_status, prep.stderr_text, address, dest)
        res = conn.exec_with_input(
            remote.restore_extract_command(dest, root, members, strip=strip),
            chunks(), what="restore")
        _check(res.exit_status, res.stderr_text, address, dest)
    log.info("restored archive %s to %s:%s%s (%d bytes sent)", archive_id, address, dest,
             f" (only {members})" if members else "", sent)
    return NodeRestore(archive_id, address, dest, members, sent)


class _Head(io.RawIOBase):
    """The archive's bytes from its start, read through the store on demand."""

    def __init__(self, store: Store, file_name: str) -> None:
        self._store, self._name, self._pos = store, file_name, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self._store.read_range(self._name, self._pos, min(len(buf), 256 * 1024))
        buf[:len(data)] = data
        self._pos += len(data)
        return len(data)


def _holds_one_file(store: Store, file_name: str) -> bool:
    """Whether the archive is of a single file (a target that is a file): its
    first member is then not a directory, and nothing is stripped from it.
    Only the first entry is read, through the store. Mode "r|gz" is enough
    here though it inflates only the first gzip member (cli/restore.py's
    GunzipReader is what reads a whole archive): a member starts on an entry
    boundary and holds whole headers (a large file's first member is its
    header alone), so the first entry's header is always in the first one."""
    try:
        with tarfile.open(fileobj=io.BufferedReader(_Head(store, file_name)),
                          mode="r|gz") as tar:
            first = tar.next()
    except (tarfile.TarError, OSError, EOFError, StorageError) as exc:
        raise RestoreError(f"the stored archive cannot be read: {exc}") from None
    return first is not None and not first.isdir()


def _check(status: int, stderr: str, address: str, dest: str) -> None:
    if status == 0:
        return
    if status == remote.EXIT_REFUSED and remote.REFUSED_MARK in stderr:
        raise RestoreRefused(address)
    if status == remote.EXIT_DEST_EXISTS:
        raise DestExists(address, dest)
    err = RemoteCommandFailed(address, "restore", status, stderr)
    raise RestoreError(err.message)

