"""Hostile input against a live backhauld: a corpus of hostile registration
values and a bounded property-based fuzz of the served OpenAPI schema.

Every hostile value must be refused with a clear 4xx in the one error shape,
or stored and used safely; a canary file that each value would create if any
shell on the server or the node ran it proves that none did.

The corpus lives here, in one place: ``tests/test_hostile_input.py`` imports
it (``from bench.reliability_hostile import CORPUS``) and asserts on each
entry; ``run_hostile(report)`` counts the same outcomes for the reliability
report. ``python -m bench.reliability_hostile`` prints the table.

Network safety: the only targets these probes may make backhauld connect to
are 127.0.0.0/8 and ::1. Hosts in the corpus are checked before they are sent
(``network_safe_host``) and hosts the fuzzer generates are rewritten to
127.0.0.N unless the server would refuse them without connecting.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import pwd
import shutil
import socket
import tarfile
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fixtures.server import Backhauld

CANARY_PREFIX = "bhcanary"
# Placeholders in corpus values, replaced by ``Hostile.render``:
#   @C@     absolute path of this entry's canary file (under /tmp)
#   @N@     bare canary file name (lands in the cwd of whatever runs it)
#   @BASE@  an existing directory of this entry, on the node and the server
C, N, BASE = "@C@", "@N@", "@BASE@"

# Run outcomes a stored hostile value may lead to: each is the server saying
# clearly why the run failed, none of them means a command ran.
SAFE_RUN_ERRORS = frozenset({"path_not_found", "permission_denied", "unreachable",
                             "auth_failed", "timeout"})

# Words an error's code or message must contain to say which field is wrong.
FIELD_WORDS = {"host": ("host",), "user": ("user",), "port": ("port",), "path": ("path",),
               "every_minutes": ("every_minutes", "frequency"), "keep": ("keep",)}


@dataclass(frozen=True)
class Hostile:
    """One hostile value for one field of ``POST /api/v1/targets``."""

    name: str
    field: str
    value: Any
    why: str

    def canary(self, tag: str) -> str:
        return f"{tag}-{self.name}"

    def render(self, tag: str, base: str) -> Any:
        """The value with its placeholders filled (other JSON types unchanged)."""
        if not isinstance(self.value, str):
            return self.value
        name = self.canary(tag)
        return (self.value.replace(C, f"/tmp/{name}").replace(N, name)
                .replace(BASE, base))


def _h(field_name: str, entries: Iterable[tuple[str, Any, str]]) -> list[Hostile]:
    return [Hostile(f"{field_name}-{n}", field_name, v, why) for n, v, why in entries]


CORPUS: tuple[Hostile, ...] = tuple(
    _h("host", [
        ("semicolon", f"127.0.0.1;touch {C}", "shell command separator"),
        ("subshell", f"$(touch {C})", "command substitution"),
        ("backticks", f"`touch {C}`", "backtick substitution"),
        ("proxycommand", f"-oProxyCommand=touch${{IFS}}{C}", "ssh option injection"),
        ("proxycommand-space", f"-oProxyCommand=touch {C}", "ssh option injection"),
        ("newline", f"127.0.0.1\ntouch {C}", "newline injection"),
        ("crlf", "127.0.0.1\r\nX-Injected: 1", "header/log injection"),
        ("nul", f"127.0.0.1\x00touch {C}", "NUL truncation"),
        ("pipe", f"127.0.0.1|touch {C}", "pipe"),
        ("and", f"127.0.0.1&&touch {C}", "command chaining"),
        ("dotdot", "..", "path traversal"),
        ("long", "a" * 10_000, "very long string"),
        ("long-labels", ".".join(["a" * 63] * 5), "longer than 253 characters"),
        ("label-64", "a" * 64 + ".invalid", "a label longer than 63 characters"),
        ("unicode", "bäckup.invalid", "non-ASCII host name"),
        ("arabic-digits", "١٢٧.٠.٠.١", "non-ASCII digits"),
        ("fullwidth", "１２７.０.０.１", "full-width digits"),
        ("user-in-host", "root@127.0.0.1", "user@ smuggled into host"),
        ("port-in-host", "127.0.0.1:22", "port smuggled into host"),
        ("space-option", "127.0.0.1 -p 22", "argument splitting"),
        ("url", "ssh://127.0.0.1", "URL instead of a host"),
        ("leading-dash", "-127.0.0.1", "option-like"),
        ("escape", "\x1b[2J127.0.0.1", "terminal escape"),
        ("surrogate", "\ud800", "lone surrogate"),
        ("percent", "127.0.0.1%0a", "percent-encoded newline"),
        ("empty", "", "empty"),
        ("int", 127, "not a string"),
        ("list", ["127.0.0.1"], "not a string"),
        ("null", None, "missing"),
        ("ipv6-loopback", "[::1]", "valid: IPv6 loopback in brackets (nothing listens)"),
        ("decimal-ipv4", "2130706433", "valid host name that libc reads as 127.0.0.1"),
    ]) + _h("user", [
        ("semicolon", f"root;touch {C}", "shell command separator"),
        ("subshell", f"$(touch {C})", "command substitution"),
        ("backticks", f"`touch {C}`", "backtick substitution"),
        ("proxycommand", f"-oProxyCommand=touch${{IFS}}{C}", "ssh option injection"),
        ("dash-l", "-l root", "option-like"),
        ("newline", f"root\ntouch {C}", "newline injection"),
        ("nul", "root\x00", "NUL"),
        ("at", "root@127.0.0.1", "user@host smuggled into user"),
        ("dotdot", "..", "path traversal"),
        ("long", "a" * 10_000, "very long string"),
        ("33-chars", "a" * 33, "one over the limit"),
        ("unicode", "rööt", "non-ASCII"),
        ("space", "root x", "argument splitting"),
        ("quotes", "root'\"", "quote breaking"),
        ("surrogate", "\udc80", "lone surrogate"),
        ("int", 0, "not a string"),
        ("empty", "", "valid: the server's default user"),
    ]) + _h("port", [
        ("semicolon", f"22;touch {C}", "shell command separator"),
        ("subshell", f"$(touch {C})", "command substitution"),
        ("proxycommand", f"-oProxyCommand=touch${{IFS}}{C}", "ssh option injection"),
        ("zero", 0, "out of range"),
        ("negative", -1, "out of range"),
        ("65536", 65536, "out of range"),
        ("huge", 10**30, "beyond 64 bits"),
        ("long-digits", "9" * 5000, "very long digit string"),
        ("float", 22.5, "not a whole number"),
        ("hex", "0x16", "hex"),
        ("arabic-digits", "٢٢", "non-ASCII digits"),
        ("list", [22], "not a number"),
        ("null", None, "null"),
        ("empty", "", "empty"),
    ]) + _h("path", [
        ("relative", "relative/dir", "not absolute"),
        ("root", "/", "the whole node"),
        ("dotdot", f"{BASE}/../etc", "traversal"),
        ("dot", f"{BASE}/./x", "dot component"),
        ("nul", f"{BASE}/a\x00b", "NUL"),
        ("newline", f"{BASE}/a\ntouch {N}", "newline injection"),
        ("cr", f"{BASE}/a\rb", "carriage return"),
        ("long", "/" + "a" * 5000, "longer than PATH_MAX"),
        ("long-component", f"{BASE}/" + "a" * 300, "component longer than NAME_MAX"),
        ("empty", "", "empty"),
        ("option", f"-oProxyCommand=touch${{IFS}}{C}", "option-like, relative"),
        ("int", 5, "not a string"),
        ("null", None, "null"),
        ("surrogate-low", f"{BASE}/\udc80", "lone low surrogate (an undecodable byte)"),
        ("surrogate-high", f"{BASE}/\ud800", "lone high surrogate"),
        # Odd but valid names: stored, backed up under their own name, no command runs.
        ("subshell", f"{BASE}/$(touch {N})", "command substitution"),
        ("subshell-abs", f"{BASE}/$(touch${{IFS}}{C})", "command substitution"),
        ("backticks", f"{BASE}/`touch {N}`", "backtick substitution"),
        ("semicolon", f"{BASE}/x;touch {N};", "command separator"),
        ("squote", f"{BASE}/x'; touch {N}; echo '", "single-quote breaking"),
        ("dquote", f"{BASE}/x\"; touch {N}; echo \"", "double-quote breaking"),
        ("pipe", f"{BASE}/x|touch {N}", "pipe"),
        ("and", f"{BASE}/x&&touch {N}", "command chaining"),
        ("redirect", f"{BASE}/x>{N}", "redirection"),
        ("tar-checkpoint", f"{BASE}/--checkpoint=1 --checkpoint-action=exec=touch {N}",
         "tar option injection"),
        ("tar-to-command", f"{BASE}/--to-command=touch {N}", "tar option injection"),
        ("dash", f"{BASE}/-rf", "option-like name"),
        ("glob", f"{BASE}/*", "glob"),
        ("tilde", f"{BASE}/~root", "tilde"),
        ("dollar-var", f"{BASE}/${{HOME}}", "variable expansion"),
        ("unicode", f"{BASE}/ünïcødé-日本-😀", "non-ASCII"),
        ("escape", f"{BASE}/\x1b[31mred", "terminal escape"),
        ("tab", f"{BASE}/a\tb", "tab"),
        ("space", f"{BASE}/with space", "space"),
        ("backslash", f"{BASE}/a\\b", "backslash"),
        ("three-dots", f"{BASE}/...", "a name, not a traversal"),
        ("double-slash", f"{BASE}//x//", "normalised"),
    ]) + _h("every_minutes", [
        ("semicolon", f"5;touch {C}", "shell command separator"),
        ("subshell", f"$(touch {C})", "command substitution"),
        ("cron", "*/5 * * * *", "cron syntax"),
        ("zero", 0, "out of range"),
        ("negative", -5, "out of range"),
        ("year-plus-one", 366 * 24 * 60 + 1, "just over the limit"),
        ("huge", 10**30, "beyond 64 bits"),
        ("float", 1.5, "not a whole number"),
        ("exponent", "1e3", "exponent string"),
        ("nan", float("nan"), "NaN"),
        ("inf", float("inf"), "infinity"),
        ("list", [5], "not a number"),
        ("null", None, "null"),
        ("string-number", "5", "valid: a numeric string"),
    ]) + _h("keep", [
        ("semicolon", f"10;touch {C}", "shell command separator"),
        ("zero", 0, "out of range"),
        ("huge", 10**30, "beyond 64 bits"),
    ])
)


# -- network safety --------------------------------------------------------------


def is_loopback_ip(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        try:  # what libc makes of "2130706433", "0x7f.1", "127.1" (no DNS)
            packed = socket.inet_aton(text)
        except OSError:
            return False
        ip = ipaddress.IPv4Address(packed)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def network_safe_host(value: object) -> bool:
    """True when sending ``value`` as a host cannot make backhauld connect (or
    resolve a name) outside loopback: the server's own validation refuses it
    before any connection, or it is a loopback address."""
    from orchestrator import validation
    from orchestrator.errors import BackhaulError

    if not isinstance(value, str):
        return True  # the request model refuses it
    try:
        canonical = validation.host(value)
    except BackhaulError:
        return True
    return is_loopback_ip(canonical)


def loopback_host(value: object) -> object:
    """A fuzzed host, kept when it is network-safe, else 127.0.0.N."""
    if network_safe_host(value):
        return value
    return f"127.0.0.{sum(str(value).encode()) % 250 + 2}"


# -- canaries ---------------------------------------------------------------------


def new_tag() -> str:
    return f"{CANARY_PREFIX}-{uuid.uuid4().hex[:12]}"


def canary_dirs(*extra: Path) -> tuple[list[Path], list[Path]]:
    """(flat, deep) dirs a canary could land in: /tmp and the cwd of anything
    the server or a node would run a shell in, and the trees the probes use."""
    home = Path(pwd.getpwuid(os.geteuid()).pw_dir)
    return [Path("/tmp"), home, Path.cwd()], list(extra)


def find_canaries(tag: str, flat: Iterable[Path], deep: Iterable[Path]) -> list[str]:
    """Regular files whose name starts with ``tag``: each is a command that ran.
    (Odd directories the probes create may carry the name; they are dirs.)"""
    found: set[str] = set()
    for d in flat:
        try:
            found.update(str(p) for p in d.iterdir() if p.name.startswith(tag) and p.is_file())
        except OSError:
            continue
    for d in deep:
        found.update(str(p) for p in d.rglob(f"{tag}*") if p.is_file())
    return sorted(found)


# -- responses ----------------------------------------------------------------------


def error_shape_problem(status: int, content_type: str, body: bytes) -> str | None:
    """None when a >= 400 answer is exactly ``{"error": {"code", "message"}}``
    with non-empty strings; else what is wrong with it."""
    if status < 400:
        return None
    if not content_type.startswith("application/json"):
        return f"{status}: content-type {content_type!r}, not JSON"
    try:
        doc = json.loads(body)
    except ValueError:
        return f"{status}: body is not JSON: {body[:120]!r}"
    if not isinstance(doc, dict) or set(doc) != {"error"} or not isinstance(doc["error"], dict):
        return f"{status}: not the error shape: {body[:200]!r}"
    err = doc["error"]
    if set(err) != {"code", "message"}:
        return f"{status}: error keys {sorted(err)}: {body[:200]!r}"
    if not all(isinstance(err[k], str) and err[k] for k in ("code", "message")):
        return f"{status}: empty or non-string code/message: {body[:200]!r}"
    return None


def response_problem(status: int, content_type: str, body: bytes) -> str | None:
    if status >= 500:
        return f"{status}: server error: {body[:200]!r}"
    return error_shape_problem(status, content_type, body)


# -- one hostile value against a live server ----------------------------------------

class ApiClient:
    """The API with the token: ``request(method, "/targets", ...)``."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url
        self.token = token
        # No kept-alive connections: after a 500 uvicorn drops the connection,
        # and the next request must not fail for that.
        self._client = httpx.Client(timeout=120,
                                    limits=httpx.Limits(max_keepalive_connections=0))

    def close(self) -> None:
        self._client.close()

    def request(self, method: str, path: str, *, json_body: Any = None,
                **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        if json_body is not None:
            # As any client could send it: lone surrogates as \u escapes, NaN as NaN.
            kw["content"] = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        return self._client.request(method, self.base_url + "/api/v1" + path,
                                    headers=headers, **kw)


@dataclass
class Outcome:
    entry: Hostile
    sent: Any = None
    status: int = 0
    code: str | None = None
    message: str = ""
    shape_problem: str | None = None
    unsafe_host: bool = False
    created_dir: Path | None = None
    target_id: int | None = None
    runs: list[tuple[int, str | None, str | None]] = field(default_factory=list)
    archive_top: list[str] = field(default_factory=list)
    canaries: list[str] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        return 400 <= self.status < 500

    @property
    def accepted(self) -> bool:
        return self.status == 201

    def says_what_is_wrong(self) -> bool:
        """The code or the message names the field (``invalid_path``, "port: ...")."""
        text = f"{self.code} {self.message}".lower()
        if self.code == "path_not_found":
            return "does not exist" in text
        return any(w in text for w in FIELD_WORDS[self.entry.field])

    def run_problems(self) -> list[str]:
        """What is wrong with the runs of an accepted value (empty: all safe)."""
        problems = []
        for http_status, status, code in self.runs:
            if http_status != 200:
                problems.append(f"run request answered {http_status}")
            elif status == "failed" and code not in SAFE_RUN_ERRORS:
                problems.append(f"run failed with {code}")
            elif status not in ("success", "unchanged", "failed"):
                problems.append(f"run status {status}")
        if self.created_dir is not None and self.runs and \
                self.runs[0][1] not in ("success", "unchanged"):
            problems.append(f"backup of the existing dir did not succeed: {self.runs[0]}")
        if self.created_dir is not None and len(self.runs) > 1 and \
                self.runs[1][1:] != ("failed", "path_not_found"):
            problems.append(f"backup of the removed dir did not fail with path_not_found: "
                            f"{self.runs[1]}")
        if self.created_dir is not None and self.runs and \
                self.archive_top != [self.created_dir.name]:
            problems.append(f"archive holds {self.archive_top}, expected "
                            f"[{self.created_dir.name!r}]")
        return problems

    def problems(self) -> list[str]:
        """Every broken promise (empty: refused clearly or stored safely)."""
        out = []
        if self.unsafe_host:
            return [f"host {self.sent!r} would be accepted and is not loopback"]
        if self.shape_problem:  # a 5xx lands here too
            out.append(self.shape_problem)
        elif not (self.refused or self.accepted):
            out.append(f"answered {self.status}: {self.code}: {self.message}")
        if self.refused and not self.says_what_is_wrong():
            out.append(f"message does not say what is wrong with {self.entry.field}: "
                       f"{self.message!r}")
        if self.accepted:
            out += self.run_problems()
        if self.canaries:
            out.append(f"canary files appeared: {self.canaries}")
        return out


def probe_entry(api: ApiClient, entry: Hostile, node: Any, base: Path, tag: str,
                deep: Iterable[Path] = ()) -> Outcome:
    """Register ``entry``'s value (the other fields valid); when it is stored,
    back it up, check the archive, remove the dir, back up again, unregister.

    ``node`` is an ``SSHD`` (host, port, user); ``base`` an empty dir under
    which this entry's directories are made; ``tag`` the canary tag."""
    valid = base / "valid"
    valid.mkdir(parents=True, exist_ok=True)
    (valid / "data.txt").write_text("data\n")
    value = entry.render(tag, str(base))
    out = Outcome(entry, sent=value)
    body = {"host": node.host, "port": node.port, "user": node.user, "path": str(valid),
            "every_minutes": 60, entry.field: value}
    if entry.field == "host" and not network_safe_host(value):
        out.unsafe_host = True
        return out
    if entry.field == "path" and isinstance(value, str) and value.startswith(str(base) + "/") \
            and "\0" not in value:
        try:
            d = Path(os.path.normpath(value))
            d.mkdir(parents=True, exist_ok=True)
            (d / "data.txt").write_text("odd\n")
            out.created_dir = d
        except (OSError, UnicodeEncodeError):
            out.created_dir = None
    r = api.request("POST", "/targets", json_body=body)
    out.status = r.status_code
    out.shape_problem = response_problem(r.status_code, r.headers.get("content-type", ""),
                                         r.content)
    if r.status_code >= 400 and not out.shape_problem:
        err = r.json()["error"]
        out.code, out.message = err["code"], err["message"]
    if r.status_code == 201:
        out.target_id = r.json()["target"]["id"]
        _exercise(api, out)
    out.canaries = find_canaries(tag, *canary_dirs(base, *deep))
    return out


def _exercise(api: ApiClient, out: Outcome) -> None:
    """Back up now (after the run a registration starts, which the request
    waits for), read the newest archive's top-level names, then, when the odd
    dir was made for this entry, remove it and back up again."""
    tid = out.target_id
    rounds = 2 if out.created_dir is not None else 1
    for i in range(rounds):
        if i == 1:
            shutil.rmtree(out.created_dir)  # type: ignore[arg-type]
        r = api.request("POST", f"/targets/{tid}/run", params={"wait": "true", "timeout": 60})
        run = r.json().get("run", {}) if r.status_code == 200 else {}
        out.runs.append((r.status_code, run.get("status"), run.get("error_code")))
        if i == 0:
            out.archive_top = _newest_archive_top(api, tid)
    api.request("DELETE", f"/targets/{tid}", params={"purge": "true"})


def _newest_archive_top(api: ApiClient, target_id: int) -> list[str]:
    r = api.request("GET", f"/targets/{target_id}/backups")
    kept = [b for b in r.json().get("backups", []) if b["retained"]] if r.is_success else []
    if not kept:
        return []
    d = api.request("GET", f"/archives/{kept[0]['id']}/download")
    if not d.is_success:
        return []
    with tarfile.open(fileobj=io.BytesIO(d.content), mode="r:gz") as tar:
        return sorted({m.name.split("/", 1)[0] for m in tar})


# -- bounded fuzz of the served schema -----------------------------------------------


@dataclass
class FuzzStats:
    requests: int = 0
    server_errors: int = 0
    bad_shape: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, other: FuzzStats) -> None:
        self.requests += other.requests
        self.server_errors += other.server_errors
        self.bad_shape += other.bad_shape
        self.problems += other.problems


