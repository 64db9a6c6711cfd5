"""`asynq-sidecar demo` runs its whole story against real processes and reports every step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_story_passes_and_exits_0():
    proc = subprocess.run(
        [sys.executable, "-m", "exporter", "demo", "--duration", "1", "--no-color"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "FAIL" not in out
    for step in ("1. Leftovers", "2. Three workers", "3. 'graceful'", "4. 'killed'", "5. 'leaky'",
                 "6. A fleet sweep", "7. A task lost its lease entry", "every step behaved as expected"):
        assert step in out
    assert "/metrics" in out
    assert "\033[" not in out  # plain output when not on a terminal
    assert out.count("ok   ") >= 16
