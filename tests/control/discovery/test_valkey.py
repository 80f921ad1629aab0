"""Replicas on one Valkey: what only a shared store can get wrong.

Races between replicas, watches spanning replicas, a change log that restarts under a
watcher, Valkey going away and coming back, and the keys' hash tags. The rules every
store shares are tested on both stores by the rest of this directory.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import redis.crc

from control.discovery.proto import cluster_pb2 as pb
from control.discovery.valkey import PREFIX, cluster_keys
from tests.control.discovery.threaded import ThreadedServer
from tests.control.discovery.valkeyproc import ValkeyProcess

from .conftest import Raw, eventually, run

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
FAST: dict[str, Any] = {"rate": 1e6, "burst": 10**6}


@pytest.fixture
def replicas(valkey: ValkeyProcess) -> Iterator[Callable[..., ThreadedServer]]:
    """Start replicas on the session's (emptied) Valkey; all stopped at teardown."""
    valkey.flush()
    started: list[ThreadedServer] = []

    def factory(**options: Any) -> ThreadedServer:
        server = ThreadedServer(store=valkey.url, **FAST | options)
        server.start("127.0.0.1", 0)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


def test_two_replicas_racing_for_the_last_slot_only_one_wins(replicas):
    a, b = replicas(), replicas()

    async def main() -> None:
        async with Raw(a) as ra, Raw(b) as rb:
            for start in range(0, 1023, 128):  # more at once can trip gRPC's overload cut-off
                await asyncio.gather(
                    *(
                        ra.update("full", f"n{i}", data=b"x")
                        for i in range(start, min(start + 128, 1023))
                    )
                )
            for round_ in range(3):
                candidates = [f"r{round_}-{i}" for i in range(16)]
                results = await asyncio.gather(
                    *(
                        (ra if i % 2 else rb).update("full", aid, data=b"x")
                        for i, aid in enumerate(candidates)
                    ),
                    return_exceptions=True,
                )
                winners = [aid for aid, r in zip(candidates, results, strict=True) if r is None]
                refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
                assert len(winners) == 1, results
                assert len(refused) == 15 and all(e.code() == EXHAUSTED for e in refused)
                listed = await rb.list("full")
                assert len(listed) == 1024 and winners[0] in listed
                # Free the slot for the next round.
                await ra.stub.AffiliateDelete(
                    pb.AffiliateDeleteRequest(cluster_id="full", affiliate_id=winners[0]),
                    timeout=10,
                )

    run(main(), timeout=120)


async def _follow(
    raw: Raw, cluster: str, seen: dict[str, list[bytes]], table: dict[str, bytes]
) -> None:
    """Apply a watch to ``table``; record every data value each affiliate went through."""
    call = raw.stub.Watch(pb.WatchRequest(cluster_id=cluster))
    first = True
    async for reply in call:
        for a in reply.affiliates:
            if reply.deleted:
                table.pop(a.id, None)
                seen[a.id].append(b"<deleted>")
            else:
                table[a.id] = a.data
                seen[a.id].append(a.data)
        if first:
            first = False
            table["<snapshot>"] = b""


def test_watchers_on_every_replica_see_each_change_once_and_in_order(replicas):
    servers = [replicas() for _ in range(3)]
    writers, versions = 3, 60

    async def main() -> None:
        raws = [Raw(s) for s in servers]
        watches = []
        try:

            async def writer(w: int) -> None:
                raw = raws[w % 3]
                for v in range(1, versions + 1):
                    await raw.update("o", f"w{w}", data=b"%d" % v)
                    if v % 20 == 0:  # watchers join while changes flow
                        seen: dict[str, list[bytes]] = collections.defaultdict(list)
                        table: dict[str, bytes] = {}
                        watches.append(
                            (
                                seen,
                                table,
                                asyncio.create_task(_follow(raws[v % 3], "o", seen, table)),
                            )
                        )

            await asyncio.gather(*(writer(w) for w in range(writers)))
            await raws[0].stub.AffiliateDelete(
                pb.AffiliateDeleteRequest(cluster_id="o", affiliate_id="w0"), timeout=10
            )
            final = {aid: data for aid, (data, _) in (await raws[1].list("o")).items()}
            assert final == {f"w{w}": b"%d" % versions for w in range(1, writers)}
            for seen, table, _task in watches:

                def reached(t: dict[str, bytes] = table) -> bool:
                    return {k: v for k, v in t.items() if k != "<snapshot>"} == final

                await eventually(reached, "a watcher reached the final state")
                for aid, values in seen.items():
                    # From its snapshot on, a watcher sees versions in order, none twice, up
                    # to the last (changes that queued up meanwhile go out as the latest
                    # state only: fanout.py).
                    nums = [int(v) for v in values if v != b"<deleted>"]
                    assert nums == sorted(set(nums)) and nums[-1] == versions, (aid, values)
                    assert (b"<deleted>" in values) == (aid == "w0")
        finally:
            for _, _, task in watches:
                task.cancel()
            await asyncio.gather(*(t for _, _, t in watches), return_exceptions=True)
            for raw in raws:
                await raw.channel.close()

    run(main(), timeout=120)


