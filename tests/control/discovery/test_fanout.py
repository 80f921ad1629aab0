"""Watch replies as bytes: batched, coalesced, and what a protobuf parser reads from them."""

from __future__ import annotations

import collections

from control.discovery.fanout import MAX_CHANGE_MESSAGE, WatchEncoder
from control.discovery.proto import cluster_pb2 as pb
from control.discovery.state import AffiliateView, Notification


def _view(aid: str, data: bytes = b"d", endpoints: tuple[bytes, ...] = (b"e" * 16,)):
    return AffiliateView(aid, data, endpoints)


def test_changes_keep_the_latest_state_per_affiliate_deletions_apart():
    enc = WatchEncoder()
    queue = collections.deque(
        [
            Notification("a", _view("a", b"1")),
            Notification("b", _view("b")),
            Notification("a", _view("a", b"2")),
            Notification("b", None),  # deleted after its update
            Notification("c", None),
            Notification("c", _view("c", b"back")),  # re-created after its deletion
        ]
    )
    replies = [pb.WatchResponse.FromString(r) for r in enc.changes(queue)]
    assert not queue
    assert [(r.deleted, [(a.id, a.data) for a in r.affiliates]) for r in replies] == [
        (False, [("a", b"2"), ("c", b"back")]),
        (True, [("b", b"")]),
    ]


def test_snapshot_bytes_parse_as_one_watch_response_and_share_encodings():
    enc = WatchEncoder()
    views = [
        _view(f"n{i}", bytes([i]) * 300, (bytes([i]) * 16, bytes([i]) * 32)) for i in range(50)
    ]
    blob = enc.snapshot(views)
    parsed = pb.WatchResponse.FromString(blob)
    assert [(a.id, a.data, list(a.endpoints)) for a in parsed.affiliates] == [
        (v.id, v.data, list(v.endpoints)) for v in views
    ]
    assert not parsed.deleted
    assert enc.affiliate(views[7]) is enc.affiliate(views[7])  # encoded once
    assert enc.snapshot(list(views)) is blob  # the same set: the same message, shared
    assert enc.snapshot(views[1:]) is not blob
    assert enc.snapshot([]) == b""  # an empty snapshot is an empty message


def test_large_batches_are_split():
    enc = WatchEncoder()
    big = b"x" * 2000
    queue = collections.deque(Notification(f"n{i}", _view(f"n{i}", big)) for i in range(1024))
    replies = enc.changes(queue)
    assert len(replies) > 1 and all(len(r) <= MAX_CHANGE_MESSAGE for r in replies)
    ids = [a.id for r in replies for a in pb.WatchResponse.FromString(r).affiliates]
    assert ids == [f"n{i}" for i in range(1024)]


def test_cache_is_bounded():
    enc = WatchEncoder(capacity=8)
    views = [_view(f"n{i}") for i in range(100)]
    for v in views:
        enc.affiliate(v)
    assert len(enc._cache) <= 8
    assert pb.WatchResponse.FromString(enc.affiliate(views[0])).affiliates[0].id == "n0"
