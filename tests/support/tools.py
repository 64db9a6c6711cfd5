"""Command-line tools the tests need: found, skipped without, or failed under CI=true."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_tool(name: str) -> str:
    """Path of a command-line tool; skip without it, but fail under CI=true (CI installs it)."""
    path = shutil.which(name)
    if path:
        return path
    if IN_CI:
        pytest.fail(f"{name} is not installed; scripts/setup.sh installs it under CI")
    pytest.skip(f"{name} is not installed (scripts/setup.sh installs it where apt-get works)")
