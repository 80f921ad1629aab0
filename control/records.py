"""Typed records of KubeSpan state, printable like `talosctl get`.

Each record has a namespace, a type, an ID, a version (bumped by RecordStore when the
spec changes) and a spec whose keys are spelled as Talos's YAML tags. The table view
has Talos's columns: NODE NAMESPACE TYPE ID VERSION, then the resource's own print
columns (values of lists rendered as JSON, as talosctl's jsonpath does).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import yaml

from control.identity import KubeSpanIdentity
from control.peerspec import PeerSpec
from kubespan_dp import netutil
from kubespan_dp.netutil import Address

NAMESPACE = "kubespan"
REDACTED = "(redacted)"


@dataclass(frozen=True)
class Kind:
    type: str  # full resource type, e.g. KubeSpanPeerSpecs.kubespan.talos.dev
    display: str  # TYPE column
    columns: tuple[tuple[str, str], ...]  # (header, spec key)
    aliases: tuple[str, ...]  # names accepted by `get`


IDENTITY = Kind(
    "KubeSpanIdentities.kubespan.talos.dev",
    "KubeSpanIdentity",
    (("ADDRESS", "address"), ("PUBLICKEY", "publicKey")),
    ("kubespanidentities", "kubespanidentity"),
)
PEER_SPEC = Kind(
    "KubeSpanPeerSpecs.kubespan.talos.dev",
    "KubeSpanPeerSpec",
    (("LABEL", "label"), ("ENDPOINTS", "endpoints")),
    ("kubespanpeerspecs", "kubespanpeerspec"),
)
PEER_STATUS = Kind(
    "KubeSpanPeerStatuses.kubespan.talos.dev",
    "KubeSpanPeerStatus",
    (
        ("LABEL", "label"),
        ("ENDPOINT", "endpoint"),
        ("STATE", "state"),
        ("RX", "receiveBytes"),
        ("TX", "transmitBytes"),
        ("PATH", "path"),  # ours, after Talos's columns: direct or through a relay
    ),
    ("kubespanpeerstatuses", "kubespanpeerstatus"),
)
ENDPOINT = Kind(
    "KubeSpanEndpoints.kubespan.talos.dev",
    "KubeSpanEndpoint",
    (("ENDPOINT", "endpoint"), ("AFFILIATE ID", "affiliateID")),
    ("kubespanendpoints", "kubespanendpoint"),
)
KINDS = (IDENTITY, PEER_SPEC, PEER_STATUS, ENDPOINT)


def kind_by_name(name: str) -> Kind:
    lowered = name.lower()
    for kind in KINDS:
        if (
            lowered in kind.aliases
            or lowered == kind.type.lower()
            or lowered == kind.display.lower()
        ):
            return kind
    raise KeyError(f"unknown resource type {name!r}")


@dataclass
class Record:
    kind: Kind
    id: str
    spec: dict[str, Any]
    version: int = 1
    namespace: str = NAMESPACE
    node: str = field(default="", compare=False)


# --- formatting helpers ---------------------------------------------------------------------


def format_endpoint(endpoint: Address | None) -> str:
    return "" if endpoint is None else netutil.format_endpoint(endpoint)


def format_time(when: datetime | float | None) -> str:
    """RFC 3339 in UTC; the zero time (never) as Go prints it."""
    if when is None:
        return "0001-01-01T00:00:00Z"
    if not isinstance(when, datetime):
        when = datetime.fromtimestamp(when, tz=UTC)
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- constructors ---------------------------------------------------------------------------


def identity_record(identity: KubeSpanIdentity, *, reveal_private_key: bool = False) -> Record:
    return Record(
        IDENTITY,
        "local",
        {
            "address": str(identity.address),
            "subnet": str(identity.subnet),
            "privateKey": identity.private_key_b64 if reveal_private_key else REDACTED,
            "publicKey": identity.public_key_b64,
        },
    )


def peer_spec_record(spec: PeerSpec) -> Record:
    return Record(
        PEER_SPEC,
        spec.public_key,
        {
            "address": str(spec.address),
            "allowedIPs": [str(net) for net in spec.allowed_ips],
            "endpoints": [format_endpoint(e) for e in spec.endpoints],
            "label": spec.label,
        },
    )


def peer_status_record(
    public_key: str,
    *,
    label: str,
    state: str,
    endpoint: Address | None,
    rx_bytes: int = 0,
    tx_bytes: int = 0,
    last_handshake: datetime | float | None = None,
    last_used_endpoint: Address | None = None,
    last_endpoint_change: datetime | float | None = None,
    relayed: bool = False,
) -> Record:
    """`relayed`: the endpoint is a relay's (control.relay), so the path is "relayed"."""
    if state not in ("unknown", "up", "down"):
        raise ValueError(f"peer state must be unknown, up or down, not {state!r}")
    return Record(
        PEER_STATUS,
        public_key,
        {
            "endpoint": format_endpoint(endpoint),
            "label": label,
            "state": state,
            "receiveBytes": rx_bytes,
            "transmitBytes": tx_bytes,
            "lastHandshakeTime": format_time(last_handshake),
            "lastUsedEndpoint": format_endpoint(last_used_endpoint),
            "lastEndpointChange": format_time(last_endpoint_change),
            "path": "" if endpoint is None else "relayed" if relayed else "direct",
        },
    )


