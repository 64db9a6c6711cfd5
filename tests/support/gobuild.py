"""Go binaries for the tests, built once per session into a cache keyed by their sources.

- the static launcher, `go/cmd/asynq-launch` (CGO_ENABLED=0, -trimpath, -ldflags='-s -w': the
  binary the images ship);
- the example worker, `go/examples/worker` (the drop-in), at the module's asynq version and at
  each other version in PEER_VERSIONS (with -modfile: go.mod with that asynq version, and go.sum
  joined with the peer's sum file of that version);
- the real asynq peer, `go/internal/asynqpeer`, at each asynq version in PEER_VERSIONS: its
  main.go in a module of its own made from the committed `asynq-<version>.mod` and `.sum`.

A binary is rebuilt only when a file it is built from (or the Go version) changed: the cache
directory's name is a hash of them. `bench/launcher.py` uses the same builds.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.tools import IN_CI, require_tool

ROOT = Path(__file__).resolve().parents[2]
GO_MODULE = ROOT / "go"
PEER_DIR = GO_MODULE / "internal" / "asynqpeer"
#: The asynq versions the real-asynq tests build their peer at: the newest and an older one.
PEER_VERSIONS = ("v0.26.0", "v0.25.1")
#: Where built binaries are kept between sessions.
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "asynq-sidecar-tests" / "go"
#: Where `go` is on these machines when PATH lacks it.
GO_FALLBACK = "/usr/local/go/bin/go"

STATIC = ("-trimpath", "-ldflags=-s -w")


class GoBuildError(RuntimeError):
    """`go build` failed; the message has its output."""


def find_go() -> str | None:
    return shutil.which("go") or (GO_FALLBACK if os.access(GO_FALLBACK, os.X_OK) else None)


def go_env(**extra: str) -> dict[str, str]:
    # GOTOOLCHAIN=local: build with the Go that is installed, never download another one.
    return {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly", **extra}


def _key(go: str, files: list[Path], *flags: str) -> str:
    h = hashlib.sha256()
    h.update(subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout.encode())
    for flag in flags:
        h.update(flag.encode() + b"\0")
    for f in sorted(files):
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def _module_files() -> list[Path]:
    """Every file of the Go module a build in it can depend on."""
    return [p for p in GO_MODULE.rglob("*") if p.is_file() and p.suffix in (".go", ".mod", ".sum")]


def _cached(name: str, key: str, build) -> Path:
    """CACHE/name-key/name, built by `build(output)` when absent."""
    out = CACHE / f"{name}-{key}" / name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{name}.{os.getpid()}")
    build(tmp)
    tmp.rename(out)  # atomic: a reader never sees half a binary
    return out


def _go_build(go: str, cwd: Path, output: Path, package: str, *flags: str, env: dict[str, str]) -> None:
    proc = subprocess.run([go, "build", *flags, "-o", str(output), package], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise GoBuildError(f"go build {package} (in {cwd}) failed:\n{proc.stdout}{proc.stderr}")


def module_asynq_version() -> str:
    """The asynq version go/go.mod requires."""
    m = re.search(r"^\s*(?:require\s+)?github\.com/hibiken/asynq\s+(v\S+)", (GO_MODULE / "go.mod").read_text(),
                  re.MULTILINE)
    if not m:
        raise GoBuildError("go/go.mod requires no github.com/hibiken/asynq")
    return m.group(1)


def build_in_module(go: str, package: str, name: str, *, static: bool = False) -> Path:
    """A package of the go/ module (`./cmd/asynq-launch`), cached."""
    flags = STATIC if static else ()
    env = go_env(CGO_ENABLED="0") if static else go_env()
    key = _key(go, _module_files(), package, *flags, str(static))
    return _cached(name, key, lambda out: _go_build(go, GO_MODULE, out, package, *flags, env=env))


def build_launcher(go: str) -> Path:
    return build_in_module(go, "./cmd/asynq-launch", "asynq-launch", static=True)


def build_example_worker(go: str, version: str | None = None) -> Path:
    """go/examples/worker at go.mod's asynq version, or at `version` (one of PEER_VERSIONS)."""
    pinned = module_asynq_version()
    if version is None or version == pinned:
        return build_in_module(go, "./examples/worker", "worker")
    peer_sum = PEER_DIR / f"asynq-{version}.sum"
    key = _key(go, [*_module_files(), peer_sum], "./examples/worker", version)

    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="worker-") as tmp:
            mod, s = Path(tmp) / "alt.mod", Path(tmp) / "alt.sum"
            text = (GO_MODULE / "go.mod").read_text()
            mod.write_text(text.replace(f"github.com/hibiken/asynq {pinned}", f"github.com/hibiken/asynq {version}"))
            lines = set((GO_MODULE / "go.sum").read_text().splitlines()) | set(peer_sum.read_text().splitlines())
            s.write_text("\n".join(sorted(lines)) + "\n")
            _go_build(go, GO_MODULE, out, "./examples/worker", f"-modfile={mod}", env=go_env())

    return _cached(f"worker-{version}", key, build)


