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

import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import remote, validation
from orchestrator.errors import BackhaulError, InvalidPath, RemoteCommandFailed
from orchestrator.ssh import NodeAddress, SSHPool
from orchestrator.verify_cmd import archive_root
from storage.archives import ArchiveStore
from storage.catalog import Catalog

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024


class RestoreError(BackhaulError):
    code = "restore_failed"
    http_status = 422


class DestExists(BackhaulError):
    code = "dest_exists"
    http_status = 409

    def __init__(self, address: str, dest: str) -> None:
        super().__init__(f"{dest} already exists on {address}; restore into a new directory "
                         "or add --force to write into it")


class RestoreRefused(BackhaulError):
    code = "command_refused"
    http_status = 422

    def __init__(self, address: str) -> None:
        super().__init__(
            f"{address} refused the restore: the server's key there is restricted to "
            "backhaul's backup commands (backhaul pubkey --restricted); restore with "
            "`backhaul restore ID --to DIR` and copy the files, or authorise a separate, "
            "unrestricted restore key on that node for the restore")


class ArchiveGone(BackhaulError):
    code = "archive_rotated"
    http_status = 410


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


def relative_members(only: list[str], tree_path: str) -> list[str]:
    """``--only`` names, relative to the tree or absolute under its path on the node."""
    out = []
    root = tree_path.rstrip("/")
    for name in only:
        original = name
        if "\0" in name or "\n" in name:
            raise InvalidPath(f"--only {original!r}: NUL or newline in the name")
        if name.startswith("/"):
            if not (name == root or name.startswith(root + "/")):
                raise InvalidPath(f"--only {original}: not inside {tree_path}")
            name = name[len(root):]
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise InvalidPath(f"--only {original}: '..' is not allowed")
        out.append("/".join(parts))
    return out


def restore_to_node(catalog: Catalog, store: ArchiveStore, pool: SSHPool, *,
                    archive_id: int, user: str, host: str, port: int, dest: str,
                    only: list[str], force: bool) -> NodeRestore:
    archive = catalog.get_archive(archive_id)
    if archive["deleted_at"] is not None:
        raise ArchiveGone(f"archive {archive_id} was rotated out; nothing to restore")
    path = store.path_of(archive["file_name"])
    if not path.exists():
        raise ArchiveGone(f"archive {archive_id} is listed but its file is gone from the store")
    host, port, user = validation.host(host), validation.port(port), validation.user(user)
    dest = remote.validate_path(dest)
    if not catalog.find_node(user, host, port):
        raise RestoreError(f"{user}@{host}:{port} is not a node backhaul knows (its host key "
                           "is pinned on a registration); register a target on it first")
    target = catalog.get_target(archive["target_id"])
    members = relative_members(only, target.path)
    root = archive_root(catalog, archive)
    strip = 0 if _holds_one_file(path) else 1
    node = NodeAddress(user, host, port)
    address = str(node)
    sent = 0

    def whole() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while data := f.read(CHUNK):
                yield data

    source = whole
    if members:
        # Only the gzip members holding the selection, through the index
        # (orchestrator/browse.py imports this module, hence here).
        from orchestrator.browse import open_listing, selected_stream, selection

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


def _holds_one_file(path: Path) -> bool:
    """Whether the archive is of a single file (a target that is a file): its
    first member is then not a directory, and nothing is stripped from it."""
    try:
        # "r:gz", not "r|gz": tarfile's stream mode stops at the end of the
        # first gzip member, and archives are many members.
        with tarfile.open(path, mode="r:gz") as tar:
            first = tar.next()
    except (tarfile.TarError, OSError, EOFError) as exc:
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

