"""backhaul: the thin client of backhauld (click + the standard library).

Errors are reported in one place, ``BackhaulGroup.invoke``: one line on stderr,
``backhaul: error: [code] message``, exit status 1; usage errors are click's
(exit 2); Ctrl-C exits 130 without a traceback.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import click

from cli import output
from cli.client import (
    DEFAULT_URL,
    Address,
    Client,
    ClientError,
    InvalidArgument,
    normalize_path,
    parse_address,
)

ADDRESS_METAVAR = "[USER@]HOST[:PORT]"
DEFAULT_DATA_DIR = "backhaul-data"
JOBS_PAGE = 100  # `jobs` rows by default: a page of a large fleet, the rest counted
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]+=*")


def token_file() -> str:
    """Where the server writes its API token: ``$BACKHAUL_DATA_DIR/api-token``."""
    return os.path.join(os.environ.get("BACKHAUL_DATA_DIR") or DEFAULT_DATA_DIR, "api-token")


def read_token_file() -> str | None:
    try:
        with open(token_file(), encoding="utf-8") as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


@dataclass
class State:
    server: str
    token: str | None
    json: bool = False
    _client: Client | None = field(default=None, repr=False)

    def client(self) -> Client:
        if self._client is None:
            token = self.token if self.token is not None else read_token_file()
            self._client = Client(self.server, token)
        return self._client


# --- parameter types ----------------------------------------------------------


class AddressType(click.ParamType):
    name = "address"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, Address):
            return value
        try:
            return parse_address(value)
        except InvalidArgument as exc:
            self.fail(exc.message, param, ctx)


class RemotePathType(click.ParamType):
    """An absolute path on the node; checked here, sent as typed (the server normalises)."""

    name = "path"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            normalize_path(value)
        except InvalidArgument as exc:
            self.fail(exc.message, param, ctx)
        return value


class ArchiveIdType(click.ParamType):
    name = "archive_id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        if not text.isdigit() or int(text) < 1:
            self.fail(
                f"an archive id is a number (the ID column of `backhaul backups`), got {value!r}",
                param,
                ctx,
            )
        return int(text)


ADDRESS = AddressType()
REMOTE_PATH = RemotePathType()
ARCHIVE_ID = ArchiveIdType()


def _at_least_one(what: str) -> Any:
    def check(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise click.BadParameter(f"{what} must be at least 1, got {value}")
        return value

    return check


def _fingerprint(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not _FINGERPRINT.fullmatch(value):
        raise click.BadParameter(
            f"expected SHA256:<base64> as printed by 'ssh-keygen -lf', got {value!r}"
        )
    return value


def _set_json(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    state = ctx.find_object(State)
    if value and state is not None:
        state.json = True


# Also on every command, so `--json` works before or after the command name.
json_option = click.option(
    "--json",
    "json_output",
    is_flag=True,
    expose_value=False,
    callback=_set_json,
    help="Print the API's JSON answer unchanged.",
)


# --- the group and its single error handler ----------------------------------


class BackhaulGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # the order they are defined in, not alphabetical

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ClientError as exc:
            message = f"[{exc.code}] {exc.message}"
            state = ctx.find_object(State)
            client = state._client if state is not None else None
            if exc.code == "unauthorized" and client is not None and not client.token:
                message += f" (no token given and none readable in {token_file()})"
            _fail(message)
        except KeyboardInterrupt:
            raise click.exceptions.Exit(130) from None
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:
            raise  # click's main silences it
        except Exception as exc:  # the promise is one line, never a traceback
            _fail(f"[unexpected_error] {type(exc).__name__}: {exc}")


def _fail(message: str) -> None:
    click.echo(f"backhaul: error: {' '.join(message.split())}", err=True)
    raise click.exceptions.Exit(1)


def _emit_json(obj: Any) -> None:
    click.echo(output.to_json(obj))


def _warn(warnings: Any) -> None:
    if isinstance(warnings, str):
        warnings = [warnings] if warnings else []
    for warning in warnings or []:
        click.echo(f"warning: {output.clean(warning)}", err=True)


def _now() -> datetime:
    return datetime.now(UTC)


@click.group(
    "backhaul",
    cls=BackhaulGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--server",
    envvar="BACKHAUL_URL",
    default=DEFAULT_URL,
    show_default=True,
    show_envvar=True,
    metavar="URL",
    help="backhauld's API address.",
)
@click.option(
    "--token",
    envvar="BACKHAUL_TOKEN",
    show_envvar=True,
    metavar="TOKEN",
    help="API token [default: the file $BACKHAUL_DATA_DIR/api-token, else "
    "./backhaul-data/api-token].",
)
@click.option("--json", "json_output", is_flag=True, help="Print the API's JSON answer unchanged.")
@click.version_option(package_name="backhaul", prog_name="backhaul")
@click.pass_context
def main(ctx: click.Context, server: str, token: str | None, json_output: bool) -> None:
    """Register, query and fetch backups from a backhauld server."""
    ctx.obj = State(server=server, token=token, json=json_output)


# --- targets ------------------------------------------------------------------


@main.command()
@click.argument("address", type=ADDRESS, metavar=ADDRESS_METAVAR)
@click.argument("path", type=REMOTE_PATH)
@click.option(
    "--every",
    "every_minutes",
    type=int,
    required=True,
    metavar="MINUTES",
    callback=_at_least_one("the frequency (minutes)"),
    help="Back up every MINUTES minutes.",
)
@click.option(
    "--keep",
    type=int,
    default=10,
    show_default=True,
    callback=_at_least_one("--keep"),
    help="Archives to keep.",
)
@click.option(
    "--host-key",
    metavar="SHA256:...",
    callback=_fingerprint,
    help="Pin the node's host key fingerprint now instead of on first contact.",
)
@click.option(
    "--pre",
    "pre_command",
    metavar="CMD",
    help="Run CMD on the node (sh -c, as given) before each backup; its failure fails the run.",
)
@click.option("--post", "post_command", metavar="CMD",
              help="Run CMD on the node after each backup.")
@click.option("--pre-optional", is_flag=True,
              help="A failing --pre command does not fail the run.")
@click.option("--ping-url", metavar="URL",
              help="Healthchecks-style URL: pinged on success, URL/fail on failure.")
@json_option
@click.pass_obj
def register(
    state: State,
    address: Address,
    path: str,
    every_minutes: int,
    keep: int,
    host_key: str | None,
    pre_command: str | None,
    post_command: str | None,
    pre_optional: bool,
    ping_url: str | None,
) -> None:
    """Back up PATH on the node every MINUTES minutes."""
    answer = state.client().register(
        address.host, address.port, address.user, path, every_minutes, keep, host_key,
        pre_command=pre_command, post_command=post_command,
        pre_optional=pre_optional or None, ping_url=ping_url,
    )
    if state.json:
        _emit_json(answer)
    else:
        t = answer.get("target") or {}
        click.echo(
            f"registered {t.get('id')}: {t.get('address')} {t.get('path')} "
            f"{output.every(t.get('every_minutes'))} (keep {t.get('keep')})"
        )
    _warn(answer.get("warnings"))


@main.command()
@click.argument("address", type=ADDRESS, metavar=ADDRESS_METAVAR)
@click.argument("path", type=REMOTE_PATH)
@click.option("--purge", is_flag=True, help="Also delete the target's archives.")
@json_option
@click.pass_obj
def unregister(state: State, address: Address, path: str, purge: bool) -> None:
    """Stop backing up PATH; its archives stay unless --purge."""
    client = state.client()
    target = client.resolve(address, path)
    answer = client.unregister(target["id"], purge=purge)
    if state.json:
        _emit_json(answer)
        return
    t = answer.get("target") or target
    line = f"unregistered {t.get('id')}: {t.get('address')} {t.get('path')}"
    if purge:
        line += f"; purged {answer.get('purged_archives', 0)} archives"
    else:
        line += "; its archives are kept (backhaul backups lists them)"
    click.echo(line)


@main.command()
@click.argument("address", type=ADDRESS, metavar=ADDRESS_METAVAR)
@click.argument("path", type=REMOTE_PATH)
@click.option(
    "--every",
    "every_minutes",
    type=int,
    metavar="MINUTES",
    callback=_at_least_one("the frequency (minutes)"),
    help="Back up every MINUTES minutes from now on.",
)
@click.option("--keep", type=int, callback=_at_least_one("--keep"), help="Archives to keep.")
@click.option("--yes", "-y", is_flag=True, help="Rotate at once without asking (lower --keep).")
@json_option
@click.pass_context
def edit(
    ctx: click.Context,
    address: Address,
    path: str,
    every_minutes: int | None,
    keep: int | None,
    yes: bool,
) -> None:
    """Change a registered target's frequency or keep; its history stays."""
    if every_minutes is None and keep is None:
        raise click.UsageError("give --every MINUTES and/or --keep N to change", ctx)
    state = ctx.find_object(State)
    assert state is not None
    client = state.client()
    target = client.resolve(address, path)
    label = f"{target.get('address')} {target.get('path')}"
    if not target.get("active"):
        raise ClientError("target_unregistered", f"{label} is not registered")
    kept = int(target.get("archives_kept") or 0)
    if keep is not None and keep < kept and not yes:
        doomed = kept - keep
        question = (
            f"keep {keep}: this deletes the {doomed} oldest of {kept} kept archives of {label} now"
        )
        if not sys.stdin.isatty():
            raise ClientError(
                "confirmation_needed", f"{question}; add --yes to do so without a terminal"
            )
        if not click.confirm(f"{question}. Continue?", err=True):
            raise ClientError("cancelled", "nothing changed")
    answer = client.edit_target(target["id"], every_minutes=every_minutes, keep=keep)
    if state.json:
        _emit_json(answer)
        return
    t = answer.get("target") or target
    every = output.every(t.get("every_minutes"))
    line = f"edited {t.get('id')}: {label} {every} (keep {t.get('keep')})"
    rotated = answer.get("rotated_archives") or []
    if rotated:
        line += f"; rotated out {len(rotated)} archives ({', '.join(str(i) for i in rotated)})"
    click.echo(line)


