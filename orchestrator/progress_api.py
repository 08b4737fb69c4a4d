"""Progress of a run while it goes on: the bytes received from the node so
far (the engine's per-run wire counter), for ``backhaul run --wait``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter
from fastapi import Path as PathParam

if TYPE_CHECKING:
    from orchestrator.server import Server

Id = Annotated[int, PathParam(ge=1, le=2**63 - 1)]


def router(server: Server) -> APIRouter:
    r = APIRouter(prefix="/api/v1")

    @r.get("/targets/{target_id}/progress",
           summary="the target's run in progress: bytes received from the node so far")
    def progress(target_id: Id) -> dict[str, Any]:
        server.catalog.get_target(target_id)  # 404 for an unknown target
        now = server.engine.progress(target_id)
        if now is None:
            return {"target_id": target_id, "running": False, "run_id": None,
                    "bytes_so_far": None}
        run_id, so_far = now
        return {"target_id": target_id, "running": True, "run_id": run_id,
                "bytes_so_far": so_far}

    return r
