"""Who may talk to whom, checked before anything touches the network (no torch here).

A two-party run is authenticated and encrypted unless ``--insecure`` is given, and that
flag is refused for any address that is not a loopback address.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from kedit_vfl.errors import UserError


@dataclass(frozen=True)
class Rendezvous:
    host: str
    port: int

    def __str__(self) -> str:
        return f"tcp://{self.host}:{self.port}"


@dataclass(frozen=True)
class Security:
    """How this party proves itself and recognises its peer.

    ``identity``: the folder from ``kvtool vfl keygen``; ``peer_cert``: the other party's
    certificate, pinned; ``insecure``: plaintext without authentication (loopback only).
    """

    identity: Path | None = None
    peer_cert: Path | None = None
    insecure: bool = False


def parse_rendezvous(text: str) -> Rendezvous:
    """``tcp://HOST:PORT`` -> Rendezvous; anything else is a user error."""
    parsed = urlparse(text)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme != "tcp" or not parsed.hostname or port is None or parsed.path not in ("", "/"):
        raise UserError(f"--rendezvous {text}: expected tcp://HOST:PORT, e.g. tcp://10.0.0.5:29500")
    if not 1 <= port <= 65535:
        raise UserError(f"--rendezvous {text}: port must be between 1 and 65535")
    return Rendezvous(parsed.hostname, port)


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_security(security: Security, where: Rendezvous) -> None:
    """Refuse, before anything waits on the network, a set-up that is not safe for ``where``."""
    if security.insecure:
        if not is_loopback(where.host):
            raise UserError(
                f"--insecure: {where.host} is not a loopback address; plaintext is only allowed on "
                "127.0.0.1 or ::1. Across machines give --identity and --peer-cert instead"
            )
        if security.identity is not None or security.peer_cert is not None:
            raise UserError("--insecure turns TLS off: drop --identity and --peer-cert, or drop --insecure")
        return
    missing = [
        text
        for text, value in (
            ("--identity DIR (this party's key and certificate: 'kvtool vfl keygen')", security.identity),
            ("--peer-cert FILE (the other party's cert.pem)", security.peer_cert),
        )
        if value is None
    ]
    if missing:
        raise UserError(
            "two-party runs are authenticated and encrypted: give "
            + " and ".join(missing)
            + " (or --insecure, for a test on this machine's loopback address only)"
        )