@main.command()
@click.argument("address", type=ADDRESS, metavar=ADDRESS_METAVAR)
@click.argument("path", type=REMOTE_PATH)
@json_option
@click.pass_obj
def backups(state: State, address: Address, path: str) -> None:
    """Every backup made of PATH: date, size, kept or rotated, sha256, id."""
    client = state.client()
    target = client.resolve(address, path)
    answer = client.backups(target["id"])
    if state.json:
        _emit_json(answer)
        return
    items = answer.get("backups") or []
    label = f"{target.get('address')} {target.get('path')}"
    if not items:
        click.echo(f"no backups of {label} yet")
        return
    rows = [
        (
            output.utc_seconds(b.get("created_at")),
            output.human_size(b.get("size")),
            b.get("size"),
            _archive_state(b),
            (b.get("sha256") or "-")[:12],
            b.get("id"),
        )
        for b in items
    ]
    click.echo(output.table(("CREATED", "SIZE", "BYTES", "STATE", "SHA256", "ID"), rows, {1, 2, 5}))
    kept = [b for b in items if b.get("retained")]
    kept_bytes = sum(int(b.get("size") or 0) for b in kept)
    click.echo(
        f"\n{label}: {len(items)} backups made, {len(kept)} kept ({output.human_size(kept_bytes)})"
    )
    corrupt = [b for b in kept if b.get("verify_status") == "corrupt"]
    for b in corrupt:
        reason = output.clean(b.get("verify_error") or "")
        click.echo(f"warning: archive {b.get('id')} is CORRUPT: {reason}", err=True)


