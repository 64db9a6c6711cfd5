"""The Grafana dashboards: importable JSON, linted panel by panel, every query filtered by the
job/namespace/pod variables and built only from metrics the exporter really emits."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from exporter.server.sidecar import Sidecar
from tests.support import promql_names as pn
from tests.support.helpers import eventually, register_server, scrape

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = ROOT / "dashboards" / "grafana"
DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
FILTER_VARIABLES = ("job", "namespace", "pod")

#: Grafana unit ids the dashboards may use (a typo in a unit silently shows raw numbers).
UNITS = {"s", "ms", "short", "none", "percentunit", "ops", "bool", "bytes"}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def panels(dashboard: dict) -> list[dict]:
    """Every panel but rows (structure, not content)."""
    return [p for p in pn.dashboard_panels(dashboard) if p.get("type") != "row"]


def all_queries() -> list[tuple[str, str]]:
    return [(f"{path.name}: {where}", expr)
            for path in DASHBOARDS for where, expr in pn.dashboard_queries(load(path))]


by_dashboard = pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)


def test_the_fleet_and_shutdowns_dashboards_exist():
    assert {p.name for p in DASHBOARDS} >= {"asynq-fleet.json", "asynq-shutdowns.json"}


@by_dashboard
def test_dashboard_is_importable_json_for_current_grafana(path):
    d = load(path)
    assert d["schemaVersion"] >= 36
    assert d.get("id") is None, "an exported id would clash on import"
    assert d["uid"] and len(d["uid"]) <= 40 and d["title"]
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids)), "dashboard uids must be unique"
    assert d["panels"], "no panels"


@by_dashboard
def test_datasource_and_filter_variables_default_to_all(path):
    variables = {v["name"]: v for v in load(path)["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    for name in FILTER_VARIABLES:
        var = variables[name]
        assert var["type"] == "query", name
        assert var["datasource"] == DATASOURCE, name
        assert var["includeAll"] and var["multi"], name
        assert var["current"]["value"] in (["$__all"], "$__all"), f"{name} does not default to All"
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert query.startswith("label_values(") and query.rstrip(")").endswith(name), name


@by_dashboard
def test_every_panel_has_title_unit_datasource_description_and_targets(path):
    d = load(path)
    ids = [p["id"] for p in pn.dashboard_panels(d)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels(d):
        where = f"panel {p['id']} {p.get('title')!r}"
        assert p.get("title"), where
        assert p.get("description"), f"{where}: no description"
        assert p["fieldConfig"]["defaults"].get("unit") in UNITS, f"{where}: unit"
        for override in p["fieldConfig"].get("overrides", []):
            for prop in override["properties"]:
                if prop["id"] == "unit":
                    assert prop["value"] in UNITS, f"{where}: override unit"
        assert p["datasource"] == DATASOURCE, where
        assert p["targets"], f"{where}: no query"
        refs = [t.get("refId") for t in p["targets"]]
        assert all(refs) and len(refs) == len(set(refs)), f"{where}: refIds {refs}"
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE, where
            assert t["expr"].strip(), where


@by_dashboard
def test_panels_fit_the_grid_without_overlapping(path):
    taken: set[tuple[int, int]] = set()
    for p in pn.dashboard_panels(load(path)):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"panel {p['title']!r} overlaps another"
        taken |= cells


@by_dashboard
def test_every_panel_query_filters_by_job_namespace_and_pod(path):
    d = load(path)
    values = pn.dashboard_variable_values(d)
    for p in panels(d):
        for t in p["targets"]:
            expr = pn.substitute(t["expr"], values)
            for s in pn.selectors(expr):
                for name in FILTER_VARIABLES:
                    assert s.matcher(name) == ("=~", values[name]), \
                        f"{path.name}: panel {p['title']!r} {t['refId']}: {s.name} is not filtered by ${name}"


def test_the_expected_panels_are_there():
    titles = {p["title"] for path in DASHBOARDS for p in panels(load(path))}
    assert {
        "Live vs expired registrations per set", "Oldest expired entry per set", "Live servers by status",
        "Concurrency vs active tasks", "Utilisation", "Registrations removed by reason (per hour)",
        "Leaks per hour", "Sidecars with Redis down",
        "Shutdown duration (heatmap)", "Shutdown duration p50 / p95 / p99 vs budget", "Exits by outcome",
        "Shutdowns over budget", "Abandoned tasks", "Workers by state", "Per-pod drill-down",
        "Stale tasks per queue", "Oldest expired lease per queue", "Stale tasks handed back to asynq (per hour)",
    } <= titles


def test_the_heatmap_reads_histogram_buckets_and_the_quantiles_face_the_budget():
    d = load(DASHBOARD_DIR / "asynq-shutdowns.json")
    by_title = {p["title"]: p for p in panels(d)}
    heat = by_title["Shutdown duration (heatmap)"]
    assert heat["type"] == "heatmap" and heat["targets"][0]["format"] == "heatmap"
    assert "_bucket" in heat["targets"][0]["expr"] and "by (le)" in heat["targets"][0]["expr"]
    quantiles = by_title["Shutdown duration p50 / p95 / p99 vs budget"]["targets"]
    exprs = " ".join(t["expr"] for t in quantiles)
    for q in ("0.50", "0.95", "0.99"):
        assert f"histogram_quantile({q}," in exprs
    assert "asynq_sidecar_shutdown_budget_seconds" in exprs


def test_registry_gauges_are_aggregated_with_max_not_summed_across_sidecars():
    for where, expr in all_queries():
        assert not pn.summed_fleet_series(expr), f"{where}: {expr}"


def test_dashboard_metrics_are_in_the_metric_contract():
    assert pn.problems(all_queries(), pn.contract_series(), contract=True) == []


async def test_dashboard_metrics_are_emitted_by_the_real_exporter(rdb, make_config):
    register_server(rdb, "host-a", 1, "s1", time.time() + 10)
    rdb.sadd("asynq:queues", "default")  # the per-queue task gauges have a series only with a queue
    async with Sidecar(make_config()) as sc:
        await eventually(lambda: sc.watcher.latest, what="a details read")
        exposed = pn.exposed_series(await scrape(sc.http_url))
    problems = pn.problems(all_queries(), pn.exposed_labels(exposed), contract=False)
    assert problems == [], f"exposed: {sorted(exposed)}"
