"""Smoke test of the benchmarks: `python -m bench --quick scrape-commands` runs, prints a table that
parses, and exits 0. Timings are never asserted here (bench/ and docs/performance.md are for that);
the number of Redis commands per scrape does not depend on the machine's speed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.core import HEADER
from exporter.devtools.redis_server import RedisServerError, find_redis_server
from tests.support.tools import IN_CI

REPO = Path(__file__).resolve().parents[2]
RESULTS = {"PASS", "MISS", "INFO", "NOT MEASURED"}


def results_table(output: str) -> list[dict[str, str]]:
    """The rows of the final results table, as {column: cell}."""
    _, sep, tail = output.partition("## results")
    assert sep, f"no results section in:\n{output}"
    lines = [line for line in tail.splitlines() if line.startswith("|")]
    assert lines, f"no table after the results heading:\n{tail}"
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert tuple(header) == HEADER
    assert set(lines[1].replace("|", "")) == {"-"}
    rows = []
    for line in lines[2:]:
        if line.startswith("| live servers"):  # a comparison table follows; not in this run
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(HEADER), line
        rows.append(dict(zip(HEADER, cells, strict=False)))
    return rows


def test_quick_scrape_commands_prints_a_parsable_table_and_exits_0():
    try:
        find_redis_server()
    except RedisServerError as e:
        if IN_CI:
            pytest.fail(str(e))
        pytest.skip(str(e))
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "scrape-commands"], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = results_table(proc.stdout)
    assert rows and all(r["measurement"] == "scrape-commands" for r in rows)
    assert all(r["result"] in RESULTS for r in rows)
    assert all(r["n"].isdigit() and int(r["n"]) > 0 for r in rows)
    judged = [r for r in rows if r["target"] != "-"]
    assert judged and all(r["result"] in ("PASS", "MISS") for r in judged)
    assert "machine:" in proc.stdout

