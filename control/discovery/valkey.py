"""The discovery state in Valkey (or Redis 7), shared by any number of service replicas.

Keys (prefix ``kubespan:discovery:``); every key of one cluster carries the hash tag
``{CLUSTER}`` so a Valkey Cluster keeps a cluster on one shard, and each script below
touches one cluster's keys only:

- ``{c}:aff``  hash, affiliate id -> record (expiry, data, endpoints with their expiries);
- ``{c}:due``  sorted set, affiliate id -> when GC next has something to do with it;
- ``{c}:log``  stream of changes, one entry per notification: ``n`` (the cluster's
  sequence number, dense), ``a`` (affiliate id), ``r`` (the new record; empty: deleted);
- ``{c}:head`` hash: ``n`` and ``id`` of the last change, ``eps`` (endpoint count).

Three keys span clusters, each used only by single-key commands: ``clusters`` (sorted
set, cluster id -> the earliest time GC must visit it), ``gc-lease`` (the replica that runs
the next GC pass) and ``watchers`` (hash, replica -> its watch count, so that the replicas
together keep to one budget of watch messages, fanout.Pace).

Every rule runs inside a Lua script, atomically on Valkey and with Valkey's clock
(``TIME``), so replicas need no clock agreement and two racing updates cannot both take
the 1,024th slot. Each replica keeps a copy of every cluster it has watchers of: read
once (the affiliates and the number of the last change, in one script), then kept
current by one XREAD loop on the cluster's log, which also feeds those watchers. A Watch
takes its snapshot from that copy once it holds every change numbered up to the last one
in Valkey when the Watch came, and the changes after it from the same loop. A gap in
the numbers (the stream trimmed under a stalled reader, or recreated) ends the watches
with ABORTED, as a queue overflow does, so no client ever silently misses a change.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import logging
import os
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from control.discovery.state import (
    AffiliateView,
    LimitError,
    Limits,
    Notification,
    Stats,
    check_affiliate_id,
    check_update,
)
from control.discovery.store import Store, StoreUnavailable, Watcher

log = logging.getLogger("control.discovery.valkey")

PREFIX = "kubespan:discovery:"
# How long the change log keeps entries: feeds read them within milliseconds; one that
# falls this far behind sees a gap and ends its watches.
LOG_RETENTION_MS = 60_000
# An empty cluster's log and head outlive it this long, so that its watchers keep their
# place; a log recreated later restarts its numbering, which watchers detect as a gap.
EMPTY_KEEP_MS = 3_600_000
XREAD_BLOCK_MS = 2_000  # below the socket timeout, so a blocked read is never a timeout
# Store operations in flight per replica: a burst of requests queues here instead of
# opening a connection each. Feeds are not counted: each holds its own connection.
OPS_MAX = 64
WATCHERS_EVERY = 1.0  # seconds between the replicas' exchanges of their watch counts

# Shared by the scripts. A record is big-endian: f64 expiry (ms), u32 data length, data,
# then per endpoint: u8 length, endpoint, f64 expiry (ms).
_LUA_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function ms(x) return string.format('%.0f', x) end
local function decode(rec)
  local exp, n, pos = struct.unpack('>dI4', rec)
  local data = string.sub(rec, pos, pos + n - 1)
  pos = pos + n
  local eps = {}
  while pos <= #rec do
    local len
    len, pos = struct.unpack('B', rec, pos)
    local e = string.sub(rec, pos, pos + len - 1)
    local e_exp
    e_exp, pos = struct.unpack('>d', rec, pos + len)
    eps[#eps + 1] = {e, e_exp}
  end
  return exp, data, eps
end
local function encode(exp, data, eps)
  local parts = {struct.pack('>dI4', exp, #data), data}
  for _, e in ipairs(eps) do
    parts[#parts + 1] = struct.pack('B', #e[1]) .. e[1] .. struct.pack('>d', e[2])
  end
  return table.concat(parts)
end
local function due_of(exp, eps)
  local due = exp
  for _, e in ipairs(eps) do if e[2] < due then due = e[2] end end
  return due
end
-- KEYS[1..4] are always aff, due, log, head of one cluster.
local function append(now, aid, rec)
  local n = redis.call('HINCRBY', KEYS[4], 'n', 1)
  local id = redis.call('XADD', KEYS[3], 'MINID', '~', ms(now - RETENTION_MS), '*',
                        'n', n, 'a', aid, 'r', rec)
  redis.call('HSET', KEYS[4], 'id', id)
  redis.call('PERSIST', KEYS[3])
  redis.call('PERSIST', KEYS[4])
end
local function forget_if_empty()
  if redis.call('HLEN', KEYS[1]) == 0 then
    redis.call('PEXPIRE', KEYS[3], KEEP_MS)
    redis.call('PEXPIRE', KEYS[4], KEEP_MS)
    return true
  end
  return false
end
""".replace("RETENTION_MS", str(LOG_RETENTION_MS)).replace("KEEP_MS", str(EMPTY_KEEP_MS))

