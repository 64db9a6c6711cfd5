"""`--web-config-file`: the exporter-toolkit format, checked at start, and a locked-down HTTP
server with real TLS (server and client certificates from a throw-away CA) and basic auth."""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import bcrypt
import pytest

from exporter.server import webconfig
from exporter.server.sidecar import Sidecar
from exporter.server.webconfig import BasicAuth, WebConfigError
from tests.support.helpers import samples
from tests.support.pki import PKI
from tests.support.prom import Prometheus
from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "prometheus", "correct horse battery staple"


def toolkit_hash(password: str, rounds: int = 4) -> str:
    """A bcrypt hash as `htpasswd -nBC` writes it ($2y$), at the lowest cost to keep tests fast."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode().replace("$2b$", "$2y$", 1)


def write_config(directory: Path, text: str) -> str:
    path = directory / "web.yml"
    path.write_text(text)
    return str(path)


def tls_block(pki: PKI, *, client_auth: str | None = None, extra: str = "") -> str:
    lines = ["tls_server_config:", f"  cert_file: {pki.server.cert}", f"  key_file: {pki.server.key}"]
    if client_auth:
        lines += [f"  client_auth_type: {client_auth}", f"  client_ca_file: {pki.ca.cert}"]
    return "\n".join(lines) + "\n" + extra


def client_ssl(pki: PKI, cert=None, *, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def get(url: str, *, ctx: ssl.SSLContext | bool | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    timeout = aiohttp.ClientTimeout(total=5)  # a hang is a failure, not a stuck suite
    async with aiohttp.ClientSession(timeout=timeout) as s, s.get(
            url, ssl=ctx if ctx is not None else True, headers=headers or {}) as r:
        return r.status, dict(r.headers), await r.text()


# ---------------------------------------------------------------- the file, checked at start


@pytest.mark.parametrize(("text", "needle"), [
    ("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n",
     "tls_server_config.cert_file: cannot read"),
    ("basic_auth_user:\n  a: b\n", "basic_auth_user: unknown field"),
    ("tls_server_config:\n  cert_fiel: x\n", "tls_server_config.cert_fiel: unknown field"),
    ("basic_auth_users:\n  alice: plaintext\n", "basic_auth_users.alice: not a bcrypt hash"),
    ("basic_auth_users:\n  'a:b': $2y$04$abcdefghijklmnopqrstuuJ0dJHE1T4ZcU9b8dU6qk0pTqTTEKfAu\n",
     "cannot contain ':'"),
    ("basic_auth_users: [alice]\n", "basic_auth_users: expected a mapping"),
    ("- just\n- a list\n", "the file: expected a mapping"),
    ("tls_server_config: {cert_file: x\n", "not valid YAML at line"),
    ("rate_limit:\n  interval: 1s\n  burst: 5\n", "rate_limit: not supported"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
     "http_server_config.headers.X-Frame-Options: expected one of deny, sameorigin"),
    ("http_server_config:\n  headers:\n    Server: x\n", "headers.Server: this header cannot be set"),
])
def test_bad_files_are_refused_naming_the_field(tmp_path, text, needle):
    with pytest.raises(WebConfigError) as e:
        webconfig.load(write_config(tmp_path, text))
    assert needle in str(e.value)


@pytest.mark.parametrize(("tls", "needle"), [
    ("  client_auth_type: RequireAnyClientCert\n  client_ca_file: {ca}\n",
     "client_auth_type: RequireAnyClientCert accepts certificates nobody verified"),
    ("  client_auth_type: Sometimes\n", "client_auth_type: 'Sometimes' is not one of"),
    ("  client_ca_file: {ca}\n", "client CA is set but client_auth_type is NoClientCert"),
    ("  client_auth_type: RequireAndVerifyClientCert\n", "client_ca_file: required with client_auth_type"),
    ("  min_version: TLS14\n", "min_version: 'TLS14' is not one of TLS10, TLS11, TLS12, TLS13"),
    ("  min_version: TLS13\n  max_version: TLS12\n", "min_version: TLS13 is above max_version TLS12"),
    ("  cipher_suites: [TLS_AES_128_GCM_SHA256]\n", "cipher_suites: not supported"),
    ("  client_allowed_sans: [prometheus]\n", "client_allowed_sans: not supported"),
])
def test_bad_tls_settings_are_refused(tmp_path, pki, tls, needle):
    text = tls_block(pki) + tls.format(ca=pki.ca.cert)
    with pytest.raises(WebConfigError) as e:
        webconfig.load(write_config(tmp_path, text))
    assert needle in str(e.value)


def test_a_key_that_does_not_match_the_certificate_is_refused(tmp_path, pki):
    text = f"tls_server_config:\n  cert_file: {pki.server.cert}\n  key_file: {pki.client.key}\n"
    with pytest.raises(WebConfigError, match=r"tls_server_config.cert_file/key_file: cannot use"):
        webconfig.load(write_config(tmp_path, text))


def test_relative_paths_are_relative_to_the_file_and_secrets_stay_out_of_repr(tmp_path, pki):
    for pair in (pki.server, pki.ca):
        (tmp_path / pair.cert.name).write_bytes(pair.cert.read_bytes())
    (tmp_path / "server.key").write_bytes(pki.server.key.read_bytes())
    hashed = toolkit_hash(PASSWORD)
    cfg = webconfig.load(write_config(tmp_path, (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
        f"basic_auth_users:\n  {USER}: {hashed}\n")))
    assert cfg.tls.cert_file == str(tmp_path / "server.crt")
    assert cfg.tls.client_ca_file == str(tmp_path / "ca.crt")
    assert hashed not in repr(cfg) and hashed not in cfg.describe()
    assert "client certificates: RequireAndVerifyClientCert" in cfg.describe()


def test_an_empty_file_means_plain_http_without_auth(tmp_path):
    cfg = webconfig.load(write_config(tmp_path, ""))
    assert cfg.tls is None and not cfg.users and cfg.scheme == "http"


def test_the_cli_exits_2_naming_the_file_and_the_field(tmp_path):
    path = write_config(tmp_path, "basic_auth_users:\n  alice: hunter2\n")
    proc = subprocess.run([sys.executable, "-m", "exporter", "serve", "--web-config-file", path],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert f"--web-config-file: invalid value '{path}'" in proc.stderr
    assert "basic_auth_users.alice: not a bcrypt hash" in proc.stderr
    assert "hunter2" not in proc.stderr.replace(f"'{path}'", "")  # the value is not echoed


# ---------------------------------------------------------------- basic auth, unit


async def test_bcrypt_runs_once_per_credentials_and_the_caches_are_bounded():
    calls = []

    def check(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        return bcrypt.checkpw(password, hashed)

    auth = BasicAuth({USER: toolkit_hash(PASSWORD).encode()}, check=check)
    good = basic(USER, PASSWORD)["Authorization"]
    results = await asyncio.gather(*(auth.authorized(good) for _ in range(20)))
    assert results == [None] * 20 and len(calls) == 1  # concurrent scrapes share one check
    assert await auth.authorized(basic(USER, "wrong")["Authorization"]) == "denied"
    assert await auth.authorized(basic(USER, "wrong")["Authorization"]) == "denied"
    assert len(calls) == 2  # a repeated wrong password is not checked again
    for i in range(webconfig.BAD_CACHE_SIZE + 50):  # a flood of guesses
        await auth.authorized(basic(USER, f"guess-{i}")["Authorization"])
    assert len(auth._bad) == webconfig.BAD_CACHE_SIZE
    before = len(calls)
    assert await auth.authorized(good) is None
    assert len(calls) == before  # the guesses did not evict the good credentials
    assert not any(PASSWORD.encode() in key for key in auth._good)  # keyed by a hash, not the password


async def test_malformed_unknown_and_overlong_credentials_are_refused():
    auth = BasicAuth({USER: toolkit_hash(PASSWORD).encode()})
    assert await auth.authorized(None) == "missing"
    assert await auth.authorized("Bearer abc") == "malformed"
    assert await auth.authorized("Basic !!!notbase64") == "malformed"
    assert await auth.authorized("Basic " + base64.b64encode(b"no-colon").decode()) == "malformed"
    assert await auth.authorized(basic("alice", PASSWORD)["Authorization"]) == "denied"  # unknown user
    assert await auth.authorized(basic(USER, "x" * 100)["Authorization"]) == "denied"  # > 72 bytes
    assert await auth.authorized(basic(USER.upper(), PASSWORD)["Authorization"]) == "denied"
    assert await auth.authorized(basic(USER, PASSWORD)["Authorization"].replace("Basic", "basic")) is None


# ---------------------------------------------------------------- the endpoint, for real


@pytest.fixture
def locked_down(tmp_path, pki, make_config):
    """A sidecar config serving HTTPS with basic auth; client certificates per `client_auth`."""

    def make(client_auth: str | None = None, extra: str = ""):
        text = tls_block(pki, client_auth=client_auth, extra=extra)
        text += f"basic_auth_users:\n  {USER}: {toolkit_hash(PASSWORD)}\n  other: {toolkit_hash('x')}\n"
        return make_config(web=webconfig.load(write_config(tmp_path, text)))

    return make


async def test_https_with_basic_auth_401_for_wrong_or_missing_credentials(locked_down, pki):
    cfg = locked_down(extra="http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n")
    async with Sidecar(cfg) as sc:
        assert sc.http_url.startswith("https://")
        ctx = client_ssl(pki)
        status, headers, body = await get(sc.http_url + "/metrics", ctx=ctx, headers=basic(USER, PASSWORD))
        assert status == 200 and "asynq_sidecar_build_info" in body
        assert headers["X-Content-Type-Options"] == "nosniff"
        for creds in ({}, basic(USER, "wrong"), basic("nobody", PASSWORD), {"Authorization": "Basic ???"}):
            status, headers, body = await get(sc.http_url + "/metrics", ctx=ctx, headers=creds)
            assert status == 401, creds
            assert headers["WWW-Authenticate"].startswith('Basic realm="asynq-sidecar"')
            assert "asynq_" not in body
            assert headers["X-Content-Type-Options"] == "nosniff"
        for path in ("/", "/readyz"):
            assert (await get(sc.http_url + path, ctx=ctx))[0] == 401
            assert (await get(sc.http_url + path, ctx=ctx, headers=basic(USER, PASSWORD)))[0] == 200
        # A kubelet probe: HTTPS without verifying the certificate and without credentials.
        status, _, body = await get(sc.http_url + "/healthz", ctx=False)
        assert (status, body) == (200, "ok\n")
        status, _, text = await get(sc.http_url + "/metrics", ctx=ctx, headers=basic(USER, PASSWORD))
    refused = {labels: v for (name, labels), v in samples(text).items()
               if name == "asynq_sidecar_http_requests_refused_total"}
    assert refused[(("reason", "missing"),)] == 3
    assert refused[(("reason", "denied"),)] == 2
    assert refused[(("reason", "malformed"),)] == 1


async def test_plain_http_to_the_tls_port_gets_no_metrics(locked_down):
    async with Sidecar(locked_down()) as sc:
        plain = sc.http_url.replace("https://", "http://")
        with pytest.raises(aiohttp.ClientError):  # the handshake fails and the server hangs up
            await get(plain + "/metrics", headers=basic(USER, PASSWORD))


async def test_a_client_certificate_is_required_and_must_chain_to_the_client_ca(locked_down, pki):
    async with Sidecar(locked_down(client_auth="RequireAndVerifyClientCert")) as sc:
        url = sc.http_url + "/metrics"
        status, _, body = await get(url, ctx=client_ssl(pki, pki.client), headers=basic(USER, PASSWORD))
        assert status == 200 and "asynq_sidecar_build_info" in body
        # Client certificates do not replace basic auth: both are asked for.
        assert (await get(url, ctx=client_ssl(pki, pki.client)))[0] == 401
        for ctx in (client_ssl(pki), client_ssl(pki, pki.stranger)):
            with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
                await get(url, ctx=ctx, headers=basic(USER, PASSWORD))
        # Without a certificate the server aborts the handshake. In TLS 1.2 the client sees the
        # handshake fail; in TLS 1.3 the client's half completes first, then the server hangs up
        # before reading the request (asyncio closes without flushing the alert).
        tls12 = await asyncio.to_thread(attempt, sc.http_address,
                                        client_ssl(pki, max_version=ssl.TLSVersion.TLSv1_2))
        assert tls12.startswith("handshake failed"), tls12
        tls13 = await asyncio.to_thread(attempt, sc.http_address, client_ssl(pki))
        assert tls13 in ("closed without an answer", "read failed: TLSV13_ALERT_CERTIFICATE_REQUIRED"), tls13


def attempt(address: tuple[str, int], ctx: ssl.SSLContext) -> str:
    """What a blocking TLS client sees when it connects and asks for /healthz."""
    with socket.create_connection(address, timeout=5) as raw:
        try:
            tls = ctx.wrap_socket(raw, server_hostname="localhost")
        except (ssl.SSLError, ConnectionError) as e:
            return f"handshake failed: {e}"
        with tls:
            try:
                tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                answer = tls.recv(100)
            except ssl.SSLError as e:
                return f"read failed: {e.reason}"
            except ConnectionError:
                return "closed without an answer"
            return "closed without an answer" if not answer else f"answered: {answer!r}"


async def test_tls13_minimum_refuses_a_tls12_client(tmp_path, pki, make_config):
    text = tls_block(pki) + "  min_version: TLS13\n"
    cfg = make_config(web=webconfig.load(write_config(tmp_path, text)))
    async with Sidecar(cfg) as sc:
        assert (await get(sc.http_url + "/healthz", ctx=client_ssl(pki)))[0] == 200
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            await get(sc.http_url + "/healthz", ctx=client_ssl(pki, max_version=ssl.TLSVersion.TLSv1_2))


# ---------------------------------------------------------------- what a real Prometheus sees


class SecurePrometheus(Prometheus):
    """Scrapes one target over HTTPS with a client certificate, twice: as `good` with the right
    password and as `bad` with a wrong one."""

    def __init__(self, *args, pki: PKI, password_files: dict[str, Path], **kwargs) -> None:  # noqa: F811
        super().__init__(*args, **kwargs)
        self.pki = pki
        self.password_files = password_files

    def config(self) -> dict:
        config = super().config()
        tls = {"ca_file": str(self.pki.ca.cert), "cert_file": str(self.pki.client.cert),
               "key_file": str(self.pki.client.key), "server_name": "localhost"}
        config["scrape_configs"] = [
            {"job_name": job, "scheme": "https", "tls_config": tls,
             "basic_auth": {"username": USER, "password_file": str(path)},
             "static_configs": [{"targets": self.targets}]}
            for job, path in self.password_files.items()]
        return config


@pytest.mark.e2e
async def test_a_real_prometheus_scrapes_over_mutual_tls_with_basic_auth(locked_down, pki, tmp_path):  # noqa: F811
    binary = require_tool("prometheus")
    files = {"good": tmp_path / "good", "bad": tmp_path / "bad"}
    files["good"].write_text(PASSWORD)
    files["bad"].write_text("not " + PASSWORD)
    async with Sidecar(locked_down(client_auth="RequireAndVerifyClientCert")) as sc:
        _, port = sc.http_address
        prom = SecurePrometheus(binary, tmp_path / "prometheus", [f"127.0.0.1:{port}"], pki=pki,
                                password_files=files)
        await asyncio.to_thread(prom.start)  # from a thread: this loop keeps serving scrapes
        try:
            up = await prom.eventually(lambda: len(v := prom.values("up")) == 2 and v, timeout=30,
                                       what="both jobs scraped")
            assert {dict(k)["job"]: v for k, v in up.items()} == {"good": 1.0, "bad": 0.0}
            redis_up = await asyncio.to_thread(prom.values, "asynq_sidecar_redis_up")
            assert [dict(k)["job"] for k in redis_up] == ["good"]
            targets = (await asyncio.to_thread(prom.api, "targets"))["activeTargets"]
            errors = {t["labels"]["job"]: t["lastError"] for t in targets}
            assert errors["good"] == "" and "401" in errors["bad"], errors
        finally:
            await asyncio.to_thread(prom.close)
