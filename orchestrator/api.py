"""HTTP/JSON routes (FastAPI): token auth and one error shape.

Every error leaves through ``_error`` as ``{"error": {"code", "message"}}``
with a fitting HTTP status; a test asserts the shape across routes.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator import browse_api, metrics, options_api, progress_api, validation, web
from orchestrator.errors import BackhaulError
from orchestrator.guard import RequestGuard
from orchestrator.restore import restore_to_node
from orchestrator.server import Server, __version__
from storage.catalog import Node, Target, format_address
from storage.errors import NotFound, StorageError, TargetExists

log = logging.getLogger(__name__)

API = "/api/v1"

MAX_ID = 2**63 - 1  # SQL BIGINT: larger ids cannot exist
Id = Annotated[int, PathParam(ge=1, le=MAX_ID)]
OptId = Annotated[int | None, Query(ge=1, le=MAX_ID)]
OptPort = Annotated[int | None, Query(ge=1, le=65535)]


class RegisterBody(BaseModel):
    host: str = Field(description="node host name or IP address")
    port: int = Field(22, description="node SSH port")
    user: str | None = Field(None, description="SSH user (default: the server's default user)")
    path: str = Field(description="absolute path on the node to back up")
    every_minutes: int = Field(description="backup frequency in minutes (>= 1)")
    keep: int = Field(10, description="archives to keep (>= 1)")
    host_key_fingerprint: str | None = Field(
        None, description="expected host key, SHA256:... as ssh-keygen -l prints it")
    pre_command: str | None = Field(None, max_length=4096, description=(
        "run on the node before the fingerprint (sh -c, as given); its failure fails the run"))
    post_command: str | None = Field(None, max_length=4096,
                                     description="run on the node after the backup")
    pre_optional: bool = Field(False, description="a failing pre command does not fail the run")
    ping_url: str | None = Field(None, max_length=2048, description=(
        "Healthchecks-style URL: pinged on success, <url>/fail on failure"))


_OPTION_FIELDS = {"pre_command", "post_command", "pre_optional", "ping_url"}


class TrustBody(BaseModel):
    fingerprint: str | None = None


class VerifyBody(BaseModel):
    archive_ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] | None = Field(
        None, max_length=10_000, description="archives to verify")
    all: bool = Field(False, description="verify every kept archive")


class RestoreBody(BaseModel):
    host: str = Field(description="node to restore onto")
    port: int = Field(22, description="its SSH port")
    user: str | None = Field(None, description="SSH user (default: the server's default user)")
    dest: str = Field(description="absolute directory on the node; new unless force")
    only: list[str] = Field([], max_length=10_000,
                            description="files or subtrees, relative to the tree")
    force: bool = Field(False, description="write into an existing directory")


class EditBody(BaseModel):
    every_minutes: int | None = Field(None, description="new backup frequency in minutes")
    keep: int | None = Field(None, description="new number of archives to keep; "
                                               "a lower one rotates at once")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


def iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def node_json(n: Node) -> dict[str, Any]:
    return {
        "id": n.id, "user": n.user, "host": n.host, "port": n.port, "address": n.address,
        "host_key_type": n.host_key_type, "host_key_fingerprint": n.host_key_fingerprint,
        "host_key_pinned": n.host_key_b64 is not None,
        "reachable": n.reachable, "last_error": n.last_error,
        "last_error_code": n.last_error_code,
        "last_seen_at": iso(n.last_seen_at), "unreachable_since": iso(n.unreachable_since),
        "next_probe_at": iso(n.next_probe_at) if n.reachable is False else None,
    }


def target_json(t: Target, summary: dict[str, Any] | None,
                next_run: dt.datetime | None) -> dict[str, Any]:
    s = summary or {}
    return {
        "id": t.id, "node_id": t.node.id, "user": t.node.user, "host": t.node.host,
        "port": t.node.port, "address": t.node.address, "path": t.path,
        "every_minutes": t.every_minutes, "keep": t.keep, "active": t.active,
        "created_at": iso(t.created_at), "unregistered_at": iso(t.unregistered_at),
        "next_run_at": iso(next_run) if t.active else None,
        "last_run_at": iso(s.get("last_run_at")), "last_status": s.get("last_status"),
        "last_error_code": s.get("last_error_code"),
        "archives_kept": s.get("archives_kept", 0), "bytes_kept": s.get("bytes_kept", 0),
        "failures": t.failures, "node_reachable": t.node.reachable,
    }


def archive_json(a: dict[str, Any]) -> dict[str, Any]:
    if a["deleted_at"] is None:
        state = "kept"
    else:  # rows deleted before the reason was recorded were all rotations
        state = a.get("deleted_reason") or "rotated"
    return {
        "id": a["id"], "target_id": a["target_id"], "run_id": a["run_id"],
        "created_at": iso(a["created_at"]), "size": a["size"], "sha256": a["sha256"],
        "file_name": a["file_name"].rsplit("/", 1)[-1], "fingerprint": a["fingerprint"],
        "retained": a["deleted_at"] is None, "deleted_at": iso(a["deleted_at"]),
        "state": state, "verify_status": a.get("verify_status"),
        "verified_at": iso(a.get("verified_at")), "verify_error": a.get("verify_error"),
    }


def run_json(r: dict[str, Any]) -> dict[str, Any]:
    started, finished = r["started_at"], r["finished_at"]
    return {
        "id": r["id"], "target_id": r["target_id"],
        "address": format_address(r["user"], r["host"], r["port"]), "path": r["path"],
        "scheduled_at": iso(r["scheduled_at"]),
        "start_delay_seconds": round((started - r["scheduled_at"]).total_seconds(), 3)
        if r["scheduled_at"] else None,
        "started_at": iso(started), "finished_at": iso(finished), "status": r["status"],
        "trigger": r["trigger"], "bytes_transferred": r["bytes_transferred"],
        "archive_id": r["archive_id"], "archive_size": r.get("archive_size"),
        "error_code": r["error_code"], "message": r["message"],
        "warnings": r["warnings"], "transfer": r.get("transfer"),
        "duration_seconds": round((finished - started).total_seconds(), 3) if finished else None,
    }


def create_app(server: Server) -> FastAPI:
    # The schema is served below behind the token; /docs and /redoc are off
    # (they load their scripts from a CDN and would show the API to anyone).
    # No trailing-slash redirects: Starlette builds their Location from the
    # request's Host header.
    app = FastAPI(title="backhauld", version=__version__,
                  description="backhaul's backup server API. Every route but /health needs "
                              "`Authorization: Bearer <token>` (the token is in "
                              "<data-dir>/api-token).",
                  openapi_url=None, docs_url=None, redoc_url=None, redirect_slashes=False)
    # Token and body size are checked before any body is read.
    app.add_middleware(RequestGuard, token=server.token, error=_error)
    token = server.token.encode()

    # async: it does no I/O, and a sync dependency costs every request a
    # hop to the thread pool and back (besides the endpoint's own).
    async def require_token(request: Request) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip().encode(),
                                                                    token):
            raise ApiError(401, "unauthorized", "missing or wrong API token (see "
                                                "<data-dir>/api-token or BACKHAUL_TOKEN)")

    @app.exception_handler(ApiError)
    def _api_error(_r: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc.status, exc.code, exc.message, headers)

    @app.exception_handler(BackhaulError)
    def _backhaul_error(_r: Request, exc: BackhaulError) -> JSONResponse:
        return _error(exc.http_status, exc.code, exc.message)

    @app.exception_handler(StorageError)
    def _storage_error(_r: Request, exc: StorageError) -> JSONResponse:
        if isinstance(exc, NotFound):
            return _error(404, exc.code, exc.message)
        if isinstance(exc, TargetExists):
            return _error(409, exc.code, exc.message)
        log.error("storage error answering a request: %s", exc.message)
        return _error(503, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    def _validation(_r: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query"))
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    def _http(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    def _unexpected(_r: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering a request")
        return _error(500, "internal_error", f"{exc.__class__.__name__}: {exc}")

    @app.get("/health", summary="liveness (no token)")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_token)])
    def openapi() -> dict[str, Any]:
        return app.openapi()

    r = APIRouter(prefix=API, dependencies=[Depends(require_token)])

    def target_out(t: Target) -> dict[str, Any]:
        return target_json(t, server.catalog.target_summaries([t.id]).get(t.id),
                           server.scheduler.next_runs(t.id).get(t.id))

    def canonical_host(host: str | None) -> str | None:
        """Filters compare with hosts as stored (lower-case names, compressed IPs)."""
        if host is None:
            return None
        try:
            return validation.host(host)
        except BackhaulError:
            return host

    def resolve_target(target_id: Id) -> Target:
        return server.catalog.get_target(target_id)

    @r.get("/pubkey", summary="the server's SSH public key")
    def pubkey(restricted: bool = False, host: str | None = None,
               port: int = Query(22, ge=1, le=65535), user: str | None = None,
               ) -> dict[str, Any]:
        line = server.authorized_keys_line(restricted=restricted, host=host, port=port,
                                           user=user)
        return {"public_key": server.key.public_line, "fingerprint": server.key.fingerprint,
                "authorized_keys_line": line}

    @r.get("/nodes", summary="nodes with pinned host keys and reachability")
    def list_nodes() -> dict[str, Any]:
        return {"nodes": [node_json(n) for n in server.catalog.list_nodes()]}

    @r.delete("/nodes/{node_id}", summary="forget a node that has no registered targets")
    def forget_node(node_id: Id) -> dict[str, Any]:
        return {"node": node_json(server.forget_node(node_id))}

    @r.post("/nodes/{node_id}/trust", summary="forget a node's pinned host key")
    def trust(node_id: Id, body: TrustBody | None = None) -> dict[str, Any]:
        node = server.trust_node(node_id, body.fingerprint if body else None)
        return {"node": node_json(node)}

    @r.post("/targets", status_code=201, summary="register a (node, path) target")
    def register(body: RegisterBody) -> JSONResponse:
        reg = server.register(host=body.host, port=body.port, user=body.user, path=body.path,
                              every_minutes=body.every_minutes, keep=body.keep,
                              host_key_fingerprint=body.host_key_fingerprint,
                              options=body.model_dump(include=_OPTION_FIELDS,
                                                      exclude_unset=True))
        # A target whose first run is later has no runs or archives yet and
        # its next run is the one just stored: nothing to read back.
        out = target_out(reg.target) if reg.first_run_at is None else \
            target_json(reg.target, None, reg.first_run_at)
        # JSONResponse (plain JSON types already): FastAPI would run its encoder
        # over the dict in a second hop to the thread pool.
        return JSONResponse({"target": out, "warnings": reg.warnings,
                             "options": options_api.options_json(
                                 server.catalog.target_options([reg.target.id]).get(reg.target.id)
                                 if body.model_fields_set & _OPTION_FIELDS else None)},
                            status_code=201)

    @r.get("/targets", summary="targets with next and last run")
    def list_targets(host: str | None = None, port: OptPort = None,
                     user: str | None = None, path: str | None = None,
                     all: bool = Query(False, description="include unregistered targets"),
                     limit: int | None = Query(None, ge=1, le=MAX_ID, description=(
                         "at most this many targets, in id order (default: all)")),
                     offset: int = Query(0, ge=0, le=MAX_ID,
                                         description="skip this many first (with limit)"),
                     ) -> JSONResponse:
        filters = {"active_only": not all, "host": canonical_host(host), "port": port,
                   "user": user, "path": path}
        targets = server.catalog.list_targets(**filters, limit=limit, offset=offset)
        # A page reads the run summaries and next runs of its own targets only.
        page = None if limit is None else [t.id for t in targets]
        summaries = server.catalog.target_summaries(page)
        next_runs = (server.scheduler.next_runs() if page is None
                     else server.scheduler.next_runs_of(page))
        counts = server.catalog.target_counts(**filters)
        # JSONResponse: FastAPI's encoder would walk 10,000 ready-made dicts again.
        return JSONResponse({
            "targets": [target_json(t, summaries.get(t.id), next_runs.get(t.id))
                        for t in targets],
            "total": counts["total"], "offset": offset if limit is not None else 0,
            "summary": {"by_status": counts["by_status"],
                        "node_unreachable": counts["node_unreachable"]}})

    @r.get("/targets/{target_id}", summary="one target")
    def get_target(target_id: Id) -> dict[str, Any]:
        return {"target": target_out(resolve_target(target_id))}

    @r.delete("/targets/{target_id}", summary="unregister: stop its backups")
    def unregister(target_id: Id, purge: bool = False) -> dict[str, Any]:
        target, purged = server.unregister(target_id, purge=purge)
        return {"target": target_out(target), "purged_archives": purged}

    @r.patch("/targets/{target_id}", summary="change a target's frequency or keep")
    def edit(target_id: Id, body: EditBody) -> dict[str, Any]:
        if body.every_minutes is None and body.keep is None:
            raise ApiError(422, "invalid_request", "give every_minutes and/or keep to change")
        target, rotated = server.edit_target(target_id, every_minutes=body.every_minutes,
                                             keep=body.keep)
        return {"target": target_out(target), "rotated_archives": rotated}

    @r.get("/targets/{target_id}/backups",
           summary="every archive ever made of the target's node and path, "
                   "across registrations")
    def backups(target_id: Id) -> dict[str, Any]:
        target = resolve_target(target_id)
        made = server.catalog.list_archives_of_path(target.node.id, target.path)
        return {"target": target_out(target), "backups": [archive_json(a) for a in made]}

    @r.post("/targets/{target_id}/run", summary="back up now")
    def run(target_id: Id, wait: bool = False,
            timeout: float | None = Query(None, gt=0, le=7 * 86400, allow_inf_nan=False),
            full: bool = Query(False, description="a true full backup, not a delta"),
            ) -> JSONResponse:
        result = server.run_now(target_id, wait=wait, timeout=timeout, full=full)
        if result is None:
            return JSONResponse({"target_id": target_id, "queued": True}, status_code=202)
        return JSONResponse({"run": run_json(result)})

    @r.get("/runs", summary="the run log, newest first")
    def runs(target_id: OptId = None, host: str | None = None, port: OptPort = None,
             user: str | None = None, path: str | None = None,
             status: str | None = None,
             limit: int = Query(50, ge=1, le=10_000)) -> JSONResponse:
        target_ids = [target_id] if target_id is not None else None
        if target_ids is None and (host or port or user or path):
            target_ids = [t.id for t in server.catalog.list_targets(
                active_only=False, host=canonical_host(host), port=port, user=user,
                path=path)]
        rows = server.catalog.list_runs(target_ids=target_ids, status=status, limit=limit)
        return JSONResponse({"runs": [run_json(x) for x in rows]})

    @r.post("/archives/verify", summary="re-read stored archives: sha256, gzip, tar, index")
    def verify(body: VerifyBody) -> dict[str, Any]:
        if body.all == bool(body.archive_ids):
            raise ApiError(422, "invalid_request", "give archive_ids or all=true (not both)")
        checks = server.verify_archives(None if body.all else body.archive_ids)
        return {"results": [c.as_json() for c in checks],
                "corrupt": sum(c.status == "corrupt" for c in checks)}

    @r.post("/archives/{archive_id}/restore",
            summary="stream the archive onto a node over SSH (tar xzf - there)")
    def restore(archive_id: Id, body: RestoreBody) -> dict[str, Any]:
        done = restore_to_node(server.catalog, server.store, server.pool,
                               archive_id=archive_id, user=body.user or server.default_user,
                               host=body.host, port=body.port, dest=body.dest,
                               only=body.only, force=body.force)
        return {"restored": done.as_json()}

    @r.get("/archives/{archive_id}", summary="one archive's facts")
    def archive(archive_id: Id) -> dict[str, Any]:
        return {"backup": archive_json(server.catalog.get_archive(archive_id))}

    @r.get("/archives/{archive_id}/download", summary="the archive's tar.gz bytes",
           response_class=StreamingResponse)
    def download(archive_id: Id) -> StreamingResponse:
        a = server.catalog.get_archive(archive_id)
        if a["deleted_at"] is not None:
            raise ApiError(410, "archive_rotated",
                           f"archive {archive_id} was rotated out on {iso(a['deleted_at'])}")
        # Through the store (a directory or object storage), streamed: never
        # whole in memory, and the length known up front for the client.
        if not server.store.exists(a["file_name"]):
            raise ApiError(410, "archive_missing",
                           f"archive {archive_id} is listed but its file is gone from the store")
        size = server.store.size_of(a["file_name"])
        name = a["file_name"].rsplit("/", 1)[-1]
        return StreamingResponse(server.store.iter_bytes(a["file_name"]),
                                 media_type="application/gzip",
                                 headers={"X-Backhaul-SHA256": a["sha256"],
                                          "Content-Length": str(size),
                                          "Content-Disposition":
                                              f'attachment; filename="{name}"'})

    app.include_router(r)
    # Operators' views, each in its own module: /metrics and the status page.
    app.include_router(metrics.router(server))
    app.include_router(web.router(server))
    app.include_router(options_api.router(server), dependencies=[Depends(require_token)])
    app.include_router(browse_api.router(server), dependencies=[Depends(require_token)])
    app.include_router(progress_api.router(server), dependencies=[Depends(require_token)])
    return app
