"""docs/metrics.md lists exactly what a real sidecar exports: names, types and labels."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from exporter.sidecar import Sidecar
from tests.helpers import eventually, scrape

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
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


async def test_every_exported_metric_is_documented_with_its_type_and_labels(make_config):
    async with Sidecar(make_config()) as sc:
        await eventually(lambda: sc.watcher.latest, what="a details read")
        text = await scrape(sc.http_url)
    exported = {}
    for family in text_string_to_metric_families(text):
        labels = frozenset(k for s in family.samples for k in s.labels if k != "le")
        exported[exposed_name(family)] = (family.type, labels)
    doc = documented()
    assert sorted(set(exported) - set(doc)) == [], "exported but not in docs/metrics.md"
    assert sorted(set(doc) - set(exported)) == [], "in docs/metrics.md but not exported"
    for name, (mtype, labels) in exported.items():
        assert doc[name] == (mtype, labels), f"{name}: docs say {doc[name]}, exporter says {(mtype, labels)}"
