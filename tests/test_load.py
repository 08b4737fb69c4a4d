"""A short load run: many targets over several nodes on a fast tick, some
trees changing. Every due run happens once, none overlap, none are lost.
(bench/reliability.py runs the long version: 1,000 targets over 20 nodes.)"""

from __future__ import annotations

import random
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from conftest import LiveServer

from bench.reliability import analyze_runs
from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey
from storage.catalog import Catalog

NODES = 3
PER_NODE = 10
TICK = 3.0  # seconds per schedule "minute"
DURATION = 18.0


def test_every_due_run_happens_exactly_once(tmp_path: Path, server_key: ServerKey) -> None:
    with ExitStack() as stack:
        nodes = [stack.enter_context(SSHD(tmp_path / f"n{i}", server_key.public_line,
                                          host=f"127.0.1.{i + 1}")) for i in range(NODES)]
        srv = LiveServer(tmp_path / "srv", server_key, minute_seconds=TICK, workers=8,
                         per_node=2).start()
        stack.callback(srv.stop)
        dirs = []
        for n in nodes:
            for j in range(PER_NODE):
                d = tmp_path / f"{n.host}-{j}"
                d.mkdir()
                (d / "f").write_text("seed")
                dirs.append((n, d))
        targets = [srv.register(n, d, every=1) for n, d in dirs]
        stop = threading.Event()

        def churn() -> None:  # a tenth of the trees change between runs
            rng = random.Random(7)
            while not stop.wait(TICK / 3):
                for _, d in rng.sample(dirs, len(dirs) // 10):
                    (d / "f").write_text(str(time.time()))

        writer = threading.Thread(target=churn)
        writer.start()
        start = time.time()
        time.sleep(DURATION)
        end = time.time()
        stop.set()
        writer.join()
        srv.stop()

        cat = Catalog(srv.data_dir / "catalog.db")
        try:
            rows = cat.list_runs(limit=100_000)
        finally:
            cat.close()
    assert {r["target_id"] for r in rows} == {t["id"] for t in targets}
    figures = analyze_runs(rows, TICK, start, end)
    assert figures["lost"] == 0, figures
    assert figures["overlapped"] == 0, figures
    assert figures["failed"] == 0, [(r["status"], r["error_code"], r["message"])
                                    for r in rows if r["status"] == "failed"]
    assert figures["min_due_runs_per_target"] >= DURATION / TICK - 4, figures
    assert figures["start_delay_p99_s"] < TICK, figures