def _archive_state(b: dict[str, Any]) -> str:
    state = b.get("state") or ("kept" if b.get("retained") else "rotated")
    if state == "kept" and b.get("verify_status") == "corrupt":
        return "kept,CORRUPT"
    if state == "kept" and b.get("verify_status") == "ok":
        return "kept,verified"
    return str(state)


@main.command()
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help=f"show at most N targets, in id order  [default: {JOBS_PAGE}; with --json: all]",
)
@click.option(
    "--offset", type=click.IntRange(min=0), default=0, help="skip the first N targets (paging)"
)
@click.option("--all", "show_all", is_flag=True, help="list every target (no page)")
@json_option
@click.pass_obj
def jobs(state: State, limit: int | None, offset: int, show_all: bool) -> None:
    """The schedule: active targets with their next and last run.

    With many targets one page is shown (the server counts the rest), with a
    summary of every target's last status; --all lists them all."""
    if show_all and (limit is not None or offset):
        raise click.UsageError("--all lists every target: leave out --limit and --offset")
    if limit is None and not show_all and not (state.json and not offset):
        limit = JOBS_PAGE
    answer = state.client().list_targets(limit=limit, offset=offset or None)
    if state.json:
        _emit_json(answer)
        return
    targets = answer.get("targets") or []
    total = answer.get("total", len(targets))
    if not targets:
        if total:
            click.echo(f"no targets past the first {offset} ({total} registered)")
        else:
            click.echo("no targets registered (see: backhaul register --help)")
        return
    now = _now()
    rows = []
    for t in targets:
        status = t.get("last_status") or "not run yet"
        if t.get("last_error_code"):
            status += f" ({t['last_error_code']})"
        if t.get("node_reachable") is False:
            status += ", node unreachable"
        rows.append(
            (
                t.get("id"),
                t.get("address"),
                t.get("path"),
                output.every(t.get("every_minutes")),
                output.when(t.get("next_run_at"), now),
                output.when(t.get("last_run_at"), now, missing="never"),
                status,
                t.get("archives_kept"),
                output.human_size(t.get("bytes_kept")),
            )
        )
    headers = ("ID", "NODE", "PATH", "EVERY", "NEXT RUN", "LAST RUN", "STATUS", "KEPT", "BYTES")
    click.echo(output.table(headers, rows, {0, 7, 8}))
    if offset or len(targets) < total:
        click.echo(f"\n{_page_line(offset, len(targets), total)}\n"
                   f"{_status_summary(total, answer.get('summary') or {})}")


