"""``run --wait`` on a terminal: the bytes received so far, polled from the
server while the run goes on, on one line of stderr that is cleared at the end."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import click

from cli import output
from cli.client import Client, ClientError

POLL_SECONDS = 0.5


@contextmanager
def run_progress(client: Client, target_id: int, enabled: bool | None = None) -> Iterator[None]:
    """While the block runs, show the target's run progress (only when stderr
    is a terminal, unless ``enabled`` says otherwise)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield
        return
    stop = threading.Event()
    shown = [0]  # width of what is on the line

    def show(text: str) -> None:
        pad = " " * max(0, shown[0] - len(text))
        click.echo(f"\r{text}{pad}", err=True, nl=False)
        shown[0] = len(text)

    def poll() -> None:
        while not stop.wait(POLL_SECONDS):
            try:
                p = client.progress(target_id)
            except ClientError:
                continue  # progress is a courtesy; the run's answer is what counts
            if p.get("running") and not stop.is_set():
                show(f"run {p.get('run_id')}: {output.human_size(p.get('bytes_so_far'))} "
                     "received so far")

    thread = threading.Thread(target=poll, name="run-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        if shown[0]:
            click.echo("\r" + " " * shown[0] + "\r", err=True, nl=False)
