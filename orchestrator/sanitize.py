"""Node-supplied text made safe to log and store.

A node may print anything on stderr or in its answers: terminal escape
sequences that repaint an operator's terminal, carriage returns that hide a
line, newlines that forge log records, bidi overrides that reorder text.
Such characters are shown as ``\\xNN`` / ``\\uNNNN`` escapes instead.
"""

from __future__ import annotations

import logging
import re

# C0 controls, DEL, C1 controls, and the Unicode bidi/format controls that
# reorder or hide text (LRE..RLO, LRI..PDI, zero-width marks, BOM).
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def _escape(m: re.Match[str]) -> str:
    c = m.group(0)
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def escape_controls(text: str, keep: str = "") -> str:
    """``text`` with every control character escaped, except those in ``keep``
    (e.g. ``"\\n\\t"`` for multi-line stderr kept as a run's warnings)."""
    if not keep:
        return _CONTROLS.sub(_escape, text)
    return _CONTROLS.sub(lambda m: m.group(0) if m.group(0) in keep else _escape(m), text)


class SafeFormatter(logging.Formatter):
    """A text log formatter that escapes control characters in the message, so
    no node text can forge a log line or drive the terminal that shows it.
    Tracebacks keep their newlines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging API
        record.message = escape_controls(record.message)
        return super().formatMessage(record)
