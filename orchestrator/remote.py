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
        # --no-unquote: GNU tar would read a backslash in the name as an escape
        + f"exec tar -C {shlex.quote(parent or '/')} --no-unquote {compress} -cf - "
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
    ``extra`` complete commands (the targets' hook commands)."""
    out = [probe_command(), has_pigz_command()]
    for p in sorted(set(paths)):
        out += [check_command(p), fingerprint_command(p), tar_command(p, pigz=False),
                tar_command(p, pigz=True)]
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