def build_peer(go: str, version: str) -> Path:
    """go/internal/asynqpeer at asynq `version`, in a temporary module of its own."""
    mod, s = PEER_DIR / f"asynq-{version}.mod", PEER_DIR / f"asynq-{version}.sum"
    sources = [*PEER_DIR.glob("*.go")]
    key = _key(go, [*sources, mod, s])

    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="asynqpeer-") as tmp:
            for f in sources:
                if not f.name.endswith("_test.go"):
                    shutil.copy(f, tmp)
            shutil.copy(mod, Path(tmp) / "go.mod")
            shutil.copy(s, Path(tmp) / "go.sum")
            _go_build(go, Path(tmp), out, ".", env=go_env())

    return _cached(f"asynqpeer-{version}", key, build)


def _go_or_skip() -> str:
    go = find_go()
    return go if go else require_tool("go")


def _require_package(package: str) -> None:
    """A package of the go/ module must exist; without it the tests that need it skip (fail in CI)."""
    path = GO_MODULE / package
    if not path.is_dir():
        if IN_CI:
            pytest.fail(f"{path.relative_to(ROOT)} does not exist")
        pytest.skip(f"{path.relative_to(ROOT)} does not exist in this checkout yet")


@pytest.fixture(scope="session")
def go_launcher() -> Path:
    """The static Go launcher, asynq-launch."""
    go = _go_or_skip()
    _require_package("./cmd/asynq-launch")
    return build_launcher(go)


@pytest.fixture(scope="session")
def example_workers() -> dict[str, Path]:
    """{asynq version: go/examples/worker (an asynq worker on the drop-in) built at it}."""
    go = _go_or_skip()
    _require_package("./examples/worker")
    with ThreadPoolExecutor(len(PEER_VERSIONS)) as pool:
        built = pool.map(lambda v: build_example_worker(go, v), PEER_VERSIONS)
    return dict(zip(PEER_VERSIONS, built, strict=False))


@pytest.fixture(scope="session")
def asynq_peers() -> dict[str, Path]:
    """{asynq version: the asynqpeer binary built at it}, built side by side."""
    go = _go_or_skip()
    with ThreadPoolExecutor(len(PEER_VERSIONS)) as pool:
        built = pool.map(lambda v: build_peer(go, v), PEER_VERSIONS)
    return dict(zip(PEER_VERSIONS, built, strict=False))


def build_all() -> list[Path]:
    """Every binary the tests use that this checkout can build (what `python -m tests.support.gobuild`
    does from scripts/setup.sh, so that the test session finds them cached)."""
    go = find_go()
    if go is None:
        raise GoBuildError("go is not installed")
    built = []
    if (GO_MODULE / "cmd" / "asynq-launch").is_dir():
        built.append(build_launcher(go))
    with ThreadPoolExecutor(len(PEER_VERSIONS)) as pool:
        if (GO_MODULE / "examples" / "worker").is_dir():
            built += pool.map(lambda v: build_example_worker(go, v), PEER_VERSIONS)
        built += pool.map(lambda v: build_peer(go, v), PEER_VERSIONS)
    return built


if __name__ == "__main__":
    for path in build_all():
        print(path)