def _record(stats: FuzzStats, label: str, what: str, status: int, content_type: str,
            body: bytes) -> None:
    stats.requests += 1
    problem = response_problem(status, content_type, body)
    if problem is None:
        return
    if status >= 500:
        stats.server_errors += 1
    else:
        stats.bad_shape += 1
    stats.problems.append(f"{label} {what} -> {problem}")


def fuzz_operation(operation: Any, base_url: str, token: str, *,
                   max_examples: int = 30) -> FuzzStats:
    """Positive and negative schemathesis cases for one operation, derandomised
    (the same cases every run); hosts in bodies are kept to loopback."""
    import requests
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    stats = FuzzStats()
    label = f"{operation.method.upper()} {operation.path}"
    headers = {"Authorization": f"Bearer {token}"}
    session = requests.Session()

    def send(case: Any, mode: GenerationMode) -> None:
        if isinstance(case.body, dict) and "host" in case.body:
            case.body["host"] = loopback_host(case.body["host"])
        body = "-" if type(case.body).__name__ == "NotSet" else str(case.body)[:200]
        what = f"[{mode.value}] path={case.path_parameters} query={case.query} body={body}"
        try:
            r = case.call(base_url=base_url, session=session, headers=headers, timeout=60)
        except Exception as exc:  # noqa: BLE001 - a dropped connection is a finding
            stats.requests += 1
            stats.server_errors += 1
            stats.problems.append(f"{label} {what} -> {type(exc).__name__}: {exc}")
            return
        content_type = r.headers.get("content-type") or [""]  # schemathesis: lists
        _record(stats, label, what, r.status_code, content_type[0], r.content)

    def property_test(mode: GenerationMode) -> Callable[[], None]:
        @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate],
                  print_blob=False)
        @given(operation.as_strategy(generation_mode=mode))
        def one(case: Any) -> None:
            send(case, mode)

        return one

    for mode in GenerationMode:
        run = property_test(mode)
        try:
            run()
        except Unsatisfiable:
            pass  # no parameters to break: no negative cases exist
    session.close()
    return stats


