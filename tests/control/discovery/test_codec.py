"""Affiliate decoding is tolerant as Talos's NewAffiliateSpec: a bad entry is skipped, the
affiliate stays. Checked on the codec and through a real client and service."""

from __future__ import annotations

from ipaddress import IPv6Address, ip_address, ip_network

import pytest

from control.affiliate import Affiliate
from control.discovery.cipher import AffiliateCipher, secret_key
from control.discovery.client import Backoff, DiscoveryClient
from control.discovery.codec import CodecError, decode_affiliate, encode_affiliate
from control.discovery.proto import affiliate_pb2 as cpb

from .conftest import Raw, make_affiliate, new_secret, run, target

KS_ADDRESS = IPv6Address("fd7f:175a:b97c:5602::4")


def raw_affiliate(**kubespan: object) -> cpb.Affiliate:
    """A well-formed affiliate message, for the tests to spoil one field of."""
    msg = cpb.Affiliate(
        node_id="n4",
        addresses=[ip_address("10.5.0.4").packed, ip_address("fd00:5::4").packed],
        hostname="n4.example",
        nodename="n4",
        machine_type="controlplane",
        operating_system="Talos (v1.14.0)",
    )
    msg.kubespan.public_key = "k"
    msg.kubespan.address = KS_ADDRESS.packed
    msg.kubespan.additional_addresses.add(ip=bytes([10, 244, 4, 0]), bits=24)
    msg.control_plane.api_server_port = 6443
    for field, value in kubespan.items():
        setattr(msg.kubespan, field, value)
    return msg


def decode(msg: cpb.Affiliate) -> tuple[Affiliate, list[str]]:
    reports: list[str] = []
    return decode_affiliate(msg.SerializeToString(), (), reports.append), reports


def test_a_bad_address_or_prefix_ip_is_skipped_not_the_affiliate() -> None:
    msg = raw_affiliate()
    msg.addresses.insert(1, b"\x0a\x05\x00")  # 3 bytes
    msg.addresses.append(b"")
    msg.kubespan.additional_addresses.add(ip=b"\x01" * 5, bits=8)
    msg.kubespan.exclude_advertised_addresses.add(ip=b"", bits=0)
    msg.kubespan.exclude_advertised_addresses.add(ip=bytes(16), bits=0)
    got, reports = decode(msg)
    assert got.addresses == (ip_address("10.5.0.4"), ip_address("fd00:5::4"))
    assert got.kubespan is not None and got.kubespan.address == KS_ADDRESS
    assert got.kubespan.additional_addresses == (ip_network("10.244.4.0/24"),)
    assert got.kubespan.exclude_advertised_networks == (ip_network("::/0"),)
    assert (got.hostname, got.nodename, got.machine_type) == ("n4.example", "n4", "controlplane")
    assert got.control_plane_api_port == 6443
    assert reports == [
        "n4: additional address [1]: IP must be 4 or 16 bytes, got 5: skipped",
        "n4: excluded network [0]: IP must be 4 or 16 bytes, got 0: skipped",
        "n4: address [1]: IP must be 4 or 16 bytes, got 3: skipped",
        "n4: address [3]: IP must be 4 or 16 bytes, got 0: skipped",
    ]


@pytest.mark.parametrize(
    "spoil, reason",
    [
        (
            lambda m: m.kubespan.additional_addresses.add(ip=bytes(4), bits=33),
            "additional address [1]: prefix length 33 out of range for 0.0.0.0",
        ),
        (
            lambda m: m.kubespan.exclude_advertised_addresses.add(ip=bytes(16), bits=129),
            "excluded network [0]: prefix length 129 out of range for ::",
        ),
        (
            lambda m: setattr(m.kubespan, "address", bytes([10, 0, 0, 1])),
            "kubespan address must be IPv6",
        ),
        (
            lambda m: setattr(m.kubespan, "address", b""),
            "kubespan address: IP must be 4 or 16 bytes, got 0",
        ),
    ],
    ids=["v4-bits", "v6-bits", "v4-kubespan-address", "no-kubespan-address"],
)
def test_what_talos_cannot_route_leaves_out_only_the_kubespan_part(spoil, reason: str) -> None:
    """Talos keeps these but then fails to build the peer's IP set and ignores the peer:
    the affiliate stays a member, without KubeSpan."""
    msg = raw_affiliate()
    spoil(msg)
    got, reports = decode(msg)
    assert got.kubespan is None
    assert got.addresses == (ip_address("10.5.0.4"), ip_address("fd00:5::4"))
    assert reports == [f"n4: {reason}: its KubeSpan part is left out"]


def test_out_of_range_api_port_is_dropped_alone() -> None:
    msg = raw_affiliate()
    msg.control_plane.api_server_port = 70000
    got, reports = decode(msg)
    assert got.control_plane_api_port is None and got.kubespan is not None
    assert reports == ["n4: control plane API port 70000 out of range: skipped"]


def test_no_affiliate_at_all_is_still_an_error() -> None:
    for blob in (b"\xff\xff", b"", cpb.Affiliate(hostname="x").SerializeToString()):
        with pytest.raises(CodecError):
            decode_affiliate(blob)


def test_default_report_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    msg = raw_affiliate()
    msg.addresses.append(b"\x01")
    decode_affiliate(msg.SerializeToString())
    assert [r.getMessage() for r in caplog.records if r.name == "control.discovery.codec"] == [
        "affiliate n4: address [2]: IP must be 4 or 16 bytes, got 1: skipped"
    ]


def test_client_keeps_an_affiliate_with_a_bad_entry(server) -> None:
    """Through the real service and client: the watcher sees the spoilt affiliate."""

    async def main() -> None:
        secret = new_secret()
        cipher = AffiliateCipher(secret_key(secret))
        watcher = DiscoveryClient(
            target(server), "tol", secret, "w", insecure=True, backoff=Backoff(0.05, 0.5)
        )
        watcher.start()
        try:
            msg = raw_affiliate()
            msg.addresses.insert(0, b"\x0a\x05\x00")
            async with Raw(server) as raw:
                await raw.update("tol", "n4", data=cipher.seal_data(msg.SerializeToString()))
                good = make_affiliate("good", 1)
                await raw.update("tol", "good", data=cipher.seal_data(encode_affiliate(good)))
            got = await watcher.wait_for(lambda t: {"n4", "good"} <= set(t), 20)
            assert got["n4"].addresses == (ip_address("10.5.0.4"), ip_address("fd00:5::4"))
            assert got["n4"].kubespan is not None
        finally:
            await watcher.close()

    run(main())
