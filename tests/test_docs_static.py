"""Static checks that docs/ARCHITECTURE.md, docs/DEMO.md, docker-compose.yml
and the Dockerfiles cannot drift from the code and from each other.

No Docker engine is needed: the compose file is parsed with PyYAML, the
Dockerfiles are read as text, and the class diagrams are checked against the
imported modules.
"""

from __future__ import annotations

import glob
import importlib
import inspect
import pkgutil
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
DEMO = ROOT / "docs" / "DEMO.md"
NODE_DOCKERFILE = "fixtures/sshd/Dockerfile"
NODE_TEMPLATE = "fixtures/sshd/sshd_config.template"
NODE_SERVICES = ("node1", "node2", "node3")
API_PORT = 7710
# The client's own variables; every other BACKHAUL_* name must be a server setting.
CLIENT_ENV = {"BACKHAUL_URL", "BACKHAUL_TOKEN", "BACKHAUL_DATA_DIR"}

MERMAID_TYPES = {
    "classDiagram", "classDiagram-v2", "flowchart", "graph", "sequenceDiagram",
    "stateDiagram", "stateDiagram-v2", "erDiagram", "journey", "gantt", "pie",
    "gitGraph", "mindmap", "timeline", "C4Context", "C4Container", "C4Component",
    "C4Deployment", "requirementDiagram", "quadrantChart", "sankey-beta", "xychart-beta",
    "block-beta", "packet-beta", "architecture-beta", "kanban",
}


# --- helpers ------------------------------------------------------------------


def compose() -> dict:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), \
        "docker-compose.yml has no services mapping"
    return doc


def build_of(name: str, service: dict) -> tuple[Path, Path]:
    """(context dir, Dockerfile path) of a service, as compose resolves them."""
    build = service.get("build")
    assert build is not None, f"service {name} has no build section"
    if isinstance(build, str):
        build = {"context": build}
    context = (ROOT / build.get("context", ".")).resolve()
    dockerfile = context / build.get("dockerfile", "Dockerfile")
    return context, dockerfile


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


