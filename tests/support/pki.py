"""A throw-away certificate authority for TLS tests, made with the openssl command line.

One CA signs a server certificate (localhost, 127.0.0.1) and a client certificate; a second,
unrelated CA signs a client certificate that the first CA's servers must refuse.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_CA_EXT = ("basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
           "subjectKeyIdentifier=hash\n")
_SERVER_EXT = ("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
               "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
               "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
_CLIENT_EXT = ("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
               "extendedKeyUsage=clientAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    ca: Pair
    server: Pair  # CN localhost, SAN DNS:localhost and IP:127.0.0.1; usable as a client too
    client: Pair  # signed by `ca`
    stranger_ca: Pair
    stranger: Pair  # a client certificate signed by `stranger_ca`, which `ca` does not know


def _run(openssl: str, *args: str | Path) -> None:
    proc = subprocess.run([openssl, *map(str, args)], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args[:2]))} failed: {proc.stderr.strip()}")


def _key_args(key: Path) -> list[str | Path]:
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key]


def _ca(openssl: str, d: Path, name: str) -> Pair:
    pair = Pair(d / f"{name}.crt", d / f"{name}.key")
    addext = [arg for line in _CA_EXT.splitlines() for arg in ("-addext", line)]
    _run(openssl, "req", "-x509", *_key_args(pair.key), "-out", pair.cert, "-days", "2",
         "-subj", f"/CN={name}", "-config", "/dev/null", *addext)
    return pair


def _leaf(openssl: str, d: Path, name: str, cn: str, ca: Pair, ext_text: str, serial: int) -> Pair:
    pair = Pair(d / f"{name}.crt", d / f"{name}.key")
    csr, ext = d / f"{name}.csr", d / f"{name}.ext"
    ext.write_text(ext_text)
    _run(openssl, "req", "-new", *_key_args(pair.key), "-out", csr, "-subj", f"/CN={cn}",
         "-config", "/dev/null")
    _run(openssl, "x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-set_serial",
         str(serial), "-days", "2", "-extfile", ext, "-out", pair.cert)
    pair.key.chmod(0o600)
    return pair


def make_pki(openssl: str, directory: Path) -> PKI:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(openssl, directory, "ca")
    stranger_ca = _ca(openssl, directory, "stranger-ca")
    return PKI(
        ca=ca,
        server=_leaf(openssl, directory, "server", "localhost", ca, _SERVER_EXT, 2),
        client=_leaf(openssl, directory, "client", "prometheus", ca, _CLIENT_EXT, 3),
        stranger_ca=stranger_ca,
        stranger=_leaf(openssl, directory, "stranger", "prometheus", stranger_ca, _CLIENT_EXT, 4),
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> PKI:
    """A CA with server and client certificates (skipped without openssl, failed under CI)."""
    from tests.support.tools import require_tool

    return make_pki(require_tool("openssl"), tmp_path_factory.mktemp("pki"))