# ARGV: affiliate id, has data (1/0), data, ttl ms, max affiliates, max endpoints,
# then the endpoints. Returns {0, due} or {1} (cluster full) or {2} (too many endpoints).
_UPDATE = """
local now = now_ms()
local aid = ARGV[1]
local rec = redis.call('HGET', KEYS[1], aid)
local exp, data, eps = 0, '', {}
if rec then
  exp, data, eps = decode(rec)
elseif redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[5]) then
  return {1}
end
local known = {}
for i, e in ipairs(eps) do known[e[1]] = i end
local fresh, seen = {}, {}
for i = 7, #ARGV do
  local e = ARGV[i]
  if not known[e] and not seen[e] then
    seen[e] = true
    fresh[#fresh + 1] = e
  end
end
if #eps + #fresh > tonumber(ARGV[6]) then return {2} end
-- Every check before the first write: a refused request leaves no trace.
local expiration = now + tonumber(ARGV[4])
local changed = not rec
if ARGV[2] == '1' and ARGV[3] ~= '' then  -- empty data counts as absent
  if data ~= ARGV[3] then changed = true end
  data = ARGV[3]
  exp = expiration
end
for i = 7, #ARGV do
  local j = known[ARGV[i]]
  if j and eps[j][2] < expiration then eps[j][2] = expiration end
end
for _, e in ipairs(fresh) do
  eps[#eps + 1] = {e, expiration}
  changed = true
end
if expiration > exp then exp = expiration end
rec = encode(exp, data, eps)
redis.call('HSET', KEYS[1], aid, rec)
local due = due_of(exp, eps)
redis.call('ZADD', KEYS[2], ms(due), aid)
if #fresh > 0 then redis.call('HINCRBY', KEYS[4], 'eps', #fresh) end
if changed then append(now, aid, rec) end
return {0, ms(due)}
"""

# ARGV: affiliate id. Returns 1 if it was there.
_DELETE = """
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if not rec then return 0 end
local _, _, eps = decode(rec)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[4], 'eps', -#eps)
append(now_ms(), ARGV[1], '')
forget_if_empty()
return 1
"""

# Drops expired affiliates and endpoints. Returns {affiliates removed, next due or -1
# when the cluster is empty}.
_GC = """
local now = now_ms()
local removed = 0
for _, aid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ms(now))) do
  local rec = redis.call('HGET', KEYS[1], aid)
  if not rec then
    redis.call('ZREM', KEYS[2], aid)
  else
    local exp, data, eps = decode(rec)
    if exp < now then
      redis.call('HDEL', KEYS[1], aid)
      redis.call('ZREM', KEYS[2], aid)
      redis.call('HINCRBY', KEYS[4], 'eps', -#eps)
      append(now, aid, '')
      removed = removed + 1
    else
      local kept = {}
      for _, e in ipairs(eps) do
        if e[2] > now then kept[#kept + 1] = e end
      end
      if #kept ~= #eps then
        rec = encode(exp, data, kept)
        redis.call('HSET', KEYS[1], aid, rec)
        redis.call('HINCRBY', KEYS[4], 'eps', #kept - #eps)
        append(now, aid, rec)
      end
      redis.call('ZADD', KEYS[2], ms(due_of(exp, kept)), aid)
    end
  end
end
if forget_if_empty() then return {removed, -1} end
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
return {removed, first[2]}
"""

