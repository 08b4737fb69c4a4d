"""The server's exception root and its children.

Each class carries a stable ``code`` that is stored in the run log, returned
by the API in ``{"error": {"code", "message"}}`` and printed by the client.
paramiko, socket and storage exceptions are translated into these at the
boundary (``ssh.py``, ``backup.py``); none escapes ``orchestrator/`` raw.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storage.catalog import Node, Target


class BackhaulError(Exception):
    """Root of every error the server raises on purpose."""

    code = "internal_error"
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- input ---------------------------------------------------------------


class InvalidInput(BackhaulError):
    code = "invalid_request"
    http_status = 422


class InvalidPath(InvalidInput):
    code = "invalid_path"


class InvalidHost(InvalidInput):
    code = "invalid_host"


class InvalidPort(InvalidInput):
    code = "invalid_port"


class InvalidUser(InvalidInput):
    code = "invalid_user"


class InvalidFrequency(InvalidInput):
    code = "invalid_frequency"


class InvalidKeep(InvalidInput):
    code = "invalid_keep"


class RunInProgress(BackhaulError):
    code = "run_in_progress"
    http_status = 409

    def __init__(self, target_id: int) -> None:
        super().__init__(f"target {target_id} is being backed up right now")


# --- node and transport ----------------------------------------------------


class NodeError(BackhaulError):
    """Something went wrong talking to a node. ``node_unreachable`` says whether
    the failure means the node itself cannot be reached (probe it) or only
    this run failed (retry the target)."""

    http_status = 502
    node_unreachable = False


class UnreachableNode(NodeError):
    code = "unreachable"
    node_unreachable = True

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot reach {address}: {reason}")


class AuthFailed(NodeError):
    code = "auth_failed"

    def __init__(self, address: str, reason: str = "") -> None:
        hint = (
            "the node refused the server's key; add the line from `backhaul pubkey` "
            "to the backup user's authorized_keys"
        )
        super().__init__(f"authentication to {address} failed{': ' + reason if reason else ''}"
                         f" ({hint})")


class HostKeyMismatch(NodeError):
    code = "host_key_mismatch"

    def __init__(self, address: str, expected: str, got: str) -> None:
        super().__init__(
            f"host key of {address} changed: pinned {expected}, node offered {got}; "
            f"if the change is legitimate run `backhaul trust {address}`"
        )
        self.expected = expected
        self.got = got


class Timeout(NodeError):
    code = "timeout"
    http_status = 504

    def __init__(self, address: str, what: str, seconds: float) -> None:
        super().__init__(f"{what} on {address} gave no data for {seconds:g} s")


class StreamIncomplete(NodeError):
    """The channel closed (or the transport died) before the remote command
    reported an exit status: the bytes received cannot be trusted."""

    code = "remote_command_failed"

    def __init__(self, address: str, what: str) -> None:
        super().__init__(f"{what} on {address} ended without an exit status "
                         "(connection lost mid-stream); nothing was kept")


class ConnectionLost(UnreachableNode):
    """The transport died mid-command: the node (or the network) went away."""

    def __init__(self, address: str, what: str) -> None:
        NodeError.__init__(self, f"connection to {address} lost during {what}; "
                                 "nothing from this run was kept")


class PathNotFound(NodeError):
    code = "path_not_found"
    http_status = 422

    def __init__(self, address: str, path: str) -> None:
        super().__init__(f"{path} does not exist on {address}")


class PermissionDenied(NodeError):
    code = "permission_denied"
    http_status = 422

    def __init__(self, address: str, path: str, detail: str = "") -> None:
        super().__init__(f"{path} on {address} is not readable by the backup user"
                         f"{': ' + detail if detail else ''}")


class CommandRefused(NodeError):
    code = "command_refused"
    http_status = 422

    def __init__(self, address: str, path: str) -> None:
        super().__init__(
            f"{address} refused to run backhaul's command for {path}: its key is restricted "
            f"to other paths; put the line from `backhaul pubkey --restricted {address}` in "
            "the node's authorized_keys")


class RemoteCommandFailed(NodeError):
    code = "remote_command_failed"

    def __init__(self, address: str, what: str, exit_status: int, stderr: str) -> None:
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else "no message"
        super().__init__(f"{what} on {address} exited with status {exit_status}: {tail}")
        self.exit_status = exit_status


# --- monitoring and hooks ---------------------------------------------------------


class InvalidCommand(InvalidInput):
    code = "invalid_command"


class InvalidUrl(InvalidInput):
    code = "invalid_url"


class PreCommandFailed(NodeError):
    """A target's pre command failed: the run fails, keeping its stderr."""

    code = "pre_command_failed"

    def __init__(self, address: str, exit_status: int, stderr: str) -> None:
        what = ("timed out" if exit_status == 124 else f"exited with status {exit_status}")
        super().__init__(f"pre command on {address} {what}"
                         + (f": {stderr}" if stderr else " (no stderr)"))
        self.exit_status = exit_status


