"""The streaming tar.gz verifier against real GNU tar and pigz output and
hand-made hostile archives."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from storage.errors import InvalidArchive
from storage.verify import TarGzVerifier


def verify(data: bytes, root: str, chunk: int = 7919) -> int:
    v = TarGzVerifier(root)
    for i in range(0, len(data), chunk):
        v.feed(data[i:i + chunk])
    v.finish()
    return v.members


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("v")
    deep = base / "app" / ("x" * 120) / ("y" * 120)
    deep.mkdir(parents=True)
    (deep / "f").write_text("hi" * 1000)
    os.symlink("/etc/passwd", base / "app" / "abs-link")
    os.link(deep / "f", base / "app" / "hard")
    (base / "app" / "big").write_bytes(os.urandom(2_000_000))
    (base / "app" / "empty").mkdir()
    return base


def gnu_tar(base: Path, *extra: str) -> bytes:
    return subprocess.run(["tar", "-C", str(base), "-czf", "-", *extra, "app"],
                          capture_output=True, check=True).stdout


@pytest.mark.parametrize("fmt", [[], ["--format=posix"], ["--format=gnu"]])
@pytest.mark.parametrize("chunk", [511, 7919, 1 << 20])
def test_real_tar_output_passes(tree: Path, fmt: list[str], chunk: int) -> None:
    data = gnu_tar(tree, *fmt)
    assert verify(data, "app", chunk) == 8


def test_pigz_output_passes(tree: Path) -> None:
    if not shutil.which("pigz"):
        pytest.skip("pigz not installed")
    data = subprocess.run(["tar", "-C", str(tree), "-I", "pigz -n", "-cf", "-", "app"],
                          capture_output=True, check=True).stdout
    assert verify(data, "app") == 8


def test_truncated_stream_is_refused(tree: Path) -> None:
    data = gnu_tar(tree)
    for cut in (len(data) // 2, len(data) - 10, 30):
        with pytest.raises(InvalidArchive, match="truncated|corrupt"):
            verify(data[:cut], "app")


def test_not_gzip_is_refused() -> None:
    with pytest.raises(InvalidArchive, match="not valid gzip"):
        verify(os.urandom(5000), "app")


def test_members_outside_the_root_are_refused(tree: Path) -> None:
    with pytest.raises(InvalidArchive, match="outside 'other'"):
        verify(gnu_tar(tree), "other")


def _one_member(name: str, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w:gz", format=fmt) as tf:
        ti = tarfile.TarInfo(name)
        ti.size = 3
        tf.addfile(ti, io.BytesIO(b"abc"))
    return b.getvalue()


@pytest.mark.parametrize("name,fmt", [
    ("../evil", tarfile.GNU_FORMAT),
    ("/etc/evil", tarfile.GNU_FORMAT),
    ("app/../../x", tarfile.USTAR_FORMAT),
    ("app/" + "a/" * 60 + "../" * 70 + "x", tarfile.GNU_FORMAT),  # GNU long name
    ("app/" + "../" * 60 + "etc/x", tarfile.PAX_FORMAT),  # pax path record
])
def test_escaping_names_are_refused(name: str, fmt: int) -> None:
    with pytest.raises(InvalidArchive, match="absolute|escaping"):
        verify(_one_member(name, fmt), "app")


def test_an_empty_archive_is_refused() -> None:
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w:gz"):
        pass
    with pytest.raises(InvalidArchive, match="no files"):
        verify(b.getvalue(), "app")