def test_a_change_log_that_restarted_under_a_watcher_ends_its_watch(replicas, valkey):
    server = replicas()

    async def main() -> None:
        async with Raw(server) as raw:
            await raw.update("g", "a", data=b"1")
            call = raw.stub.Watch(pb.WatchRequest(cluster_id="g"))
            assert [a.id for a in (await call.read()).affiliates] == ["a"]
            # As after the cluster sat empty past its keys' expiry: numbering restarts at 1.
            _, _, log_key, head_key = cluster_keys("g")
            with valkey.client() as c:
                c.delete(log_key, head_key)
            await raw.update("g", "b", data=b"2")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while True:
                    await call.read()
            assert info.value.code() == grpc.StatusCode.ABORTED
            # A new watch starts from the new numbering.
            again = raw.stub.Watch(pb.WatchRequest(cluster_id="g"))
            assert sorted(a.id for a in (await again.read()).affiliates) == ["a", "b"]
            await raw.update("g", "c", data=b"3")
            assert [a.id for a in (await again.read()).affiliates] == ["c"]
            again.cancel()

    run(main())


def test_expiry_is_collected_once_for_watchers_on_every_replica(replicas):
    a, b = replicas(gc_interval=0.1), replicas(gc_interval=0.1)

    async def main() -> None:
        async with Raw(a) as ra, Raw(b) as rb:
            await ra.update("e", "keep", data=b"k", ttl=600)
            calls = [r.stub.Watch(pb.WatchRequest(cluster_id="e")) for r in (ra, rb)]
            for call in calls:
                assert [x.id for x in (await call.read()).affiliates] == ["keep"]
            await rb.update("e", "short", data=b"s", ttl=0.5)
            for call in calls:
                added = await call.read()
                assert [x.id for x in added.affiliates] == ["short"] and not added.deleted
            for call in calls:
                gone = await call.read()
                assert gone.deleted and [x.id for x in gone.affiliates] == ["short"]
            await ra.update("e", "marker", data=b"m")
            for call in calls:  # the next message is the marker: no second delete came first
                nxt = await call.read()
                assert [x.id for x in nxt.affiliates] == ["marker"] and not nxt.deleted
                call.cancel()
            assert set(await rb.list("e")) == {"keep", "marker"}

    run(main())


def test_replicas_pace_watch_messages_by_every_replicas_watches(replicas, valkey):
    a, b = replicas(), replicas()
    watchers = PREFIX + "watchers"

    async def main() -> None:
        async with Raw(a) as ra:
            calls = [ra.stub.Watch(pb.WatchRequest(cluster_id="p")) for _ in range(5)]
            for call in calls:
                await call.read()
            # b's watch messages are spaced as if a's five watches were its own (fanout.Pace).
            await eventually(lambda: b.call(b._watch_count) == 5, "b counts a's watches")
            assert a.call(a._watch_count) == 5
            # A replica that stopped reporting (killed) stops counting; a live one counts.
            with valkey.client() as c:
                c.hset(watchers, mapping={"gone": "7 1000", "live": "3 99999999999999"})
            await eventually(lambda: b.call(b._watch_count) == 8, "b counts a live replica")
            with valkey.client() as c:
                assert not c.hexists(watchers, "gone")
                c.hdel(watchers, "live")
            for call in calls:
                call.cancel()
            await eventually(lambda: b.call(b._watch_count) == 0, "a's watches ended")
        a.stop()  # a stopped replica takes its entry away
        with valkey.client() as c:
            assert set(c.hkeys(watchers)) == {b.store.replica_id.encode()}

    run(main())


