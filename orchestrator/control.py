"""The control plane: registering, editing and removing targets, forgetting
and trusting nodes, the key line a node's authorized_keys should hold.

What the API's write endpoints call (through ``Server``, which delegates
here). A change reaches the schedule of this process at once; on a
scale-out deployment the leader follows the catalog (``roles.py``).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator import remote, validation
from orchestrator.backup import BackupEngine, same_endpoint
from orchestrator.errors import (
    AuthFailed,
    CommandRefused,
    HostKeyMismatch,
    InvalidInput,
    NodeError,
    NodeInUse,
    NotRegistered,
    ServerError,
    TargetInactive,
)
from orchestrator.hooks import validate_command, validate_url
from orchestrator.policy import RunPolicy
from orchestrator.settings import Settings
from orchestrator.ssh import NodeAddress, ServerKey, SSHPool
from orchestrator.verify_cmd import ArchiveCheck, archive_root, check_archive
from storage.archives import rotate
from storage.catalog import Catalog, Node, Target, TargetOptions, format_address
from storage.errors import NotFound, TargetExists
from storage.stores.base import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    target: Target
    warnings: list[str]
    # The job's first run when this process stored it for a later time (the
    # node is down): no run has started, so the API answers without re-reading.
    first_run_at: dt.datetime | None = None


class Control:
    def __init__(self, settings: Settings, catalog: Catalog, store: Store, pool: SSHPool,
                 engine: BackupEngine, key: ServerKey, policy: RunPolicy, scheduler: Any, *,
                 clock: Callable[[], dt.datetime], default_user: str) -> None:
        self.settings = settings
        self.catalog = catalog
        self.store = store
        self.pool = pool
        self.engine = engine
        self.key = key
        self.policy = policy
        self.scheduler = scheduler  # swapped with the policy's (see RunPolicy)
        self.clock = clock
        self.default_user = default_user

    def register(self, *, host: str, port: int, user: str | None, path: str,
                 every_minutes: int, keep: int = 10,
                 host_key_fingerprint: str | None = None,
                 options: dict[str, Any] | None = None) -> Registration:
        host = validation.host(host)
        port = validation.port(port)
        user = validation.user(user if user else self.default_user)
        path = remote.validate_path(path)
        every_minutes = validation.every_minutes(every_minutes)
        keep = validation.keep(keep)
        if host_key_fingerprint is not None:
            host_key_fingerprint = validation.fingerprint(host_key_fingerprint)
        options = validate_options(options or {})

        # The node and the duplicate check in one read (the write re-checks).
        known, duplicate = self.catalog.find_node_for_path(user, host, port, path)
        if known is not None and duplicate is not None:
            raise TargetExists(known.address, path, duplicate)
        existing_nodes = [known] if known is not None else []
        # A known node needs no write (the common case: many paths per node).
        node = (existing_nodes[0] if existing_nodes and existing_nodes[0].forgotten_at is None
                else self.catalog.ensure_node(user, host, port))
        if host_key_fingerprint is not None:
            for other in same_endpoint(self.catalog, host, port):
                if other.host_key_b64 is not None and other.host_key_fingerprint != \
                        host_key_fingerprint:
                    self._forget_node_if_new(node, existing_nodes)
                    raise HostKeyMismatch(other.address, other.host_key_fingerprint or "?",
                                          host_key_fingerprint)
            self.catalog.set_host_key_expected(node.id, host_key_fingerprint)

        warnings: list[str] = []
        reachable = True
        try:
            self.engine.check_path(NodeAddress(user, host, port), path)
        except (AuthFailed, CommandRefused) as exc:
            warnings.append(f"{exc.message}; registered anyway, backups start once it works")
        except NodeError as exc:
            if not exc.node_unreachable:
                self._forget_node_if_new(node, existing_nodes)
                raise
            reachable = False
            if not (node.reachable is False and node.last_error_code == exc.code):
                self.catalog.node_unreachable(node.id, exc.message, code=exc.code)
            warnings.append(f"{exc.message}; registered anyway: backhaul probes the node "
                            "and backs up as soon as it answers")

        # One catalog commit: the target, its options and (node down) its first failure.
        target = self.catalog.add_target(node.id, path, every_minutes, keep,
                                         failures=0 if reachable else 1, options=options)
        node_changed = reachable and not warnings and node.reachable is not True
        if node_changed:
            self.catalog.node_reachable(node.id)
        stored: dt.datetime | None = None
        if reachable:
            self.scheduler.add_target(target.id, every_minutes)
        else:
            first = self.clock() + dt.timedelta(seconds=every_minutes *
                                                self.settings.minute_seconds)
            # (the scale-out roles' stand-in stores nothing: the leader does)
            stored = self.scheduler.add_target(target.id, every_minutes, first_run_at=first)
            if not self.scheduler.has_probe(node.id):  # else one is on its way already
                self.policy.ensure_probe(self.catalog.get_node(node.id))
                node_changed = True
        log.info("registered target %s: %s %s every %d min, keep %d", target.id,
                 node.address, path, every_minutes, keep)
        return Registration(self.catalog.get_target(target.id) if node_changed else target,
                            warnings, stored if isinstance(stored, dt.datetime) else None)

    def set_target_options(self, target_id: int, **changes: Any) -> TargetOptions:
        """Change a target's pre/post commands, ``pre_optional`` or ping URL
        (what ``edit`` sets); a value of None or "" removes a command or URL."""
        return self.catalog.set_target_options(target_id, **validate_options(changes))

    def _forget_node_if_new(self, node: Node, existing: list[Node]) -> None:
        if not existing:
            self.catalog.delete_node_if_unused(node.id)

    def unregister(self, target_id: int, *, purge: bool = False) -> tuple[Target, int]:
        current = self.catalog.get_target(target_id)
        if not current.active and not (
                purge and self.catalog.list_archives(target_id, retained_only=True)):
            # Saying "unregistered" twice would hide a typo or a stale script;
            # purging what an earlier unregister kept is still allowed.
            raise NotRegistered(current)
        target = self.catalog.unregister_target(target_id)
        self.scheduler.remove_target(target_id)
        purged = 0
        if purge:
            retained = self.catalog.list_archives(target_id, retained_only=True)
            self.catalog.mark_archives_deleted([a["id"] for a in retained], reason="purged")
            for a in retained:
                self.store.delete(a["file_name"])
            purged = len(retained)
        log.info("unregistered target %s (%s %s)%s", target_id, target.node.address,
                 target.path, f", purged {purged} archives" if purge else "")
        return target, purged

    def forget_node(self, node_id: int) -> Node:
        """``nodes --forget``: hide a node nothing is registered on any more (a
        mistyped port, a retired machine). Its history stays in the catalog."""
        node = self.catalog.get_node(node_id)
        active = self.catalog.list_targets(node_id=node_id)
        if active:
            raise NodeInUse(node, [t.path for t in active])
        self.scheduler.remove_probe(node_id)
        self.pool.discard(NodeAddress(node.user, node.host, node.port))
        log.info("node %s forgotten", node.address)
        return self.catalog.forget_node(node_id)

    def edit_target(self, target_id: int, *, every_minutes: int | None = None,
                    keep: int | None = None) -> tuple[Target, list[int]]:
        """``backhaul edit``: new frequency and/or keep for a registered target,
        its history untouched. A lower keep rotates at once; returns the ids
        of the archives that rotated out."""
        target = self.catalog.get_target(target_id)
        if not target.active:
            raise TargetInactive(target_id)
        if every_minutes is not None:
            every_minutes = validation.every_minutes(every_minutes)
        if keep is not None:
            keep = validation.keep(keep)
        updated = self.catalog.update_target(target_id, every_minutes=every_minutes, keep=keep)
        if every_minutes is not None and every_minutes != target.every_minutes:
            self.scheduler.set_interval(target_id, every_minutes)
        rotated: list[int] = []
        if keep is not None:
            rotated = rotate(self.catalog, self.store, target_id, keep)
        log.info("edited target %s (%s %s): every %d min, keep %d%s", target_id,
                 target.node.address, target.path, updated.every_minutes, updated.keep,
                 f"; rotated out archives {rotated}" if rotated else "")
        return updated, rotated

    def verify_archives(self, archive_ids: list[int] | None) -> list[ArchiveCheck]:
        """``backhaul verify``: re-read the given archives (None: every kept one)."""
        if archive_ids is None:
            wanted = self.catalog.archives_due_for_scrub(self.clock() + dt.timedelta(days=1),
                                                         limit=1_000_000)
        else:
            wanted = [self.catalog.get_archive(aid) for aid in archive_ids]
        return [check_archive(self.catalog, self.store, a, archive_root(self.catalog, a))
                for a in wanted]

    def trust_node(self, node_id: int, fingerprint: str | None) -> Node:
        """Forget a node's pinned host key after a deliberate change; the next
        contact pins the new one (or only ``fingerprint``, when given)."""
        if fingerprint is not None:
            fingerprint = validation.fingerprint(fingerprint)
        node = self.catalog.get_node(node_id)
        # The key is pinned per host:port: forget it for every user there.
        for other in same_endpoint(self.catalog, node.host, node.port):
            self.catalog.expect_host_key(other.id, fingerprint)
            self.pool.discard(NodeAddress(other.user, other.host, other.port))
            log.warning("host key of %s forgotten (was %s)%s", other.address,
                        other.host_key_fingerprint,
                        f"; only {fingerprint} will be accepted" if fingerprint else "")
            for t in self.catalog.overdue_targets(other.id):
                self.scheduler.recover_now(t.id)
        return self.catalog.get_node(node_id)

    def authorized_keys_line(self, *, restricted: bool, host: str | None = None,
                             port: int = 22, user: str | None = None) -> str:
        """The line a node's authorized_keys should hold. Restricted to a node,
        the key may run only backhaul's commands on that node's active paths."""
        line = self.key.public_line
        if not restricted:
            return line
        if host is None:
            # ``restrict`` alone forbids forwarding and ptys but lets the key run
            # any command: not what a user asking for a restricted key expects.
            raise InvalidInput("a restricted line is made for one node: name it "
                               "(backhaul pubkey --restricted USER@HOST:PORT); without a "
                               "node's paths the key could still run any command")
        # The line goes into one user's authorized_keys: only that user's paths,
        # the server's default user when none is named (as in `register`).
        user = validation.user(user or self.default_user)
        host, port = validation.host(host), validation.port(port)
        matches = self.catalog.find_node(user, host, port)
        if not matches:
            others = sorted(n.user for n in self.catalog.find_node(None, host, port))
            raise NotFound("node", format_address(user, host, port)
                           + (f" (registered there: {', '.join(others)}; name one as "
                              "USER@HOST:PORT)" if others else ""))
        targets = [t for n in matches for t in self.catalog.list_targets(node_id=n.id)]
        hooks = [remote.hook_command(c, self.settings.hook_timeout)
                 for o in self.catalog.target_options([t.id for t in targets]).values()
                 for c in (o.pre_command, o.post_command) if c]
        return remote.restricted_key_line(line, [t.path for t in targets], hooks)


def validate_options(changes: dict[str, Any]) -> dict[str, Any]:
    """Target options as given by the API, validated; unknown names refused."""
    out: dict[str, Any] = {}
    for name, value in changes.items():
        if name in ("pre_command", "post_command"):
            out[name] = validate_command(value, name.replace("_", " "))
        elif name == "ping_url":
            out[name] = validate_url(value)
        elif name == "pre_optional":
            out[name] = bool(value)
        else:
            raise ServerError(f"unknown target option {name!r}")
    return out
