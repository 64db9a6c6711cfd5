"""Flags and ASYNQ_SIDECAR_* variables: validation messages, precedence, secrets, generated docs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exporter.cli import configs
from exporter.cli import options as config
from exporter.cli.docs import markdown
from exporter.cli.main import COMMAND_OPTIONS, build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **(env or {})}, cwd=ROOT, timeout=30)


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["serve", "--listen", "nope"], {}, "--listen: invalid value 'nope': expected HOST:PORT"),
        (["serve", "--listen", "1.2.3.4:99999"], {}, "expected a port from 0 to 65535"),
        (["serve", "--redis-url", "http://x"], {}, "--redis-url: invalid value 'http://x': expected a URL with scheme"),
        (["serve", "--log-format", "xml"], {}, "--log-format: invalid value 'xml': expected one of text, json"),
        (["serve", "--socket-mode", "999"], {}, "expected an octal file mode"),
        (["serve", "--settle", "-1"], {}, "--settle: invalid value '-1'"),
        (["serve"], {"ASYNQ_SIDECAR_WATCH_INTERVAL": "soon"},
         "ASYNQ_SIDECAR_WATCH_INTERVAL: invalid value 'soon': expected a number of seconds"),
        (["serve", "--redis-password-file", "/nonexistent/pw"], {}, "--redis-password-file: invalid value '/nonexistent/pw': cannot read it"),
    ],
)
def test_bad_values_exit_2_naming_flag_value_and_what_is_accepted(args, env, needle):
    proc = run_cli(*args, env=env)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr


def test_flag_beats_environment_and_environment_beats_default():
    parser = build_parser()
    ns = parser.parse_args(["serve", "--listen", "127.0.0.1:9"])
    values = config.resolve(ns, config.SERVE_OPTIONS,
                            {"ASYNQ_SIDECAR_LISTEN": "127.0.0.1:8", "ASYNQ_SIDECAR_SETTLE": "7.5"})
    assert values["listen"] == ("127.0.0.1", 9)
    assert values["settle"] == 7.5
    assert values["watch_interval"] == 10.0


def test_password_never_appears_in_repr_or_display(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    cfg = configs.redis_config({"redis_url": "redis://user:inurl@r:6379/0",
                                          "redis_password_file": str(pw), "redis_timeout": 1.0})
    assert cfg.password == "s3cret"
    assert "s3cret" not in repr(cfg) and "inurl" not in repr(cfg)
    assert cfg.display_url == "redis://user:***@r:6379/0"


def test_help_lists_every_variable():
    proc = run_cli("serve", "--help")
    assert proc.returncode == 0
    flat = "".join(proc.stdout.split())
    for name in config.SERVE_OPTIONS:
        assert config.OPTIONS[name].env in flat


def test_configuration_doc_is_generated_from_the_table():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == markdown(COMMAND_OPTIONS), (
        "docs/configuration.md is stale: python -m exporter.cli.docs > docs/configuration.md")


def test_main_returns_2_on_missing_command(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
