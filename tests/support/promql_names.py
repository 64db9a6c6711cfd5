"""Metric names in PromQL (dashboards, rules) and in an exposition, and the exporter's metric contract.

Queries are parsed with promql_parser after Grafana's macros and variables are substituted, and the
tree is walked for vector selectors; an exposition's names are the sample names PromQL sees
(`x_total`, `x_bucket`/`x_sum`/`x_count`), including those of families declared without samples yet.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import promql_parser
from prometheus_client.parser import text_string_to_metric_families

# ---------------------------------------------------------------- the contract (issues 2, 3, 4)

#: Every metric family of the exporter's contract: name -> (type, labels). Names and labels are
#: copied from the metric tables of issues 2 (registry), 3 (lifecycle), 4 (cleanup) and 17
#: (stale tasks), plus
#: `asynq_sidecar_undecodable_values_total{kind}`, which the exporter adds.
CONTRACT: dict[str, tuple[str, tuple[str, ...]]] = {
    # issue 2: registry metrics
    "asynq_registry_entries": ("gauge", ("set", "state")),
    "asynq_registry_oldest_expired_seconds": ("gauge", ("set",)),
    "asynq_registry_servers": ("gauge", ("status",)),
    "asynq_registry_concurrency": ("gauge", ()),
    "asynq_registry_active_tasks": ("gauge", ()),
    "asynq_registry_snapshot_age_seconds": ("gauge", ()),
    "asynq_sidecar_redis_up": ("gauge", ()),
    "asynq_sidecar_redis_errors_total": ("counter", ()),
    "asynq_sidecar_build_info": ("gauge", ("version",)),
    "asynq_sidecar_undecodable_values_total": ("counter", ("kind",)),
    # issue 3: lifecycle metrics
    "asynq_sidecar_workers": ("gauge", ("state",)),
    "asynq_sidecar_worker_starts_total": ("counter", ()),
    "asynq_sidecar_worker_exits_total": ("counter", ("outcome",)),
    "asynq_sidecar_shutdown_duration_seconds": ("histogram", ()),
    "asynq_sidecar_last_shutdown_duration_seconds": ("gauge", ()),
    "asynq_sidecar_shutdown_budget_seconds": ("gauge", ()),
    "asynq_sidecar_shutdowns_over_budget_total": ("counter", ()),
    "asynq_sidecar_socket_connections": ("gauge", ()),
    "asynq_sidecar_protocol_errors_total": ("counter", ("reason",)),
    # issue 4: cleanup metrics
    "asynq_sidecar_leaked_registrations_total": ("counter", ()),
    "asynq_sidecar_registrations_removed_total": ("counter", ("reason",)),
    "asynq_sidecar_cleanup_errors_total": ("counter", ()),
    "asynq_sidecar_cleanups_pending": ("gauge", ()),
    "asynq_sidecar_abandoned_tasks_total": ("counter", ()),
    # issue 17: stale tasks
    "asynq_queue_active_tasks": ("gauge", ("queue",)),
    "asynq_queue_lease_expired_tasks": ("gauge", ("queue",)),
    "asynq_queue_oldest_lease_expired_seconds": ("gauge", ("queue",)),
    "asynq_queue_orphaned_tasks": ("gauge", ("queue",)),
    "asynq_sidecar_tasks_recovered_total": ("counter", ("reason",)),
    "asynq_sidecar_tasks_would_recover_total": ("counter", ("reason",)),
}

#: Label values the contract enumerates: (metric, label) -> the values the exporter can emit.
CONTRACT_VALUES: dict[tuple[str, str], frozenset[str]] = {
    ("asynq_registry_entries", "set"): frozenset({"servers", "workers", "schedulers"}),
    ("asynq_registry_entries", "state"): frozenset({"live", "expired"}),
    ("asynq_registry_oldest_expired_seconds", "set"): frozenset({"servers", "workers", "schedulers"}),
    ("asynq_sidecar_workers", "state"): frozenset({"starting", "running", "stopping"}),
    ("asynq_sidecar_worker_exits_total", "outcome"): frozenset({"graceful", "error", "killed", "lost"}),
    ("asynq_sidecar_registrations_removed_total", "reason"):
        frozenset({"worker_exit", "previous_incarnation", "sweep"}),
    ("asynq_sidecar_tasks_recovered_total", "reason"): frozenset({"worker_death", "orphan"}),
    ("asynq_sidecar_tasks_would_recover_total", "reason"): frozenset({"worker_death", "orphan"}),
}

#: Series that Prometheus makes itself, not the exporter.
PROMETHEUS_SERIES = frozenset({"up"})

#: Labels that scraping attaches (target labels), allowed on any selector.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "endpoint", "service"})

_SUFFIXES = {
    "counter": ("",),  # contract names of counters already end in _total
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def contract_series() -> dict[str, frozenset[str]]:
    """Sample names of the contract -> the labels each may carry (besides target labels)."""
    out: dict[str, frozenset[str]] = {}
    for family, (kind, labels) in CONTRACT.items():
        for suffix in _SUFFIXES[kind]:
            extra = ("le",) if suffix == "_bucket" else ()
            out[family + suffix] = frozenset(labels + extra)
    return out


def family_of(series: str) -> str:
    """The contract family of a sample name (`x_bucket` -> `x` for a histogram)."""
    if series in CONTRACT:
        return series
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix) and series[: -len(suffix)] in CONTRACT:
            return series[: -len(suffix)]
    return series


# ---------------------------------------------------------------- Grafana substitution

#: Values for Grafana's global macros: durations where a range is expected.
GRAFANA_MACROS: dict[str, str] = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "__rate_interval_ms": "300000",
    "__interval_ms": "60000",
    "__range_ms": "3600000",
    "__range_s": "3600",
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana macros and `$var`, `${var}`, `${var:fmt}`, `[[var]]` by `values`
    (macros have defaults). A variable with no value is an error: the dashboard does not define it."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in values:
            return values[name]
        if name in GRAFANA_MACROS:
            return GRAFANA_MACROS[name]
        raise KeyError(f"undefined Grafana variable ${name} in {expr!r}")

    return _VARIABLE.sub(one, expr)


# ---------------------------------------------------------------- PromQL selectors


@dataclass(frozen=True)
class Selector:
    name: str | None
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value); op is = != =~ !~

    def matcher(self, label: str) -> tuple[str, str] | None:
        for name, op, value in self.matchers:
            if name == label:
                return op, value
        return None


_OPS = {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}


def selectors(expr: str) -> list[Selector]:
    """Every vector selector of a PromQL expression (inside ranges, subqueries and calls too)."""
    return _selectors_of(promql_parser.parse(expr))


def _selectors_of(tree: Any) -> list[Selector]:
    found: list[Selector] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = tuple((m.name, _OPS[str(m.op).rsplit(".", 1)[-1]], m.value)
                             for m in node.matchers.matchers)
            name = node.name or next((v for n, op, v in matchers if n == "__name__" and op == "="), None)
            found.append(Selector(name, tuple(m for m in matchers if m[0] != "__name__")))

    promql_parser.walk(tree, visit)
    return found


def metric_names(expr: str) -> set[str]:
    return {s.name for s in selectors(expr) if s.name is not None}


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<expr>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.+)\)\s*$", re.S)


def variable_query_expr(query: str) -> str | None:
    """The PromQL inside a Grafana Prometheus variable query (`label_values(EXPR, label)`,
    `query_result(EXPR)`), or None when it has none (`label_values(label)`)."""
    for pattern in (_LABEL_VALUES, _QUERY_RESULT):
        m = pattern.match(query)
        if m:
            return m.group("expr")
    raise ValueError(f"not a Prometheus variable query this test understands: {query!r}")


def simple_alternatives(regex: str) -> set[str] | None:
    """`a|b|c` -> {a, b, c} when the regex is a plain alternation of literals, else None."""
    if re.fullmatch(r"[A-Za-z0-9_]+(\|[A-Za-z0-9_]+)*", regex):
        return set(regex.split("|"))
    return None


# ---------------------------------------------------------------- dashboards and rules


def dashboard_panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel, rows' nested panels included (rows themselves too)."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_variable_values(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """A substitution for each template variable: a duration for interval variables, a
    recognisable sentinel (`__var_NAME__`) for the others."""
    values = {}
    for var in dashboard.get("templating", {}).get("list", []):
        if var["type"] == "interval":
            values[var["name"]] = "1h"
        else:
            values[var["name"]] = f"__var_{var['name']}__"
    return values


def dashboard_queries(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL with variables substituted) for every panel target and variable query."""
    values = dashboard_variable_values(dashboard)
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            where = f"panel {panel.get('id')} {panel.get('title')!r} target {target.get('refId')}"
            yield where, substitute(target["expr"], values)
    for var in dashboard.get("templating", {}).get("list", []):
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        expr = variable_query_expr(query)
        if expr is not None:
            yield f"variable {var['name']}", substitute(expr, values)