# The clusters GC must visit now (on the index key alone: Valkey's clock, any shard).
# ARGV: most to return. Returns {now, cluster ids}.
_DUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {now, redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[1])}
"""

# The state of a cluster and the position of its last change, at one instant.
_SNAPSHOT = """
local head = redis.call('HMGET', KEYS[4], 'n', 'id')
return {head[1] or '0', head[2] or '0-0', redis.call('HGETALL', KEYS[1])}
"""

# Each replica's watch count, for the others (KEYS[1]: hash, replica id -> "count expiry").
# ARGV: this replica's id, its count, how long the entry counts (ms). Returns the sum of
# the other replicas' counts; drops entries of replicas that stopped reporting.
_WATCHERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. string.format('%.0f', now + ARGV[3]))
local others = 0
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  if flat[i] ~= ARGV[1] then
    local count, expiry = string.match(flat[i + 1], '(%d+) (%d+)')
    if tonumber(expiry) < now then
      redis.call('HDEL', KEYS[1], flat[i])
    else
      others = others + tonumber(count)
    end
  end
end
return others
"""


def _tag(cluster_id: str) -> str:
    # Braces would end the hash tag early; escaping them (and %) keeps keys distinct.
    return cluster_id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def cluster_keys(cluster_id: str) -> list[str]:
    base = f"{PREFIX}{{{_tag(cluster_id)}}}:"
    return [base + "aff", base + "due", base + "log", base + "head"]


def decode_record(rec: bytes) -> tuple[float, bytes, list[tuple[bytes, float]]]:
    """(expiry ms, data, [(endpoint, expiry ms)]) from a record the scripts wrote."""
    exp, n = struct.unpack_from(">dI", rec)
    pos = 12
    data = rec[pos : pos + n]
    pos += n
    endpoints = []
    while pos < len(rec):
        size = rec[pos]
        endpoint = rec[pos + 1 : pos + 1 + size]
        pos += 1 + size
        (ep_exp,) = struct.unpack_from(">d", rec, pos)
        pos += 8
        endpoints.append((endpoint, ep_exp))
    return exp, data, endpoints


def _view(affiliate_id: bytes | str, rec: bytes) -> AffiliateView:
    _, data, endpoints = decode_record(rec)
    aid = affiliate_id.decode() if isinstance(affiliate_id, bytes) else affiliate_id
    return AffiliateView(aid, data, tuple(e for e, _ in endpoints))


def _strings(items: Any) -> list[str]:
    return [x.decode() for x in items]


def _pairs(flat: list[Any]) -> list[tuple[Any, Any]]:
    return list(zip(flat[0::2], flat[1::2], strict=True))


class _Subscription:
    """A watcher of one cluster on this replica, fed by that cluster's shared feed."""

    def __init__(self, feed: _Feed, buffer: int, wakeup: Callable[[], None]) -> None:
        self._feed = feed
        self._buffer = buffer
        self._wakeup = wakeup
        self.queue: collections.deque[Notification] = collections.deque()
        self.overflowed = False
        self.unavailable = False
        self.closed = False
        self.started = False  # has its snapshot: changes before that are in it

    def push(self, notes: list[Notification]) -> None:
        if self.closed or not self.started:
            return
        if len(self.queue) + len(notes) > self._buffer:
            self.fail(lost=True)
            return
        self.queue.extend(notes)
        self._wakeup()

    def fail(self, lost: bool) -> None:
        if self.closed:
            return
        if lost:
            self.overflowed = True
        else:
            self.unavailable = True
        self.queue.clear()
        self.close()
        self._wakeup()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._feed.remove(self)


