"""Watch replies, encoded once and batched per watcher.

A Watch stream's first message is the snapshot. Every later message carries all the
changes queued for that watcher since its previous message, the latest state of each
affiliate only: one message of updated affiliates and one of deleted ones (``deleted``
covers the whole message; Talos's client and ours apply every affiliate in a reply).
So a watcher that falls behind catches up in one message instead of one per change, and
the service's work per change stops growing with how far behind its watchers are.

Batching only pays if a watcher has something to batch: woken at once, each watcher would
send every change alone. So each watcher spaces its change messages (``Pace``) so that all
open watches together send about ``messages_per_second``: with few watchers a change goes
out at once, with 1,024 busy ones each sends a few messages a second, each carrying all
that changed meanwhile, and the loop keeps time for everything else (Hello first).
Replicas on a shared store count each other's watches too (store.other_watchers): the
budget is the service's, so a client's messages are spaced alike however the watches are
spread over replicas.

Each affiliate state is encoded to wire bytes once; every snapshot and change message that
carries it joins the same bytes (``WatchResponse.affiliates`` is field 1, repeated: a
message is the concatenation of its elements, each tagged and length-prefixed).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Callable, Iterable

from control.discovery.proto import cluster_pb2 as pb
from control.discovery.state import AffiliateView, Notification

_AFFILIATE_TAG = b"\x0a"  # WatchResponse field 1 (affiliates), length-delimited
_DELETED = b"\x10\x01"  # WatchResponse field 2 (deleted) = true
# Split change messages above this (a snapshot is one message, as the protocol wants).
MAX_CHANGE_MESSAGE = 1 << 20


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(body: bytes) -> bytes:
    return _AFFILIATE_TAG + _varint(len(body)) + body


def encode_watch_reply(reply: bytes | pb.WatchResponse) -> bytes:
    """The Watch response serializer: pre-encoded replies go out as they are."""
    return reply if isinstance(reply, bytes) else reply.SerializeToString()


class WatchEncoder:
    """Wire bytes of affiliates, encoded once per view and shared by every watcher.

    Keyed by the view's identity (the store hands out one view per affiliate state, see
    state.py); an entry holds its view, so the id cannot be reused while it is cached.
    """

    SNAPSHOTS = 16  # whole snapshots kept (most recent), for watchers that see the same set

    def __init__(self, capacity: int = 1 << 15) -> None:
        self.capacity = capacity
        self._cache: dict[int, tuple[AffiliateView, bytes]] = {}
        # tuple of view ids -> (the views, which keep the ids valid; the message)
        self._snapshots: dict[tuple[int, ...], tuple[list[AffiliateView], bytes]] = {}

    def affiliate(self, view: AffiliateView) -> bytes:
        entry = self._cache.get(id(view))
        if entry is not None and entry[0] is view:
            return entry[1]
        body = pb.Affiliate(
            id=view.id, data=view.data, endpoints=list(view.endpoints)
        ).SerializeToString()
        encoded = _field(body)
        if len(self._cache) >= self.capacity:
            # Forget the older half (dicts keep insertion order); live ones come back.
            for key in list(itertools.islice(self._cache, self.capacity // 2)):
                del self._cache[key]
        self._cache[id(view)] = (view, encoded)
        return encoded

    def snapshot(self, views: Iterable[AffiliateView]) -> bytes:
        """The first message of a watch; the same bytes for every watcher of an unchanged
        cluster (after a restart, a whole cluster reconnects to a state that refreshes
        do not change)."""
        views = list(views)
        key = tuple(map(id, views))
        hit = self._snapshots.pop(key, None)
        if hit is None:
            hit = (views, b"".join(map(self.affiliate, views)))
            if len(self._snapshots) >= self.SNAPSHOTS:
                del self._snapshots[next(iter(self._snapshots))]
        self._snapshots[key] = hit  # most recent last
        return hit[1]

    def changes(self, queue: collections.deque[Notification]) -> list[bytes]:
        """Drain ``queue`` into at most a few messages: updates, then deletions."""
        latest: dict[str, AffiliateView | None] = {}
        while queue:
            note = queue.popleft()
            latest[note.affiliate_id] = note.affiliate
        replies: list[bytes] = []
        batch: list[bytes] = []
        size = 0
        for view in latest.values():
            if view is not None:
                encoded = self.affiliate(view)
                if batch and size + len(encoded) > MAX_CHANGE_MESSAGE:
                    replies.append(b"".join(batch))
                    batch, size = [], 0
                batch.append(encoded)
                size += len(encoded)
        if batch:
            replies.append(b"".join(batch))
        gone = [
            _field(pb.Affiliate(id=aid).SerializeToString())
            for aid, view in latest.items()
            if view is None
        ]
        if gone:
            replies.append(b"".join(gone) + _DELETED)
        return replies


class Pace:
    """One watch stream's spacing of change messages (a share of a service-wide budget)."""

    MAX_GAP = 1.0  # never hold a change longer than this

    def __init__(self, messages_per_second: float, streams: Callable[[], int]) -> None:
        self._rate = messages_per_second
        self._streams = streams
        self._loop = asyncio.get_running_loop()
        self._last = -self.MAX_GAP

    async def wait(self) -> None:
        """Called before sending changes: returns once this stream's turn has come."""
        gap = min(self.MAX_GAP, self._streams() / self._rate)
        delay = self._last + gap - self._loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        self._last = self._loop.time()
