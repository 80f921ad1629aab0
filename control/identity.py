"""Node identities: the KubeSpan keypair + ULA address, and the discovery node id.

Both live in small YAML files in the state directory, created once and never replaced:

* ``kubespan-identity.yaml``: address, subnet, privateKey, publicKey (keys base64).
  The address is recomputed at every load from the cluster id and the first MAC, so a
  changed cluster id or NIC moves the address while the keypair stays.
* ``node-identity.yaml``: nodeId (32 random bytes, base62, as Talos).

Creation is race-safe: the content is written to a private temporary file, fsynced,
then hard-linked to the final name. link(2) fails if the name exists, so a second
process never clobbers the first one's file; the loser reads the winner's file.
A file that exists but can't be read or parsed is an IdentityError naming it.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv6Address, IPv6Interface, IPv6Network
from pathlib import Path
from typing import Any

import yaml

from control import base62, keys
from control.ula import ula_prefix

KUBESPAN_IDENTITY_FILE = "kubespan-identity.yaml"
NODE_IDENTITY_FILE = "node-identity.yaml"
NODE_ID_SIZE = 32
FILE_MODE = 0o600

_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$")


class IdentityError(Exception):
    """An identity file that exists but is unusable; never silently replaced."""


# --- address derivation -----------------------------------------------------------------


def parse_mac(mac: str | bytes) -> bytes:
    if isinstance(mac, bytes):
        if len(mac) != 6:
            raise ValueError(f"MAC must be 6 bytes, got {len(mac)}")
        return mac
    if not _MAC_RE.match(mac):
        raise ValueError(f"not a 48-bit MAC address: {mac!r}")
    return bytes(int(part, 16) for part in re.split(r"[:-]", mac))


def eui64_address(subnet: IPv6Network, mac: str | bytes) -> IPv6Address:
    """Subnet's upper 64 bits + modified EUI-64 of the MAC (U/L bit flipped, ff:fe inserted)."""
    m = parse_mac(mac)
    iid = bytes([m[0] ^ 0x02]) + m[1:3] + b"\xff\xfe" + m[3:6]
    return IPv6Address(subnet.network_address.packed[:8] + iid)


# --- first MAC ------------------------------------------------------------------------------


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def first_physical_mac(
    sys_class_net: str | Path = "/sys/class/net",
    *,
    exclude: tuple[str, ...] = ("kubespan",),
    allow_virtual: bool = False,
) -> str | None:
    """The MAC of the first physical Ethernet link by name, as Talos's "first MAC".

    Physical = backed by a device (``device`` entry) and of type Ethernet (1). With
    allow_virtual, fall back to the first non-loopback Ethernet link with a non-zero MAC
    (containers and network namespaces only have veths). None when nothing fits.
    """
    root = Path(sys_class_net)
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return None
    fallback = None
    for name in names:
        if name in exclude:
            continue
        link = root / name
        mac = _read(link / "address").lower()
        if _read(link / "type") != "1" or not _MAC_RE.match(mac) or mac == "00:00:00:00:00:00":
            continue
        if (link / "device").exists():
            return mac
        if fallback is None:
            fallback = mac
    return fallback if allow_virtual else None


# --- atomic create-once files ---------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_exclusive(path: Path, content: bytes) -> bool:
    """Write content to path only if path does not exist yet. True if we created it.

    tmp (O_EXCL, 0600) + fsync + link(2): readers never see a partial file, and an
    existing file (another process won the race) is left untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        _fsync_dir(path.parent)
        return True
    finally:
        os.unlink(tmp)


def _load_yaml_mapping(path: Path) -> dict:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"{path}: cannot read identity file: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise IdentityError(f"{path}: identity file is not valid YAML") from None
    if not isinstance(data, dict):
        raise IdentityError(f"{path}: identity file is not a YAML mapping")
    return data


def _load_or_create(
    path: Path, generate: Callable[[], dict], parse: Callable[[Path, dict], Any]
) -> Any:
    if not path.exists():
        content = yaml.safe_dump(generate(), sort_keys=False).encode()
        create_exclusive(path, content)  # if we lost the race, the winner's file is read below
    return parse(path, _load_yaml_mapping(path))


# --- KubeSpan identity ----------------------------------------------------------------------


@dataclass(frozen=True)
class KubeSpanIdentity:
    address: IPv6Interface  # the node's address as /128 (the link gets it as /64)
    subnet: IPv6Network
    private_key: bytes = field(repr=False)
    public_key: bytes

    @property
    def public_key_b64(self) -> str:
        return keys.encode_key(self.public_key)

    @property
    def private_key_b64(self) -> str:
        return keys.encode_key(self.private_key)

    @property
    def link_address(self) -> IPv6Interface:
        return IPv6Interface((self.address.ip, self.subnet.prefixlen))


def _parse_kubespan_identity(
    path: Path, data: dict, cluster_id: str, mac: str | bytes
) -> KubeSpanIdentity:
    private_text, public_text = data.get("privateKey"), data.get("publicKey")
    if not isinstance(private_text, str) or not isinstance(public_text, str):
        raise IdentityError(f"{path}: privateKey/publicKey: missing or not a string")
    try:
        private = keys.decode_key(private_text)
        public = keys.decode_key(public_text)
    except keys.KeyError_ as exc:
        raise IdentityError(f"{path}: privateKey/publicKey: {exc}") from None
    if keys.public_key(private) != public:
        raise IdentityError(f"{path}: publicKey does not match privateKey")
    subnet = ula_prefix(cluster_id)
    return KubeSpanIdentity(
        IPv6Interface((eui64_address(subnet, mac), 128)), subnet, private, public
    )


def load_or_create_kubespan_identity(
    state_dir: str | Path, cluster_id: str, mac: str | bytes
) -> KubeSpanIdentity:
    """The node's KubeSpan identity; the keypair is created on first use only."""
    if not cluster_id:
        raise ValueError("cluster id is required for the KubeSpan address")
    parse_mac(mac)  # a bad MAC must fail before anything is written
    path = Path(state_dir) / KUBESPAN_IDENTITY_FILE

    def generate() -> dict:
        private = keys.generate_private_key()
        subnet = ula_prefix(cluster_id)
        return {
            "address": f"{eui64_address(subnet, mac)}/128",
            "subnet": str(subnet),
            "privateKey": keys.encode_key(private),
            "publicKey": keys.encode_key(keys.public_key(private)),
        }

    return _load_or_create(
        path, generate, lambda p, d: _parse_kubespan_identity(p, d, cluster_id, mac)
    )


# --- node id ------------------------------------------------------------------------------


def generate_node_id() -> str:
    return base62.encode(os.urandom(NODE_ID_SIZE))


def _parse_node_id(path: Path, data: dict) -> str:
    node_id = data.get("nodeId")
    if not isinstance(node_id, str) or not node_id:
        raise IdentityError(f"{path}: nodeId missing or not a string")
    try:
        base62.decode(node_id)
    except ValueError as exc:
        raise IdentityError(f"{path}: nodeId is not base62: {exc}") from None
    return node_id


def load_or_create_node_id(state_dir: str | Path) -> str:
    """The node's discovery id (affiliate id), created on first use only."""
    path = Path(state_dir) / NODE_IDENTITY_FILE
    return _load_or_create(path, lambda: {"nodeId": generate_node_id()}, _parse_node_id)


def read_node_id(state_dir: str | Path) -> str | None:
    """The node's discovery id if it has one (never creates it)."""
    path = Path(state_dir) / NODE_IDENTITY_FILE
    if not path.exists():
        return None
    return _parse_node_id(path, _load_yaml_mapping(path))