# 64-bit and float edges the generator reaches only by luck.
INT_EDGES = (0, -1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30)
FLOAT_EDGES = ("0", "-0", "1e-300", "1e308", "1e400", "inf", "-inf", "nan")


def boundary_operation(openapi: dict[str, Any], method: str, path: str, base_url: str,
                       token: str) -> FuzzStats:
    """Each integer or number parameter (path or query) of one operation, at
    its edges, the others left out (or 1 for required path ids)."""
    stats = FuzzStats()
    label = f"{method.upper()} {path}"
    params = openapi["paths"][path][method].get("parameters", [])
    fill = {p["name"]: 1 for p in params if p["in"] == "path"}
    extra = {"wait": "true"} if path.endswith("/run") else {}
    headers = {"Authorization": f"Bearer {token}"}
    for p in params:
        kind = _param_type(p.get("schema", {}))
        if kind not in ("integer", "number"):
            continue
        values: tuple[Any, ...] = INT_EDGES if kind == "integer" else FLOAT_EDGES
        for v in values:
            where, query = {**fill}, {**extra}
            if p["in"] == "path":
                where[p["name"]] = v
            else:
                query[p["name"]] = v
            what = f"{p['name']}={v}"
            try:
                # A fresh connection each: a 500 makes uvicorn drop the kept-alive one.
                r = httpx.request(method.upper(), base_url + path.format(**where),
                                  params=query, headers=headers, timeout=60)
            except httpx.HTTPError as exc:
                stats.requests += 1
                stats.server_errors += 1
                stats.problems.append(f"{label} {what} -> {type(exc).__name__}: {exc}")
                continue
            _record(stats, label, what, r.status_code, r.headers.get("content-type", ""),
                    r.content)
    return stats


