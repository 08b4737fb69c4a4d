"""Bounds on what one run may cost the server, whatever its node sends.

``RunLimits`` gathers them (built from the settings in ``server.py``):
a wall-clock deadline per run, a cap on the output of commands whose answer
is one short line, and the archive stream's limits (``storage.limits``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from storage.limits import ArchiveLimits, MiB

if TYPE_CHECKING:
    from orchestrator.settings import Settings

DEFAULT_RUN_TIMEOUT = 6 * 3600.0
DEFAULT_COMMAND_OUTPUT = 1 * MiB


@dataclass(frozen=True)
class RunLimits:
    run_timeout: float = DEFAULT_RUN_TIMEOUT  # seconds; 0 = none
    command_output: int = DEFAULT_COMMAND_OUTPUT  # bytes of stdout without a sink
    archive: ArchiveLimits = field(default_factory=ArchiveLimits)

    def deadline(self) -> Deadline | None:
        return Deadline.after(self.run_timeout) if self.run_timeout else None


@dataclass(frozen=True)
class Deadline:
    """A point in monotonic time, and the budget it was set with (for messages)."""

    at: float
    seconds: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds)

    def remaining(self) -> float:
        return self.at - time.monotonic()


def run_limits(settings: Settings) -> RunLimits:
    """The limits named by the settings table (see ``orchestrator.settings``)."""
    return RunLimits(
        run_timeout=settings.run_timeout,
        command_output=settings.max_command_output,
        archive=ArchiveLimits(max_archive_size=settings.max_archive_size,
                              max_uncompressed=settings.max_uncompressed_size,
                              max_ratio=settings.max_compression_ratio))
