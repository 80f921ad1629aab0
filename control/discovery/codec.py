"""control.affiliate.Affiliate <-> the sidero.discovery.client protobuf payloads.

An affiliate travels as two things: its data (an ``Affiliate`` message without
endpoints) and its KubeSpan endpoints (one ``Endpoint`` message each), because the
service merges endpoints separately. IP addresses are raw 4 or 16 bytes on the wire.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

from google.protobuf.message import DecodeError

from control.affiliate import Affiliate, KubeSpanInfo
from control.discovery.proto import affiliate_pb2 as cpb
from kubespan_dp.netutil import Address, IPAddress, IPNetwork


class CodecError(ValueError):
    """A payload that decrypted but does not describe a valid affiliate or endpoint."""


def _ip_from_bytes(raw: bytes, what: str) -> IPAddress:
    if len(raw) == 4:
        return IPv4Address(raw)
    if len(raw) == 16:
        return IPv6Address(raw)
    raise CodecError(f"{what}: IP must be 4 or 16 bytes, got {len(raw)}")


def _prefixes(items, what: str) -> tuple[IPNetwork, ...]:
    out = []
    for p in items:
        ip = _ip_from_bytes(p.ip, what)
        try:
            # strict=False: Talos sends the prefix as given, host bits and all.
            out.append(ip_network((ip, p.bits), strict=False))
        except ValueError as exc:
            raise CodecError(f"{what}: {exc}") from exc
    return tuple(out)


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


def decode_affiliate(data: bytes, endpoints: list[Address] | tuple[Address, ...] = ()) -> Affiliate:
    """Build an Affiliate from its plaintext data and its already-decoded endpoints."""
    msg = cpb.Affiliate()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise CodecError(f"affiliate data is not a valid protobuf: {exc}") from exc
    if not msg.node_id:
        raise CodecError("affiliate has no node id")
    kubespan = None
    if msg.HasField("kubespan"):
        ks = msg.kubespan
        address = _ip_from_bytes(ks.address, "kubespan address")
        if not isinstance(address, IPv6Address):
            raise CodecError("kubespan address must be IPv6")
        kubespan = KubeSpanInfo(
            public_key=ks.public_key,
            address=address,
            additional_addresses=_prefixes(ks.additional_addresses, "additional address"),
            endpoints=tuple(endpoints),
            exclude_advertised_networks=_prefixes(
                ks.exclude_advertised_addresses, "excluded network"
            ),
        )
    api_port = msg.control_plane.api_server_port if msg.HasField("control_plane") else None
    if api_port is not None and api_port > 65535:
        raise CodecError("control plane API port out of range")
    return Affiliate(
        node_id=msg.node_id,
        hostname=msg.hostname,
        nodename=msg.nodename,
        machine_type=msg.machine_type,
        operating_system=msg.operating_system,
        addresses=tuple(_ip_from_bytes(a, "address") for a in msg.addresses),
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
