"""Packaging: the Dockerfile and .dockerignore, and the Kubernetes manifests in deploy/kubernetes/.

hadolint lints the Dockerfiles; kubernetes-validate --strict checks every manifest against
Kubernetes 1.29 and the newest schema it ships. What no schema checks is checked here: the
security context of every container, the probes, the grace-period arithmetic, that every flag
and variable exists in exporter/config.py, the custom resources (PodMonitor, PrometheusRule,
which the validator only warns about), and that the PrometheusRule holds exactly the alerts/
rules.
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import re
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from exporter.asynq import model as asynq
from exporter.cli.options import OPTIONS, readable_file
from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
WORKER_DOCKERFILE = ROOT / "deploy" / "kubernetes" / "native-sidecar" / "worker.Dockerfile"
BUNDLED_DOCKERFILE = ROOT / "deploy" / "kubernetes" / "bundled" / "worker.Dockerfile"
DEPLOY = ROOT / "deploy" / "kubernetes"
RULES = ROOT / "alerts" / "asynq-sidecar.rules.yml"
PROMETHEUSRULE = DEPLOY / "prometheus-operator" / "prometheusrule.yaml"
MODES = ("native-sidecar", "worker-speaks-protocol", "bundled")

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SIDECAR_IMAGE = "registry.example.com/asynq-sidecar"
SOCKET = OPTIONS["socket"].default
#: Where the sidecar image carries the static Go launcher, for worker images to copy.
LAUNCHER = "/usr/local/bin/asynq-launch"
PORT = OPTIONS["listen"].default[1]

# The grace-period arithmetic of docs/deploy.md, in seconds.
ASYNQ_DRAIN = 8.0  # asynq's Config.ShutdownTimeout default
ASYNQ_EXIT = 1.0  # heartbeater stop, ClearServerState (3 round trips), process exit
CLEANUP = 2 * OPTIONS["redis-timeout"].default  # two Redis operations timing out
# An unreported exit waits for the registration's expiry (at most asynq's TTL after its last
# beat) plus --settle, by Redis's clock, before cleanup.
EXPIRY_AND_SETTLE = asynq.REGISTRATION_TTL + OPTIONS["settle"].default
KUBELET_LAG = 2.0  # the kubelet noticing the worker's exit before it SIGTERMs the sidecar
SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
SIDECAR_RESOURCES = {"requests": {"cpu": "10m", "memory": "64Mi"},
                     "limits": {"cpu": "200m", "memory": "128Mi"}}


def tool(name: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A tool from the test extras: scripts/test.sh does not put .venv/bin on PATH, so look
    beside this interpreter first."""
    scripts = sysconfig.get_path("scripts")
    monkeypatch.setenv("PATH", scripts + os.pathsep + os.environ.get("PATH", ""))
    return require_tool(name)


# ---------------------------------------------------------------- Dockerfile


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def one(steps: list[tuple[str, str]], word: str) -> str:
    found = [rest for w, rest in steps if w == word]
    assert len(found) == 1, f"expected one {word} in the final stage, found {found}"
    return found[0]


def build_args(path: Path) -> dict[str, str]:
    args = {}
    for word, rest in instructions(path):
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value.strip('"')
    return args


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, WORKER_DOCKERFILE, BUNDLED_DOCKERFILE],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_dockerfile_passes_hadolint_with_no_finding_and_no_ignore(dockerfile, tmp_path, monkeypatch):
    hadolint = tool("hadolint", monkeypatch)
    config = tmp_path / "hadolint.yaml"  # hermetic: no .hadolint.yaml of the machine applies
    config.write_text("ignored: []\n")
    labels = []
    if dockerfile == DOCKERFILE:
        labels = ["--require-label", "org.opencontainers.image.title:text",
                  "--require-label", "org.opencontainers.image.licenses:spdx"]
    proc = subprocess.run(
        [hadolint, "--no-color", "--config", str(config), "--format", "json",
         "--failure-threshold", "style", "--disable-ignore-pragma", *labels, str(dockerfile)],
        capture_output=True, text=True, timeout=60)
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and findings == [], json.dumps(findings, indent=1) + proc.stderr
    assert "hadolint ignore" not in dockerfile.read_text()


