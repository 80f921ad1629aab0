"""A small client for WireGuard's cross-platform UAPI (wireguard-go, kubespan-wg).

One request per connection on the unix socket /var/run/wireguard/<link>.sock:
`get=1\\n\\n` answers with key=value lines; `set=1\\n<key=value lines>\\n` applies them as
one transaction. Every reply ends with `errno=N` and a blank line; N != 0 is a failure.
Keys travel as lowercase hex. Secrets read back (private and preshared keys) are
dropped while parsing so they never sit in objects that may be printed or logged.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import EllipsisType

from control.backends.base import BackendError, check_key
from kubespan_dp.netutil import (
    Address,
    IPNetwork,
    check_endpoint,
    format_endpoint,
    parse_endpoint,
)


class UAPIError(BackendError):
    """The daemon refused a request (errno != 0) or the socket failed."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass
class UAPIPeer:
    public_key: bytes
    endpoint: Address | None = None
    persistent_keepalive: int = 0
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    last_handshake_sec: int = 0  # wall clock, as the daemon reports it
    last_handshake_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    protocol_version: int = 1
    has_preshared_key: bool = False

    @property
    def last_handshake(self) -> float | None:
        """Wall-clock seconds; None when 0/0 (never)."""
        if self.last_handshake_sec == 0 and self.last_handshake_nsec == 0:
            return None
        return self.last_handshake_sec + self.last_handshake_nsec / 1e9


@dataclass
class UAPIDevice:
    listen_port: int = 0
    fwmark: int = 0
    has_private_key: bool = False
    peers: list[UAPIPeer] = field(default_factory=list)


def _is_set(value: str) -> bool:
    """Whether a key read back is set; the key itself is dropped."""
    return any(value.strip("0"))


# The `get` reply, key -> (attribute, parser): device keys before the first public_key,
# then each peer's. Keys not listed are skipped (a newer daemon may send more).
_DEVICE_KEYS: dict[str, tuple[str, Callable[[str], object]]] = {
    "listen_port": ("listen_port", int),
    "fwmark": ("fwmark", int),
    "private_key": ("has_private_key", _is_set),
}
_PEER_KEYS: dict[str, tuple[str, Callable[[str], object]]] = {
    "endpoint": ("endpoint", parse_endpoint),
    "persistent_keepalive_interval": ("persistent_keepalive", int),
    "last_handshake_time_sec": ("last_handshake_sec", int),
    "last_handshake_time_nsec": ("last_handshake_nsec", int),
    "rx_bytes": ("rx_bytes", int),
    "tx_bytes": ("tx_bytes", int),
    "protocol_version": ("protocol_version", int),
    "preshared_key": ("has_preshared_key", _is_set),
}


def key_hex(key: bytes) -> str:
    return check_key(key, "a WireGuard key").hex()


class UAPIClient:
    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def _exchange(self, request: bytes) -> list[tuple[str, str]]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                sock.sendall(request)
                buf = bytearray()
                while not (buf.endswith(b"\n\n") and b"errno=" in buf):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
        except OSError as exc:
            raise UAPIError(f"UAPI {self.path}: {exc.strerror or exc}") from exc
        pairs: list[tuple[str, str]] = []
        for line in buf.decode(errors="replace").splitlines():
            if not line:
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise UAPIError(f"UAPI {self.path}: malformed reply line")
            pairs.append((key, value))
        if not pairs or pairs[-1][0] != "errno":
            raise UAPIError(f"UAPI {self.path}: reply ended without errno")
        errno = int(pairs[-1][1])
        if errno != 0:
            raise UAPIError(f"UAPI {self.path}: request failed with errno={errno}", errno)
        return pairs[:-1]

    def get(self) -> UAPIDevice:
        dev = UAPIDevice()
        peer: UAPIPeer | None = None
        for key, value in self._exchange(b"get=1\n\n"):
            if key == "public_key":
                peer = UAPIPeer(bytes.fromhex(value))
                dev.peers.append(peer)
            elif key == "allowed_ip" and peer is not None:
                peer.allowed_ips.append(ipaddress.ip_network(value, strict=False))
            else:
                target, fields = (dev, _DEVICE_KEYS) if peer is None else (peer, _PEER_KEYS)
                if key in fields:
                    name, parse = fields[key]
                    setattr(target, name, parse(value))
        return dev

    def set(self, items: Sequence[tuple[str, str]]) -> None:
        """Apply key=value items as one transaction (raises UAPIError on errno != 0)."""
        lines = ["set=1"]
        for key, value in items:
            if not key.isidentifier() or any(c in value for c in "\n="):
                raise ValueError(f"invalid UAPI item {key!r}")
            lines.append(f"{key}={value}")
        self._exchange(("\n".join(lines) + "\n\n").encode())

    def stats(self) -> dict[str, str]:
        """Our daemon's drop counters (its `stats=1` extension; wireguard-go has none)."""
        return dict(self._exchange(b"stats=1\n\n"))

    def ping(self) -> bool:
        """Whether a daemon answers on the socket."""
        try:
            self.get()
        except UAPIError:
            return False
        return True


def peer_items(
    public_key: bytes,
    *,
    update_only: bool = False,
    remove: bool = False,
    preshared_key: bytes | None | EllipsisType = ...,
    endpoint: Address | None = None,
    persistent_keepalive: int | None = None,
    allowed_ips: Iterable[IPNetwork] | None = None,
) -> list[tuple[str, str]]:
    """The items for one peer; `...` / None leave a field as it is.

    `allowed_ips` given means "replace the list with exactly these". A preshared key
    of None clears it (all-zero key).
    """
    items = [("public_key", key_hex(public_key))]
    if remove:
        return items + [("remove", "true")]
    if update_only:
        items.append(("update_only", "true"))
    if preshared_key is not ...:
        items.append(("preshared_key", key_hex(preshared_key) if preshared_key else "0" * 64))
    if endpoint is not None:
        items.append(("endpoint", format_endpoint(check_endpoint(endpoint))))
    if persistent_keepalive is not None:
        if not 0 <= persistent_keepalive <= 65535:
            raise ValueError("persistent keepalive out of range")
        items.append(("persistent_keepalive_interval", str(persistent_keepalive)))
    if allowed_ips is not None:
        items.append(("replace_allowed_ips", "true"))
        items.extend(("allowed_ip", str(net)) for net in allowed_ips)
    return items
