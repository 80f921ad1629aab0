"""Wire compatibility with Sidero's discovery API, checked without our generated code.

The messages are built and read here field by field from the numbers in
siderolabs/discovery-api (server/cluster.proto, client/affiliate.proto), with a
protobuf encoder written in this file, and the encryption is redone here with bare
AES primitives. If our .proto files, codec or cipher drifted from the reference
layout, these tests would disagree with them.
"""

from __future__ import annotations

import asyncio
import base64
import os
from ipaddress import IPv6Address, ip_address, ip_network
from typing import Any

import grpc
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import Message

from control.affiliate import Affiliate, KubeSpanInfo
from control.discovery.client import DiscoveryClient
from control.discovery.codec import (
    decode_affiliate,
    decode_endpoint,
    encode_affiliate,
    encode_endpoint,
)
from control.discovery.proto import affiliate_pb2 as cpb
from control.discovery.proto import cluster_pb2 as pb

from .conftest import make_affiliate, run, target

# --- a minimal protobuf wire codec (varint = 0, length-delimited = 2) -------------------


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 two's complement, as protobuf does
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def f_varint(field: int, value: int) -> bytes:
    return varint(field << 3 | 0) + varint(value)


def f_bytes(field: int, value: bytes | str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return varint(field << 3 | 2) + varint(len(raw)) + raw


def parse(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field, wire type, value) in order; value is int for varints, bytes otherwise."""
    out: list[tuple[int, int, int | bytes]] = []
    i = 0

    def read_varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    while i < len(buf):
        key = read_varint()
        field, wt = key >> 3, key & 7
        if wt == 0:
            out.append((field, wt, read_varint()))
        elif wt == 2:
            n = read_varint()
            out.append((field, wt, buf[i : i + n]))
            i += n
        else:
            raise AssertionError(f"unexpected wire type {wt}")
    return out


def fields(buf: bytes) -> dict[int, list[Any]]:
    """Values by field number. Each is an int (varint) or bytes (length-delimited): the
    tests know which from the field number, so they are typed Any, not int | bytes."""
    d: dict[int, list[Any]] = {}
    for field, _, value in parse(buf):
        d.setdefault(field, []).append(value)
    return d


# --- reference encryption, redone with bare primitives -----------------------------------

KEY = bytes(range(32))
SECRET = base64.b64encode(KEY).decode()


def ref_seal_data(plain: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(KEY).encrypt(nonce, plain, None)


def ref_open_data(sealed: bytes) -> bytes:
    return AESGCM(KEY).decrypt(sealed[:12], sealed[12:], None)


def ref_seal_endpoint(pb_bytes: bytes) -> bytes:
    framed = bytes([len(pb_bytes)]) + pb_bytes
    framed += b"\x00" * (-len(framed) % 16)
    enc = Cipher(algorithms.AES(KEY), modes.ECB()).encryptor()
    return enc.update(framed) + enc.finalize()


def ref_open_endpoint(sealed: bytes) -> bytes:
    dec = Cipher(algorithms.AES(KEY), modes.ECB()).decryptor()
    framed = dec.update(sealed) + dec.finalize()
    return framed[1 : 1 + framed[0]]


# --- a Talos-shaped affiliate, byte by byte -----------------------------------------------


def talos_affiliate_bytes() -> bytes:
    prefix = f_bytes(1, bytes([10, 244, 3, 0])) + f_varint(2, 24)
    excluded = f_bytes(1, bytes(4)) + f_varint(2, 0)
    kubespan = (
        f_bytes(1, "PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=")
        + f_bytes(2, IPv6Address("fd50:8d60:4238:6302:f857:23ff:fe21:d1e0").packed)
        + f_bytes(3, prefix)
        + f_bytes(4, excluded)
    )
    return (
        f_bytes(1, "7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC")
        + f_bytes(2, bytes([192, 168, 3, 4]))
        + f_bytes(2, IPv6Address("2001:db8::1").packed)
        + f_bytes(3, "foo.com")
        + f_bytes(4, "bar")
        + f_bytes(5, "controlplane")
        + f_bytes(6, "Talos (v1.9.0)")
        + f_bytes(7, kubespan)
        + f_bytes(8, f_varint(1, 6443))
    )


TALOS_EXPECTED = Affiliate(
    node_id="7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC",
    hostname="foo.com",
    nodename="bar",
    machine_type="controlplane",
    operating_system="Talos (v1.9.0)",
    addresses=(ip_address("192.168.3.4"), ip_address("2001:db8::1")),
    kubespan=KubeSpanInfo(
        public_key="PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=",
        address=IPv6Address("fd50:8d60:4238:6302:f857:23ff:fe21:d1e0"),
        additional_addresses=(ip_network("10.244.3.0/24"),),
        endpoints=(("10.0.0.2", 51820),),
        exclude_advertised_networks=(ip_network("0.0.0.0/0"),),
    ),
    control_plane_api_port=6443,
)


def test_reference_affiliate_bytes_decode_under_our_codec():
    ep = f_bytes(1, bytes([10, 0, 0, 2])) + f_varint(2, 51820)
    got = decode_affiliate(talos_affiliate_bytes(), [decode_endpoint(ep)])
    assert got == TALOS_EXPECTED


def test_our_affiliate_encoding_reads_back_field_by_field():
    enc = fields(encode_affiliate(TALOS_EXPECTED))
    assert enc[1] == [TALOS_EXPECTED.node_id.encode()]
    assert enc[2] == [bytes([192, 168, 3, 4]), IPv6Address("2001:db8::1").packed]
    assert (enc[3], enc[4], enc[5], enc[6]) == (
        [b"foo.com"],
        [b"bar"],
        [b"controlplane"],
        [b"Talos (v1.9.0)"],
    )
    ks = fields(enc[7][0])
    assert ks[1] == [b"PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY="]
    assert ks[2] == [IPv6Address("fd50:8d60:4238:6302:f857:23ff:fe21:d1e0").packed]
    assert fields(ks[3][0]) == {1: [bytes([10, 244, 3, 0])], 2: [24]}
    # proto3 omits zero scalars: a /0 prefix carries only its IP.
    assert fields(ks[4][0]) == {1: [bytes(4)]}
    assert fields(enc[8][0]) == {1: [6443]}
    # Endpoints are not part of the data message; they travel separately.
    assert set(enc) == {1, 2, 3, 4, 5, 6, 7, 8}


def test_endpoint_message_both_ways():
    ours = encode_endpoint(("2001:db8::5", 51820))
    assert fields(ours) == {1: [IPv6Address("2001:db8::5").packed], 2: [51820]}
    assert decode_endpoint(f_bytes(1, bytes([203, 0, 113, 9])) + f_varint(2, 443)) == (
        "203.0.113.9",
        443,
    )


def test_server_messages_encode_as_the_reference_layout():
    req = pb.AffiliateUpdateRequest(
        cluster_id="cid",
        affiliate_id="aid",
        affiliate_data=b"DATA",
        affiliate_endpoints=[b"E1", b"E2"],
    )
    req.ttl.seconds = 1800
    assert fields(req.SerializeToString()) == {
        1: [b"cid"],
        2: [b"aid"],
        3: [b"DATA"],
        4: [b"E1", b"E2"],
        5: [f_varint(1, 1800)],
    }
    # Hand-built messages decode under our generated classes.
    hello = pb.HelloResponse.FromString(
        f_bytes(1, f_bytes(1, "other:443")) + f_bytes(2, b"\x7f\x00\x00\x01")
    )
    assert hello.redirect.endpoint == "other:443" and hello.client_ip == b"\x7f\x00\x00\x01"
    watch = pb.WatchResponse.FromString(
        f_bytes(1, f_bytes(1, "x") + f_bytes(2, b"D") + f_bytes(3, b"E")) + f_varint(2, 1)
    )
    assert (
        watch.deleted
        and watch.affiliates[0].id == "x"
        and list(watch.affiliates[0].endpoints) == [b"E"]
    )
    assert fields(pb.HelloRequest(cluster_id="c", client_version="v").SerializeToString()) == {
        1: [b"c"],
        2: [b"v"],
    }
    assert fields(
        pb.AffiliateDeleteRequest(cluster_id="c", affiliate_id="a").SerializeToString()
    ) == {1: [b"c"], 2: [b"a"]}
    assert fields(pb.ListRequest(cluster_id="c").SerializeToString()) == {1: [b"c"]}
    assert fields(pb.WatchRequest(cluster_id="c").SerializeToString()) == {1: [b"c"]}
    listed = fields(
        pb.ListResponse(
            affiliates=[pb.Affiliate(id="i", data=b"d", endpoints=[b"e"])]
        ).SerializeToString()
    )
    assert fields(listed[1][0]) == {1: [b"i"], 2: [b"d"], 3: [b"e"]}


def test_affiliate_data_field_presence_is_on_the_wire():
    # An update with no data (harvested endpoints for another node) must leave field 3 out;
    # one with empty data must carry it (proto3 `optional`).
    absent = pb.AffiliateUpdateRequest(cluster_id="c", affiliate_id="a")
    empty = pb.AffiliateUpdateRequest(cluster_id="c", affiliate_id="a", affiliate_data=b"")
    assert 3 not in fields(absent.SerializeToString())
    assert fields(empty.SerializeToString())[3] == [b""]


async def read_bytes(stream: grpc.aio.UnaryStreamCall[bytes, bytes]) -> bytes:
    message = await stream.read()
    assert isinstance(message, bytes), message  # not grpc.aio.EOF
    return message


def test_hand_built_reference_client_interoperates_with_our_service_and_client(server):
    """A 'Talos' speaking raw bytes on the real gRPC paths, next to our DiscoveryClient."""

    def identity(raw: bytes) -> bytes:  # raw bytes in, raw bytes out
        return raw

    async def main() -> None:
        ours = DiscoveryClient(target(server), "wire", SECRET, "ours", insecure=True)
        ours.set_local(make_affiliate("ours", 7))
        ours.start()
        try:
            async with grpc.aio.insecure_channel(target(server)) as ch:

                def call(method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
                    return ch.unary_unary(
                        f"/sidero.discovery.server.Cluster/{method}", identity, identity
                    )

                hello = fields(
                    await call("Hello")(f_bytes(1, "wire") + f_bytes(2, "v1.9.0"), timeout=10)
                )
                assert hello == {2: [b"\x7f\x00\x00\x01"]}
                ep = ref_seal_endpoint(f_bytes(1, bytes([10, 0, 0, 2])) + f_varint(2, 51820))
                update = (
                    f_bytes(1, "wire")
                    + f_bytes(2, "talos-node")
                    + f_bytes(3, ref_seal_data(talos_affiliate_bytes()))
                    + f_bytes(4, ep)
                    + f_bytes(5, f_varint(1, 1800))
                )
                assert await call("AffiliateUpdate")(update, timeout=10) == b""
                # Our client decrypts and decodes the hand-built affiliate exactly.
                got = await ours.wait_for(lambda t: "talos-node" in t, 20)
                assert got["talos-node"] == TALOS_EXPECTED
                # And the reference side can read what our client published.
                # (our client's update may land after its watch saw talos-node: wait)
                deadline = asyncio.get_running_loop().time() + 20
                while True:
                    listed = fields(await call("List")(f_bytes(1, "wire"), timeout=10))
                    by_id = {fields(a)[1][0]: fields(a) for a in listed[1]}
                    if b"ours" in by_id or asyncio.get_running_loop().time() > deadline:
                        break
                    await asyncio.sleep(0.05)
                mine = by_id[b"ours"]
                plain = fields(ref_open_data(mine[2][0]))
                assert plain[1] == [b"ours"] and plain[3] == [b"ours.example"]
                assert fields(ref_open_endpoint(mine[3][0])) == {
                    1: [bytes([10, 5, 0, 7])],
                    2: [51820],
                }
                # Deterministic endpoints: our sealing of the same endpoint equals the reference's.
                assert ours._cipher.seal_endpoint(encode_endpoint(("10.0.0.2", 51820))) == ep
                # Watch over raw bytes: the first message is the snapshot with both affiliates.
                stream = ch.unary_stream(
                    "/sidero.discovery.server.Cluster/Watch", identity, identity
                )(f_bytes(1, "wire"))
                snap = fields(await read_bytes(stream))
                assert sorted(fields(a)[1][0] for a in snap[1]) == [b"ours", b"talos-node"]
                assert 2 not in snap  # deleted=false is omitted
                await call("AffiliateDelete")(
                    f_bytes(1, "wire") + f_bytes(2, "talos-node"), timeout=10
                )
                gone = fields(await read_bytes(stream))
                assert gone[2] == [1] and fields(gone[1][0]) == {1: [b"talos-node"]}
                stream.cancel()
                await ours.wait_for(lambda t: "talos-node" not in t, 20)
        finally:
            await ours.close()

    run(main())


def test_storage_snapshot_layout():
    """Our snapshot file uses discovery-service's storage layout (ttl = field 5 / 3)."""
    from control.discovery.state import State

    state = State()
    state.update("c", "a", b"D", [b"E" * 16], 100.0, now=0.0)
    snap = fields(state.export_snapshot(now=0.0))
    cluster = fields(snap[1][0])
    assert cluster[1] == [b"c"]
    aff = fields(cluster[2][0])
    assert aff[1] == [b"a"] and aff[3] == [b"D"] and fields(aff[5][0]) == {1: [100]}
    ep = fields(aff[4][0])
    assert ep[2] == [b"E" * 16] and fields(ep[3][0]) == {1: [100]}
    # An old-style snapshot (absolute expiration, field 2 / 1) restores too.
    import time

    wall = time.time()
    old_ep = f_bytes(1, f_varint(1, int(wall) + 50)) + f_bytes(2, b"F" * 16)
    old_aff = (
        f_bytes(1, "b")
        + f_bytes(2, f_varint(1, int(wall) + 50))
        + f_bytes(3, b"X")
        + f_bytes(4, old_ep)
    )
    blob = f_bytes(1, f_bytes(1, "old") + f_bytes(2, old_aff))
    restored = State()
    assert restored.import_snapshot(blob, now=1000.0, wall_now=wall) == 1
    [view] = restored.list("old")
    assert (view.id, view.data, view.endpoints) == ("b", b"X", (b"F" * 16,))


def test_generated_python_classes_match_the_reference_field_numbers():
    """Our .proto field numbers, as seen through the generated descriptors."""
    want: dict[type[Message], dict[str, int]] = {
        cpb.Affiliate: {
            "node_id": 1,
            "addresses": 2,
            "hostname": 3,
            "nodename": 4,
            "machine_type": 5,
            "operating_system": 6,
            "kubespan": 7,
            "control_plane": 8,
        },
        cpb.KubeSpan: {
            "public_key": 1,
            "address": 2,
            "additional_addresses": 3,
            "exclude_advertised_addresses": 4,
        },
        cpb.IPPrefix: {"ip": 1, "bits": 2},
        cpb.Endpoint: {"ip": 1, "port": 2},
        cpb.ControlPlane: {"api_server_port": 1},
        pb.Affiliate: {"id": 1, "data": 2, "endpoints": 3},
        pb.HelloRequest: {"cluster_id": 1, "client_version": 2},
        pb.HelloResponse: {"redirect": 1, "client_ip": 2},
        pb.RedirectMessage: {"endpoint": 1},
        pb.AffiliateUpdateRequest: {
            "cluster_id": 1,
            "affiliate_id": 2,
            "affiliate_data": 3,
            "affiliate_endpoints": 4,
            "ttl": 5,
        },
        pb.AffiliateDeleteRequest: {"cluster_id": 1, "affiliate_id": 2},
        pb.ListRequest: {"cluster_id": 1},
        pb.ListResponse: {"affiliates": 1},
        pb.WatchRequest: {"cluster_id": 1},
        pb.WatchResponse: {"affiliates": 1, "deleted": 2},
    }
    for cls, numbers in want.items():
        assert {f.name: f.number for f in cls.DESCRIPTOR.fields} == numbers, (
            cls.DESCRIPTOR.full_name
        )
    assert pb.DESCRIPTOR.package == "sidero.discovery.server"
    assert cpb.DESCRIPTOR.package == "sidero.discovery.client"
    assert [m.name for m in pb.DESCRIPTOR.services_by_name["Cluster"].methods] == [
        "Hello",
        "AffiliateUpdate",
        "AffiliateDelete",
        "List",
        "Watch",
    ]