def test_image_is_multi_stage_on_slim_python_with_a_venv_from_the_builder():
    steps = instructions(DOCKERFILE)
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) >= 2 and froms[0].endswith(" AS builder"), froms
    base = build_args(DOCKERFILE)["PYTHON_IMAGE"]
    version = re.fullmatch(r"python:3\.(\d+)-slim(-\w+)?", base)
    assert version and int(version.group(1)) >= 11, base
    assert froms[-1] == "${PYTHON_IMAGE}"
    starts = [i for i, (word, _) in enumerate(steps) if word == "FROM"]
    builder = steps[starts[0]:starts[1]]
    installs = [rest for word, rest in builder if word == "RUN" and "pip install" in rest]
    # The project itself, so the ranges in pyproject.toml decide every dependency.
    assert len(installs) == 1 and installs[0].split()[-1] == ".", installs
    copies = [rest for word, rest in final_stage(DOCKERFILE) if word == "COPY"]
    assert copies == ["--from=builder /opt/asynq-sidecar /opt/asynq-sidecar",
                      f"--from=launcher /out/asynq-launch {LAUNCHER}"]


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Stage name (or its index) -> its instructions, FROM first."""
    steps = instructions(path)
    starts = [i for i, (word, _) in enumerate(steps) if word == "FROM"] + [len(steps)]
    out = {}
    for n, (a, b) in enumerate(zip(starts, starts[1:], strict=False)):
        words = steps[a][1].split()
        out[words[2] if len(words) == 3 and words[1].upper() == "AS" else str(n)] = steps[a:b]
    return out


def test_image_carries_the_static_go_launcher_at_a_fixed_path():
    launcher = stages(DOCKERFILE)["launcher"]
    assert launcher[0][1].startswith("${GO_IMAGE} ")
    assert re.fullmatch(r"golang:1\.\d+-bookworm", build_args(DOCKERFILE)["GO_IMAGE"])
    (build,) = [rest for word, rest in launcher if word == "RUN"]
    # The flags the tests' build uses (tests/support/gobuild.py): one static file, for any image.
    assert build == 'CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/asynq-launch ./cmd/asynq-launch'
    assert ("COPY", "go/ ./") in launcher
    assert LAUNCHER == "/usr/local/bin/asynq-launch"


def test_worker_image_is_distroless_with_the_launcher_copied_from_the_sidecar_image():
    named = stages(WORKER_DOCKERFILE)
    assert named["sidecar"] == [("FROM", "${SIDECAR_IMAGE} AS sidecar")]  # only a source to copy from
    assert build_args(WORKER_DOCKERFILE)["SIDECAR_IMAGE"].startswith(SIDECAR_IMAGE + ":")
    final = final_stage(WORKER_DOCKERFILE)
    base = final[0][1]
    assert base == "scratch" or base.startswith("gcr.io/distroless/static"), base
    copies = [rest for word, rest in final if word == "COPY"]
    assert f"--from=sidecar {LAUNCHER} {LAUNCHER}" in copies
    entrypoint = json.loads(one(final, "ENTRYPOINT"))
    assert entrypoint == [LAUNCHER, "--socket", SOCKET, "--", "/worker"]
    # The same command as the native-sidecar Deployment's worker.
    spec = deployment("native-sidecar")["spec"]["template"]["spec"]
    assert spec["containers"][0]["command"] == entrypoint
    assert not any("python" in rest.lower() or "asynq-sidecar " in rest
                   for _, rest in instructions(WORKER_DOCKERFILE)), "no Python in the worker image"


def test_image_runs_as_a_numeric_non_root_user():
    user = one(final_stage(DOCKERFILE), "USER")
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"USER {user}: runAsNonRoot needs a number"


def test_image_entrypoint_is_the_cli_and_serves_by_default():
    from exporter.cli.main import COMMANDS

    final = final_stage(DOCKERFILE)
    assert json.loads(one(final, "ENTRYPOINT")) == ["asynq-sidecar"]
    assert json.loads(one(final, "CMD")) == ["serve"]
    assert "serve" in COMMANDS
    assert "asynq-sidecar" in PYPROJECT["scripts"]
    assert one(final, "EXPOSE") == str(PORT)


def test_image_works_with_a_read_only_root_filesystem():
    final = final_stage(DOCKERFILE)
    env = " ".join(rest for word, rest in final if word == "ENV")
    assert re.search(r"\bPYTHONDONTWRITEBYTECODE=1\b", env)
    # The one place the sidecar writes (its socket) is a volume, owned by the image's user.
    assert json.loads(one(final, "VOLUME")) == [posixpath.dirname(SOCKET)]
    uid = one(final, "USER").split(":")[0]
    assert any(word == "RUN" and f"-o {uid} " in rest and posixpath.dirname(SOCKET) in rest
               for word, rest in final)


def test_image_carries_oci_labels_with_the_package_version_and_license():
    final = final_stage(DOCKERFILE)
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"',
                             " ".join(rest for word, rest in final if word == "LABEL")))
    for key in ("title", "description", "version", "revision", "created", "licenses"):
        assert f"org.opencontainers.image.{key}" in labels, key
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert build_args(DOCKERFILE)["VERSION"] == PYPROJECT["version"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["license"]["text"]


def healthcheck_argv() -> list[str]:
    spec = one(final_stage(DOCKERFILE), "HEALTHCHECK")
    assert " CMD [" in spec, "HEALTHCHECK must use the exec form"
    argv = json.loads(spec.split(" CMD ", 1)[1])
    assert argv[0] == "python" and "/healthz" in argv[-1], argv
    return [sys.executable, *argv[1:]]


async def test_healthcheck_passes_on_a_serving_sidecar_and_fails_without_one():
    from aiohttp import web
    from prometheus_client import CollectorRegistry

    from exporter.server.http import build_app

    async def nothing() -> None:
        return None

    async def ready() -> bool:
        return True

    async def check(port: int) -> int:
        env = {**os.environ, "ASYNQ_SIDECAR_LISTEN": f"0.0.0.0:{port}"}
        proc = await asyncio.create_subprocess_exec(*healthcheck_argv(), env=env,
                                                    stderr=asyncio.subprocess.DEVNULL)
        return await asyncio.wait_for(proc.wait(), timeout=20)

    runner = web.AppRunner(build_app(CollectorRegistry(), before_scrape=nothing, redis_ready=ready))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        assert await check(port) == 0
    finally:
        await runner.cleanup()
    assert await check(port) != 0


# ---------------------------------------------------------------- .dockerignore


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus **) as a regex on slash paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = glob_regex(pattern.lstrip("!").strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            result = not negate
    return result


def test_dockerignore_lets_in_only_what_the_image_is_built_from():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    for path in (".venv/bin/python", ".git/HEAD", "tests/ops/test_packaging.py", ".pytest_cache/v/x",
                 ".hypothesis/examples/x", ".benchmarks/x", "exporter/__pycache__/cli.cpython-312.pyc",
                 "asynq_sidecar.egg-info/PKG-INFO", "build/lib/x.py", "dist/x.whl", "docs/deploy.md",
                 "deploy/kubernetes/bundled/deployment.yaml", ".env", "scripts/demo.sh"):
        assert ignored(path, patterns), f"{path} would be sent to the Docker build"
    for path in ("go/lifecycle/client_test.go", "go/internal/asynqpeer/main.go"):
        assert ignored(path, patterns), f"{path} would be sent to the Docker build"
    # Everything the Dockerfile copies from the context, and the whole package, gets in.
    needed = ["pyproject.toml", "README.md", "go/go.mod", "go/go.sum", "go/cmd/asynq-launch/main.go"]
    needed += [p.relative_to(ROOT).as_posix() for p in (ROOT / "go").rglob("*.go")
               if not p.name.endswith("_test.go") and "asynqpeer" not in p.parts]
    needed += [p.relative_to(ROOT).as_posix() for p in (ROOT / "exporter").iterdir()
               if p.suffix in (".py", ".proto")]
    for word, rest in instructions(DOCKERFILE):
        if word == "COPY" and not rest.startswith("--from"):
            needed += [src.rstrip("/") + ("/__init__.py" if src.endswith("/") else "")
                       for src in rest.split()[:-1]]
    for path in needed:
        assert not ignored(path, patterns), f"{path} is needed by the build but ignored"


def test_launcher_stage_builds_offline_from_the_build_context_alone(tmp_path):
    """What the image's launcher stage does, without Docker: the files of go/ that .dockerignore
    lets in, `go build` of the stage's command with no module cache and no proxy (the launcher
    needs none of the module's requirements), giving one static file."""
    from tests.support.gobuild import find_go, go_env

    go = find_go() or require_tool("go")
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    context = tmp_path / "src"
    for f in (ROOT / "go").rglob("*"):
        rel = f.relative_to(ROOT).as_posix()
        if f.is_file() and not ignored(rel, patterns):
            dest = context / f.relative_to(ROOT / "go")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
    (build,) = [rest for word, rest in stages(DOCKERFILE)["launcher"] if word == "RUN"]
    out = tmp_path / "out" / "asynq-launch"
    assert build == 'CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/asynq-launch ./cmd/asynq-launch'
    env = go_env(CGO_ENABLED="0", GOPROXY="off", GOMODCACHE=str(tmp_path / "modcache"), GOFLAGS="")
    proc = subprocess.run([go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(out), "./cmd/asynq-launch"],
                          cwd=context, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = out.read_bytes()
    assert data[:4] == b"\x7fELF" and b"/lib64/ld-linux" not in data  # static: no interpreter
    assert not (tmp_path / "modcache").exists()  # nothing was downloaded, nothing needed to be


# ---------------------------------------------------------------- manifests: loading


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_resources() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in load(path)]