def _page_line(offset: int, shown: int, total: int) -> str:
    line = f"targets {offset + 1}-{offset + shown} of {total} shown (--all lists every one"
    if offset + shown < total:
        line += f"; next page: --offset {offset + shown}"
    return line + ")"


def _status_summary(total: int, summary: dict[str, Any]) -> str:
    """``all 10000: 9990 success, 10 failed; 10 on unreachable nodes``."""
    by_status = summary.get("by_status") or {}
    names = {"never": "not run yet"}
    parts = [f"{n} {names.get(status, status)}"
             for status, n in sorted(by_status.items(), key=lambda kv: (-kv[1], kv[0]))]
    line = f"all {total}: " + (", ".join(parts) or "no status")
    unreachable = summary.get("node_unreachable")
    if unreachable:
        line += f"; {unreachable} on unreachable nodes"
    return line


@main.command()
@click.argument("address", type=ADDRESS, metavar=f"[{ADDRESS_METAVAR}", required=False)
@click.argument("path", type=REMOTE_PATH, metavar="[PATH]]", required=False)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Show at most this many runs.",
)
@json_option
@click.pass_obj
def history(state: State, address: Address | None, path: str | None, limit: int) -> None:
    """The run log, newest first: of everything, of one node, or of one target."""
    client = state.client()
    if address is None:
        answer = client.runs(limit=limit)
    elif path is None:
        answer = client.runs(host=address.host, port=address.port, user=address.user, limit=limit)
    else:
        # Every registration of this node and path, not just the newest one.
        target = client.resolve(address, path)
        answer = client.runs(
            host=target.get("host"),
            port=target.get("port"),
            user=target.get("user"),
            path=target.get("path"),
            limit=limit,
        )
    if state.json:
        _emit_json(answer)
        return
    runs = answer.get("runs") or []
    if not runs:
        click.echo("no runs")
        return
    rows = []
    for r in runs:
        error = "-"
        if r.get("error_code") or r.get("status") in ("failed", "interrupted"):
            error = ": ".join(str(x) for x in (r.get("error_code"), r.get("message")) if x) or "-"
        rows.append(
            (
                r.get("id"),
                output.utc_time(r.get("started_at")),
                r.get("address"),
                r.get("path"),
                r.get("status"),
                r.get("trigger"),
                output.human_size(r.get("bytes_transferred")),
                r.get("transfer") or "-",
                output.human_duration(r.get("duration_seconds")),
                r.get("archive_id"),
                error,
            )
        )
    headers = ("RUN", "STARTED", "NODE", "PATH", "STATUS", "TRIGGER", "BYTES", "TRANSFER",
               "DURATION", "ARCHIVE", "ERROR")
    click.echo(output.table(headers, rows, {0, 6, 8, 9}))