def test_keys_of_a_cluster_share_one_hash_slot(replicas, valkey):
    server = replicas()
    odd = ["plain", "with{brace", "with}brace", "{tag}", "%7B", "é"]

    async def main() -> None:
        async with Raw(server) as raw:
            for cid in odd:
                await raw.update(cid, "a", data=b"x", endpoints=[b"e" * 16])
                await raw.stub.AffiliateDelete(
                    pb.AffiliateDeleteRequest(cluster_id=cid, affiliate_id="a"), timeout=10
                )
                await raw.update(cid, "b", data=b"y")
                assert set(await raw.list(cid)) == {"b"}

    run(main())
    with valkey.client() as c:
        keys = [k.decode() for k in c.scan_iter(match=PREFIX + "*")]
    per_cluster: dict[str, set[int]] = collections.defaultdict(set)
    for k in keys:
        if "{" in k:
            per_cluster[k[: k.rindex(":")]].add(redis.crc.key_slot(k.encode()))
    assert len(per_cluster) == len(odd)  # distinct ids never share keys
    assert all(len(slots) == 1 for slots in per_cluster.values()), per_cluster
    assert {cluster_keys(cid)[0] for cid in odd} <= set(keys)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_valkey_down_means_unavailable_and_replicas_recover_when_it_returns(tmp_path):
    store = ValkeyProcess(tmp_path, port=_free_port(), persist=True)
    store.start()
    server = ThreadedServer(store=store.url, gc_interval=0.2, **FAST)
    server.start("127.0.0.1", 0)

    async def expect_unavailable(what: str, coro) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await coro
        assert info.value.code() == UNAVAILABLE, (what, info.value)

    async def main() -> None:
        async with Raw(server) as raw:
            await raw.update("d", "a", data=b"before")
            watch = raw.stub.Watch(pb.WatchRequest(cluster_id="d"))
            assert [x.id for x in (await watch.read()).affiliates] == ["a"]
            await asyncio.to_thread(store.stop)  # SIGTERM; the append-only file keeps "a"
            # The open watch ends, and every call fails plainly: no crash, no empty answer.
            await expect_unavailable("watch", watch.read())
            await expect_unavailable("update", raw.update("d", "b", data=b"during"))
            await expect_unavailable("list", raw.list("d"))
            await expect_unavailable(
                "delete",
                raw.stub.AffiliateDelete(
                    pb.AffiliateDeleteRequest(cluster_id="d", affiliate_id="a"), timeout=10
                ),
            )
            again = raw.stub.Watch(pb.WatchRequest(cluster_id="d"))
            await expect_unavailable("new watch", again.read())
            # Hello needs no store.
            await raw.stub.Hello(pb.HelloRequest(cluster_id="d"), timeout=10)
            await asyncio.to_thread(store.start)
            # Same replica, not restarted: it serves again once Valkey is back.
            for _ in range(200):
                try:
                    listed = await raw.list("d")
                    break
                except grpc.aio.AioRpcError as err:
                    assert err.code() == UNAVAILABLE
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the replica never recovered")
            assert set(listed) == {"a"}
            watch = raw.stub.Watch(pb.WatchRequest(cluster_id="d"))
            assert [x.id for x in (await watch.read()).affiliates] == ["a"]
            await raw.update("d", "b", data=b"after")
            assert [x.id for x in (await watch.read()).affiliates] == ["b"]
            watch.cancel()
            # Killed hard this time, mid-watch: the same.
            watch = raw.stub.Watch(pb.WatchRequest(cluster_id="d"))
            await watch.read()
            await asyncio.to_thread(store.stop, 9)
            await expect_unavailable("watch after kill", watch.read())
            await expect_unavailable("update after kill", raw.update("d", "c", data=b"x"))
            await asyncio.to_thread(store.start)
            for _ in range(200):
                try:
                    await raw.update("d", "c", data=b"x")
                    break
                except grpc.aio.AioRpcError as err:
                    assert err.code() == UNAVAILABLE
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the replica never recovered after a kill")
            assert set(await raw.list("d")) == {"a", "b", "c"}

    try:
        run(main(), timeout=120)
    finally:
        server.stop()
        store.stop()


def test_health_is_not_serving_while_valkey_is_down(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from control.discovery.health import CLUSTER_SERVICE

    store = ValkeyProcess(tmp_path)
    store.start()
    server = ThreadedServer(store=store.url, store_check_interval=0.1, **FAST)
    server.start("127.0.0.1", 0)
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

    async def main() -> None:
        async with Raw(server) as raw:
            stub: Any = health_pb2_grpc.HealthStub(raw.channel)  # its stub lacks the methods
            # A Watch of the health sends the status, then every change of it.
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=CLUSTER_SERVICE))
            assert (await watch.read()).status == serving
            await asyncio.to_thread(store.stop)
            assert (await watch.read()).status == not_serving
            await expect_code(UNAVAILABLE, raw.list("d"))
            await asyncio.to_thread(store.start)
            assert (await watch.read()).status == serving  # the store check saw it back
            assert await raw.list("d") == {}
            watch.cancel()

    try:
        run(main(), timeout=60)
    finally:
        server.stop()
        store.stop()


async def expect_code(code: grpc.StatusCode, coro: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert info.value.code() == code, info.value
