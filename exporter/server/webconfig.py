"""`--web-config-file`: TLS and basic auth of the HTTP server, in the format of Prometheus's
exporter-toolkit (`tls_server_config`, `basic_auth_users`, `http_server_config.headers`).

The file is read and checked once, at start-up; a bad one stops the command with a message
naming the field. Basic auth covers every path except /healthz, which answers only "ok" and is
left open so that a kubelet probe needs no password (docs/endpoint-security.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from aiohttp import web

from exporter.logs import RateLimiter

log = logging.getLogger("exporter.server.webconfig")

#: Paths served without basic auth (TLS, when configured, still applies to them).
OPEN_PATHS = frozenset({"/healthz"})

#: bcrypt looks at the first 72 bytes only; a longer password is refused rather than truncated.
BCRYPT_MAX_PASSWORD = 72

#: Verified credentials kept so that a scrape does not pay a bcrypt check (~60 ms at cost 10).
GOOD_CACHE_SIZE = 64
#: Rejected credentials kept so that a client repeating a wrong password costs one check only.
BAD_CACHE_SIZE = 256

_BCRYPT_HASH = re.compile(r"^\$2[abxy]?\$(\d\d)\$[./A-Za-z0-9]{53}$")

# client_auth_type -> verify mode. Go's RequestClientCert and RequireAnyClientCert accept a
# certificate that nobody verified; Python's ssl has no such mode, and they protect nothing.
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

# The response headers exporter-toolkit lets a file set, with the values it accepts (None: any).
_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}

_TLS_FIELDS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "client_ca",
               "min_version", "max_version", "prefer_server_cipher_suites", "cert", "key",
               "cipher_suites", "curve_preferences", "client_allowed_sans"}
_TOP_FIELDS = {"tls_server_config", "basic_auth_users", "http_server_config", "rate_limit"}


class WebConfigError(ValueError):
    """A web config file that cannot be used; the message names the field."""


@dataclass(frozen=True)
class TLSServerConfig:
    """`tls_server_config`, with paths made absolute (relative ones are relative to the file)."""

    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    client_ca: str | None = field(default=None, repr=False)  # inline PEM
    min_version: str = "TLS12"
    max_version: str = "TLS13"

    @property
    def verifies_clients(self) -> bool:
        return self.client_auth_type != "NoClientCert"

    def context(self) -> ssl.SSLContext:
        """A server-side SSLContext; raises WebConfigError naming the field that fails."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = _TLS_VERSIONS[self.min_version]
        ctx.maximum_version = _TLS_VERSIONS[self.max_version]
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as e:
            raise WebConfigError(f"tls_server_config.cert_file/key_file: cannot use {self.cert_file} "
                                 f"with {self.key_file}: {e.reason or e}") from None
        except OSError as e:  # read between the check and here, or a directory
            raise WebConfigError(f"tls_server_config.cert_file/key_file: {e.strerror or e}") from None
        if self.verifies_clients:
            try:
                if self.client_ca_file:
                    ctx.load_verify_locations(cafile=self.client_ca_file)
                else:
                    ctx.load_verify_locations(cadata=self.client_ca)
            except (ssl.SSLError, OSError, ValueError) as e:
                where = "client_ca_file" if self.client_ca_file else "client_ca"
                reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
                raise WebConfigError(f"tls_server_config.{where}: not a usable PEM CA certificate: "
                                     f"{reason}") from None
            ctx.verify_mode = _CLIENT_AUTH[self.client_auth_type]
        return ctx