@main.command()
@click.argument("address", type=ADDRESS, metavar=ADDRESS_METAVAR)
@click.argument("path", type=REMOTE_PATH)
@click.option("--wait", is_flag=True, help="Wait for the run to finish; exit 1 if it failed.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="With --wait: give up waiting after SECONDS.",
)
@click.option("--full", is_flag=True,
              help="A true full backup: send the whole tree, not just what changed.")
@json_option
@click.pass_context
def run(ctx: click.Context, address: Address, path: str, wait: bool, timeout: float | None,
        full: bool) -> None:
    """Back up PATH now."""
    if timeout is not None and not wait:
        raise click.UsageError("--timeout only makes sense with --wait", ctx)
    state = ctx.find_object(State)
    assert state is not None
    client = state.client()
    target = client.resolve(address, path)
    from cli.progress import run_progress

    with run_progress(client, target["id"], None if wait and not state.json else False):
        answer = client.run(target["id"], wait=wait, timeout=timeout, full=full)
    label = f"{target.get('address')} {target.get('path')}"
    if state.json:
        _emit_json(answer)
    if not wait:
        if not state.json:
            click.echo(f"queued a backup of {label} (target {target['id']})")
        return
    r = answer.get("run") or {}
    status = r.get("status")
    _warn(r.get("warnings"))
    if status in ("success", "unchanged"):
        if not state.json:
            if status == "success":
                detail = (
                    f"archive {r.get('archive_id')} "
                    f"({output.human_size(r.get('archive_size'))} stored), "
                    f"{output.human_size(r.get('bytes_transferred'))} transferred in "
                    f"{output.human_duration(r.get('duration_seconds'))}"
                    + (f" ({r['transfer']})" if r.get("transfer") else "")
                )
            else:
                detail = "nothing changed since the last backup"
            click.echo(f"{status}: {label}: run {r.get('id')}, {detail}")
        return
    if status == "running":
        click.echo(f"still running: run {r.get('id')} of {label}", err=True)
    else:
        reason = output.clean(r.get("message") or "no message")
        click.echo(f"{status or 'failed'}: {r.get('error_code') or 'unknown'}: {reason}", err=True)
    ctx.exit(1)


# --- archives -----------------------------------------------------------------


@main.command()
@click.argument("archive_id", type=ARCHIVE_ID, metavar="ARCHIVE_ID")
@click.option(
    "-o",
    "--output",
    "output_path",
    metavar="FILE",
    help="Write here ('-' for stdout, a directory for its file name there). "
    "Default: the archive's file name in the current directory.",
)
@json_option
@click.pass_obj
def download(state: State, archive_id: int, output_path: str | None) -> None:
    """Fetch an archive, verified against the server's sha256."""
    client = state.client()
    info = client.get_archive(archive_id)
    backup = info.get("backup") or {}
    expected = backup.get("sha256")
    if output_path == "-":
        sys.stdout.flush()
        stream = sys.stdout.buffer
        client.download(archive_id, stream, None, expected)
        stream.flush()
        return
    if output_path is None or os.path.isdir(output_path):
        name = _download_name(client, backup, archive_id)
        dest = os.path.join(output_path or "", name)
        # A name we chose must not silently replace an existing file; -o FILE may.
        if os.path.lexists(dest):
            raise ClientError("file_exists", f"{dest} already exists; choose a name with -o FILE")
    else:
        dest = output_path
    with output.progress_bar(f"downloading archive {archive_id}", backup.get("size")) as bar:
        result = client.download_to_path(archive_id, dest, bar, expected)
    if state.json:
        _emit_json(info)
    else:
        click.echo(
            f"saved archive {archive_id} to {dest} "
            f"({output.human_size(result.size)}, sha256 {result.sha256[:12]})"
        )


