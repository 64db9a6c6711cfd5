"""Smoke test of `python -m bench --quick launcher`: both launchers measured in one run, the Go
launcher's targets judged. Its figures are for docs/performance.md, not asserted here, except the
two targets the static launcher must meet on any machine: RSS and file size."""

from __future__ import annotations

import subprocess
import sys

from tests.bench.test_bench import REPO, results_table


def test_quick_launcher_bench_measures_both_launchers_and_meets_the_go_targets(go_launcher):  # noqa: F811
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "launcher"], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The results table, without the side-by-side table printed after it.
    _, _, final = proc.stdout.partition("## results")
    results, _, side_by_side = final.partition("| launcher | RSS median")
    rows = {r["measurement"]: r for r in results_table("## results" + results)}
    for name in ("go", "python"):
        for what in ("rss", "start", "signal"):
            assert rows[f"launcher-{what}-{name}"]["n"] != "0", rows
    assert rows["launcher-rss-go"]["result"] == "PASS"
    assert rows["launcher-size-go"]["result"] == "PASS"
    assert "| asynq-launch (Go) |" in side_by_side and "| asynq-sidecar run (Python) |" in side_by_side
