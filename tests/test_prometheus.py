"""A real Prometheus scrapes a live backhauld with the token file as its
credentials, and PromQL over its HTTP API sees backhaul's series; the shipped
alert rules pass promtool."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LiveServer

from fixtures.prometheus import PROMETHEUS, PROMTOOL, Prometheus, scrape_config
from fixtures.sshd.launcher import SSHD

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "docs" / "alerts.yml"

pytestmark = pytest.mark.skipif(not Path(PROMETHEUS).exists(),
                                reason="prometheus is not installed (scripts/bootstrap.sh)")


@pytest.fixture
def prometheus(live: LiveServer, tmp_path: Path) -> Iterator[Prometheus]:
    config = scrape_config(f"127.0.0.1:{live.port}", live.data_dir / "api-token",
                           rule_files=[ALERTS])
    prom = Prometheus(tmp_path / "prometheus", config).start()
    yield prom
    prom.stop()


def test_prometheus_scrapes_backhauld(live: LiveServer, node: SSHD, prometheus: Prometheus,
                                      tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "f").write_text("data")
    t = live.register(node, app, every=600)
    live.wait_for(lambda: [r for r in live.runs(t["id"]) if r["status"] == "success"], 30,
                  "the first run")
    run = live.api("POST", f"/targets/{t['id']}/run", params={"wait": "true"}).json()["run"]
    assert run["status"] == "unchanged"

    up = prometheus.wait_query('up{job="backhaul"} == 1')
    assert up[0]["metric"]["instance"] == f"127.0.0.1:{live.port}"
    # The age of the last good backup, as an alert would compute it.
    age = prometheus.wait_query(
        f'time() - backhaul_last_success_timestamp_seconds{{target_id="{t["id"]}"}}')
    assert age[0]["metric"]["path"] == str(app)
    assert age[0]["metric"]["node"] == t["address"]
    assert 0 <= float(age[0]["value"][1]) < 120
    # The unchanged run is counted and the tree does not look stale.
    prometheus.wait_query(f'backhaul_runs_total{{target_id="{t["id"]}",result="unchanged"}} >= 1')
    assert prometheus.query('ALERTS{alertname="BackhaulBackupTooOld"}') == []
    groups = prometheus.api("rules")["groups"]
    names = {r["name"] for g in groups for r in g["rules"]}
    assert {"BackhaulBackupTooOld", "BackhaulNodeUnreachable"} <= names
    assert all(r["health"] in ("ok", "unknown") for g in groups for r in g["rules"])


def test_wrong_token_file_fails_the_scrape(live: LiveServer, tmp_path: Path) -> None:
    bad = tmp_path / "bad-token"
    bad.write_text("not-the-token\n")
    prom = Prometheus(tmp_path / "prometheus",
                      scrape_config(f"127.0.0.1:{live.port}", bad)).start()
    try:
        down = prom.wait_query('up{job="backhaul"} == 0')
        assert down
        targets = prom.api("targets")["activeTargets"]
        assert "401" in targets[0]["lastError"]
        assert prom.query("backhaul_up") == []
    finally:
        prom.stop()


def test_alert_rules_pass_promtool() -> None:
    res = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 6 rules found" in res.stdout


def test_alert_rules_behave(tmp_path: Path) -> None:
    """promtool's rule unit tests: an unchanged tree (its last success keeps
    moving) stays quiet; a target whose last success stops moving fires."""
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(f"""
rule_files: [{ALERTS}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'backhaul_last_success_timestamp_seconds{{target_id="1",node="n",path="/a"}}'
        values: '0+60x300'
      - series: 'backhaul_target_interval_seconds{{target_id="1",node="n",path="/a"}}'
        values: '60x300'
      - series: 'backhaul_target_registered_timestamp_seconds{{target_id="1",node="n",path="/a"}}'
        values: '0x300'
      - series: 'backhaul_last_success_timestamp_seconds{{target_id="2",node="n",path="/b"}}'
        values: '0x300'
      - series: 'backhaul_target_interval_seconds{{target_id="2",node="n",path="/b"}}'
        values: '60x300'
      - series: 'backhaul_target_registered_timestamp_seconds{{target_id="2",node="n",path="/b"}}'
        values: '0x300'
      - series: 'backhaul_up{{version="x"}}'
        values: '1x300'
    alert_rule_test:
      - eval_time: 4h
        alertname: BackhaulBackupTooOld
        exp_alerts:
          - exp_labels: {{severity: critical, target_id: "2", node: n, path: /b}}
            exp_annotations: {{summary: "no good backup of n /b for 4h 0m 0s"}}
""")
    res = subprocess.run([PROMTOOL, "test", "rules", str(tests)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
