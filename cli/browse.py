"""``backhaul ls`` and ``backhaul find``: an archive's entries and the kept
archives holding a file, read from the archives' indexes on the server."""

from __future__ import annotations

import stat
from datetime import UTC, datetime
from typing import Any

import click

from cli import output
from cli.client import Address
from cli.main import (
    ADDRESS,
    ADDRESS_METAVAR,
    ARCHIVE_ID,
    REMOTE_PATH,
    State,
    _emit_json,
    json_option,
    main,
)

_KIND = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK,
         "hardlink": stat.S_IFREG, "chardev": stat.S_IFCHR, "blockdev": stat.S_IFBLK,
         "fifo": stat.S_IFIFO}


def mode_text(entry: dict[str, Any]) -> str:
    """``drwxr-xr-x`` as ``ls -l`` shows it (a hard link shows as ``h``)."""
    text = stat.filemode(_KIND.get(str(entry.get("type")), 0) | int(entry.get("mode") or 0))
    return ("h" + text[1:]) if entry.get("type") == "hardlink" else text


def mtime_text(value: Any) -> str:
    try:
        t = datetime.fromtimestamp(float(value), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"
    return f"{t:%Y-%m-%d %H:%M:%S}"


def name_text(entry: dict[str, Any]) -> str:
    name = output.clean(entry.get("path"))
    if entry.get("type") == "symlink":
        return f"{name} -> {output.clean(entry.get('link'))}"
    if entry.get("type") == "hardlink":
        return f"{name} link to {output.clean(entry.get('link'))}"
    return name


@main.command("ls")
@click.argument("archive_id", type=ARCHIVE_ID, metavar="ARCHIVE_ID")
@click.argument("path", required=False, metavar="[PATH]")
@json_option
@click.pass_obj
def ls(state: State, archive_id: int, path: str | None) -> None:
    """The entries of an archive (type, mode, size, mtime, path), from its index.

    PATH limits the list to one file or subtree: relative to the backed-up
    tree, or its absolute path on the node (as `restore --only` takes it).
    """
    answer = state.client().list_entries(archive_id, path)
    if state.json:
        _emit_json(answer)
        return
    rows = [
        (mode_text(e), e.get("size"), mtime_text(e.get("mtime")), name_text(e))
        for e in answer.get("entries") or []
    ]
    click.echo(output.table(("MODE", "SIZE", "MTIME (UTC)", "PATH"), rows, {1}))
    if answer.get("truncated"):
        click.echo("(the list was cut short; use --json with the API's limit)", err=True)


@main.command("find")
@click.argument("address", type=ADDRESS, metavar=ADDRESS_METAVAR)
@click.argument("path", type=REMOTE_PATH)
@click.argument("pattern")
@json_option
@click.pass_obj
def find(state: State, address: Address, path: str, pattern: str) -> None:
    """Which kept archives of PATH hold entries matching the glob PATTERN.

    PATTERN is matched (fnmatch, case-sensitive) against each entry's path
    relative to the tree and against its basename: 'app.conf', '*.log',
    'etc/*.conf'. Quote it for the shell.
    """
    client = state.client()
    target = client.resolve(address, path)
    answer = client.find(target["id"], pattern)
    if state.json:
        _emit_json(answer)
        return
    rows = []
    for a in answer.get("archives") or []:
        for e in a.get("entries") or []:
            rows.append(
                (
                    a.get("archive_id"),
                    output.utc_seconds(a.get("created_at")),
                    e.get("type"),
                    e.get("size"),
                    mtime_text(e.get("mtime")),
                    (e.get("sha256") or "-")[:12],
                    name_text(e),
                )
            )
    label = f"{target.get('address')} {target.get('path')}"
    searched = answer.get("archives_searched", 0)
    if not rows:
        click.echo(f"no entry matching {pattern!r} in the {searched} kept archives of {label}")
        return
    headers = ("ARCHIVE", "BACKUP CREATED", "TYPE", "SIZE", "MTIME (UTC)", "SHA256", "PATH")
    click.echo(output.table(headers, rows, {0, 3}))
    held = len(answer.get("archives") or [])
    matches = answer.get("matches")
    click.echo(f"\n{matches} matches in {held} of {searched} kept archives of {label}")
    if answer.get("truncated"):
        click.echo("(cut short: narrow the pattern)", err=True)