def copy_sources(path: Path) -> list[str]:
    """Sources of every COPY/ADD that reads the build context (not --from=)."""
    sources: list[str] = []
    for word, args in dockerfile_instructions(path):
        if word not in ("COPY", "ADD"):
            continue
        if args.startswith("["):
            parts = yaml.safe_load(args)  # the JSON form
        else:
            parts = shlex.split(args)
        flags = [p for p in parts if p.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        paths = [p for p in parts if not p.startswith("--")]
        assert len(paths) >= 2, f"{path}: {word} {args!r} names no source and destination"
        sources.extend(paths[:-1])
    return sources


def dockerignore_patterns(context: Path, dockerfile: Path) -> list[str]:
    """BuildKit uses <Dockerfile>.dockerignore when present, else <context>/.dockerignore."""
    for candidate in (dockerfile.with_name(dockerfile.name + ".dockerignore"),
                      context / ".dockerignore"):
        if candidate.is_file():
            return [line.strip().lstrip("/") for line in candidate.read_text().splitlines()
                    if line.strip() and not line.strip().startswith("#")]
    return []


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(rel: str, patterns: list[str]) -> bool:
    """Whether a context path is excluded: a pattern matching the path or one of
    its parent directories excludes it, a later ``!pattern`` re-includes it."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _ignore_regex(pattern.removeprefix("!").rstrip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def mermaid_blocks(text: str) -> list[str]:
    return re.findall(r"^```mermaid[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S)


def first_statement(block: str) -> str:
    """The diagram's first statement, after any front matter and comments."""
    lines = block.splitlines()
    if lines and lines[0].strip() == "---":
        end = next((i for i, ln in enumerate(lines[1:], 1) if ln.strip() == "---"), len(lines))
        lines = lines[end + 1:]
    for line in lines:
        stripped = line.strip()
        if stripped and not stripped.startswith("%%"):
            return stripped
    return ""


_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_RELATION = re.compile(
    rf"^\s*({_IDENT})\s*(?:\"[^\"]*\"\s*)?"
    r"(<\|--|--\|>|<\|\.\.|\.\.\|>|\*--|--\*|o--|--o|<--|-->|<\.\.|\.\.>|--|\.\.)"
    rf"\s*(?:\"[^\"]*\"\s*)?({_IDENT})\s*(?::.*)?$")
_CLASS = re.compile(rf"^\s*class\s+({_IDENT})(?:~[^~]*~)?\s*(\{{)?\s*$")
_ANNOTATION = re.compile(rf"^\s*<<\s*(\w+)\s*>>\s*({_IDENT})?\s*$")
_MEMBER_LINE = re.compile(rf"^\s*({_IDENT})\s*:\s*(.*)$")
_METHOD = re.compile(rf"^[+\-#~]?\s*({_IDENT})\s*\(")


def parse_class_diagram(block: str) -> dict[str, dict]:
    """``{name: {"stereotypes": set, "methods": set}}`` for every class a
    classDiagram names: in ``class X`` lines, relations, annotations and
    ``X : member`` lines."""
    classes: dict[str, dict] = {}

    def entry(name: str) -> dict:
        return classes.setdefault(name, {"stereotypes": set(), "methods": set()})

    def member(name: str, text: str) -> None:
        m = _METHOD.match(text.strip())
        if m:
            entry(name)["methods"].add(m.group(1))

    current: str | None = None
    for line in block.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("%%"):
            continue
        if current is not None:
            if stripped == "}":
                current = None
                continue
            ann = _ANNOTATION.match(stripped)
            if ann:
                entry(current)["stereotypes"].add(ann.group(1))
            else:
                member(current, stripped)
            continue
        m = _CLASS.match(stripped)
        if m:
            entry(m.group(1))
            if m.group(2):
                current = m.group(1)
            continue
        m = _ANNOTATION.match(stripped)
        if m and m.group(2):
            entry(m.group(2))["stereotypes"].add(m.group(1))
            continue
        m = _RELATION.match(stripped)
        if m:
            entry(m.group(1))
            entry(m.group(3))
            continue
        m = _MEMBER_LINE.match(stripped)
        if m and m.group(1) not in ("direction", "note", "style", "classDef", "link", "click"):
            member(m.group(1), m.group(2))
    assert current is None, f"class {current} is not closed in the diagram"
    return classes


def code_modules() -> list[ModuleType]:
    """Every module of orchestrator (and its dispatch backends) and storage, and
    the client's API module."""
    modules: list[ModuleType] = []
    for package in ("orchestrator", "orchestrator.dispatch", "storage"):
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name != "__main__":
                modules.append(importlib.import_module(f"{package}.{info.name}"))
    modules.append(importlib.import_module("cli.client"))
    return modules


def defined_classes(modules: list[ModuleType]) -> dict[str, list[type]]:
    """Classes by name, counting only those defined in the module (not imported)."""
    found: dict[str, list[type]] = {}
    for module in modules:
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == module.__name__:
                found.setdefault(name, []).append(obj)
    return found


# --- docker-compose.yml and the Dockerfiles ----------------------------------------


def test_compose_parses_and_has_the_demo_services() -> None:
    services = compose()["services"]
    assert {"server", *NODE_SERVICES} <= set(services), sorted(services)


@pytest.mark.parametrize("name", ["server", *NODE_SERVICES])
def test_build_context_dockerfile_and_copied_files_exist(name: str) -> None:
    context, dockerfile = build_of(name, compose()["services"][name])
    assert context.is_dir(), f"{name}: build context {context} does not exist"
    assert dockerfile.is_file(), f"{name}: Dockerfile {dockerfile} does not exist"
    patterns = dockerignore_patterns(context, dockerfile)
    sources = copy_sources(dockerfile)
    assert sources, f"{dockerfile} copies nothing from its context"
    for src in sources:
        matches = glob.glob(str(context / src))
        assert matches, f"{dockerfile.relative_to(ROOT)}: COPY source {src!r} is missing " \
                        f"from the build context {context}"
        for match in matches:
            rel = Path(match).resolve().relative_to(context).as_posix()
            assert not ignored(rel, patterns), \
                f"{dockerfile.relative_to(ROOT)}: COPY source {src!r} is excluded by .dockerignore"


@pytest.mark.parametrize("name", NODE_SERVICES)
def test_nodes_build_from_the_sshd_fixture_dockerfile(name: str) -> None:
    context, dockerfile = build_of(name, compose()["services"][name])
    assert context == ROOT, f"{name} must build with the repository root as context " \
                            f"(its Dockerfile COPYs fixtures/sshd/...)"
    assert dockerfile == ROOT / NODE_DOCKERFILE


def test_node_image_and_local_launcher_use_the_same_sshd_template() -> None:
    sources = copy_sources(ROOT / NODE_DOCKERFILE)
    assert NODE_TEMPLATE in sources, f"{NODE_DOCKERFILE} does not COPY {NODE_TEMPLATE}"
    launcher_py = ROOT / "fixtures" / "sshd" / "launcher.py"
    assert Path(NODE_TEMPLATE).name in launcher_py.read_text(), \
        "fixtures/sshd/launcher.py does not name the template file"
    from fixtures.sshd import launcher

    paths = {v.resolve() for v in vars(launcher).values() if isinstance(v, Path)}
    assert (ROOT / NODE_TEMPLATE).resolve() in paths, \
        "the launcher renders a different sshd_config template than the node image"


def _published(service: dict) -> list[tuple[str | None, str]]:
    """(host_ip, container port) of every published port, short or long syntax."""
    out: list[tuple[str | None, str]] = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append((port.get("host_ip"), str(port.get("target"))))
            continue
        text = str(port).split("/")[0]
        if text.startswith("["):  # [::1]:7710:7710
            host, _, rest = text[1:].partition("]:")
            out.append((host, rest.rsplit(":", 1)[-1]))
            continue
        parts = text.split(":")
        out.append((parts[0] if len(parts) == 3 else None, parts[-1]))
    return out


def test_only_the_api_is_published_and_only_on_loopback() -> None:
    services = compose()["services"]
    published = _published(services["server"])
    assert (("127.0.0.1", str(API_PORT))) in published, published
    for name, service in services.items():
        for host_ip, target in _published(service):
            assert host_ip in ("127.0.0.1", "::1"), \
                f"{name} publishes port {target} on all interfaces"
    for name in NODE_SERVICES:
        assert not services[name].get("ports"), f"{name} needs no published port"


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def test_server_service_matches_the_settings_and_the_client() -> None:
    from orchestrator.settings import SETTINGS, Settings

    server = compose()["services"]["server"]
    env = _environment(server)
    known = {s.env for s in SETTINGS} | CLIENT_ENV
    for name in env:
        if name.startswith("BACKHAUL_"):
            assert name in known, f"docker-compose.yml sets {name}, which nothing reads"
    # The client in the container finds the token under BACKHAUL_DATA_DIR.
    assert env.get("BACKHAUL_DATA_DIR") == "/data"
    assert env.get("BACKHAUL_DEFAULT_USER") == "backup"
    command = server.get("command")
    argv = shlex.split(command) if isinstance(command, str) else list(command or [])
    settings = Settings.load(argv, env={k: v for k, v in env.items() if k.startswith("BACKHAUL_")})
    assert str(settings.data_dir) == "/data"
    assert settings.listen == ("0.0.0.0", API_PORT), \
        "inside its container the server must listen on all interfaces, on the published port"
    mounts = [str(v) for v in server.get("volumes") or []]
    assert any(m.split(":")[1:2] == ["/data"] for m in mounts), "no volume holds /data"


def test_the_key_volume_connects_server_and_nodes() -> None:
    doc = compose()
    services = doc["services"]

    def mount(service: dict, target: str) -> list[str] | None:
        for v in service.get("volumes") or []:
            parts = str(v).split(":")
            if len(parts) >= 2 and parts[1] == target:
                return parts
        return None

    server_keys = mount(services["server"], "/keys")
    assert server_keys is not None and "ro" not in server_keys[2:], \
        "the server must mount /keys writable"
    assert server_keys[0] in (doc.get("volumes") or {}), "/keys must be a named volume"
    for name in NODE_SERVICES:
        node_keys = mount(services[name], "/keys")
        assert node_keys is not None, f"{name} does not mount /keys"
        assert node_keys[0] == server_keys[0], f"{name} mounts another volume at /keys"
        assert node_keys[2:] == ["ro"], f"{name} must mount /keys read-only"
    pubkey = "/keys/backhaul.pub"
    assert pubkey in (ROOT / "fixtures" / "sshd" / "node-entrypoint.sh").read_text()
    assert pubkey in (ROOT / "docker" / "server-entrypoint.sh").read_text()


def test_shell_scripts_of_the_images_parse() -> None:
    sh = shutil.which("sh")
    assert sh is not None
    for script in ("docker/server-entrypoint.sh", "fixtures/sshd/node-entrypoint.sh",
                   "fixtures/sshd/writer.sh"):
        res = subprocess.run([sh, "-n", str(ROOT / script)], capture_output=True, text=True)
        assert res.returncode == 0, f"{script}: {res.stderr}"


def test_server_image_runs_backhauld_through_its_entrypoint() -> None:
    dockerfile = ROOT / "docker" / "server.Dockerfile"
    instructions = dockerfile_instructions(dockerfile)
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("python:3.11-slim")
    runs = " ".join(args for word, args in instructions if word == "RUN")
    assert re.search(r"pip install \S*\.\[server\]", runs), "the image must install .[server]"
    entrypoint = [args for word, args in instructions if word == "ENTRYPOINT"]
    assert entrypoint, "no ENTRYPOINT"
    script = (ROOT / "docker" / "server-entrypoint.sh").read_text()
    assert re.search(r'^exec backhauld "\$@"$', script, re.M), \
        "the entrypoint must exec backhauld (it must get SIGTERM itself)"


# --- docs/ARCHITECTURE.md ------------------------------------------------------------


def test_every_mermaid_block_is_non_empty_and_of_a_known_type() -> None:
    blocks = mermaid_blocks(ARCHITECTURE.read_text())
    assert blocks, "docs/ARCHITECTURE.md has no mermaid diagrams"
    for i, block in enumerate(blocks, 1):
        first = first_statement(block)
        assert first, f"mermaid block {i} is empty"
        kind = first.split()[0]
        assert kind in MERMAID_TYPES, f"mermaid block {i} starts with unknown {kind!r}"
        assert len([ln for ln in block.splitlines() if ln.strip()]) > 1, \
            f"mermaid block {i} has a type but no content"


def test_architecture_has_every_required_diagram() -> None:
    kinds = [first_statement(b).split()[0] for b in mermaid_blocks(ARCHITECTURE.read_text())]
    for required in ("classDiagram", "sequenceDiagram", "stateDiagram-v2"):
        assert required in kinds, f"no {required} in docs/ARCHITECTURE.md"
    assert kinds.count("flowchart") >= 2, "deployment and activity diagrams are flowcharts"


def _diagram_classes() -> dict[str, dict]:
    merged: dict[str, dict] = {}
    for block in mermaid_blocks(ARCHITECTURE.read_text()):
        if first_statement(block).split()[0] not in ("classDiagram", "classDiagram-v2"):
            continue
        for name, info in parse_class_diagram(block).items():
            entry = merged.setdefault(name, {"stereotypes": set(), "methods": set()})
            entry["stereotypes"] |= info["stereotypes"]
            entry["methods"] |= info["methods"]
    return merged


def test_class_diagram_parser_reads_classes_relations_and_members() -> None:
    parsed = parse_class_diagram(
        "classDiagram\n"
        "    class Alpha {\n        <<module>>\n        +run(x) int\n        +field: str\n    }\n"
        "    class Beta~T~\n"
        "    <<interface>> Gamma\n"
        "    Alpha <|-- Delta\n"
        '    Beta "1" o-- "0..* many" Epsilon : label\n'
        "    Zeta : +go() bool$\n")
    assert set(parsed) == {"Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta"}
    assert parsed["Alpha"] == {"stereotypes": {"module"}, "methods": {"run"}}
    assert parsed["Gamma"]["stereotypes"] == {"interface"}
    assert parsed["Zeta"]["methods"] == {"go"}


def test_every_class_in_the_class_diagrams_exists_in_the_code() -> None:
    diagram = _diagram_classes()
    assert len(diagram) >= 20, f"the class diagrams name only {sorted(diagram)}"
    modules = code_modules()
    by_module = {m.__name__.rsplit(".", 1)[-1]: m for m in modules}
    classes = defined_classes(modules)
    problems = []
    for name, info in sorted(diagram.items()):
        if "module" in info["stereotypes"]:
            module = by_module.get(name)
            if module is None:
                problems.append(f"<<module>> {name}: no module orchestrator.{name}, "
                                f"storage.{name} or cli.{name}")
                continue
            for method in sorted(info["methods"]):
                if not callable(getattr(module, method, None)):
                    problems.append(f"{name}.{method}(): no such function in {module.__name__}")
            continue
        candidates = classes.get(name)
        if not candidates:
            problems.append(f"class {name}: not defined in orchestrator.*, storage.* or "
                            "cli.client")
            continue
        if not any(all(hasattr(c, m) for m in info["methods"]) for c in candidates):
            missing = sorted(m for m in info["methods"]
                             if not any(hasattr(c, m) for c in candidates))
            problems.append(f"class {name}: no method(s) {missing} "
                            f"({', '.join(c.__module__ for c in candidates)})")
    assert not problems, "docs/ARCHITECTURE.md drifted from the code:\n" + "\n".join(problems)


def test_every_class_in_the_diagrams_is_described() -> None:
    text = ARCHITECTURE.read_text()
    described = set(re.findall(r"^\|\s*`([A-Za-z_][A-Za-z0-9_]*)`\s*\|", text, re.M))
    missing = sorted(set(_diagram_classes()) - described)
    assert not missing, f"classes in the diagrams without a row in the class table: {missing}"


def test_named_setting_and_env_vars_in_the_docs_exist() -> None:
    from orchestrator.settings import SETTINGS

    known = {s.env for s in SETTINGS} | CLIENT_ENV | {"BACKHAUL_PUBKEY_FILE"}
    for doc in (ARCHITECTURE, DEMO):
        for name in set(re.findall(r"\bBACKHAUL_[A-Z_]+\b", doc.read_text())):
            assert name in known, f"{doc.name} names {name}, which nothing reads"


# --- docs/DEMO.md --------------------------------------------------------------------


def _demo_commands() -> list[list[str]]:
    """argv after ``backhaul`` of every client command in DEMO.md's ```sh blocks
    (commands only; output is shown in ```text blocks)."""
    out = []
    for block in re.findall(r"^```sh\n(.*?)^```", DEMO.read_text(), re.M | re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if "backhaul" in words:
                out.append(words[words.index("backhaul") + 1:])
    return out


def test_demo_uses_real_client_commands_and_options() -> None:
    from cli.main import main as cli_main

    commands = _demo_commands()
    used = {argv[0] for argv in commands if argv}
    for required in ("pubkey", "register", "jobs", "run", "backups", "history", "download",
                     "unregister"):
        assert required in used, f"docs/DEMO.md never runs `backhaul {required}`"
    global_opts = {o for p in cli_main.params for o in p.opts}
    for argv in commands:
        assert argv, "an empty backhaul command in docs/DEMO.md"
        command = cli_main.commands.get(argv[0])
        assert command is not None, f"docs/DEMO.md runs unknown `backhaul {argv[0]}`"
        opts = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | global_opts
        opts |= {"--help", "-h"}
        for token in argv[1:]:
            if token.startswith("-") and token != "-":
                assert token.split("=", 1)[0] in opts, \
                    f"docs/DEMO.md: `backhaul {argv[0]}` has no option {token}"


def test_demo_compose_services_exist() -> None:
    services = set(compose()["services"])
    text = DEMO.read_text()
    for verb, name in re.findall(r"docker compose (exec|stop|start|restart|logs) (?:-\S+ )*"
                                 r"([a-z][a-z0-9_-]*)", text):
        assert name in services, f"docs/DEMO.md: `docker compose {verb} {name}`: no such service"
    for host in set(re.findall(r"backup@(node\d+):22", text)):
        assert host in services, f"docs/DEMO.md registers {host}, which compose does not run"