def rule_queries(rules: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]


# ---------------------------------------------------------------- an exposition


def exposed_series(text: str) -> dict[str, set[frozenset[tuple[str, str]]]]:
    """Sample names a Prometheus text exposition makes queryable -> the label sets seen.

    A family declared with `# TYPE` but no sample yet (a labelled metric before its first
    child) still counts, with the sample names its type gives it."""
    out: dict[str, set[frozenset[tuple[str, str]]]] = {}
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            declared = [family.name + "_total"]
        else:
            declared = [family.name + s for s in _SUFFIXES.get(family.type, ("",))]
        for name in declared:
            out.setdefault(name, set())
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out.setdefault(sample.name, set()).add(frozenset(sample.labels.items()))
    return out


# ---------------------------------------------------------------- checks

#: Series that every sidecar reports identically because all read the same shared Redis: summing
#: them across sidecars multiplies the fleet by the number of pods (use max or avg).
FLEET_SERIES_PREFIXES = ("asynq_registry_", "asynq_queue_", "asynq_sidecar_undecodable_values")

#: For `problems`: a series whose labels are not known (any matcher is accepted).
ANY_LABELS = None


def summed_fleet_series(expr: str) -> list[str]:
    """Fleet-wide series (see FLEET_SERIES_PREFIXES) that appear under a `sum` aggregation."""
    found: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and str(node.op) == "sum":
            found.extend(s.name for s in _selectors_of(node.expr)
                         if s.name and s.name.startswith(FLEET_SERIES_PREFIXES))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def problems(queries: Iterator[tuple[str, str]] | list[tuple[str, str]],
             known: Mapping[str, frozenset[str] | None], *, contract: bool) -> list[str]:
    """What is wrong with the metric selectors of `queries` against `known` (series name -> the
    labels it may carry, or ANY_LABELS): unknown names, unknown labels, and values outside what the
    contract enumerates. Series Prometheus makes itself (`up`) and target labels are allowed."""
    source = "in the metric contract" if contract else "emitted by the exporter"
    out: list[str] = []
    for where, expr in queries:
        try:
            found = selectors(expr)
        except ValueError as e:
            out.append(f"{where}: does not parse ({e}): {expr}")
            continue
        for s in found:
            if s.name is None:
                out.append(f"{where}: a selector without a metric name: {expr}")
                continue
            if s.name in PROMETHEUS_SERIES:
                continue
            if s.name not in known:
                out.append(f"{where}: {s.name} is not {source}")
                continue
            allowed = known[s.name]
            for label, op, value in s.matchers:
                if label in TARGET_LABELS:
                    continue
                if allowed is not ANY_LABELS and label not in allowed:
                    out.append(f"{where}: {s.name} has no label {label!r} {source}")
                enumerated = CONTRACT_VALUES.get((family_of(s.name), label))
                if enumerated and op in ("=", "=~"):
                    values = {value} if op == "=" else simple_alternatives(value)
                    if values is not None and not values <= enumerated:
                        out.append(f"{where}: {s.name}{{{label}{op}{value!r}}}: "
                                   f"{sorted(values - enumerated)} not among {sorted(enumerated)}")
    return out


def exposed_labels(exposed: Mapping[str, set[frozenset[tuple[str, str]]]]) -> dict[str, frozenset[str] | None]:
    """Series name -> label names seen in an exposition, or ANY_LABELS for a family declared
    without samples (its labels cannot be known from the text)."""
    return {name: (frozenset(k for labels in seen for k, _ in labels) if seen else ANY_LABELS)
            for name, seen in exposed.items()}
