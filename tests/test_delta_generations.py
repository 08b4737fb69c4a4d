"""The generational property test: random mutations of a real tree, one
backup per generation, every archive checked against its generation's tree
(tarfile with filter="data", GNU tar --compare, gzip -t, bsdtar)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
from conftest import Engine, address
from test_delta_transfer import check_archive, newest_archive, tree_state

from fixtures.sshd.launcher import SSHD

pytestmark = pytest.mark.timeout(400)

GENERATIONS = 32
ODD = [b"with space", b"quote's", b'dq"x', b"$(touch pwned)", b"semi;colon", b"caf\xe9",
       b"back\\slash", b"new\nline", b"-dash", b"\xff\xfe"]
MODES = [0o644, 0o600, 0o755, 0o700, 0o640, 0o604]


class Mutator:
    def __init__(self, root: Path, seed: int) -> None:
        self.root = os.fsencode(root)
        self.rnd = random.Random(seed)
        self.n = 0
        self.done: list[str] = []

    def entries(self, kind: str | None = None) -> list[bytes]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                if kind == "file" and (os.path.islink(p) or not os.path.isfile(p)):
                    continue
                if kind == "dir" and (os.path.islink(p) or not os.path.isdir(p)):
                    continue
                if kind == "link" and not os.path.islink(p):
                    continue
                out.append(p)
        return sorted(out)

    def dirs(self) -> list[bytes]:
        return [self.root] + self.entries("dir")

    def new_name(self, odd: bool = False) -> bytes:
        base = self.rnd.choice(ODD) if odd else b"g"
        parent = self.rnd.choice(self.dirs())
        while True:
            self.n += 1
            name = os.path.join(parent, base + b"-%d" % self.n)
            if not os.path.lexists(name):
                return name

    def data(self, large: bool = False) -> bytes:
        if large:
            return self.rnd.randbytes(self.rnd.randint(1_200_000, 2_500_000))
        size = self.rnd.choice([0, 10, 700, 5000, 70_000, 200_000])
        if self.rnd.random() < 0.5:
            return (b"text line %d\n" % self.n) * (size // 12 + 1)
        return self.rnd.randbytes(size)

    def pick(self, kind: str | None = None) -> bytes | None:
        found = self.entries(kind)
        return self.rnd.choice(found) if found else None

    # -- mutations -----------------------------------------------------------------

    def create(self) -> None:
        with open(self.new_name(self.rnd.random() < 0.3), "wb") as f:
            f.write(self.data(self.rnd.random() < 0.08))

    def rewrite(self) -> None:
        if p := self.pick("file"):
            with open(p, "wb") as f:
                f.write(self.data())

    def append(self) -> None:
        if p := self.pick("file"):
            with open(p, "ab") as f:
                f.write(self.rnd.randbytes(self.rnd.choice([1, 100, 4096, 30_000])))

    def truncate(self) -> None:
        if p := self.pick("file"):
            os.truncate(p, self.rnd.randint(0, os.path.getsize(p)))

    def write_middle(self) -> None:
        big = [p for p in self.entries("file") if os.path.getsize(p) > 1_000_000]
        if big:
            p = self.rnd.choice(big)
            with open(p, "r+b") as f:
                for _ in range(self.rnd.randint(1, 4)):
                    f.seek(self.rnd.randint(0, os.path.getsize(p) - 100))
                    f.write(self.rnd.randbytes(self.rnd.randint(1, 5000)))

    def delete(self) -> None:
        if p := self.pick():
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)

    def rename(self) -> None:
        p = self.pick()
        if p is None:
            return
        dest = self.new_name(self.rnd.random() < 0.3)
        if os.path.isdir(p) and not os.path.islink(p) and dest.startswith(p + b"/"):
            return
        os.rename(p, dest)

    def chmod(self) -> None:
        if p := self.pick("file"):
            os.chmod(p, self.rnd.choice(MODES))

    def touch(self) -> None:
        if p := self.pick("file"):
            t = self.rnd.randint(1_000_000_000, 1_700_000_000)
            os.utime(p, (t, t))

    def symlink(self) -> None:
        target = self.rnd.choice([b"missing-target", b"n-1", b"../n-2", b"."])
        link = self.pick("link")
        if link is not None and self.rnd.random() < 0.6:
            os.unlink(link)  # retarget
        else:
            link = self.new_name()
        if link.rsplit(b"/", 1)[0] == self.root and target.startswith(b"../"):
            target = target[3:]
        os.symlink(target, link)

    def hardlink(self) -> None:
        if self.rnd.random() < 0.6:
            if p := self.pick("file"):
                os.link(p, self.new_name())
        else:
            linked = [p for p in self.entries("file") if os.stat(p).st_nlink > 1]
            if linked:
                os.unlink(self.rnd.choice(linked))

    def retype(self) -> None:
        p = self.pick()
        if p is None:
            return
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
            with open(p, "wb") as f:
                f.write(b"was a directory\n")
        elif os.path.islink(p):
            os.unlink(p)
            os.mkdir(p)
        elif self.rnd.random() < 0.5:
            os.unlink(p)
            os.mkdir(p)
            with open(os.path.join(p, b"inside"), "wb") as f:
                f.write(b"was a file\n")
        else:
            os.unlink(p)
            os.symlink(b"was-a-file", p)

    def empty_dir(self) -> None:
        os.mkdir(self.new_name(self.rnd.random() < 0.3))

    def generation(self) -> list[str]:
        ops = [self.create, self.rewrite, self.append, self.truncate, self.write_middle,
               self.delete, self.rename, self.chmod, self.touch, self.symlink,
               self.hardlink, self.retype, self.empty_dir]
        weights = [5, 3, 4, 2, 3, 2, 2, 2, 2, 2, 2, 1, 1]
        done = []
        for op in self.rnd.choices(ops, weights, k=self.rnd.randint(1, 6)):
            op()
            done.append(op.__name__)
        return done


def seed_tree(root: Path) -> None:
    rnd = random.Random(7)
    for d in ("a", "a/b", "c", "empty"):
        (root / d).mkdir(parents=True)
    for i in range(30):
        d = rnd.choice(["", "a", "a/b", "c"])
        (root / d / f"n-{i}").write_bytes(rnd.randbytes(rnd.choice([5, 900, 9000, 90_000])))
    (root / "big.db").write_bytes(rnd.randbytes(2_200_000))
    (root / "app.log").write_bytes(b"log line\n" * 20_000)
    os.link(root / "a" / "b" / "n-1" if (root / "a/b/n-1").exists() else root / "big.db",
            root / "hard")
    os.symlink("n-1", root / "sym")


def test_every_generation_extracts_to_its_tree(eng: Engine, node: SSHD,
                                               tmp_path: Path) -> None:
    src = tmp_path / "app"
    seed_tree(src)
    target = eng.register(node, src, keep=3)
    mut = Mutator(src, seed=int(os.environ.get("BACKHAUL_TEST_SEED", "20261201")))
    transfers = []
    for gen in range(GENERATIONS):
        done = mut.generation() if gen else ["initial tree"]
        # Both node tool paths: python3 on even generations, coreutils on odd.
        eng.engine.use_node_python = gen % 2 == 0
        eng.pool.discard(address(node))  # a fresh connection re-detects the tools
        res = eng.engine.run(target.id)
        assert res.status in ("success", "unchanged"), (gen, done, res.message)
        transfers.append(res.transfer)
        if res.status == "unchanged":
            continue
        assert not res.warnings, (gen, done, res.warnings)
        check_archive(newest_archive(eng, target.id), src, tmp_path / f"x{gen}",
                      tree_state(src))
        shutil.rmtree(tmp_path / f"x{gen}")
    print(transfers)
    assert transfers[0] == "full"
    assert transfers.count("delta") >= GENERATIONS // 2, transfers
