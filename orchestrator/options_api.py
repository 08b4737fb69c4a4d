"""Per-target options over HTTP: pre/post commands, ``pre_optional`` and the
ping URL. Registration sets them too (``POST /targets``); this router reads
them and changes some of them (what ``backhaul edit`` sends)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from storage.catalog import TargetOptions

if TYPE_CHECKING:
    from orchestrator.server import Server

Id = Annotated[int, PathParam(ge=1, le=2**63 - 1)]


class OptionsBody(BaseModel):
    pre_command: str | None = Field(
        None, description="run on the node before the fingerprint (sh -c, as given); "
                          "empty removes it", max_length=4096)
    post_command: str | None = Field(
        None, description="run on the node after the backup; empty removes it",
        max_length=4096)
    pre_optional: bool | None = Field(
        None, description="a failing pre command does not fail the run")
    ping_url: str | None = Field(
        None, description="Healthchecks-style URL pinged on success, <url>/fail on "
                          "failure; empty removes it", max_length=2048)


def options_json(o: TargetOptions | None) -> dict[str, Any]:
    o = o or TargetOptions()
    return {"pre_command": o.pre_command, "post_command": o.post_command,
            "pre_optional": o.pre_optional, "ping_url": o.ping_url}


def router(server: Server) -> APIRouter:
    r = APIRouter(prefix="/api/v1")

    @r.get("/targets/{target_id}/options", summary="a target's hooks and ping URL")
    def get_options(target_id: Id) -> dict[str, Any]:
        server.catalog.get_target(target_id)  # 404 for an unknown target
        return {"target_id": target_id,
                "options": options_json(server.catalog.target_options([target_id])
                                        .get(target_id))}

    @r.patch("/targets/{target_id}/options", summary="change a target's hooks or ping URL")
    def set_options(target_id: Id, body: OptionsBody) -> dict[str, Any]:
        server.catalog.get_target(target_id)
        changed = server.set_target_options(target_id, **body.model_dump(exclude_unset=True))
        return {"target_id": target_id, "options": options_json(changed)}

    return r