@dataclass(frozen=True)
class WebConfig:
    """A checked web config file. `users` maps a user name to its bcrypt hash."""

    path: str
    tls: TLSServerConfig | None = None
    users: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def ssl_context(self) -> ssl.SSLContext | None:
        return self.tls.context() if self.tls is not None else None

    def describe(self) -> str:
        """One line for the start-up log: what is on, never a secret."""
        parts = []
        if self.tls is None:
            parts.append("TLS off")
        else:
            parts.append(f"TLS on (min {self.tls.min_version}, client certificates: "
                         f"{self.tls.client_auth_type})")
        if self.users:
            parts.append(f"basic auth for {len(self.users)} user(s), /healthz open")
        else:
            parts.append("no basic auth")
        return f"{self.path}: " + ", ".join(parts)

    def middlewares(self, on_reject: Callable[[str], None] | None = None) -> list[Any]:
        """aiohttp middlewares: response headers, then basic auth when users are configured.
        `on_reject(reason)` is told of each refused request (missing, malformed, denied)."""
        out: list[Any] = []
        if self.headers:
            out.append(_headers_middleware(dict(self.headers)))
        if self.users:
            out.append(BasicAuth(self.users, on_reject=on_reject).middleware)
        return out


# ---------------------------------------------------------------- basic auth


class BasicAuth:
    """Checks `Authorization: Basic` against bcrypt hashes, off the event loop, one at a time.

    Outcomes are cached by a keyed hash of (user, stored hash, password), never the password
    itself; the caches are bounded, and rejections cannot evict accepted credentials.
    """

    def __init__(self, users: Mapping[str, bytes], *, on_reject: Callable[[str], None] | None = None,
                 check: Callable[[bytes, bytes], bool] | None = None) -> None:
        import bcrypt  # noqa: PLC0415 - only with basic_auth_users configured

        self._users = [(name.encode("utf-8"), hashed) for name, hashed in users.items()]
        self._check = check or bcrypt.checkpw
        self._on_reject = on_reject or (lambda reason: None)
        self._key = secrets.token_bytes(32)
        self._good: OrderedDict[bytes, None] = OrderedDict()
        self._bad: OrderedDict[bytes, None] = OrderedDict()
        self._lock = asyncio.Lock()
        # Unknown users are checked against a hash of the same cost, so that timing does not
        # tell which names exist.
        cost = int(_BCRYPT_HASH.match(self._users[0][1].decode())[1])  # type: ignore[index]
        self._decoy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))
        self._limiter = RateLimiter(interval=10.0)

    def _lookup(self, user: bytes) -> bytes | None:
        """The stored hash of `user`, comparing every name in constant time."""
        found = None
        for name, hashed in self._users:
            if hmac.compare_digest(name, user):
                found = hashed
        return found

    async def authorized(self, header: str | None) -> str | None:
        """None when the header carries valid credentials; else why not (missing, malformed,
        denied)."""
        if header is None:
            return "missing"
        creds = _parse_basic(header)
        if creds is None:
            return "malformed"
        user, password = creds
        stored = self._lookup(user)
        if len(password) > BCRYPT_MAX_PASSWORD:
            return "denied"
        hashed = stored if stored is not None else self._decoy
        key = hashlib.blake2b(b"".join(len(part).to_bytes(4, "big") + part
                                       for part in (user, hashed, password)), key=self._key).digest()
        verdict = self._cached(key)
        if verdict is None:
            async with self._lock:  # one bcrypt at a time: a flood costs one core, not all
                verdict = self._cached(key)  # another request may have checked it meanwhile
                if verdict is None:
                    try:
                        ok = await asyncio.to_thread(self._check, password, hashed)
                    except ValueError:  # a hash or password that bcrypt refuses
                        ok = False
                    verdict = ok and stored is not None
                    self._remember(key, verdict)
        return None if verdict else "denied"

    def _cached(self, key: bytes) -> bool | None:
        for cache, verdict in ((self._good, True), (self._bad, False)):
            if key in cache:
                cache.move_to_end(key)
                return verdict
        return None

    def _remember(self, key: bytes, verdict: bool) -> None:
        cache, limit = (self._good, GOOD_CACHE_SIZE) if verdict else (self._bad, BAD_CACHE_SIZE)
        cache[key] = None
        while len(cache) > limit:
            cache.popitem(last=False)

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        reason = await self.authorized(request.headers.get("Authorization"))
        if reason is None:
            return await handler(request)
        self._on_reject(reason)
        if reason != "missing" and (suppressed := self._limiter.allow(reason)) is not None:
            log.warning("refused %s %s from %s: %s credentials (%d similar refusals not logged)",
                        request.method, request.path, request.remote, reason, suppressed)
        return web.Response(status=401, text="401 Unauthorized\n",
                            headers={"WWW-Authenticate": 'Basic realm="asynq-sidecar", charset="UTF-8"'})