class OutputTooLarge(NodeError):
    """A command whose answer is one short line printed more than the cap."""

    code = "output_too_large"

    def __init__(self, address: str, what: str, limit: int) -> None:
        super().__init__(f"{what} on {address} printed more than {limit} bytes "
                         "(--max-command-output); its answer is one short line, so the node "
                         "is misbehaving; nothing was kept")


class RunTimeout(NodeError):
    """The run's wall-clock deadline passed (a node trickling its stream)."""

    code = "run_timeout"
    http_status = 504

    def __init__(self, address: str, what: str, seconds: float) -> None:
        super().__init__(f"{what} on {address} was still going when the run reached its "
                         f"{seconds:g} s deadline (--run-timeout); nothing was kept")


# --- registration, runs and the server (were in server.py) ------------------------


class TargetInactive(BackhaulError):
    code = "target_unregistered"
    http_status = 409

    def __init__(self, target_id: int) -> None:
        super().__init__(f"target {target_id} is unregistered; register it again to back it up")


class NotRegistered(BackhaulError):
    code = "target_unregistered"
    http_status = 409

    def __init__(self, target: Target) -> None:
        when = target.unregistered_at.isoformat(timespec="seconds") \
            if target.unregistered_at else "earlier"
        super().__init__(f"{target.node.address} {target.path} is not registered "
                         f"(target {target.id} was unregistered at {when})")


class NodeInUse(BackhaulError):
    code = "node_in_use"
    http_status = 409

    def __init__(self, node: Node, paths: list[str]) -> None:
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        super().__init__(f"{node.address} still has {len(paths)} registered target(s) "
                         f"({shown}); unregister them first")


class WaitTimeout(BackhaulError):
    code = "timeout"
    http_status = 504

    def __init__(self, target_id: int, seconds: float) -> None:
        super().__init__(f"target {target_id} is still running after {seconds:g} s; "
                         "see `backhaul history` for its outcome")


class ServerError(BackhaulError):
    code = "server_error"


# --- restore (were in restore.py) -----------------------------------------------------


class RestoreError(BackhaulError):
    code = "restore_failed"
    http_status = 422


class DestExists(BackhaulError):
    code = "dest_exists"
    http_status = 409

    def __init__(self, address: str, dest: str) -> None:
        super().__init__(f"{dest} already exists on {address}; restore into a new directory "
                         "or add --force to write into it")


class RestoreRefused(BackhaulError):
    code = "command_refused"
    http_status = 422

    def __init__(self, address: str) -> None:
        super().__init__(
            f"{address} refused the restore: the server's key there is restricted to "
            "backhaul's backup commands (backhaul pubkey --restricted); restore with "
            "`backhaul restore ID --to DIR` and copy the files, or authorise a separate, "
            "unrestricted restore key on that node for the restore")


class ArchiveGone(BackhaulError):
    code = "archive_rotated"
    http_status = 410
