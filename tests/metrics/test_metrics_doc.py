"""docs/metrics.md lists exactly what a real sidecar exports: names, types and labels."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import aiohttp
import bcrypt
from prometheus_client.parser import text_string_to_metric_families

from exporter.server import webconfig
from exporter.server.sidecar import Sidecar
from tests.support.helpers import eventually, scrape

#: Exported only with --web-config-file and basic auth users.
WEB_ONLY = {"asynq_sidecar_http_requests_refused_total"}

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
_NAME = re.compile(r"^`([a-z_]+)`$")


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = _NAME.match(cells[0]) if len(cells) == 4 else None
        if name:
            assert name[1] not in rows, f"{name[1]} is documented twice"
            assert cells[3], f"{name[1]} has no meaning"
            rows[name[1]] = (cells[1], frozenset(re.findall(r"`(\w+)`", cells[2])))
    return rows


def exposed_name(family) -> str:
    return family.name + "_total" if family.type == "counter" else family.name


def families(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    out = {}
    for family in text_string_to_metric_families(text):
        labels = frozenset(k for s in family.samples for k in s.labels if k != "le")
        out[exposed_name(family)] = (family.type, labels)
    return out


async def test_every_exported_metric_is_documented_with_its_type_and_labels(rdb, make_config, tmp_path):
    rdb.sadd("asynq:queues", "default")  # the per-queue task gauges have a series only with a queue
    async with Sidecar(make_config()) as sc:
        await eventually(lambda: sc.watcher.latest, what="a details read")
        exported = families(await scrape(sc.http_url))
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    (tmp_path / "web.yml").write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    async with Sidecar(make_config(web=webconfig.load(str(tmp_path / "web.yml")))) as sc:
        auth = {"Authorization": "Basic " + base64.b64encode(b"prometheus:pw").decode()}
        async with aiohttp.ClientSession(headers=auth) as s, s.get(sc.http_url + "/metrics") as r:
            with_web = families(await r.text())
    assert set(with_web) - set(exported) == WEB_ONLY
    exported = with_web
    doc = documented()
    assert sorted(set(exported) - set(doc)) == [], "exported but not in docs/metrics.md"
    assert sorted(set(doc) - set(exported)) == [], "in docs/metrics.md but not exported"
    for name, (mtype, labels) in exported.items():
        assert doc[name] == (mtype, labels), f"{name}: docs say {doc[name]}, exporter says {(mtype, labels)}"