def pod_spec(resource: dict[str, Any]) -> dict[str, Any] | None:
    if resource["kind"] == "Deployment":
        return resource["spec"]["template"]["spec"]
    if resource["kind"] == "CronJob":
        return resource["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for path, resource in all_resources():
        spec = pod_spec(resource)
        if spec is not None:
            yield f"{path.relative_to(DEPLOY)}:{resource['kind']}", spec


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def deployment(mode: str) -> dict[str, Any]:
    (resource,) = [r for r in load(DEPLOY / mode / "deployment.yaml") if r["kind"] == "Deployment"]
    return resource


def sidecar_argv(container: dict[str, Any]) -> list[str] | None:
    """The asynq-sidecar command line a container runs, or None (a worker's own command)."""
    if container.get("command"):
        argv = list(container["command"]) + list(container.get("args", []))
    elif container["image"].startswith(SIDECAR_IMAGE + ":"):
        argv = ["asynq-sidecar", *container.get("args", [])]  # the image's ENTRYPOINT
    else:
        return None
    return argv if argv[0] == "asynq-sidecar" else None


def own_args(argv: list[str]) -> list[str]:
    """asynq-sidecar's own arguments: up to `--`, after which the worker's command begins."""
    return argv[1:argv.index("--")] if "--" in argv else argv[1:]


def serves_http(container: dict[str, Any]) -> bool:
    argv = sidecar_argv(container)
    return bool(argv) and (argv[1] == "serve" or (argv[1] == "run" and "--serve" in own_args(argv)))


def talks_to_redis(argv: list[str]) -> bool:
    args = own_args(argv)
    return args[0] in ("serve", "sweep") or (args[0] == "run" and "--serve" in args)


def flags(argv: list[str]) -> dict[str, str | None]:
    """--name -> value (None for a switch) of asynq-sidecar's own arguments."""
    out: dict[str, str | None] = {}
    args = own_args(argv)[1:]
    i = 0
    while i < len(args):
        token = args[i]
        assert token.startswith("--"), f"unexpected argument {token!r} in {argv}"
        name, eq, value = token[2:].partition("=")
        opt = OPTIONS.get(name)
        if eq:
            out[name] = value
        elif opt is not None and not opt.switch:
            out[name], i = args[i + 1], i + 1
        else:
            out[name] = None
        i += 1
    return out


def env_values(container: dict[str, Any], configmaps: dict[str, dict[str, str]]) -> dict[str, str]:
    out = {}
    for var in container.get("env", []):
        if "value" in var:
            out[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["configMapKeyRef"]
            out[var["name"]] = configmaps[ref["name"]][ref["key"]]
    return out


def configmaps() -> dict[str, dict[str, str]]:
    return {r["metadata"]["name"]: r["data"] for _, r in all_resources() if r["kind"] == "ConfigMap"}


# ---------------------------------------------------------------- manifests: schema


def validator_versions() -> list[str]:
    """1.29 and the newest schema kubernetes-validate ships (read from the package itself)."""
    try:
        from kubernetes_validate.utils import all_versions, latest_version
    except ImportError:  # not installed: the test skips (fails under CI) in tool()
        return ["1.29.0"]
    versions = all_versions()
    assert "1.29.0" in versions, f"kubernetes-validate ships no 1.29 schema: {versions}"
    return sorted({"1.29.0", latest_version()})


CUSTOM_RESOURCES = {"PodMonitor", "PrometheusRule"}


@pytest.mark.parametrize("version", validator_versions())
def test_every_manifest_validates_strictly(version, monkeypatch):
    validate = tool("kubernetes-validate", monkeypatch)
    files = manifest_files()
    proc = subprocess.run([validate, "--strict", "-k", version, *map(str, files)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ERROR" not in proc.stdout and "FATAL" not in proc.stdout, proc.stdout
    minor = version.rsplit(".", 1)[0]
    for path, resource in all_resources():
        kn = f"{resource['kind'].lower()}/{resource['metadata']['name']}"
        if resource["kind"] in CUSTOM_RESOURCES:  # no schema: checked by the tests below
            assert f"WARN {path} Couldn't find schema for kind {resource['kind']}" in proc.stdout
        else:
            assert f"INFO {path} passed for resource {kn} against version {minor}" in proc.stdout, (
                f"{path} {kn} was not validated against {minor}:\n{proc.stdout}")


def test_the_validator_rejects_an_unknown_field(tmp_path, monkeypatch):
    """--strict is what catches a misspelt field; make sure it still does."""
    validate = tool("kubernetes-validate", monkeypatch)
    bad = deployment("native-sidecar")
    bad["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run([validate, "--strict", "-k", "1.29.0", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "restartPolicyy" in proc.stdout, proc.stdout


# ---------------------------------------------------------------- manifests: content


def test_every_container_is_locked_down_and_sized():
    seen = 0
    for where, spec in pod_specs():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec.get("hostNetwork", False) is False, f"{where}: see docs/deploy.md on hostNetwork"
        assert spec.get("automountServiceAccountToken") is False, f"{where}: nothing here needs the API"
        for c in containers(spec):
            seen += 1
            for key, want in SECURITY_CONTEXT.items():
                assert c["securityContext"].get(key) == want, f"{where} {c['name']}: securityContext.{key}"
            for kind in ("requests", "limits"):
                assert set(c["resources"][kind]) == {"cpu", "memory"}, f"{where} {c['name']}: {kind}"
            if sidecar_argv(c) and own_args(sidecar_argv(c))[0] == "serve":
                assert c["resources"] == SIDECAR_RESOURCES, f"{where} {c['name']}"
    assert seen >= 6


def test_native_sidecar_starts_first_and_launches_the_worker():
    spec = deployment("native-sidecar")["spec"]["template"]["spec"]
    (sidecar,) = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert own_args(sidecar_argv(sidecar))[0] == "serve"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/healthz"
    (worker,) = spec["containers"]
    assert worker["command"] == [LAUNCHER, "--socket", SOCKET, "--", "/worker"]
    assert_socket_shared(spec, sidecar, worker)


def test_worker_speaks_protocol_has_no_launcher_and_is_told_the_socket():
    spec = deployment("worker-speaks-protocol")["spec"]["template"]["spec"]
    (sidecar,) = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert own_args(sidecar_argv(sidecar))[0] == "serve"
    (worker,) = spec["containers"]
    assert sidecar_argv(worker) is None and not worker["image"].startswith(SIDECAR_IMAGE)
    assert {v["name"]: v.get("value") for v in worker["env"]}["ASYNQ_SIDECAR_SOCKET"] == SOCKET
    # The worker runs as another user: the socket (0660) is reachable through the fsGroup.
    assert worker["securityContext"]["runAsUser"] != sidecar["securityContext"]["runAsUser"]
    assert spec["securityContext"]["fsGroup"] == sidecar["securityContext"]["runAsGroup"]
    assert OPTIONS["socket-mode"].default == 0o660
    assert_socket_shared(spec, sidecar, worker)


def test_bundled_is_one_container_running_the_launcher_with_serve():
    spec = deployment("bundled")["spec"]["template"]["spec"]
    assert "initContainers" not in spec
    (worker,) = spec["containers"]
    argv = sidecar_argv(worker)
    assert argv[:3] == ["asynq-sidecar", "run", "--serve"] and argv[argv.index("--"):] == ["--", "/worker"]
    assert [m["mountPath"] for m in worker["volumeMounts"] if m["name"] == "lifecycle"] == [
        posixpath.dirname(SOCKET)]


def assert_socket_shared(spec: dict[str, Any], *members: dict[str, Any]) -> None:
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in members:
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == posixpath.dirname(SOCKET)]
        assert "emptyDir" in volumes[mount["name"]], f"{c['name']}: the socket needs an emptyDir"
        assert not mount.get("readOnly"), c["name"]
    assert len({m["name"] for c in members for m in c["volumeMounts"]
                if m["mountPath"] == posixpath.dirname(SOCKET)}) == 1


def probe_port(container: dict[str, Any], probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, str):
        (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return port


def test_probes_are_healthz_for_liveness_and_readyz_for_readiness_on_10050():
    checked = 0
    for where, spec in pod_specs():
        for c in containers(spec):
            if not serves_http(c):
                continue
            checked += 1
            assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": PORT}, where
            for kind, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                               ("startupProbe", "/healthz")):
                if kind == "startupProbe" and kind not in c:
                    continue
                probe = c[kind]
                assert probe["httpGet"]["path"] == path, f"{where} {c['name']} {kind}"
                assert probe_port(c, probe) == PORT, f"{where} {c['name']} {kind}"
    assert checked == len(MODES)


@pytest.mark.parametrize("mode", MODES)
def test_grace_period_covers_asynq_drain_and_the_sidecar_cleanup(mode):
    """The arithmetic of docs/deploy.md and the comments in each deployment.yaml."""
    from exporter.server.sidecar import SHUTDOWN_DEADLINE

    spec = deployment(mode)["spec"]["template"]["spec"]
    grace = spec["terminationGracePeriodSeconds"]
    (argv,) = [sidecar_argv(c) for c in containers(spec) if serves_http(c)]
    budget = float(flags(argv).get("shutdown-budget") or OPTIONS["shutdown-budget"].default)
    worker_shutdown = ASYNQ_DRAIN + ASYNQ_EXIT
    if mode == "worker-speaks-protocol":  # no launcher: an unreported exit waits for the expiry
        after_exit = EXPIRY_AND_SETTLE + CLEANUP
        needed = worker_shutdown + after_exit + 1
    else:  # the launcher reports the exit: cleanup at once, then the sidecar stops
        after_exit = CLEANUP
        needed = worker_shutdown + CLEANUP + KUBELET_LAG + SHUTDOWN_DEADLINE
    assert grace >= needed, f"{mode}: {grace} s grace < {needed} s needed"
    assert worker_shutdown <= budget <= grace - after_exit, (
        f"{mode}: --shutdown-budget {budget} must leave {after_exit} s of the {grace} s grace")
    assert f"terminationGracePeriodSeconds: {grace}" in (DEPLOY / mode / "deployment.yaml").read_text()


@pytest.mark.parametrize("mode", MODES)
def test_ordinary_pods_promise_unique_host_pids(mode):
    """Each example pod runs one worker container and no hostNetwork: host and pid name one
    process at a time, so the sidecar may take a reported exit as proof (--host-pids unique)."""
    spec = deployment(mode)["spec"]["template"]["spec"]
    assert not spec.get("hostNetwork")
    (argv,) = [sidecar_argv(c) for c in containers(spec) if serves_http(c)]
    assert flags(argv).get("host-pids") == "unique"


def test_redis_password_comes_only_from_a_secret_file():
    cms = configmaps()
    for name, data in cms.items():
        for key, value in data.items():
            if "://" in value:
                assert urlsplit(value).password is None, f"ConfigMap {name}.{key} holds a password"
    for where, spec in pod_specs():
        secret_mounts = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
        for c in containers(spec):
            for var in c.get("env", []):
                assert "secretKeyRef" not in var.get("valueFrom", {}), f"{where} {c['name']} {var['name']}"
                assert "PASSWORD" not in var["name"] or var["name"].endswith("_FILE"), var["name"]
            argv = sidecar_argv(c)
            if argv is None or not talks_to_redis(argv):
                continue
            assert not any("@" in a and "://" in a for a in argv), f"{where}: credentials in argv"
            path = flags(argv).get("redis-password-file")
            assert path, f"{where} {c['name']}: no --redis-password-file"
            mounts = [m for m in c["volumeMounts"] if m["name"] in secret_mounts and m.get("readOnly")]
            assert any(posixpath.dirname(path) == m["mountPath"] for m in mounts), (
                f"{where} {c['name']}: {path} is not in a read-only Secret volume")


def test_every_flag_and_variable_exists_and_every_command_line_parses():
    from exporter.cli.main import COMMAND_OPTIONS, build_parser

    cms = configmaps()
    env_names = {opt.env: opt for opt in OPTIONS.values()}
    lines = 0
    for where, spec in pod_specs():
        for c in containers(spec):
            for name, value in env_values(c, cms).items():
                if name.startswith("ASYNQ_SIDECAR_"):
                    assert name in env_names, f"{where} {c['name']}: no option has variable {name}"
                    if env_names[name].parse is not readable_file:
                        env_names[name].parse(value)  # raises ConfigError on a bad value
            argv = sidecar_argv(c)
            if argv is None:
                continue
            lines += 1
            command = own_args(argv)[0]
            assert command in ("serve", "run", "sweep"), argv
            for name, value in flags(argv).items():
                assert name in OPTIONS or name == "serve", f"{where}: --{name} is not in exporter/config.py"
                assert name in COMMAND_OPTIONS.get(command, OPTIONS), f"{where}: {command} has no --{name}"
                opt = OPTIONS.get(name)
                if opt is not None and value is not None and opt.parse is not readable_file:
                    opt.parse(value)
            try:
                build_parser().parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"{where}: asynq-sidecar rejects {argv}")
    assert lines == 4  # 2 sidecars (native, worker-speaks-protocol), 1 launcher with --serve, 1 sweep


def test_hostname_is_left_to_the_pod():
    """Containers of a pod share the pod's hostname, which is asynq's os.Hostname(): no override."""
    for where, spec in pod_specs():
        assert not spec.get("hostNetwork") and "hostname" not in spec, where
        for c in containers(spec):
            assert "ASYNQ_SIDECAR_HOSTNAME" not in {v["name"] for v in c.get("env", [])}, where
            argv = sidecar_argv(c)
            assert argv is None or "hostname" not in flags(argv), where


def test_pods_are_labelled_for_the_service_and_the_pod_monitor_and_annotated_for_scraping():
    (service,) = load(DEPLOY / "shared" / "metrics-service.yaml")
    (monitor,) = load(DEPLOY / "prometheus-operator" / "podmonitor.yaml")
    for mode in MODES:
        template = deployment(mode)["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), mode
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items(), mode
        assert deployment(mode)["spec"]["selector"]["matchLabels"].items() <= labels.items(), mode
        annotations = template["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT),
                               "prometheus.io/path": "/metrics"}, mode


def test_metrics_service_is_headless_on_port_10050_named_metrics():
    (service,) = load(DEPLOY / "shared" / "metrics-service.yaml")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    # A number: named ports of native sidecars are not resolved for Services before 1.32.
    assert service["spec"]["ports"] == [{"name": "metrics", "port": PORT, "targetPort": PORT,
                                         "protocol": "TCP"}]


def test_pod_monitor_scrapes_the_metrics_port_under_the_job_the_alerts_expect():
    (monitor,) = load(DEPLOY / "prometheus-operator" / "podmonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
                             "relabelings", "metricRelabelings"}, endpoint
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    # The PodMonitor's job label is <namespace>/<name>; every job matcher of the alerts must take it.
    job = f"some-namespace/{monitor['metadata']['name']}"
    exprs = [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"]
             for rule in group["rules"]]
    for op, value in re.findall(r'\bjob\s*(=~|=)\s*"([^"]*)"', "\n".join(exprs)):
        assert (re.fullmatch(value, job) if op == "=~" else value == job), f"job{op}{value!r} misses {job}"


def test_sweep_cronjob_runs_sweep_every_ten_minutes_one_at_a_time():
    (cron,) = load(DEPLOY / "shared" / "sweep-cronjob.yaml")
    assert cron["kind"] == "CronJob"
    assert cron["spec"]["schedule"] == "*/10 * * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    spec = pod_spec(cron)
    (c,) = spec["containers"]
    argv = sidecar_argv(c)
    assert own_args(argv)[0] == "sweep"
    assert float(flags(argv)["grace"]) == OPTIONS["grace"].default
    assert spec["restartPolicy"] == "Never"


def test_prometheusrule_holds_exactly_the_alerts_rules():
    assert RULES.exists(), f"{RULES.relative_to(ROOT)} is missing: the PrometheusRule is built from it"
    (rule,) = load(PROMETHEUSRULE)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit", "query_offset", "labels"}, group
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r) and isinstance(r["expr"], str), r
            assert set(r) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels",
                              "annotations"}, r
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-prometheusrule.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def kustomized_files(directory: Path) -> list[Path]:
    """The manifest files a kustomization directory pulls in, through ../shared and the like."""
    files = []
    for resource in yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]:
        target = (directory / resource).resolve()
        files += kustomized_files(target) if target.is_dir() else [target]
    return files


def test_kustomizations_cover_every_manifest():
    for kustomization in sorted(DEPLOY.glob("*/kustomization.yaml")):
        here = kustomization.parent
        doc = yaml.safe_load(kustomization.read_text())
        listed = set()
        for resource in doc["resources"]:
            target = (here / resource).resolve()
            assert target.exists(), f"{kustomization.relative_to(ROOT)}: {resource} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists(), target
            listed.add(target)
        for path in here.glob("*.yaml"):
            if path.name != "kustomization.yaml" and not path.name.endswith(".example.yaml"):
                assert path.resolve() in listed, f"{path.relative_to(ROOT)} is in no kustomization"
        used = {c["image"] for path in kustomized_files(here) for res in load(path)
                if pod_spec(res) for c in containers(pod_spec(res))}
        for image in doc.get("images", []):
            assert f"{image['name']}:{image['newTag']}" in used, f"{kustomization}: {image}"
    for mode in MODES:
        assert "../shared" in yaml.safe_load((DEPLOY / mode / "kustomization.yaml").read_text())["resources"]


def test_sidecar_image_tag_is_the_package_version():
    text = "\n".join(p.read_text() for p in DEPLOY.rglob("*") if p.is_file())
    tags = set(re.findall(re.escape(SIDECAR_IMAGE) + r":([\w.-]+)", text))
    assert tags == {PYPROJECT["version"]}, tags
    for kustomization in DEPLOY.glob("*/kustomization.yaml"):
        for image in yaml.safe_load(kustomization.read_text()).get("images", []):
            if image["name"] == SIDECAR_IMAGE:
                assert image["newTag"] == PYPROJECT["version"], kustomization


def test_deploy_doc_covers_every_mode_and_the_arithmetic():
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for name in (*MODES, "shared", "prometheus-operator"):
        assert f"deploy/kubernetes/{name}/" in doc, name
    for needle in ("terminationGracePeriodSeconds", "--shutdown-budget", "--redis-password-file",
                   "hostNetwork", "PodMonitor", "sweep", "/readyz"):
        assert needle in doc, needle