def _download_name(client: Client, backup: dict[str, Any], archive_id: int) -> str:
    """``<node>-<path basename>-<stamp>-<run>.tar.gz``: a name that says whose it is."""
    stem = os.path.basename(str(backup.get("file_name") or "")) or f"archive-{archive_id}.tar.gz"
    try:
        target = client.get_target(int(backup["target_id"])).get("target") or {}
    except (ClientError, KeyError, TypeError, ValueError):
        target = {}
    parts = []
    if target.get("address"):
        parts.append(str(target["address"]).replace(":", "_"))
    base = os.path.basename(str(target.get("path") or "").rstrip("/"))
    if base:
        parts.append(base)
    name = re.sub(r"[^A-Za-z0-9._@-]", "_", "-".join([*parts, stem]))
    return name if name not in ("", ".", "..") else f"archive-{archive_id}.tar.gz"


@main.command()
@click.argument("archive_ids", type=ARCHIVE_ID, nargs=-1, metavar="[ARCHIVE_ID ...]")
@click.option("--all", "all_kept", is_flag=True, help="Verify every kept archive.")
@json_option
@click.pass_context
def verify(ctx: click.Context, archive_ids: tuple[int, ...], all_kept: bool) -> None:
    """Re-read stored archives on the server: sha256, gzip/tar, index.

    Exit 1 when any is corrupt (it is then flagged in `backhaul backups`).
    """
    if bool(archive_ids) == all_kept:
        raise click.UsageError("give ARCHIVE_ID ... or --all", ctx)
    state = ctx.find_object(State)
    assert state is not None
    answer = state.client().verify(list(archive_ids) or None)
    results = answer.get("results") or []
    if state.json:
        _emit_json(answer)
    elif not results:
        click.echo("no kept archives to verify")
    else:

        def mark(value: Any) -> str:
            return {True: "ok", False: "BAD", None: "-"}.get(value, str(value))

        rows = [
            (
                c.get("archive_id"),
                c.get("target_id"),
                output.human_size(c.get("size")),
                mark(c.get("sha256_ok")),
                mark(c.get("structure_ok")),
                "rebuilt" if c.get("index_rebuilt") else mark(c.get("index_ok")),
                str(c.get("status")).upper() if c.get("status") == "corrupt" else c.get("status"),
                c.get("error") or "-",
            )
            for c in results
        ]
        headers = ("ARCHIVE", "TARGET", "SIZE", "SHA256", "GZIP/TAR", "INDEX", "RESULT", "ERROR")
        click.echo(output.table(headers, rows, {0, 1, 2}))
    for c in results:
        if c.get("note"):
            click.echo(f"note: archive {c.get('archive_id')}: {output.clean(c['note'])}", err=True)
    corrupt = [c for c in results if c.get("status") == "corrupt"]
    if corrupt:
        ids = ", ".join(str(c.get("archive_id")) for c in corrupt)
        click.echo(f"{len(corrupt)} of {len(results)} archives are corrupt: {ids}", err=True)
        ctx.exit(1)


