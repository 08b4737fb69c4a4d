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


ADDRESS = AddressType()
REMOTE_PATH = RemotePathType()


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
@json_option
@click.pass_obj
def register(
    state: State,
    address: Address,
    path: str,
    every_minutes: int,
    keep: int,
    host_key: str | None,
) -> None:
    """Back up PATH on the node every MINUTES minutes."""
    answer = state.client().register(
        address.host, address.port, address.user, path, every_minutes, keep, host_key
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
            output.utc_time(b.get("created_at")),
            output.human_size(b.get("size")),
            b.get("size"),
            "kept" if b.get("retained") else "rotated",
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


@main.command()
@json_option
@click.pass_obj
def jobs(state: State) -> None:
    """The schedule: every active target with its next and last run."""
    answer = state.client().list_targets()
    if state.json:
        _emit_json(answer)
        return
    targets = answer.get("targets") or []
    if not targets:
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
        target = client.resolve(address, path)
        answer = client.runs(target_id=target["id"], limit=limit)
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
                error,
            )
        )
    headers = ("RUN", "STARTED", "NODE", "PATH", "STATUS", "TRIGGER", "BYTES", "TRANSFER",
               "DURATION", "ERROR")
    click.echo(output.table(headers, rows, {0, 6, 8}))


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
                    f"archive {r.get('archive_id')}, "
                    f"{output.human_size(r.get('bytes_transferred'))} in "
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
@click.argument("archive_id", type=click.IntRange(min=1), metavar="ARCHIVE_ID")
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
        name = os.path.basename(str(backup.get("file_name") or ""))
        if name in ("", ".", ".."):
            name = f"archive-{archive_id}.tar.gz"
        dest = os.path.join(output_path or "", name)
        # A name we chose must not silently replace an existing file; -o FILE may.
        if os.path.lexists(dest):
            raise ClientError("file_exists", f"{dest} already exists; choose a name with -o FILE")
    else:
        dest = output_path
    progress = None
    if sys.stderr.isatty():
        progress = output.Progress(sys.stderr, dest)
    try:
        result = client.download_to_path(archive_id, dest, progress, expected)
    finally:
        if progress is not None:
            progress.close()
    if state.json:
        _emit_json(info)
    else:
        click.echo(
            f"saved archive {archive_id} to {dest} "
            f"({output.human_size(result.size)}, sha256 {result.sha256[:12]})"
        )


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
@json_option
@click.pass_obj
def nodes(state: State) -> None:
    """Nodes with their pinned host key fingerprints and reachability."""
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
            reach.get(n.get("reachable"), str(n.get("reachable"))),
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
