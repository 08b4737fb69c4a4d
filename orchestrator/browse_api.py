"""Routes that read archives through their index: entries (``backhaul ls``),
find (``backhaul find``) and the selective extract behind
``backhaul restore --only`` (see orchestrator/browse.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from orchestrator.browse import (
    NoSuchEntry,
    find_entries,
    list_entries,
    open_listing,
    relative_members,
    selected_stream,
    selection,
)

if TYPE_CHECKING:
    from orchestrator.server import Server

Id = Annotated[int, PathParam(ge=1, le=2**63 - 1)]
Limit = Annotated[int, Query(ge=1, le=10_000_000, description="at most this many entries")]


class ExtractBody(BaseModel):
    only: list[str] = Field(min_length=1, max_length=10_000, description=(
        "files or subtrees, relative to the tree or absolute on the node"))


def router(server: Server) -> APIRouter:
    r = APIRouter(prefix="/api/v1")

    @r.get("/archives/{archive_id}/entries",
           summary="the archive's entries, from its index (the archive is not read)")
    def entries(archive_id: Id,
                path: Annotated[str | None, Query(max_length=4096, description=(
                    "only this file or subtree: relative to the tree, or the absolute "
                    "path on the node"))] = None,
                limit: Limit = 1_000_000) -> dict[str, Any]:
        return list_entries(server.catalog, server.store, archive_id, path or None, limit)

    @r.get("/targets/{target_id}/find",
           summary="which kept archives of the target's node and path hold entries "
                   "matching a glob")
    def find(target_id: Id,
             pattern: Annotated[str, Query(min_length=1, max_length=4096, description=(
                 "fnmatch glob on the path relative to the tree and on the basename"))],
             limit: Limit = 10_000) -> dict[str, Any]:
        return find_entries(server.catalog, server.store, target_id, pattern, limit)

    @r.post("/archives/{archive_id}/extract", response_class=StreamingResponse,
            summary="a tar.gz of just the selected entries, read from the archive's "
                    "members through its index")
    def extract(archive_id: Id, body: ExtractBody) -> StreamingResponse:
        only = body.only
        listed = open_listing(server.catalog, server.store, archive_id)
        names = relative_members(only, listed.tree_path)
        picked, hit = selection(listed, names)
        if not picked:
            raise NoSuchEntry(f"not in archive {archive_id}: {', '.join(only)}")
        missing = [o for o, n in zip(only, names, strict=True) if n not in hit]
        headers = {"X-Backhaul-Entries": str(len(picked))}
        if missing:
            headers["X-Backhaul-Not-Found"] = str(len(missing))
        return StreamingResponse(selected_stream(server.store, listed, picked),
                                 media_type="application/gzip", headers=headers)

    return r