class _Feed:
    """One cluster on this replica: a copy of its affiliates, kept current by following
    its change log, and the watchers of it here.

    Loaded with one read when the first watcher comes, so the watchers of a replica share
    that read and the same views (each encoded once for all of them, fanout.py) instead
    of each reading the whole cluster from Valkey.
    """

    def __init__(self, store: ValkeyStore, cluster_id: str) -> None:
        self.store = store
        self.cluster_id = cluster_id
        self.keys = cluster_keys(cluster_id)
        self.subs: set[_Subscription] = set()
        self.affiliates: dict[str, AffiliateView] = {}  # as of change number last_n
        self.last_n = 0
        self.ready = asyncio.Event()  # loaded (or the feed failed)
        self.moved = asyncio.Event()  # set (and replaced) whenever last_n moves
        self.failed = False
        self.stopping = False
        self.task = asyncio.create_task(self._run(), name=f"valkey-feed-{cluster_id[:32]}")
        store._tasks.add(self.task)
        self.task.add_done_callback(store._tasks.discard)

    def remove(self, sub: _Subscription) -> None:
        self.subs.discard(sub)
        self.store._subscriptions -= 1
        if not self.subs:
            self.stop()

    def stop(self) -> None:
        """No more watchers: the feed ends after its current read (at most XREAD_BLOCK_MS).

        Not cancelled: a command cancelled mid-flight costs the client its connection."""
        if self.store._feeds.get(self.cluster_id) is self:
            del self.store._feeds[self.cluster_id]
        self.stopping = True

    def _fail(self, lost: bool) -> None:
        self.failed = True
        self.ready.set()
        self.moved.set()
        if self.store._feeds.get(self.cluster_id) is self:
            del self.store._feeds[self.cluster_id]
        for sub in list(self.subs):
            sub.fail(lost)

    async def caught_up(self, n: int) -> None:
        """Returns once every change up to number ``n`` is applied here."""
        while self.last_n < n and not self.failed:
            await self.moved.wait()
        if self.failed:
            raise StoreUnavailable("store unavailable (watch)")

    async def _run(self) -> None:
        r = self.store.redis
        log_key = self.keys[2]
        try:
            n_raw, last_id, flat = await self.store._snapshot(keys=self.keys)
            self.last_n = int(n_raw)
            self.affiliates = {view.id: view for view in (_view(a, r) for a, r in _pairs(flat))}
            self.ready.set()
            while not self.stopping:
                reply = await r.xread({log_key: last_id}, count=512, block=XREAD_BLOCK_MS)
                notes = []
                for _key, entries in _stream_entries(reply):
                    for entry_id, fields in entries:
                        n = int(fields[b"n"])
                        if n != self.last_n + 1:
                            log.warning(
                                "cluster %r: change %d follows %d; ending its watches",
                                self.cluster_id,
                                n,
                                self.last_n,
                            )
                            self._fail(lost=True)
                            return
                        self.last_n, last_id = n, entry_id
                        aid = fields[b"a"].decode()
                        rec = fields[b"r"]
                        note = Notification(aid, _view(aid, rec) if rec else None)
                        if note.affiliate is None:
                            self.affiliates.pop(aid, None)
                        else:
                            self.affiliates[aid] = note.affiliate
                        notes.append(note)
                if notes:  # handed over per read, not per change: one wake-up each
                    for sub in list(self.subs):
                        sub.push(notes)
                moved, self.moved = self.moved, asyncio.Event()
                moved.set()
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError) as exc:
            log.warning("cluster %r: change feed failed: %s", self.cluster_id, exc)
            self._fail(lost=False)
        except Exception:
            log.exception("cluster %r: change feed failed", self.cluster_id)
            self._fail(lost=False)


def _stream_entries(reply: Any) -> list[tuple[Any, list[tuple[bytes, dict[bytes, bytes]]]]]:
    # RESP2 gives [[key, entries]], RESP3 {key: [entries]}.
    if not reply:
        return []
    if isinstance(reply, dict):
        return [(k, v[0] if v and isinstance(v[0], list) else v) for k, v in reply.items()]
    return [(k, v) for k, v in reply]


