"""``backhaul jobs`` with more targets than one page, against a live backhauld.

Most targets sit on a closed loopback port (a node that is down: registration
accepts it, nothing runs), one on a real sshd node (its first backup runs), so
the page, the counts and the summary line all have something to tell apart.
The server is this module's own: the counts are exact.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result
from conftest import LiveServer

from cli.main import JOBS_PAGE, main
from fixtures.server import free_port
from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey

DOWN = JOBS_PAGE + 4  # targets on the node that is down: one page and some more
NO_ENV = {"BACKHAUL_URL": None, "BACKHAUL_TOKEN": None, "BACKHAUL_DATA_DIR": None}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, server_key: ServerKey,
          node: SSHD) -> Iterator[tuple[LiveServer, list[dict[str, Any]]]]:
    srv = LiveServer(tmp_path_factory.mktemp("jobs-paging") / "server", server_key)
    try:
        srv.start(timeout=60)  # inside: a start that times out is stopped too
        closed = free_port("127.0.0.1")
        made = []
        for i in range(DOWN):
            r = srv.api("POST", "/targets", json={
                "host": "127.0.0.1", "port": closed, "user": "nobody",
                "path": f"/srv/down{i:03d}", "every_minutes": 1440})
            assert r.status_code == 201, r.text
            made.append(r.json()["target"])
        tree = tmp_path_factory.mktemp("jobs-tree")
        (tree / "f.txt").write_text("hello\n")
        up = srv.register(node, tree, every=1440)
        made.append(up)
        srv.wait_for(lambda: [r for r in srv.runs(up["id"]) if r["status"] == "success"],
                     30, "the first backup of the target on the real node")
        yield srv, made
    finally:
        srv.stop()


def cli(srv: LiveServer, *args: str) -> Result:
    argv = ["--server", srv.url, "--token", srv.token, *args]
    return CliRunner().invoke(main, argv, env=NO_ENV)


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return result.stdout


def rows(out: str) -> list[str]:
    """The table's data rows (up to the blank line before the page note)."""
    table = out.split("\n\n")[0].splitlines()
    assert table[0].split()[:3] == ["ID", "NODE", "PATH"], out
    return table[1:]


def ids(out: str) -> list[int]:
    return [int(r.split()[0]) for r in rows(out)]


def test_jobs_shows_one_page_and_counts_the_rest(fleet: tuple[LiveServer, list]) -> None:
    srv, made = fleet
    total = len(made)
    out = ok(cli(srv, "jobs"))
    assert ids(out) == [t["id"] for t in made[:JOBS_PAGE]]
    tail = out.split("\n\n")[1].splitlines()
    assert tail == [
        f"targets 1-{JOBS_PAGE} of {total} shown (--all lists every one; "
        f"next page: --offset {JOBS_PAGE})",
        f"all {total}: {DOWN} not run yet, 1 success; {DOWN} on unreachable nodes",
    ]


def test_jobs_limit_and_offset_page_through_every_target(
        fleet: tuple[LiveServer, list]) -> None:
    srv, made = fleet
    seen: list[int] = []
    offset = 0
    while True:
        out = ok(cli(srv, "jobs", "--limit", "40", "--offset", str(offset)))
        page = ids(out)
        seen += page
        offset += len(page)
        if "next page" not in out:
            break
        assert f"next page: --offset {offset})" in out
    assert seen == [t["id"] for t in made]
    assert f"targets 81-{len(made)} of {len(made)} shown (--all lists every one)\n" in out


def test_jobs_all_lists_every_target_without_a_page_note(
        fleet: tuple[LiveServer, list]) -> None:
    srv, made = fleet
    out = ok(cli(srv, "jobs", "--all"))
    assert ids(out) == [t["id"] for t in made]
    assert "\n\n" not in out and "shown" not in out
    up = rows(out)[-1]
    assert "success" in up and made[-1]["path"] in up
    assert "node unreachable" in rows(out)[0]


def test_jobs_json_is_the_whole_list_unless_a_limit_is_given(
        fleet: tuple[LiveServer, list]) -> None:
    srv, made = fleet
    whole = json.loads(ok(cli(srv, "jobs", "--json")))
    assert whole == srv.api("GET", "/targets").json()
    assert [t["id"] for t in whole["targets"]] == [t["id"] for t in made]
    assert whole["total"] == len(made)
    assert whole["summary"] == {"by_status": {"never": DOWN, "success": 1},
                                "node_unreachable": DOWN}
    page = json.loads(ok(cli(srv, "jobs", "--json", "--limit", "3", "--offset", "2")))
    assert [t["id"] for t in page["targets"]] == [t["id"] for t in made[2:5]]
    assert (page["total"], page["offset"]) == (len(made), 2)
    # A page's rows are the whole list's rows: same next run, same last status.
    assert page["targets"] == whole["targets"][2:5]
    last = json.loads(ok(cli(srv, "jobs", "--json", "--limit", "1",
                             "--offset", str(len(made) - 1))))
    assert last["targets"] == whole["targets"][-1:]
    assert last["targets"][0]["next_run_at"] and last["targets"][0]["last_status"] == "success"


def test_jobs_past_the_end_and_filters_keep_their_counts(
        fleet: tuple[LiveServer, list]) -> None:
    srv, made = fleet
    out = ok(cli(srv, "jobs", "--offset", str(len(made))))
    assert out == f"no targets past the first {len(made)} ({len(made)} registered)\n"
    r = srv.api("GET", "/targets", params={"port": made[0]["port"], "limit": 2})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["total"] == DOWN and len(doc["targets"]) == 2
    assert doc["summary"] == {"by_status": {"never": DOWN}, "node_unreachable": DOWN}


@pytest.mark.parametrize("args", [["--all", "--limit", "5"], ["--all", "--offset", "5"],
                                  ["--limit", "0"], ["--offset", "-1"]])
def test_jobs_refuses_contradictory_or_bad_paging(fleet: tuple[LiveServer, list],
                                                  args: list[str]) -> None:
    srv, _ = fleet
    result = cli(srv, "jobs", *args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.output


@pytest.mark.parametrize("query", [{"limit": 0}, {"offset": -1}, {"limit": "x"}])
def test_api_refuses_a_bad_page(fleet: tuple[LiveServer, list], query: dict) -> None:
    srv, _ = fleet
    r = srv.api("GET", "/targets", params=query)
    assert r.status_code == 422, r.text
    assert set(r.json()["error"]) == {"code", "message"}