def _parse_basic(header: str) -> tuple[bytes, bytes] | None:
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user, password


def _headers_middleware(headers: dict[str, str]) -> Any:
    @web.middleware
    async def add_headers(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as e:
            e.headers.update(headers)
            raise
        response.headers.update(headers)
        return response

    return add_headers


# ---------------------------------------------------------------- reading the file


def load(path: str) -> WebConfig:
    """Read and check a web config file, including its certificates and hashes."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise WebConfigError(f"cannot read it: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise WebConfigError("not UTF-8 text") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise WebConfigError(f"not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    config = parse(doc, os.path.dirname(os.path.abspath(path)), path)
    if config.tls is not None:
        config.tls.context()  # certificates that do not load stop the start, not the first scrape
    return config


def parse(doc: Any, base_dir: str, path: str = "") -> WebConfig:
    """Check a parsed document; relative file names are taken relative to `base_dir`."""
    if doc is None:
        doc = {}  # an empty file: plain HTTP, no auth (as exporter-toolkit)
    _expect_mapping(doc, "the file")
    _no_unknown(doc, _TOP_FIELDS, "")
    if doc.get("rate_limit") not in (None, {}):
        raise WebConfigError("rate_limit: not supported by asynq-sidecar (remove it, or limit "
                             "requests in front of the sidecar)")
    tls = _tls(doc.get("tls_server_config"), base_dir)
    users = _users(doc.get("basic_auth_users"))
    headers = _http(doc.get("http_server_config"))
    return WebConfig(path=path, tls=tls, users=users, headers=headers)


def _expect_mapping(value: Any, what: str) -> None:
    if not isinstance(value, dict):
        raise WebConfigError(f"{what}: expected a mapping of fields, got {type(value).__name__}")


def _no_unknown(doc: dict, known: set[str], prefix: str) -> None:
    for key in doc:
        if key not in known:
            raise WebConfigError(f"{prefix}{key}: unknown field (known: {', '.join(sorted(known))})")


def _string(doc: dict, key: str, where: str) -> str | None:
    value = doc.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise WebConfigError(f"{where}.{key}: expected a string, got {type(value).__name__}")
    return value


def _file(doc: dict, key: str, base_dir: str, where: str) -> str | None:
    name = _string(doc, key, where)
    if name is None:
        return None
    full = os.path.join(base_dir, name)
    try:
        with open(full, "rb") as f:
            f.read(1)
    except OSError as e:
        raise WebConfigError(f"{where}.{key}: cannot read {full}: {e.strerror or e}") from None
    return full


def _tls(doc: Any, base_dir: str) -> TLSServerConfig | None:
    where = "tls_server_config"
    if doc is None or doc == {}:
        return None
    _expect_mapping(doc, where)
    _no_unknown(doc, _TLS_FIELDS, where + ".")
    for key in ("cert", "key"):
        if doc.get(key):
            raise WebConfigError(f"{where}.{key}: inline certificates and keys are not supported; "
                                 f"use {key}_file")
    for key in ("cipher_suites", "curve_preferences", "client_allowed_sans"):
        if doc.get(key):
            raise WebConfigError(f"{where}.{key}: not supported by asynq-sidecar (remove it; "
                                 "Python's defaults are used for ciphers and curves)")
    prefer = doc.get("prefer_server_cipher_suites")
    if prefer is not None and not isinstance(prefer, bool):
        raise WebConfigError(f"{where}.prefer_server_cipher_suites: expected true or false")
    cert = _file(doc, "cert_file", base_dir, where)
    key_file = _file(doc, "key_file", base_dir, where)
    if cert is None:
        raise WebConfigError(f"{where}.cert_file: required when tls_server_config is set")
    if key_file is None:
        raise WebConfigError(f"{where}.key_file: required when tls_server_config is set")
    auth = _string(doc, "client_auth_type", where) or "NoClientCert"
    if auth in _UNVERIFIED_CLIENT_AUTH:
        raise WebConfigError(f"{where}.client_auth_type: {auth} accepts certificates nobody "
                             "verified and is not supported; use RequireAndVerifyClientCert "
                             "(or VerifyClientCertIfGiven)")
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(f"{where}.client_auth_type: {auth!r} is not one of "
                             + ", ".join(_CLIENT_AUTH))
    ca_file = _file(doc, "client_ca_file", base_dir, where)
    ca_inline = _string(doc, "client_ca", where)
    if ca_file and ca_inline:
        raise WebConfigError(f"{where}.client_ca: set client_ca or client_ca_file, not both")
    if (ca_file or ca_inline) and auth == "NoClientCert":
        raise WebConfigError(f"{where}.client_ca_file: a client CA is set but client_auth_type is "
                             "NoClientCert; set client_auth_type: RequireAndVerifyClientCert")
    if auth != "NoClientCert" and not (ca_file or ca_inline):
        raise WebConfigError(f"{where}.client_ca_file: required with client_auth_type {auth} "
                             "(the CA that client certificates must chain to)")
    versions = {}
    for key_name, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        value = _string(doc, key_name, where) or default
        if value not in _TLS_VERSIONS:
            raise WebConfigError(f"{where}.{key_name}: {value!r} is not one of "
                                 + ", ".join(_TLS_VERSIONS))
        versions[key_name] = value
    if _TLS_VERSIONS[versions["min_version"]] > _TLS_VERSIONS[versions["max_version"]]:
        raise WebConfigError(f"{where}.min_version: {versions['min_version']} is above "
                             f"max_version {versions['max_version']}")
    return TLSServerConfig(cert_file=cert, key_file=key_file, client_auth_type=auth, client_ca_file=ca_file,
                           client_ca=ca_inline, **versions)


def _users(doc: Any) -> dict[str, bytes]:
    where = "basic_auth_users"
    if doc is None:
        return {}
    _expect_mapping(doc, where)
    users: dict[str, bytes] = {}
    for name, hashed in doc.items():
        if not isinstance(name, str) or not name:
            raise WebConfigError(f"{where}: user name {name!r} is not a non-empty string "
                                 "(quote it in the YAML)")
        if ":" in name:
            raise WebConfigError(f"{where}.{name}: a basic auth user name cannot contain ':'")
        if not isinstance(hashed, str) or not _BCRYPT_HASH.match(hashed):
            raise WebConfigError(f"{where}.{name}: not a bcrypt hash (expected $2y$10$ and 53 "
                                 "characters, e.g. from `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)")
        users[name] = hashed.encode("ascii")
    return users


def _http(doc: Any) -> dict[str, str]:
    where = "http_server_config"
    if doc is None:
        return {}
    _expect_mapping(doc, where)
    _no_unknown(doc, {"http2", "headers"}, where + ".")
    if "http2" in doc and not isinstance(doc["http2"], bool):
        raise WebConfigError(f"{where}.http2: expected true or false")  # HTTP/1.1 is served either way
    headers = doc.get("headers") or {}
    _expect_mapping(headers, where + ".headers")
    out: dict[str, str] = {}
    for name, value in headers.items():
        if name not in _HEADERS:
            raise WebConfigError(f"{where}.headers.{name}: this header cannot be set (allowed: "
                                 + ", ".join(_HEADERS) + ")")
        if value is None or value == "":
            continue
        allowed = _HEADERS[name]
        if not isinstance(value, str) or (allowed is not None and value not in allowed):
            expected = "a string" if allowed is None else "one of " + ", ".join(allowed)
            raise WebConfigError(f"{where}.headers.{name}: expected {expected}")
        if "\n" in value or "\r" in value:
            raise WebConfigError(f"{where}.headers.{name}: a header value cannot span lines")
        out[name] = value
    return out