@main.command()
@click.argument("archive_id", type=ARCHIVE_ID, metavar="ARCHIVE_ID")
@click.option(
    "--to",
    "to_dir",
    metavar="DIR",
    help="Local directory to restore into; it becomes the backed-up tree (new or empty).",
)
@click.option(
    "--to-node",
    "to_node",
    type=ADDRESS,
    metavar=ADDRESS_METAVAR,
    help="Restore onto this node instead: the server streams the archive there over SSH.",
)
@click.option(
    "--dest",
    metavar="PATH",
    help="With --to-node: the absolute directory on the node (new unless --force).",
)
@click.option(
    "--only",
    "only",
    multiple=True,
    metavar="PATH",
    help="Restore only this file or subtree (relative to the tree, or the absolute "
    "path on the node); repeatable.",
)
@click.option("--force", is_flag=True, help="Restore into a non-empty DIR, replacing files.")
@json_option
@click.pass_context
def restore(
    ctx: click.Context,
    archive_id: int,
    to_dir: str | None,
    to_node: Address | None,
    dest: str | None,
    only: tuple[str, ...],
    force: bool,
) -> None:
    """Extract an archive safely into DIR here, or onto a node (--to-node).

    Nothing is written outside DIR: absolute names, '..', links leading out
    and anything written through a symlink from the archive are refused.
    """
    from cli import restore as safe

    if (to_dir is None) == (to_node is None):
        raise click.UsageError("give --to DIR, or --to-node NODE --dest PATH", ctx)
    if (to_node is None) != (dest is None):
        raise click.UsageError("--dest PATH goes with --to-node NODE", ctx)
    state = ctx.find_object(State)
    assert state is not None
    client = state.client()
    if to_node is not None:
        assert dest is not None
        try:
            normalize_path(dest)
        except InvalidArgument as exc:
            raise click.BadParameter(exc.message, ctx, param_hint="--dest") from None
        answer = client.restore_to_node(archive_id, to_node, dest, list(only), force)
        if state.json:
            _emit_json(answer)
        else:
            done = answer.get("restored") or {}
            click.echo(
                f"restored archive {archive_id} to {done.get('address')}:{done.get('dest')} "
                f"({output.human_size(done.get('bytes_sent'))} sent)"
            )
        return
    assert to_dir is not None
    backup = client.get_archive(archive_id).get("backup") or {}
    if backup.get("retained") is False:
        raise ClientError("archive_rotated", f"archive {archive_id} was rotated out")
    tree_path = None
    if only and any(p.startswith("/") for p in only):
        target = client.get_target(int(backup.get("target_id") or 0)).get("target") or {}
        tree_path = target.get("path")
    selection = safe.normalize_only(only, tree_path) if only else None
    root = safe.prepare_dest(to_dir, force)
    if selection:
        # Just the selected entries, read through the archive's index on the
        # server; gzip's CRC of every member is checked while extracting.
        conn, resp = client.stream_extract(archive_id, selection)
        total, announced = None, None
    else:
        conn, resp, total, announced = client.stream_archive(archive_id)
    try:
        with output.progress_bar(f"restoring archive {archive_id}", total) as bar:
            reader = safe.HashingReader(resp, bar, total)
            report = safe.extract(reader, root, selection)  # type: ignore[arg-type]
            reader.drain()
    except OSError as exc:
        raise ClientError("server_unreachable", f"the download broke off: {exc}") from None
    finally:
        conn.close()
    actual = reader.digest.hexdigest()
    wanted = {announced, None if selection else backup.get("sha256")} - {None}
    for expected in wanted:
        if expected != actual:
            raise ClientError(
                "checksum_mismatch",
                f"archive {archive_id} arrived with sha256 {actual}, the server announced "
                f"{expected}: do not trust what was written to {to_dir}",
            )
    missing = [o or "." for o in (selection or []) if o not in report.matched_only]
    summary = {
        "archive_id": archive_id,
        "to": root,
        "files": report.files,
        "directories": report.dirs,
        "symlinks": report.symlinks,
        "hardlinks": report.hardlinks,
        "bytes": report.bytes,
        "refused": report.refused,
        "skipped": report.skipped,
        "only_not_found": missing,
    }
    if state.json:
        _emit_json(summary)
    else:
        click.echo(
            f"restored archive {archive_id} to {to_dir}: {report.files} files, "
            f"{report.dirs} directories, {report.symlinks + report.hardlinks} links "
            f"({output.human_size(report.bytes)})"
        )
    for line in report.skipped:
        click.echo(f"skipped: {output.clean(line)}", err=True)
    for line in report.refused:
        click.echo(f"refused: {output.clean(line)}", err=True)
    if missing:
        click.echo(f"not in archive {archive_id}: {', '.join(missing)}", err=True)
    if report.refused or missing:
        ctx.exit(1)


