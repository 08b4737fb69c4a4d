"""Validation of everything a user registers: host, user, port, frequency,
keep and host-key fingerprint (paths are validated in ``remote.py``, next to
the commands they end up in). Each refusal says what is wrong."""

from __future__ import annotations

import ipaddress
import re

from orchestrator.errors import (
    InvalidFrequency,
    InvalidHost,
    InvalidInput,
    InvalidKeep,
    InvalidPort,
    InvalidUser,
)

MAX_EVERY_MINUTES = 366 * 24 * 60  # a year
MAX_KEEP = 10_000

_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
_FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")


def host(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidHost("host is empty; give a host name or an IP address")
    text = value.strip("[]") if value.startswith("[") else value
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        # ::ffff:127.0.0.2 is 127.0.0.2: one spelling, so one node and one host key.
        mapped = getattr(ip, "ipv4_mapped", None)
        return str(mapped or ip)
    if len(text) > 253:
        raise InvalidHost(f"host name is longer than 253 characters: {text[:40]!r}...")
    labels = text.rstrip(".").split(".")
    if labels[-1].isdigit() or labels[-1].lower().startswith("0x"):
        # 2130706433, 0x7f.1, 127.1: the resolver reads these as IPv4 addresses,
        # so one node could be registered under many names
        raise InvalidHost(f"{text!r} looks like a numeric address but is not a dotted-quad "
                          "IPv4 or an IPv6 address; write the address in full")
    if not all(_LABEL.match(label) for label in labels):
        raise InvalidHost(f"{text!r} is not a valid host name or IP address "
                          "(letters, digits, '-' and '.' only; no leading '-')")
    return text.rstrip(".").lower()


def user(value: object) -> str:
    if not isinstance(value, str) or not _USER.match(value):
        raise InvalidUser(f"{value!r} is not a valid user name (letters, digits, '_', '.', "
                          "'-'; starting with a letter or '_'; at most 32 characters)")
    return value


def port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        else:
            raise InvalidPort(f"port must be a number 1-65535, got {value!r}")
    if not 1 <= value <= 65535:
        raise InvalidPort(f"port must be 1-65535, got {value}")
    return value


def every_minutes(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidFrequency(f"frequency must be a whole number of minutes, got {value!r}")
    if not 1 <= value <= MAX_EVERY_MINUTES:
        raise InvalidFrequency(f"frequency must be 1-{MAX_EVERY_MINUTES} minutes, got {value}")
    return value


def keep(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidKeep(f"keep must be a whole number of archives, got {value!r}")
    if not 1 <= value <= MAX_KEEP:
        raise InvalidKeep(f"keep must be 1-{MAX_KEEP}, got {value}")
    return value


def fingerprint(value: object) -> str:
    if not isinstance(value, str) or not _FINGERPRINT.match(value):
        raise InvalidInput(f"host key fingerprint must look like SHA256:<43 base64 chars> "
                           f"(as `ssh-keygen -lf` prints it), got {value!r}")
    return value
