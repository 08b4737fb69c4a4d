"""The remote shell commands, built and quoted here and nowhere else.

Every value interpolated into a command goes through ``shlex.quote``; paths are
validated first (absolute, normalised, no NUL or newline, not ``/``). The
commands need only POSIX sh, GNU find/tar, coreutils and gzip on the node.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import shlex
from collections.abc import Iterable

from orchestrator.errors import InvalidPath

# Exit statuses of our own pre-checks, chosen outside tar's 0/1/2 and find's 0/1.
EXIT_NO_SUCH_PATH = 66
EXIT_NOT_READABLE = 77

EXIT_REFUSED = 126
REFUSED_MARK = "backhaul: command refused by the restricted key"

MAX_PATH = 4096

# The only environment an allowed command gets under the restricted key.
CLEAN_PATH = "/usr/bin:/bin"

# type, mode, owner, group, size, mtime, ctime (ns resolution), inode, link target,
# path relative to the start point; NUL-terminated so any byte in a name is safe.
FIND_FORMAT = r"%y %m %U %G %s %T@ %C@ %i %l %P\0"

_HEX64 = re.compile(rb"^[0-9a-f]{64}")


def validate_path(path: str) -> str:
    """Return the normalised absolute path or raise ``InvalidPath`` saying why."""
    if not isinstance(path, str) or not path:
        raise InvalidPath("path is empty; give an absolute path such as /srv/app")
    if "\x00" in path or "\n" in path or "\r" in path:
        raise InvalidPath("path contains a NUL or newline character")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidPath("path is not valid UTF-8 text (it holds a lone surrogate)") from None
    if len(encoded) > MAX_PATH:
        raise InvalidPath(f"path is longer than {MAX_PATH} bytes")
    if not path.startswith("/"):
        raise InvalidPath(f"path {path!r} is not absolute; give it from / (e.g. /srv/app)")
    parts = path.split("/")
    if ".." in parts or "." in parts:
        raise InvalidPath(f"path {path!r} contains '.' or '..' components")
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if norm == "/":
        raise InvalidPath("refusing to back up / as one target; register its directories")
    return norm


def _precheck(path: str) -> str:
    q = shlex.quote(path)
    return (f"if [ ! -e {q} ] && [ ! -L {q} ]; then echo 'backhaul: no such path' >&2; "
            f"exit {EXIT_NO_SUCH_PATH}; fi; "
            f"if [ ! -r {q} ]; then echo 'backhaul: path not readable' >&2; "
            f"exit {EXIT_NOT_READABLE}; fi; ")


def fingerprint_command(path: str) -> str:
    """A command printing the sha256 of the tree's sorted metadata listing.

    find's own exit status is carried out of the pipeline through fd 3 so a
    partial listing (unreadable subdirectory) fails instead of hashing less.
    """
    path = validate_path(path)
    find = (f"find {shlex.quote(path)} -ignore_readdir_race "
            f"-printf {shlex.quote(FIND_FORMAT)}")
    return (
        "LC_ALL=C; export LC_ALL; "
        + _precheck(path)
        + "exec 4>&1; "
        + f"rc=$( {{ {{ {find}; echo $? >&3; }} | sort -z | sha256sum >&4; }} 3>&1 ); "
        + 'exit "$rc"'
    )


def check_command(path: str) -> str:
    """Exit 0 when the path exists and is readable (registration's check)."""
    return _precheck(validate_path(path)) + "exit 0"


def parse_fingerprint(stdout: bytes) -> str | None:
    m = _HEX64.match(stdout.strip())
    return m.group(0).decode() if m else None


def has_pigz_command() -> str:
    return "command -v pigz >/dev/null 2>&1 && echo yes || echo no"


def tar_command(path: str, *, pigz: bool = False) -> str:
    """``tar czf -`` of the path, run from its parent; tar's own exit status is
    the command's (with pigz through ``-I`` rather than a pipe)."""
    path = validate_path(path)
    parent, name = posixpath.split(path)
    compress = "-I 'pigz -n'" if pigz else "-z"
    return (
        "LC_ALL=C; export LC_ALL; "
        + _precheck(path)
        # --no-unquote: GNU tar would read a backslash in the name as an escape.
        # --sort=name: entries in canonical order, so a later delta can copy
        # this archive's members (orchestrator/transfer).
        + f"exec tar -C {shlex.quote(parent or '/')} --sort=name --no-unquote {compress} -cf - "
        + f"-- {shlex.quote(name)}"
    )


def probe_command() -> str:
    return "echo backhaul-ok"


def hook_command(command: str, timeout: float) -> str:
    """A target's pre/post command as the node runs it: the user's text, run
    as given by ``sh -c`` (by design: it is the operator's own command), quoted
    here as one argument, and killed by coreutils ``timeout`` after
    ``timeout`` seconds (exit status 124)."""
    return (f"exec timeout -k 10 {max(1, int(timeout))} /bin/sh -c "
            f"{shlex.quote(command)} </dev/null")


def allowed_commands(paths: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    """Every command backhaul sends to a node that backs up ``paths``, plus
    ``extra`` complete commands (the targets' hook commands). Per-run data
    (names, sizes, block lists, the previous node time) travels over stdin, so
    this list is finite and fixed per path."""
    out = [probe_command(), has_pigz_command(), has_python_command()]
    for p in sorted(set(paths)):
        out += [check_command(p), fingerprint_command(p), tar_command(p, pigz=False),
                tar_command(p, pigz=True), scan_command(p), listing_command(p),
                fetch_command(p, pigz=False), fetch_command(p, pigz=True),
                py_refine_command(p), sh_tail_command(p), sh_hashes_command(p),
                sh_blocks_command(p)]
    return out + sorted(set(extra))


def restricted_key_line(public_line: str, paths: Iterable[str],
                        extra: Iterable[str] = ()) -> str:
    """An authorized_keys line that lets the key run only backhaul's own
    commands on ``paths`` (and the ``extra`` hook commands): the node's shell
    hashes the requested command and runs it only when the hash is on the
    list (exact match, no parsing).

    The allowed command runs with a clean environment: on a node whose sshd
    accepts client variables (``AcceptEnv``), a client could otherwise send
    ``TAR_OPTIONS=--checkpoint-action=exec=...`` with an allowed tar command."""
    hashes = "|".join(hashlib.sha256(c.encode()).hexdigest()
                      for c in allowed_commands(paths, extra))
    guard = (
        "h=$(printf '%s' \"$SSH_ORIGINAL_COMMAND\" | sha256sum); "
        f"case \"${{h%% *}}\" in {hashes}) "
        f"exec env -i PATH={CLEAN_PATH} /bin/sh -c \"$SSH_ORIGINAL_COMMAND\";; "
        f"*) echo '{REFUSED_MARK}' >&2; exit {EXIT_REFUSED};; esac"
    )
    # authorized_keys takes a double quote inside command="..." as \"
    guard = guard.replace('"', '\\"')
    return f'restrict,command="{guard}" {public_line}'


# -- restore onto a node ---------------------------------------------------------

EXIT_DEST_EXISTS = 73  # our own pre-check: the restore destination already exists


def restore_prepare_command(dest: str, *, force: bool) -> str:
    """Make the restore's destination directory: a new one (refused when the
    path exists), or with ``force`` an existing one too."""
    dest = validate_path(dest)
    q = shlex.quote(dest)
    if force:
        return f"mkdir -p -- {q}"
    return (f"if [ -e {q} ] || [ -L {q} ]; then echo 'backhaul: {dest} exists' >&2; "
            f"exit {EXIT_DEST_EXISTS}; fi; "
            f"mkdir -p -- {shlex.quote(posixpath.dirname(dest) or '/')} && mkdir -- {q}")


def restore_extract_command(dest: str, root: str, members: Iterable[str] = (),
                            strip: int = 1) -> str:
    """``tar xzf -`` into ``dest``, the archive's top directory ``root``
    stripped (dest becomes the tree); ``members`` (relative to the tree)
    select files or subtrees. GNU tar itself refuses absolute names, '..'
    and writing through symlinks it extracted."""
    dest = validate_path(dest)
    names = [shlex.quote(f"{root}/{m}" if m and strip else root) for m in members]
    return ("LC_ALL=C; export LC_ALL; "
            f"exec tar -C {shlex.quote(dest)} --no-unquote --strip-components={int(strip)} "
            "-xzf - "
            + ("-- " + " ".join(names) if names else ""))


# -- delta transfer (orchestrator/transfer) ------------------------------------
# Every command below is fixed per path; what changes from run to run (the
# previous node time, names, sizes, block lists) is written to its stdin.


def _parent(path: str) -> tuple[str, str]:
    path = validate_path(path)
    parent, name = posixpath.split(path)
    return parent or "/", name


def _carry(pipeline_head: str, pipeline_tail: str) -> str:
    """``head | tail`` with the head's exit status as the result, through fd 3
    (POSIX sh has no pipefail)."""
    return (f"rc=$( {{ {{ {pipeline_head}; echo $? >&3; }} | {pipeline_tail} >&4; }} 3>&1 ); "
            '[ "$rc" = 0 ] || exit "$rc"; ')


def scan_command(path: str) -> str:
    """Node time, fingerprint, then (when asked for and the fingerprint
    differs from the one given) one gzip section of what changed.

    stdin: two lines, the time (seconds since the epoch, decimal) from which
    changes are wanted or an empty line, and the fingerprint the server holds.
    The node time is taken before find runs, so the next scan from it cannot
    miss a change made during this one. The gzip section holds ``C<record>``
    for each entry whose ctime is newer, and for each such directory
    ``D<relative path>\\0`` followed by ``c<record>`` for each of its children
    (their %P is the child's name): that is how deletions and renames show.
    An unchanged tree costs the two lines only. Sockets are left out, as
    tar leaves them out of the archive (a tree holding one would otherwise
    never rebuild to its fingerprint); for other trees the fingerprint is
    the one ``fingerprint_command`` prints.
    """
    path = validate_path(path)
    q = shlex.quote(path)
    fmt = shlex.quote(FIND_FORMAT)
    changed = (f"find {q} -ignore_readdir_race -newerct \"@$t\" ! -type s \\( "
               f"-printf {shlex.quote('C' + FIND_FORMAT)} , -type d -printf 'D%P\\0' "
               f"-exec find {{}} -ignore_readdir_race -mindepth 1 -maxdepth 1 ! -type s "
               f"-printf {shlex.quote('c' + FIND_FORMAT)} \\; \\)")
    return (
        "LC_ALL=C; export LC_ALL; "
        + _precheck(path)
        + "IFS= read -r t || :; IFS= read -r prev || :; "
        + "case \"$t\" in *[!0-9.]*) t=;; esac; "
        + "date +%s.%N; "
        # find's status comes out first on fd 3, then the digest
        + f"out=$( {{ {{ find {q} -ignore_readdir_race ! -type s -printf {fmt}; "
        + "echo $? >&3; } "
        + "| sort -z | sha256sum; } 3>&1 ); set -- $out; "
        + '[ "$1" = 0 ] || exit "$1"; echo "$2  -"; '
        + 'if [ -n "$t" ] && [ "$2" != "$prev" ]; then exec 4>&1; '
        + _carry(changed, "gzip -1")
        + "fi; exit 0"
    )


def parse_scan(stdout: bytes) -> tuple[str, str, bytes] | None:
    """(node time, fingerprint, gzip section) or None when malformed."""
    first, _, rest = stdout.partition(b"\n")
    second, _, section = rest.partition(b"\n")
    if not re.fullmatch(rb"\d+(\.\d+)?", first.strip()):
        return None
    fp = parse_fingerprint(second)
    if fp is None:
        return None
    return first.strip().decode(), fp, section


def listing_command(path: str) -> str:
    """The whole sorted listing, gzip'd (when the scan's changes do not add up)."""
    path = validate_path(path)
    find = (f"find {shlex.quote(path)} -ignore_readdir_race ! -type s "
            f"-printf {shlex.quote(FIND_FORMAT)}")
    return ("LC_ALL=C; export LC_ALL; " + _precheck(path) + "exec 4>&1; "
            + _carry(find, "sort -z | gzip -1") + "exit 0")


def fetch_command(path: str, *, pigz: bool = False) -> str:
    """tar of just the names on stdin (NUL-separated, relative to the parent,
    in canonical order); nothing recursed, nothing unquoted, no name read as
    an option."""
    parent, _name = _parent(path)
    compress = "-I 'pigz -n'" if pigz else "-z"
    return ("LC_ALL=C; export LC_ALL; " + _precheck(validate_path(path))
            + f"exec tar -C {shlex.quote(parent)} --no-recursion --null "
            + f"--verbatim-files-from --no-unquote {compress} -cf - -T -")


def has_python_command() -> str:
    return ("command -v python3 >/dev/null 2>&1 && python3 -c 'import hashlib, gzip' "
            ">/dev/null 2>&1 && echo yes || echo no")


# One process for a whole batch of tail / block-hash / block requests.
# stdin: records ``op\0name\0a\0b\0``: T name old_size old_sha256 | H name
# block_size - | B name block_size comma-separated-indexes. Replies, in order,
# gzip'd: ``gone\n`` | ``mismatch\n`` | T: ``ok\n`` (``D <n>\n`` data)* ``E <sha>\n``
# | H: ``ok <size> <count>\n`` + count x 16 hex (the first 8 bytes of each
# block's sha256: enough to find changed blocks, as the whole-file hash
# checks the result) | L name - hashes (16 hex per chunk of the old content,
# remote.CDC_SOURCE): ``ok\n`` (``R <old chunk>\n`` | ``D <n>\n`` data)* ``E <sha>\n``.
# stdin may be gzip'd. B: ``ok\n`` (``K <i> <n>\n``
# data)* ``E <sha>\n``. The whole-file sha256 is taken in the same pass.
# Content-defined chunks of a file, the same on the node and the server (both
# run this text): a chunk ends after a line whose crc32 ends in four zero
# bits, or once it holds 8 KiB, so an inserted line moves no other boundary.
CDC_SOURCE = """
def cdc(d):
    import zlib
    out = []; s = 0; p = 0; n = len(d)
    while p < n:
        e = d.find(b"\\n", p)
        e = n if e < 0 else e + 1
        if (zlib.crc32(d[p:e]) & 15) == 0 or e - s >= 8192 or e == n:
            out.append((s, e)); s = e
        p = e
    return out
"""

NODE_PY = CDC_SOURCE + """
import sys, hashlib, gzip
d = sys.stdin.buffer.read()
d = (gzip.decompress(d) if d[:2] == b"\\x1f\\x8b" else d).split(b"\\0")
o = gzip.GzipFile(fileobj=sys.stdout.buffer, mode="wb", compresslevel=1)
w = o.write
for k in range(0, len(d) - 3, 4):
    op, n, a, b = d[k:k + 4]
    try:
        f = open(n, "rb")
    except OSError:
        w(b"gone\\n")
        continue
    with f:
        if op == b"H":
            bs = int(a); hs = []; z = 0
            while True:
                c = f.read(bs)
                if not c:
                    break
                z += len(c); hs.append(hashlib.sha256(c).hexdigest()[:16].encode())
            w(b"ok %d %d\\n" % (z, len(hs))); w(b"".join(hs))
        elif op == b"T":
            r = int(a); x = hashlib.sha256(); y = hashlib.sha256()
            while r > 0:
                c = f.read(min(r, 1 << 20))
                if not c:
                    break
                x.update(c); y.update(c); r -= len(c)
            if r or x.hexdigest().encode() != b:
                w(b"mismatch\\n")
                continue
            w(b"ok\\n")
            while True:
                c = f.read(1 << 20)
                if not c:
                    break
                y.update(c); w(b"D %d\\n" % len(c)); w(c)
            w(b"E %s\\n" % y.hexdigest().encode())
        elif op == b"L":
            hs = {}
            for j in range(0, len(b), 16):
                hs.setdefault(b[j:j + 16], j // 16)
            data = f.read(); w(b"ok\\n")
            for s, e in cdc(data):
                i = hs.get(hashlib.sha256(data[s:e]).hexdigest()[:16].encode())
                if i is None:
                    w(b"D %d\\n" % (e - s)); w(data[s:e])
                else:
                    w(b"R %d\\n" % i)
            w(b"E %s\\n" % hashlib.sha256(data).hexdigest().encode())
        elif op == b"B":
            bs = int(a); want = set(int(v) for v in b.split(b",") if v)
            x = hashlib.sha256(); i = 0
            w(b"ok\\n")
            while True:
                c = f.read(bs)
                if not c:
                    break
                x.update(c)
                if i in want:
                    w(b"K %d %d\\n" % (i, len(c))); w(c)
                i += 1
            w(b"E %s\\n" % x.hexdigest().encode())
o.close()
"""


def py_refine_command(path: str) -> str:
    parent, _name = _parent(path)
    return (f"cd -- {shlex.quote(parent)} || exit {EXIT_NO_SUCH_PATH}; "
            f"exec python3 -c {shlex.quote(NODE_PY)}")


# The coreutils-only fallbacks take one request per exec: parameters on lines,
# then the name (relative to the parent) up to EOF, read with $(cat) plus a
# sentinel so trailing newlines survive (a name cannot hold NUL).
def _sh_prologue(path: str, params: str) -> str:
    parent, _name = _parent(path)
    return ("LC_ALL=C; export LC_ALL; "
            f"cd -- {shlex.quote(parent)} || exit {EXIT_NO_SUCH_PATH}; "
            f"{params} f=$(cat; echo x); f=${{f%x}}; exec 4>&1; ")


def sh_tail_command(path: str) -> str:
    """stdin ``old_size\\nold_sha256\\nname``; replies ``gone``, ``mismatch``
    or ``ok <sha256 of the whole file>`` then the bytes after old_size."""
    body = ('if [ ! -f "$f" ] || [ -L "$f" ]; then echo gone; exit 0; fi; '
            'p=$(head -c "$n" < "$f" | sha256sum); '
            'if [ "${p%% *}" != "$s" ]; then echo mismatch; exit 0; fi; '
            'w=$(sha256sum < "$f"); echo "ok ${w%% *}"; tail -c +$((n + 1)) < "$f"')
    return (_sh_prologue(path, "IFS= read -r n; IFS= read -r s; "
                               'case "$n" in ""|*[!0-9]*) exit 2;; esac; ')
            + _carry("{ " + body + "; }", "gzip -1") + "exit 0")


def sh_hashes_command(path: str) -> str:
    """stdin ``block_size\\nname``; replies ``gone`` or ``ok <size>`` then one
    ``<sha256>  -`` line per block."""
    body = ('if [ ! -f "$f" ] || [ -L "$f" ]; then echo gone; exit 0; fi; '
            'z=$(wc -c < "$f"); echo "ok $z"; '
            'split -b "$bs" --filter=sha256sum - < "$f"')
    return (_sh_prologue(path, 'IFS= read -r bs; case "$bs" in ""|*[!0-9]*) exit 2;; esac; ')
            + _carry("{ " + body + "; }", "gzip -1") + "exit 0")


def sh_blocks_command(path: str) -> str:
    """stdin ``block_size\\nindexes (space-separated)\\nname``; replies ``gone``
    or ``ok <sha256 of the whole file>`` then the blocks in the order asked."""
    body = ('if [ ! -f "$f" ] || [ -L "$f" ]; then echo gone; exit 0; fi; '
            'w=$(sha256sum < "$f"); echo "ok ${w%% *}"; '
            'for i in $l; do dd bs="$bs" skip="$i" count=1 < "$f" 2>/dev/null; done')
    return (_sh_prologue(path, 'IFS= read -r bs; IFS= read -r l; '
                               'case "$bs" in ""|*[!0-9]*) exit 2;; esac; '
                               'case "$l" in *[!0-9\\ ]*) exit 2;; esac; ')
            + _carry("{ " + body + "; }", "gzip -1") + "exit 0")
