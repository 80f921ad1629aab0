"""End to end: our service in-process on loopback, several DiscoveryClients in two clusters."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from ipaddress import IPv4Address

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from control.affiliate import Affiliate
from control.discovery.cipher import AffiliateCipher, secret_key
from control.discovery.client import Backoff, DiscoveryClient
from control.discovery.codec import decode_affiliate, encode_affiliate, encode_endpoint
from tests.promtext import key, samples

from .conftest import Raw, endpoints_of, eventually, make_affiliate, new_secret, run, target


def fast() -> Backoff:
    """A short reconnect backoff; one per client (a Backoff keeps state)."""
    return Backoff(initial=0.05, maximum=0.5)


def client(server, cluster: str, secret: str, name: str, **kw) -> DiscoveryClient:
    kw.setdefault("backoff", fast())
    return DiscoveryClient(target(server), cluster, secret, name, insecure=True, **kw)


@contextlib.asynccontextmanager
async def running(*clients: DiscoveryClient) -> AsyncIterator[None]:
    """Start the clients; close them however the block ends (registrations stay)."""
    for c in clients:
        c.start()
    try:
        yield
    finally:
        for c in clients:
            await c.close()


def test_two_clusters_each_sees_the_others_decrypted_not_itself_not_the_other_cluster(server):
    async def main() -> None:
        sx, sy = new_secret(), new_secret()
        names_x, names_y = ["a", "b", "c"], ["d", "e"]
        clients = {n: client(server, "cluster-x", sx, n) for n in names_x}
        clients |= {n: client(server, "cluster-y", sy, n) for n in names_y}
        for i, (n, c) in enumerate(clients.items(), start=1):
            c.set_local(make_affiliate(n, i))
        expected = {n: make_affiliate(n, i) for i, n in enumerate(clients, start=1)}
        async with running(*clients.values()):
            for members in (names_x, names_y):
                for n in members:
                    want = {m: expected[m] for m in members if m != n}

                    def all_others(
                        t: dict[str, Affiliate], want: dict[str, Affiliate] = want
                    ) -> bool:
                        return t == want

                    got = await clients[n].wait_for(all_others, 20)
                    assert got == want  # decrypted and decoded field by field
                    assert n not in got
            assert clients["a"].public_ip == IPv4Address("127.0.0.1")
            # Others' data can arrive before a client's own publish returns: wait, then check.
            await eventually(lambda: all(c.connected for c in clients.values()), "all connected")

    run(main())


def test_updates_and_deletions_arrive_through_watch(server):
    async def main() -> None:
        s = new_secret()
        a, b, c = (client(server, "k", s, n) for n in "abc")
        a.set_local(make_affiliate("a", 1))
        b.set_local(make_affiliate("b", 2))
        seen: list[set[str]] = []
        c.on_change = lambda table: seen.append(set(table))
        async with running(a, b, c):
            await c.wait_for(lambda t: set(t) == {"a", "b"}, 20)
            # a changes: hostname and a new endpoint; c sees it without polling.
            moved = replace(
                make_affiliate("a", 1, endpoints=(("192.0.2.7", 51820),)), hostname="a-renamed"
            )
            a.set_local(moved)
            got = await c.wait_for(
                lambda t: t.get("a") is not None and t["a"].hostname == "a-renamed", 20
            )
            # Endpoints merge on the service: the old one stays until it expires.
            assert set(endpoints_of(got["a"])) == {("10.5.0.1", 51820), ("192.0.2.7", 51820)}
            # a reports an endpoint it saw working for b (harvesting): merged into b.
            a.set_local(moved, other_endpoints={"b": [("198.51.100.2", 51820)]})
            await c.wait_for(lambda t: ("198.51.100.2", 51820) in endpoints_of(t["b"]), 20)
            # b leaves: deleted on the service, c sees it go.
            await b.close(leave=True)
            await c.wait_for(lambda t: set(t) == {"a"}, 20)
            assert {"a", "b"} in seen and seen[-1] == {"a"}

    run(main())


def test_a_change_made_while_a_publish_is_in_flight_is_published(make_server):
    # Two tokens: Hello and Watch pass, the first publish waits 0.5 s for its token.
    server = make_server(rate=2.0, burst=2)

    async def main() -> None:
        s = new_secret()
        a = client(server, "fl", s, "a")
        a.set_local(make_affiliate("a", 1))
        cipher = AffiliateCipher(secret_key(s))

        def stored_hostname() -> str | None:
            views = server.run(lambda: server.store.list("fl"))
            return decode_affiliate(cipher.open_data(views[0].data)).hostname if views else None

        async with running(a):
            await eventually(lambda: server.run(server.store.stats).subscriptions == 1, "watch")
            a.set_local(replace(make_affiliate("a", 1), hostname="changed-in-flight"))
            for _ in range(400):
                if await asyncio.to_thread(stored_hostname) == "changed-in-flight":
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the change made during the first publish never arrived")

    run(main())


def test_affiliate_expires_after_ttl_and_watchers_see_it_deleted(server):
    async def main() -> None:
        s = new_secret()
        cipher = AffiliateCipher(secret_key(s))
        watcher = client(server, "t", s, "w")
        async with running(watcher):
            async with Raw(server) as raw:
                await watcher.wait_for(lambda t: True, 20)
                data = cipher.seal_data(encode_affiliate(make_affiliate("short", 3)))
                ep_old = cipher.seal_endpoint(encode_endpoint(("10.5.0.3", 51820)))
                ep_new = cipher.seal_endpoint(encode_endpoint(("10.5.0.33", 51820)))
                # One endpoint with a 1 s TTL, then data + another endpoint for 3 s.
                await raw.update("t", "short", data=None, endpoints=[ep_old], ttl=1.0)
                await raw.update("t", "short", data=data, endpoints=[ep_new], ttl=3.0)
                got = await watcher.wait_for(lambda t: "short" in t, 10)
                assert set(endpoints_of(got["short"])) == {
                    ("10.5.0.3", 51820),
                    ("10.5.0.33", 51820),
                }
                # Per-endpoint expiry: the 1 s endpoint goes first, the affiliate stays.
                got = await watcher.wait_for(
                    lambda t: "short" in t and len(endpoints_of(t["short"])) == 1, 10
                )
                assert endpoints_of(got["short"]) == (("10.5.0.33", 51820),)
                await watcher.wait_for(lambda t: "short" not in t, 10)
                assert await raw.list("t") == {}

    run(main())


def test_restart_from_snapshot_clients_see_same_affiliates_without_reregistering(
    make_memory_server, tmp_path
):
    path = tmp_path / "state.binpb"
    s = new_secret()
    first = make_memory_server(snapshot_path=str(path), snapshot_interval=3600)

    async def publish() -> dict:
        cs = [client(first, "snap", s, n) for n in "ab"]
        for i, c in enumerate(cs, start=1):
            c.set_local(make_affiliate(c.affiliate_id, i))
            c.start()
        await cs[0].wait_for(lambda t: "b" in t, 20)
        await cs[1].wait_for(lambda t: "a" in t, 20)
        for c in cs:
            await c.close(leave=False)  # gone without deleting: only the snapshot remembers
        async with Raw(first) as raw:
            return await raw.list("snap")

    before = run(publish())
    first.stop()
    assert path.exists() and not (tmp_path / "state.binpb.tmp").exists()
    second = make_memory_server(snapshot_path=str(path))

    async def observe() -> None:
        async with Raw(second) as raw:
            assert await raw.list("snap") == before  # same blobs, byte for byte
        watcher = client(second, "snap", s, "fresh-node")  # publishes nothing
        async with running(watcher):
            got = await watcher.wait_for(lambda t: set(t) == {"a", "b"}, 20)
            assert got == {"a": make_affiliate("a", 1), "b": make_affiliate("b", 2)}

    run(observe())


def test_snapshot_written_periodically(make_memory_server, tmp_path):
    path = tmp_path / "periodic.binpb"
    server = make_memory_server(snapshot_path=str(path), snapshot_interval=0.2)

    async def main() -> None:
        async with Raw(server) as raw:
            await raw.update("p", "x", data=b"blob")
        for _ in range(100):
            if path.exists() and b"blob" in path.read_bytes():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("periodic snapshot never written")

    run(main())


def test_corrupt_snapshot_is_kept_aside_and_service_starts_empty(make_memory_server, tmp_path):
    path = tmp_path / "bad.binpb"
    path.write_bytes(b"\xff\xff\xff garbage")
    server = make_memory_server(snapshot_path=str(path))
    assert (tmp_path / "bad.binpb.corrupt").read_bytes() == b"\xff\xff\xff garbage"
    assert server.run(server.store.stats).affiliates == 0


def test_wrong_secret_learns_nothing(server):
    async def main() -> None:
        good, bad = new_secret(), new_secret()
        a = client(server, "w", good, "a")
        b = client(server, "w", good, "b")
        spy = client(server, "w", bad, "spy")
        a.set_local(make_affiliate("a", 1))
        b.set_local(make_affiliate("b", 2))
        spy.set_local(make_affiliate("spy", 9))
        async with running(a, b):
            await a.wait_for(lambda t: "b" in t, 20)
            await b.wait_for(lambda t: "a" in t, 20)
            async with running(spy):  # after a and b: its watch snapshot carries their blobs
                await eventually(lambda: spy.connected and spy.version > 0, "spy's snapshot")
                async with Raw(server) as raw:
                    listed = await raw.list("w")
                assert set(listed) == {"a", "b", "spy"}  # everyone's blobs are there...
                for data, _endpoints in listed.values():
                    assert b"example" not in data and b"Talos" not in data  # ...but opaque
                assert spy.affiliates == {}  # ...and the spy decrypts none
                assert spy.warned_about == {"a", "b"}
                await eventually(
                    lambda: "spy" in a.warned_about and "spy" in b.warned_about, "spy seen"
                )
                assert "spy" not in a.affiliates and "spy" not in b.affiliates

    run(main())


def test_malformed_affiliates_from_others_are_skipped(server):
    async def main() -> None:
        s = new_secret()
        cipher = AffiliateCipher(secret_key(s))
        good = client(server, "m", s, "good")
        watcher = client(server, "m", s, "w")
        good.set_local(make_affiliate("good", 1))
        async with running(good, watcher):
            async with Raw(server) as raw:
                await raw.update("m", "short", data=b"tiny")
                await raw.update("m", "notpb", data=cipher.seal_data(b"\xff\xff\xff\xff"))
                await raw.update("m", "noid", data=cipher.seal_data(b""))
                # Valid data but one endpoint that does not decrypt: kept, endpoint dropped.
                await raw.update(
                    "m",
                    "badep",
                    data=cipher.seal_data(encode_affiliate(make_affiliate("badep", 4))),
                    endpoints=[
                        b"\x01" * 15,
                        cipher.seal_endpoint(encode_endpoint(("10.5.0.4", 51820))),
                    ],
                )
            got = await watcher.wait_for(lambda t: {"good", "badep"} <= set(t), 20)
            # The watch delivers in order and badep was written last: the malformed ones
            # before it have been seen (and skipped) by now.
            assert set(watcher.affiliates) == {"good", "badep"}
            assert endpoints_of(got["badep"]) == (("10.5.0.4", 51820),)

    run(main())


def test_client_follows_redirect(make_server, make_memory_server):
    real = make_server()
    # Its own state (replicas on one Valkey share theirs): it must stay empty.
    front = make_memory_server(redirect_endpoint=f"127.0.0.1:{real.port}")

    async def main() -> None:
        s = new_secret()
        a = client(front, "r", s, "a")
        b = client(real, "r", s, "b")
        a.set_local(make_affiliate("a", 1))
        b.set_local(make_affiliate("b", 2))
        async with running(a, b):
            await a.wait_for(lambda t: "b" in t, 20)
            assert a.endpoint == f"127.0.0.1:{real.port}"
            async with Raw(front) as raw:
                assert await raw.list("r") == {}

    run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_retries_until_service_appears_and_republishes_after_restart(make_server):
    port = _free_port()
    s = new_secret()

    async def main() -> None:
        a = DiscoveryClient(f"127.0.0.1:{port}", "b", s, "a", insecure=True, backoff=fast())
        a.set_local(make_affiliate("a", 1))
        async with running(a):
            await eventually(lambda: a.failed_sessions >= 2, "two failed attempts")
            assert not a.connected
            first = await asyncio.to_thread(make_server, port)
            async with Raw(first) as raw:
                for _ in range(200):
                    if "a" in await raw.list("b"):
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("client never published")
            await asyncio.to_thread(first.stop)
            second = await asyncio.to_thread(make_server, port)  # empty state, same port
            async with Raw(second) as raw:
                for _ in range(200):
                    if "a" in await raw.list("b"):
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("client never republished after restart")

    run(main())


def test_affiliates_survive_a_stateless_service_restart_for_the_grace_period(make_memory_server):
    """A restarted service without its state must not make peers vanish at once."""
    port = _free_port()
    s = new_secret()

    async def main() -> None:
        first = await asyncio.to_thread(make_memory_server, port)
        watcher = DiscoveryClient(
            f"127.0.0.1:{port}", "g", s, "w", insecure=True, reconnect_grace=1.5, backoff=fast()
        )
        gone = DiscoveryClient(f"127.0.0.1:{port}", "g", s, "gone", insecure=True, backoff=fast())
        gone.set_local(make_affiliate("gone", 1))
        watcher.start()
        gone.start()
        try:
            await watcher.wait_for(lambda t: "gone" in t, 20)
            await gone.close(leave=False)  # it will not register again
            version = watcher.version
            await asyncio.to_thread(first.stop)
            await asyncio.to_thread(make_memory_server, port)  # empty state, same port
            for _ in range(200):  # every snapshot bumps the version: wait for the new session's
                if watcher.version > version:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the watcher never reconnected")
            assert "gone" in watcher.affiliates  # carried over the restart
            await watcher.wait_for(lambda t: "gone" not in t, 10)  # then dropped after the grace
        finally:
            await watcher.close()

    run(main())


def _self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    from ipaddress import ip_address

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"), cert_pem


def test_tls(make_server, tmp_path):
    cert, key, pem = _self_signed(tmp_path)
    server = make_server(tls_cert_file=cert, tls_key_file=key)

    async def main() -> None:
        s = new_secret()
        a = DiscoveryClient(
            f"https://localhost:{server.port}/",
            "tls",
            s,
            "a",
            root_certificates=pem,
            backoff=fast(),
        )
        b = DiscoveryClient(
            f"127.0.0.1:{server.port}", "tls", s, "b", root_certificates=pem, backoff=fast()
        )
        plain = DiscoveryClient(
            f"127.0.0.1:{server.port}", "tls", s, "p", insecure=True, backoff=fast()
        )
        a.set_local(make_affiliate("a", 1))
        b.set_local(make_affiliate("b", 2))
        for x in (a, b, plain):
            x.start()
        try:
            await a.wait_for(lambda t: "b" in t, 20)
            await b.wait_for(lambda t: "a" in t, 20)
            await eventually(lambda: plain.failed_sessions >= 1, "plain client tried")
            assert not plain.connected  # h2c against a TLS port gets nowhere
        finally:
            for x in (a, b, plain):
                await x.close(leave=x is not plain)

    run(main())


def test_metrics_endpoint(make_server):
    server = make_server(metrics_port=0)

    async def main() -> None:
        s = new_secret()
        a = client(server, "met", s, "a")
        a.set_local(make_affiliate("a", 1))
        async with running(a):
            async with Raw(server) as raw:
                for _ in range(200):
                    if "a" in await raw.list("met"):
                        break
                    await asyncio.sleep(0.05)
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            text = await asyncio.to_thread(
                lambda: urllib.request.urlopen(url, timeout=10).read().decode()
            )
        got = samples(text)
        assert got[key("discovery_state_clusters")] == 1
        assert got[key("discovery_state_affiliates")] == 1
        assert got[key("discovery_state_endpoints")] == 1
        assert got[key("discovery_state_subscriptions")] == 1
        assert key("discovery_state_gc_runs_total") in got
        assert got[key("discovery_server_requests_total", method="Hello", code="OK")] >= 1
        assert got[key("discovery_server_requests_total", method="AffiliateUpdate", code="OK")] >= 1
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/other", timeout=10)
            raise AssertionError("expected 404")
        except urllib.error.HTTPError as err:
            assert err.code == 404

    run(main())


def test_updates_iterator_yields_current_set(server):
    async def main() -> None:
        s = new_secret()
        a, b = client(server, "it", s, "a"), client(server, "it", s, "b")
        a.set_local(make_affiliate("a", 1))
        b.set_local(make_affiliate("b", 2))
        async with running(a, b):
            async for table in a.updates():
                if "b" in table:
                    assert table["b"] == make_affiliate("b", 2)
                    break

    run(main())


def test_close_with_leave_when_service_unreachable_does_not_raise():
    async def main() -> None:
        a = DiscoveryClient(
            "127.0.0.1:1", "x", new_secret(), "a", insecure=True, rpc_timeout=0.5, backoff=fast()
        )
        a.set_local(make_affiliate("a", 1))
        a.start()
        await eventually(lambda: a.failed_sessions >= 1, "a failed attempt")
        await a.close(leave=True)

    run(main())