def _param_type(schema: dict[str, Any]) -> str | None:
    if "type" in schema:
        return schema["type"]
    for alt in schema.get("anyOf", []):
        if alt.get("type") in ("integer", "number"):
            return alt["type"]
    return None


def operations(openapi: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted((m, p) for p, item in openapi["paths"].items() for m in item)


# -- the bench entry point -------------------------------------------------------------


@contextmanager
def _live(root: Path) -> Iterator[tuple[Backhauld, Any]]:
    from fixtures.sshd.launcher import SSHD
    from orchestrator.ssh import ServerKey

    data = root / "server"
    key = ServerKey(data / "ssh" / "id_ed25519")
    with SSHD(root / "node", key.public_line) as node:
        srv = Backhauld(data, connect_timeout=1, io_timeout=10, shutdown_grace=5,
                        retry_min=1, retry_max=4).start()
        try:
            yield srv, node
        finally:
            srv.stop()


def run_hostile(report: dict, *, fuzz_examples: int = 15) -> None:
    """Run the corpus and a bounded fuzz against a fresh backhauld and sshd;
    fill ``report["hostile_input"]`` and ``report["fuzz"]`` with counts."""
    tag = new_tag()
    with tempfile.TemporaryDirectory(prefix="bh-hostile-") as tmp:
        root = Path(tmp)
        with _live(root) as (srv, node):
            api = ApiClient(srv.url, srv.token)
            outcomes = [probe_entry(api, e, node, root / "entries" / e.name, tag,
                                    deep=[srv.data_dir])
                        for e in CORPUS]
            api.close()
            fuzz = FuzzStats()
            fuzz_note = ""
            try:
                import schemathesis
            except ImportError:
                fuzz_note = "schemathesis not installed: fuzz skipped"
            else:
                auth = {"Authorization": f"Bearer {srv.token}"}
                schema = schemathesis.openapi.from_url(srv.url + "/openapi.json", headers=auth)
                for op in schema.get_all_operations():
                    fuzz.add(fuzz_operation(op.ok(), srv.url, srv.token,
                                            max_examples=fuzz_examples))
                openapi = httpx.get(srv.url + "/openapi.json", headers=auth).json()
                for method, path in operations(openapi):
                    fuzz.add(boundary_operation(openapi, method, path, srv.url, srv.token))
        canaries = find_canaries(tag, *canary_dirs(root))
    from bench.reliability_bounds import run_bounds
    run_bounds(report)  # fills report["bounds"]: RSS under attack, the trickle's end
    report["hostile_input"] = {
        "tried": len(outcomes),
        "refused_4xx": sum(o.refused for o in outcomes),
        "accepted_safely": sum(o.accepted and not o.problems() for o in outcomes),
        "accepted_then_broken": sum(o.accepted and bool(o.problems()) for o in outcomes),
        "server_errors_5xx": sum(o.status >= 500 for o in outcomes),
        "canaries_triggered": len(canaries),
        "broken": {o.entry.name: o.problems() for o in outcomes if o.problems()},
    }
    report["fuzz"] = {
        "requests": fuzz.requests,
        "server_errors_5xx": fuzz.server_errors,
        "bad_error_shape": fuzz.bad_shape,
        "examples_per_operation_and_mode": fuzz_examples,
        "problems": fuzz.problems[:20],
        **({"note": fuzz_note} if fuzz_note else {}),
    }


def format_table(report: dict) -> str:
    h, f = report["hostile_input"], report["fuzz"]
    rows = [
        ("hostile inputs tried", h["tried"]),
        ("  refused (4xx, clear message)", h["refused_4xx"]),
        ("  accepted and used safely", h["accepted_safely"]),
        ("  accepted, then a broken run", h["accepted_then_broken"]),
        ("  server errors (5xx)", h["server_errors_5xx"]),
        ("  canaries triggered", h["canaries_triggered"]),
        ("fuzz requests", f["requests"]),
        ("  server errors (5xx)", f["server_errors_5xx"]),
        ("  4xx not in the error shape", f["bad_error_shape"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {value:>6}" for name, value in rows]
    from bench.reliability_bounds import rows as bound_rows
    lines += [f"{what}: {figure} [{'ok' if ok else 'FAIL'}]"
              for what, figure, ok in bound_rows(report)]
    for name, problems in h["broken"].items():
        lines.append(f"broken: {name}: {'; '.join(problems)[:160]}")
    for problem in f["problems"]:
        lines.append(f"fuzz: {problem[:200]}")
    if f.get("note"):
        lines.append(f["note"])
    return "\n".join(lines)


if __name__ == "__main__":
    result: dict = {}
    run_hostile(result)
    print(format_table(result))
