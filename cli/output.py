"""Plain-text rendering for the client: aligned tables, sizes, UTC times, --json.

Functions that depend on the current time take ``now`` so tests can pin it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_CONTROL = {i: " " for i in range(32)} | {127: " "}


def to_json(obj: Any) -> str:
    """The API's JSON object, unchanged, as ``--json`` prints it."""
    return json.dumps(obj, indent=2)


def human_size(size: int | float | None) -> str:
    """``1258291`` -> ``1.2 MiB`` (binary units, one decimal); None -> ``-``."""
    if size is None:
        return "-"
    if abs(size) < 1024:
        return f"{int(size)} B"
    value = float(size)
    for unit in _UNITS:
        value /= 1024
        # Compare the rounded value so 1048575 B reads 1.0 MiB, not 1024.0 KiB.
        if abs(round(value, 1)) < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def human_duration(seconds: float | None) -> str:
    """``3.42`` -> ``3.4s``, ``125`` -> ``2m05s``, ``3720`` -> ``1h02m``."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    total = int(seconds)
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def every(minutes: int | None) -> str:
    """A frequency in minutes as ``every 5m``, ``every 2h``, ``every 1d6h``."""
    if minutes is None:
        return "-"
    days, rest = divmod(int(minutes), 1440)
    hours, mins = divmod(rest, 60)
    parts = [f"{n}{u}" for n, u in ((days, "d"), (hours, "h"), (mins, "m")) if n]
    return "every " + ("".join(parts) or "0m")


def parse_time(value: str | None) -> datetime | None:
    """An API time (ISO 8601, UTC) as an aware datetime; None if absent or unreadable."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def utc_time(value: str | None) -> str:
    """``2026-11-27T04:40:00Z`` -> ``2026-11-27 04:40`` (UTC); None -> ``-``."""
    parsed = parse_time(value)
    if parsed is None:
        return clean(value) if value else "-"
    return _minute(parsed)


def utc_seconds(value: str | None) -> str:
    """``2026-11-27T04:40:07Z`` -> ``2026-11-27 04:40:07`` (UTC); None -> ``-``."""
    parsed = parse_time(value)
    if parsed is None:
        return clean(value) if value else "-"
    return f"{_minute(parsed)}:{parsed.second:02}"


def _minute(t: datetime) -> str:
    # an f-string, not strftime: ten times faster on a 10,000-row table
    return f"{t.year:04}-{t.month:02}-{t.day:02} {t.hour:02}:{t.minute:02}"


def relative(value: str | datetime | None, now: datetime | None = None) -> str:
    """``in 3m`` / ``5m ago`` / ``now``, in the largest whole unit."""
    when = parse_time(value) if isinstance(value, str) or value is None else value
    if when is None:
        return "-"
    now = now or datetime.now(UTC)
    delta = (when - now).total_seconds()
    seconds = int(abs(delta))
    if seconds < 1:
        return "now"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        if seconds >= size:
            text = f"{seconds // size}{unit}"
            break
    return f"in {text}" if delta > 0 else f"{text} ago"


def when(value: str | None, now: datetime | None = None, missing: str = "-") -> str:
    """``2026-11-27 04:40 (in 3m)``; ``missing`` when there is no time."""
    parsed = parse_time(value)
    if parsed is None:
        return utc_time(value) if value else missing
    return f"{_minute(parsed)} ({relative(parsed, now)})"


def clean(value: object) -> str:
    """A table cell: None -> ``-``; control characters (newlines) become spaces."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value)
    return text if text.isprintable() else text.translate(_CONTROL)


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    right: Collection[int] = (),
) -> str:
    """Columns padded to their widest cell, two spaces apart; ``right`` = right-aligned indexes."""
    cells = [[clean(c) for c in headers]] + [[clean(c) for c in row] for row in rows]
    ncols = len(headers)
    for row in cells:
        if len(row) != ncols:
            raise ValueError(f"row has {len(row)} cells, expected {ncols}: {row!r}")
    widths = [max(len(row[i]) for row in cells) for i in range(ncols)]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


@contextmanager
def progress_bar(label: str, total: int | None) -> Iterator[Callable[[int, int | None], None]]:
    """A click progress bar on stderr, only when stderr is a terminal; yields a
    ``callback(bytes_so_far, total)`` for the transfer to call."""
    import sys

    import click

    if not sys.stderr.isatty():
        yield lambda _done, _total: None
        return
    with click.progressbar(
        length=int(total or 0) or None,
        label=label,
        file=sys.stderr,
        show_pos=False,
        show_percent=bool(total),
    ) as bar:
        shown = 0

        def update(done: int, _total: int | None) -> None:
            nonlocal shown
            bar.update(done - shown)
            shown = done

        yield update
