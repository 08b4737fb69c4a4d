"""The README's demo command, in its one-cycle mode, on the embedded default."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest


def test_demo_once_backs_up_every_node(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "fixtures.demo", "--once", "--dir",
                          str(tmp_path / "demo")], capture_output=True, text=True, timeout=180,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "one cycle done: 3 nodes" in out.stdout
    archives = sorted((tmp_path / "demo" / "server" / "archives").rglob("*.tar.gz"))
    nodes = {p.parent.parent.name for p in archives}
    assert len(nodes) == 3
    for a in archives:
        with tarfile.open(a, "r:gz") as tf:
            assert any(n.endswith("conf/app.ini") for n in tf.getnames())
    # every process it started is gone: nothing listens on its ports any more
    ports = re.findall(r"^node\d: \S+@(127\.0\.0\.\d+):(\d+) ", out.stdout, re.M)
    ports += re.findall(r"backhauld on (127\.0\.0\.1):(\d+)", out.stdout)
    assert len(ports) == 4, out.stdout
    for host, port in ports:
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect((host, int(port)))
