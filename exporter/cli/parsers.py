"""Value parsers of the option table: each turns a flag's or variable's text into a value, or raises
ConfigError saying what is accepted."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A value that is not accepted; the message says what is accepted."""



def parse_redis_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("expected a URL with scheme redis://, rediss:// or unix://")
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError("a unix:// URL needs a socket path, e.g. unix:///run/redis.sock")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError("expected a host, e.g. redis://redis:6379/0")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError("the port is not a number from 1 to 65535") from None
    return text


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ConfigError("expected HOST:PORT, e.g. 0.0.0.0:10050 or [::]:10050")
    host = host.strip("[]")
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise ConfigError("expected an IP address or localhost as HOST") from None
    if _digits(port_text) is None or not 0 <= int(port_text) <= 65535:
        raise ConfigError("expected a port from 0 to 65535 (0 picks a free one)")
    return host or "0.0.0.0", int(port_text)


def _digits(text: str) -> int | None:
    """The number in `text` when it is ASCII digits only (str.isdigit() also takes "²", which
    int() refuses) and short enough to convert; else None."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError("expected a number of seconds, e.g. 5 or 0.5") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ConfigError("expected a number of seconds greater than 0")
    return value


def seconds_or_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError("expected a number of seconds (0 turns it off)") from None
    if not value >= 0 or value == float("inf"):
        raise ConfigError("expected a number of seconds, 0 or more")
    return value


def positive_int(text: str) -> int:
    value = _digits(text)
    if value is None or value < 1:
        raise ConfigError("expected a whole number of 1 or more")
    return value


def int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _digits(text)
        if value is None or not low <= value <= high:
            raise ConfigError(f"expected a whole number from {low} to {high}")
        return value

    return parse


def file_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError("expected an octal file mode, e.g. 0660") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError("expected an octal file mode from 0000 to 0777")
    return mode


def uid_list(text: str) -> tuple[int, ...]:
    """`1000` or `1000,1001` -> (1000, 1001): numeric user ids (names need a passwd file that
    a distroless image lacks)."""
    uids = []
    for part in text.split(","):
        uid = _digits(part)
        if uid is None or uid > 2**32 - 2:
            raise ConfigError("expected numeric user ids separated by commas, e.g. 1000 or 1000,1001")
        uids.append(uid)
    return tuple(dict.fromkeys(uids))


def nonempty(text: str) -> str:
    if not text.strip():
        raise ConfigError("must not be empty")
    return text


def readable_file(text: str) -> str:
    try:
        with open(text, encoding="utf-8") as f:
            f.read(1)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise ConfigError(f"cannot read it: {getattr(e, 'strerror', None) or e}") from None
    return text


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ConfigError("expected one of " + ", ".join(choices))
        return text

    parse.choices = choices  # type: ignore[attr-defined]
    return parse


def boolean(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError("expected true or false (1/0, yes/no, on/off)")


def parse_sentinels(text: str) -> tuple[tuple[str, int], ...]:
    """`sentinel-0:26379,sentinel-1:26379` -> ((host, port), ...)."""
    found = []
    for part in text.split(","):
        host, sep, port = part.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or _digits(port) is None or not 1 <= int(port) <= 65535:
            raise ConfigError("expected HOST:PORT[,HOST:PORT...], e.g. sentinel-0:26379,sentinel-1:26379")
        found.append((host, int(port)))
    return tuple(found)


def web_config_file(text: str) -> Any:
    """Read and check an exporter-toolkit web config file (see exporter.server.webconfig). Its
    YAML, bcrypt and TLS code is loaded only when the flag is given."""
    from exporter.server.webconfig import WebConfigError, load  # noqa: PLC0415

    if "\0" in text:
        raise ConfigError("cannot read it: a NUL byte in the path")
    try:
        return load(text)
    except WebConfigError as e:
        raise ConfigError(str(e)) from None


def whole_seconds(text: str) -> int:
    try:
        return positive_int(text)
    except ConfigError:
        raise ConfigError("expected a whole number of seconds, 1 or more") from None


def count(text: str) -> int:
    value = _digits(text)
    if value is None:
        raise ConfigError("expected a whole number, 0 or more")
    return value


def pid(text: str) -> int:
    value = positive_int(text)
    if value > 2**31 - 1:
        raise ConfigError("expected a pid that fits in an int32")
    return value


def queues(text: str) -> dict[str, int]:
    """`default=1,critical=6` -> {"default": 1, "critical": 6} (asynq's Config.Queues)."""
    found: dict[str, int] = {}
    for part in text.split(","):
        name, sep, priority = part.strip().partition("=")
        value = _digits(priority)
        if not name or not sep or value is None or value < 1:
            raise ConfigError("expected NAME=PRIORITY pairs separated by commas, e.g. default=1,critical=6")
        found[name] = value
    return found