# --- server and nodes ---------------------------------------------------------


@main.command()
@click.argument("address", type=ADDRESS, metavar=f"[{ADDRESS_METAVAR}]", required=False)
@click.option(
    "--restricted",
    is_flag=True,
    help="The line with options restricting the key: with a node ADDRESS, to "
    "backhaul's own commands on that node's registered paths.",
)
@json_option
@click.pass_obj
def pubkey(state: State, address: Address | None, restricted: bool) -> None:
    """The server's SSH public key, as a line for the node's authorized_keys."""
    if address is not None and not restricted:
        raise click.UsageError("a node ADDRESS only makes sense with --restricted")
    answer = state.client().get_pubkey(restricted=restricted, address=address)
    if state.json:
        _emit_json(answer)
    else:
        click.echo(answer.get("authorized_keys_line") or answer.get("public_key"))


@main.command()
@click.option(
    "--forget",
    "forget",
    type=ADDRESS,
    metavar=ADDRESS_METAVAR,
    help="Remove this node from the list (it must have no registered targets; "
    "its backups and history stay).",
)
@json_option
@click.pass_obj
def nodes(state: State, forget: Address | None) -> None:
    """Nodes with their pinned host key fingerprints and reachability."""
    if forget is not None:
        client = state.client()
        node = client.find_node(forget)
        answer = client.forget_node(node["id"])
        if state.json:
            _emit_json(answer)
        else:
            click.echo(f"forgot node {node.get('address')}; its backups and history stay")
        return
    answer = state.client().list_nodes()
    if state.json:
        _emit_json(answer)
        return
    items = answer.get("nodes") or []
    if not items:
        click.echo("no nodes")
        return
    now = _now()
    reach = {True: "yes", False: "no", None: "not yet"}
    rows = [
        (
            n.get("id"),
            n.get("address"),
            n.get("host_key_type"),
            n.get("host_key_fingerprint") or "(not pinned)",
            "KEY MISMATCH"
            if n.get("last_error_code") == "host_key_mismatch"
            else reach.get(n.get("reachable"), str(n.get("reachable"))),
            output.when(n.get("last_seen_at"), now, missing="never"),
            output.when(n.get("next_probe_at"), now),
            n.get("last_error"),
        )
        for n in items
    ]
    headers = (
        "ID",
        "NODE",
        "KEY TYPE",
        "HOST KEY",
        "REACHABLE",
        "LAST SEEN",
        "NEXT PROBE",
        "LAST ERROR",
    )
    click.echo(output.table(headers, rows, {0}))


@main.command()
@click.argument("address", type=ADDRESS, metavar=ADDRESS_METAVAR)
@click.option(
    "--fingerprint",
    metavar="SHA256:...",
    callback=_fingerprint,
    help="Pin this fingerprint instead of the key presented at the next contact.",
)
@json_option
@click.pass_obj
def trust(state: State, address: Address, fingerprint: str | None) -> None:
    """Forget a node's pinned host key (after a deliberate key change)."""
    client = state.client()
    node = client.find_node(address)
    answer = client.trust_node(node["id"], fingerprint)
    if state.json:
        _emit_json(answer)
        return
    name = (answer.get("node") or node).get("address")
    if fingerprint:
        click.echo(f"pinned the host key of {name} to {fingerprint}")
    else:
        old = node.get("host_key_fingerprint")
        was = f" (was {old})" if old else ""
        click.echo(
            f"forgot the pinned host key of {name}{was}; the next contact pins the key it presents"
        )


# Commands kept in their own modules register on ``main`` when imported.
from cli import browse as _browse  # noqa: E402,F401
