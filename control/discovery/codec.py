"""control.affiliate.Affiliate <-> the sidero.discovery.client protobuf payloads.

An affiliate travels as two things: its data (an ``Affiliate`` message without
endpoints) and its KubeSpan endpoints (one ``Endpoint`` message each), because the
service merges endpoints separately. IP addresses are raw 4 or 16 bytes on the wire.

Decoding is tolerant the way Talos's (NewAffiliateSpec) is: an address or prefix whose
IP does not decode is skipped, not the affiliate. Two things Talos keeps but then
cannot build the peer's allowed IPs from (a KubeSpan address that is not an IPv6
address, a prefix length out of range) leave the affiliate without its KubeSpan part,
which is what Talos ends up with (it ignores that peer). Each skip is reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

from google.protobuf.message import DecodeError

from control.affiliate import Affiliate, KubeSpanInfo
from control.discovery.proto import affiliate_pb2 as cpb
from kubespan_dp.netutil import Address, IPAddress, IPNetwork

log = logging.getLogger(__name__)

Report = Callable[[str], None]


class CodecError(ValueError):
    """A payload that decrypted but does not describe a valid affiliate or endpoint."""


def _ip_from_bytes(raw: bytes, what: str) -> IPAddress:
    if len(raw) == 4:
        return IPv4Address(raw)
    if len(raw) == 16:
        return IPv6Address(raw)
    raise CodecError(f"{what}: IP must be 4 or 16 bytes, got {len(raw)}")


def _addresses(items, report: Report) -> tuple[IPAddress, ...]:
    out = []
    for i, raw in enumerate(items):
        try:
            out.append(_ip_from_bytes(raw, f"address [{i}]"))
        except CodecError as exc:
            report(f"{exc}: skipped")
    return tuple(out)


def _prefixes(items, what: str, report: Report) -> tuple[IPNetwork, ...]:
    """The prefixes whose IP decodes; CodecError if a length is out of range."""
    out = []
    for i, p in enumerate(items):
        try:
            ip = _ip_from_bytes(p.ip, f"{what} [{i}]")
        except CodecError as exc:
            report(f"{exc}: skipped")
            continue
        if p.bits > ip.max_prefixlen:
            raise CodecError(f"{what} [{i}]: prefix length {p.bits} out of range for {ip}")
        # strict=False: Talos sends the prefix as given, host bits and all.
        out.append(ip_network((ip, p.bits), strict=False))
    return tuple(out)


def _kubespan(ks, endpoints: tuple[Address, ...], report: Report) -> KubeSpanInfo:
    address = _ip_from_bytes(ks.address, "kubespan address")
    if not isinstance(address, IPv6Address):
        raise CodecError("kubespan address must be IPv6")
    return KubeSpanInfo(
        public_key=ks.public_key,
        address=address,
        additional_addresses=_prefixes(ks.additional_addresses, "additional address", report),
        endpoints=endpoints,
        exclude_advertised_networks=_prefixes(
            ks.exclude_advertised_addresses, "excluded network", report
        ),
    )


def encode_affiliate(affiliate: Affiliate) -> bytes:
    msg = cpb.Affiliate(
        node_id=affiliate.node_id,
        addresses=[a.packed for a in affiliate.addresses],
        hostname=affiliate.hostname,
        nodename=affiliate.nodename,
        machine_type=affiliate.machine_type,
        operating_system=affiliate.operating_system,
    )
    ks = affiliate.kubespan
    if ks is not None:
        msg.kubespan.public_key = ks.public_key
        msg.kubespan.address = ks.address.packed
        for net in ks.additional_addresses:
            msg.kubespan.additional_addresses.add(ip=net.network_address.packed, bits=net.prefixlen)
        for net in ks.exclude_advertised_networks:
            msg.kubespan.exclude_advertised_addresses.add(
                ip=net.network_address.packed, bits=net.prefixlen
            )
    if affiliate.control_plane_api_port is not None:
        msg.control_plane.api_server_port = affiliate.control_plane_api_port
    return msg.SerializeToString(deterministic=True)


def _log_report(message: str) -> None:
    log.warning("affiliate %s", message)


def decode_affiliate(
    data: bytes,
    endpoints: list[Address] | tuple[Address, ...] = (),
    report: Report | None = None,
) -> Affiliate:
    """Build an Affiliate from its plaintext data and its already-decoded endpoints.

    CodecError only when there is no affiliate at all (not a protobuf, no node id);
    entries that do not decode are left out and described to `report` (default: a
    warning in this module's log)."""
    report = report or _log_report
    msg = cpb.Affiliate()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise CodecError(f"affiliate data is not a valid protobuf: {exc}") from exc
    if not msg.node_id:
        raise CodecError("affiliate has no node id")

    def node_report(message: str) -> None:
        report(f"{msg.node_id}: {message}")

    kubespan = None
    if msg.HasField("kubespan"):
        try:
            kubespan = _kubespan(msg.kubespan, tuple(endpoints), node_report)
        except CodecError as exc:
            node_report(f"{exc}: its KubeSpan part is left out")
    api_port = msg.control_plane.api_server_port if msg.HasField("control_plane") else None
    if api_port is not None and api_port > 65535:
        node_report(f"control plane API port {api_port} out of range: skipped")
        api_port = None
    return Affiliate(
        node_id=msg.node_id,
        hostname=msg.hostname,
        nodename=msg.nodename,
        machine_type=msg.machine_type,
        operating_system=msg.operating_system,
        addresses=_addresses(msg.addresses, node_report),
        kubespan=kubespan,
        control_plane_api_port=api_port,
    )


def encode_endpoint(endpoint: Address) -> bytes:
    host, port = endpoint
    if not 0 < port < 65536:
        raise ValueError(f"endpoint port out of range: {port}")
    return cpb.Endpoint(ip=ip_address(host).packed, port=port).SerializeToString(deterministic=True)


def decode_endpoint(data: bytes) -> Address:
    msg = cpb.Endpoint()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise CodecError(f"endpoint is not a valid protobuf: {exc}") from exc
    ip = _ip_from_bytes(msg.ip, "endpoint")
    if not 0 < msg.port < 65536:
        raise CodecError(f"endpoint port out of range: {msg.port}")
    return (str(ip), msg.port)