class ValkeyStore(Store):
    """``cluster``: ``url`` names one node of a Valkey Cluster (the client finds the rest)."""

    def __init__(
        self,
        url: str,
        limits: Limits | None = None,
        *,
        cluster: bool = False,
        gc_interval: float = 60.0,
        socket_timeout: float = 5.0,
    ) -> None:
        self.limits = limits or Limits()
        self.url = url
        self.gc_interval = gc_interval
        # A few quick retries ride over a reconnect; then the caller hears UNAVAILABLE.
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": min(2.0, socket_timeout),
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            "health_check_interval": 30,
            # OPS_MAX for operations, plus one per watched cluster (its feed's read).
            "max_connections": 65536,
        }
        self.redis: aioredis.Redis | aioredis.RedisCluster
        if cluster:
            self.redis = aioredis.RedisCluster.from_url(url, **options)
        else:
            self.redis = aioredis.from_url(url, **options)
        self._ops = asyncio.Semaphore(OPS_MAX)
        self.replica_id = os.urandom(8).hex()
        self._update = self.redis.register_script(_LUA_COMMON + _UPDATE)
        self._delete = self.redis.register_script(_LUA_COMMON + _DELETE)
        self._gc = self.redis.register_script(_LUA_COMMON + _GC)
        self._snapshot = self.redis.register_script(_SNAPSHOT)
        self._due = self.redis.register_script(_DUE)
        self._watchers = self.redis.register_script(_WATCHERS)
        self._index = PREFIX + "clusters"
        self._lease = PREFIX + "gc-lease"
        self._watchers_key = PREFIX + "watchers"
        self._other_watchers = 0
        self._feeds: dict[str, _Feed] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscriptions = 0
        self._gc_runs = self._gc_clusters = self._gc_affiliates = 0

    @contextlib.asynccontextmanager
    async def _op(self, what: str) -> AsyncIterator[None]:
        """One operation: a slot among OPS_MAX, and failures as StoreUnavailable."""
        async with self._ops:
            try:
                yield
            except (RedisError, OSError) as exc:
                raise StoreUnavailable(f"store unavailable ({what}): {exc}") from exc

    async def start(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            log.warning(
                "store %s not reachable yet (%s); serving UNAVAILABLE until it is", self.url, exc
            )
        else:
            log.info("discovery state in %s", self.url)
        task = asyncio.create_task(self._exchange_watchers(), name="valkey-watchers")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        # Every feed ended (stopping ones too) before the connections close under them.
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._feeds.clear()
        with contextlib.suppress(RedisError, OSError):
            await self.redis.hdel(self._watchers_key, self.replica_id)
        await self.redis.aclose()

    def other_watchers(self) -> int:
        return self._other_watchers

    async def _exchange_watchers(self) -> None:
        """Tell the other replicas how many watches this one has, and hear theirs."""
        keep_ms = int(3 * WATCHERS_EVERY * 1000)
        while True:
            try:
                self._other_watchers = int(
                    await self._watchers(
                        keys=[self._watchers_key],
                        args=[self.replica_id, self._subscriptions, keep_ms],
                    )
                )
            except (RedisError, OSError):
                pass  # the store check reports it; watches fail by themselves
            await asyncio.sleep(WATCHERS_EVERY)

    # -- operations -------------------------------------------------------------------

    async def update(
        self,
        cluster_id: str,
        affiliate_id: str,
        data: bytes | None,
        endpoints: list[bytes],
        ttl: float,
    ) -> None:
        lim = self.limits
        check_update(lim, cluster_id, affiliate_id, data, endpoints, ttl)
        async with self._op("update"):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zscore(self._index, cluster_id)
                pipe.zcard(self._index)
                known, count = await pipe.execute()
            # Approximate across replicas: a memory bound, not a rule clients see.
            if known is None and count >= lim.clusters_max:
                raise LimitError("too many clusters", exhausted=True)
            result = await self._update(
                keys=cluster_keys(cluster_id),
                args=[
                    affiliate_id,
                    1 if data is not None else 0,
                    data or b"",
                    int(ttl * 1000),
                    lim.affiliates_per_cluster,
                    lim.endpoints_per_affiliate,
                    *endpoints,
                ],
            )
            status = int(result[0])
            if status == 1:
                raise LimitError("too many affiliates in the cluster", exhausted=True)
            if status == 2:
                raise LimitError("too many endpoints for the affiliate", exhausted=True)
            # After the script: GC may be visiting the cluster (see gc()).
            await self.redis.zadd(self._index, {cluster_id: float(result[1])}, lt=True)

    async def delete(self, cluster_id: str, affiliate_id: str) -> None:
        self.check_cluster_id(cluster_id)
        check_affiliate_id(self.limits, affiliate_id)
        async with self._op("delete"):
            await self._delete(keys=cluster_keys(cluster_id), args=[affiliate_id])

    async def list(self, cluster_id: str) -> list[AffiliateView]:
        self.check_cluster_id(cluster_id)
        async with self._op("list"):
            records = await self._records(cluster_id)
        return [_view(aid, rec) for aid, rec in records.items()]

    async def subscribe(
        self, cluster_id: str, wakeup: Callable[[], None]
    ) -> tuple[builtins.list[AffiliateView], Watcher]:
        self.check_cluster_id(cluster_id)
        if self._subscriptions >= self.limits.subscriptions_max:
            raise LimitError("too many watchers", exhausted=True)
        for _attempt in range(2):
            feed = self._feeds.get(cluster_id)
            if feed is None:
                feed = self._feeds[cluster_id] = _Feed(self, cluster_id)
            # Counted as the feed's watcher from now on, so that it stays while we wait.
            sub = _Subscription(feed, self.limits.watch_buffer, wakeup)
            feed.subs.add(sub)
            self._subscriptions += 1
            try:
                await feed.ready.wait()
                # The number of the last change now: the snapshot holds at least that much
                # (a change written through another replica just before is in it).
                applied = feed.last_n
                async with self._op("watch"):
                    n = int(await self.redis.hget(feed.keys[3], "n") or 0)
                if n < applied:
                    # The log restarted its numbering (see EMPTY_KEEP_MS): the feed is
                    # stale; end its watches and load the cluster afresh.
                    feed._fail(lost=True)
                    sub.close()
                    continue
                await feed.caught_up(n)
            except BaseException:
                sub.close()
                raise
            # No await from here: the snapshot and the start of the changes are one instant.
            sub.started = True
            return list(feed.affiliates.values()), sub
        raise StoreUnavailable("store unavailable (watch): the change log keeps restarting")

    # -- housekeeping -----------------------------------------------------------------

    async def gc(self) -> tuple[int, int]:
        """One pass over the clusters due, by whichever replica holds the lease."""
        interval_ms = max(1, int(self.gc_interval * 1000))
        removed_clusters = removed_affiliates = 0
        async with self._op("gc"):
            # Held for most of an interval: one replica per pass, another if it dies.
            if not await self.redis.set(
                self._lease, self.replica_id, nx=True, px=max(1, interval_ms * 9 // 10)
            ):
                return 0, 0
            now, due = await self._due(keys=[self._index], args=[10_000])
            for cluster_id in _strings(due):
                keys = cluster_keys(cluster_id)
                # Put off first: should this replica die mid-visit, the cluster comes back
                # due; an update racing with us lowers it again (ZADD LT after its script).
                await self.redis.zadd(self._index, {cluster_id: now + 2 * interval_ms}, xx=True)
                removed, next_due = await self._gc(keys=keys)
                removed_affiliates += int(removed)
                if int(next_due) >= 0:
                    await self.redis.zadd(self._index, {cluster_id: float(next_due)}, lt=True)
                    continue
                await self.redis.zrem(self._index, cluster_id)
                # An update that came between our script and the ZREM left its affiliate
                # unindexed (its ZADD LT may have come first): look again.
                _, next_due = await self._gc(keys=keys)
                if int(next_due) >= 0:
                    await self.redis.zadd(self._index, {cluster_id: float(next_due)}, lt=True)
                else:
                    removed_clusters += 1
        self._gc_runs += 1
        self._gc_clusters += removed_clusters
        self._gc_affiliates += removed_affiliates
        return removed_clusters, removed_affiliates

    async def ping(self) -> None:
        async with self._op("ping"):
            await self.redis.ping()

    def gc_totals(self) -> tuple[int, int, int]:
        return self._gc_runs, self._gc_clusters, self._gc_affiliates

    async def stats(self) -> Stats:
        affiliates = endpoints = 0
        async with self._op("stats"):
            clusters = _strings(await self.redis.zrange(self._index, 0, -1))
            for i in range(0, len(clusters), 1000):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for cluster_id in clusters[i : i + 1000]:
                        keys = cluster_keys(cluster_id)
                        pipe.hlen(keys[0])
                        pipe.hget(keys[3], "eps")
                    counts = await pipe.execute()
                affiliates += sum(int(c) for c in counts[0::2])
                endpoints += sum(int(c or 0) for c in counts[1::2])
        return Stats(len(clusters), affiliates, endpoints, self._subscriptions)

    async def dump(self) -> object:
        out: dict[str, dict[bytes, bytes]] = {}
        async with self._op("dump"):
            for cluster_id in _strings(await self.redis.zrange(self._index, 0, -1)):
                records = await self._records(cluster_id)
                if records:
                    out[cluster_id] = dict(sorted(records.items()))
        return dict(sorted(out.items()))

    async def _records(self, cluster_id: str) -> dict[bytes, bytes]:
        """Affiliate id -> record, for one cluster."""
        return cast(dict[bytes, bytes], await self.redis.hgetall(cluster_keys(cluster_id)[0]))