def endpoint_record(public_key: str, affiliate_id: str, endpoint: Address) -> Record:
    return Record(
        ENDPOINT, public_key, {"affiliateID": affiliate_id, "endpoint": format_endpoint(endpoint)}
    )


# --- store ----------------------------------------------------------------------------------


class RecordStore:
    """Current records by (type, id); a changed spec bumps the version."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], Record] = {}

    def put(self, record: Record) -> Record:
        key = (record.kind.type, record.id)
        old = self._records.get(key)
        if old is not None:
            record.version = old.version + (old.spec != record.spec)
        self._records[key] = record
        return record

    def replace_kind(self, kind: Kind, records: Iterable[Record]) -> None:
        """Make the records of one kind exactly these (others of that kind removed)."""
        keep = set()
        for record in records:
            self.put(record)
            keep.add(record.id)
        for key in [k for k in self._records if k[0] == kind.type and k[1] not in keep]:
            del self._records[key]

    def list(self, kind: Kind) -> list[Record]:
        return sorted((r for r in self._records.values() if r.kind is kind), key=lambda r: r.id)

    def get(self, kind: Kind, record_id: str) -> Record | None:
        return self._records.get((kind.type, record_id))


# --- rendering ------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def render_table(records: Sequence[Record], kind: Kind, node: str = "") -> str:
    """talosctl's table: tab-aligned columns, three spaces of padding."""
    rows = [["NODE", "NAMESPACE", "TYPE", "ID", "VERSION"] + [h for h, _ in kind.columns]]
    for r in records:
        rows.append(
            [r.node or node, r.namespace, kind.display, r.id, str(r.version)]
            + [_cell(r.spec.get(key, "")) for _, key in kind.columns]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i] + 3) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _document(record: Record, node: str) -> dict[str, Any]:
    return {
        "node": record.node or node,
        "metadata": {
            "namespace": record.namespace,
            "type": record.kind.type,
            "id": record.id,
            "version": record.version,
            "phase": "running",
        },
        "spec": record.spec,
    }


def render_yaml(records: Sequence[Record], node: str = "") -> str:
    return "---\n".join(yaml.safe_dump(_document(r, node), sort_keys=False) for r in records)


def render_json(records: Sequence[Record], node: str = "") -> str:
    """One JSON object per record, as `talosctl get -o json` prints them."""
    return "".join(json.dumps(_document(r, node), indent=4) + "\n" for r in records)


def render(records: Sequence[Record], kind: Kind, output: str = "table", node: str = "") -> str:
    if output == "table":
        return render_table(records, kind, node)
    if output == "yaml":
        return render_yaml(records, node)
    if output == "json":
        return render_json(records, node)
    raise ValueError(f"output must be table, yaml or json, not {output!r}")
