"""Peer state table, endpoint round robin and harvesting (pure, no I/O)."""

from __future__ import annotations

from ipaddress import IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.backends.base import PeerState
from control.peerspec import PeerSpec
from control.peerstate import (
    DIRECT_PROBE_TIME,
    ENDPOINT_CONNECTION_TIMEOUT,
    PEER_DOWN_INTERVAL,
    PeerStatus,
    calculate_state,
    harvest_endpoints,
    pick_next_endpoint,
    prune_statuses,
)
from control.peerstate import (
    PeerStateName as S,
)
from control.peersync import PeerTracker

NOW = 1_700_000_000.0
A, B, C = ("192.0.2.1", 51820), ("192.0.2.2", 51820), ("2001:db8::3", 51820)


def test_constants_match_talos() -> None:
    assert PEER_DOWN_INTERVAL == 275.0
    assert ENDPOINT_CONNECTION_TIMEOUT == 15.0


# (seconds since endpoint change or None=never, seconds since handshake or None=never,
#  has endpoint, expected). Every region of the table and its edges.
TABLE = [
    # endpoint changed long ago (> 275 s): only handshake recency matters
    (300, 10, True, S.UP),
    (300, 274.9, True, S.UP),
    (300, 275, True, S.DOWN),
    (300, 400, True, S.DOWN),  # handshake before the change, and old
    (300, None, True, S.DOWN),
    (300, None, False, S.UNKNOWN),  # down without an endpoint is unknown
    (300, 10, False, S.UP),
    (None, None, False, S.UNKNOWN),  # brand-new peer, never configured
    (None, None, True, S.DOWN),
    (None, 100, True, S.UP),
    (None, 100, False, S.UP),
    # just changed (< 15 s): handshake after the change = up, else unknown
    (0, None, True, S.UNKNOWN),
    (5, 3, True, S.UP),
    (5, 5, True, S.UNKNOWN),  # handshake at the very instant is not "after"
    (5, 10, True, S.UNKNOWN),  # handshake before the change
    (14.9, None, True, S.UNKNOWN),
    (14.9, None, False, S.UNKNOWN),
    # between 15 s and 275 s: handshake after the change = up, else down
    (15, None, True, S.DOWN),
    (15, 1, True, S.UP),
    (100, 99, True, S.UP),
    (100, 101, True, S.DOWN),  # recent handshake but before the change
    (100, None, False, S.UNKNOWN),
    (275, 274, True, S.UP),  # exactly 275 s is still the middle region
    (275, 276, True, S.DOWN),
    (275.1, 276, True, S.DOWN),
    (275.1, 274, True, S.UP),
]


@pytest.mark.parametrize("since_change,since_hs,has_ep,expected", TABLE)
def test_state_table(since_change, since_hs, has_ep, expected) -> None:
    change = None if since_change is None else NOW - since_change
    hs = None if since_hs is None else NOW - since_hs
    assert calculate_state(NOW, hs, change, has_ep) is expected


@given(
    since_change=st.one_of(st.none(), st.floats(0, 10_000)),
    since_hs=st.one_of(st.none(), st.floats(0, 10_000)),
    has_ep=st.booleans(),
)
def test_state_properties(since_change, since_hs, has_ep) -> None:
    change = None if since_change is None else NOW - since_change
    hs = None if since_hs is None else NOW - since_hs
    state = calculate_state(NOW, hs, change, has_ep)
    hs_after = hs is not None and (change is None or hs > change)
    # A handshake after the last endpoint change within the down interval is always up.
    if hs_after and since_hs < PEER_DOWN_INTERVAL:
        assert state is S.UP
    # Unknown only while waiting on a fresh endpoint, or with no endpoint at all.
    if state is S.UNKNOWN:
        assert not has_ep or (
            since_change is not None and since_change < ENDPOINT_CONNECTION_TIMEOUT
        )
    # Down never happens without an endpoint.
    if not has_ep:
        assert state is not S.DOWN
    # No handshake ever is never up.
    if hs is None:
        assert state is not S.UP


def test_pick_next_endpoint_round_robin() -> None:
    cands = [A, B, C]
    assert pick_next_endpoint(cands, None, None) == A
    assert pick_next_endpoint(cands, A, A) == B
    assert pick_next_endpoint(cands, B, B) == C
    assert pick_next_endpoint(cands, C, C) == A  # wraps
    assert pick_next_endpoint(cands, ("198.51.100.9", 1), None) == A  # vanished -> first
    assert pick_next_endpoint([], A, A) is None
    # single candidate in use: nowhere to go; but re-set if WireGuard lost/roamed it
    assert pick_next_endpoint([A], A, A) is None
    assert pick_next_endpoint([A], A, None) == A
    assert pick_next_endpoint([A], A, B) == A
    assert pick_next_endpoint([A], B, B) == A


def test_status_cycles_endpoints_while_down() -> None:
    st_ = PeerStatus(label="n2")
    t = NOW
    st_.update_from_wireguard(None)
    assert st_.calculate_state(t) is S.UNKNOWN
    ep, changed = st_.reconcile_endpoint([A, B], t)
    assert (ep, changed) == (A, True)
    assert st_.state is S.UNKNOWN and st_.last_endpoint_change == t

    # WireGuard now has A, no handshake: unknown for 15 s, endpoint kept
    st_.update_from_wireguard(PeerState(b"k" * 32, A, None, 0, 148))
    assert st_.calculate_state(t + 10) is S.UNKNOWN
    assert st_.reconcile_endpoint([A, B], t + 10) == (A, False)

    # after 15 s with no handshake: down -> next candidate B
    assert st_.calculate_state(t + 16) is S.DOWN
    assert st_.reconcile_endpoint([A, B], t + 16) == (B, True)
    assert st_.last_used_endpoint == B and st_.last_endpoint_change == t + 16

    # handshake on B: up, nothing changes
    st_.update_from_wireguard(PeerState(b"k" * 32, B, t + 18, 92, 148))
    assert st_.calculate_state(t + 20) is S.UP
    assert st_.reconcile_endpoint([A, B], t + 20) == (B, False)

    # silence for > 275 s after the last handshake: down -> back to A
    assert st_.calculate_state(t + 18 + 276) is S.DOWN
    assert st_.reconcile_endpoint([A, B], t + 18 + 276) == (A, True)


def test_status_leaves_roamed_endpoint_alone() -> None:
    st_ = PeerStatus()
    st_.reconcile_endpoint([A], NOW)
    roamed = ("203.0.113.7", 40000)
    st_.update_from_wireguard(PeerState(b"k" * 32, roamed, NOW + 1, 10, 10))
    assert st_.calculate_state(NOW + 5) is S.UP
    assert st_.reconcile_endpoint([A], NOW + 5) == (None, False)
    assert st_.endpoint == roamed


def test_status_no_candidates() -> None:
    st_ = PeerStatus()
    assert st_.calculate_state(NOW) is S.UNKNOWN
    assert st_.reconcile_endpoint([], NOW) == (None, False)
    assert st_.last_endpoint_change is None


def test_harvest_only_up_peers_with_endpoint_and_affiliate() -> None:
    up = PeerStatus(state=S.UP, endpoint=A)
    down = PeerStatus(state=S.DOWN, endpoint=B)
    no_ep = PeerStatus(state=S.UP, endpoint=None)
    stray = PeerStatus(state=S.UP, endpoint=C)
    got = harvest_endpoints(
        {"k1": up, "k2": down, "k3": no_ep, "k4": stray},
        {"k1": "node-1", "k2": "node-2", "k3": "node-3"},
    )
    assert {k: (v.affiliate_id, v.endpoint) for k, v in got.items()} == {"k1": ("node-1", A)}


def test_prune_statuses_and_the_tracker_use_one_rule() -> None:
    statuses = {"old": PeerStatus(), "keep": PeerStatus(state=S.UP)}
    assert prune_statuses(statuses, ["keep", "new"]) == ["old"]
    assert set(statuses) == {"keep"}  # pruning creates nothing
    tracker = PeerTracker()
    for key in ("k1", "k2"):
        spec = PeerSpec(key, IPv6Address("fd00::1"), (), (A,), f"node-{key}")
        tracker.observe(spec, None, NOW)  # no endpoint yet: the first candidate is set
    assert tracker.endpoint_changes == {"k1": 1, "k2": 1}
    tracker.forget_except({"k2"})
    assert list(tracker.states()) == ["k2"] and tracker.endpoint_changes == {"k2": 1}


R = ("198.51.100.9", 51821)  # a relay
RETRY = 8.0  # direct retry interval: the first probe comes 8 s after the switch to R


def relayed_status(t: float) -> PeerStatus:
    """A peer whose direct endpoints A, B failed and that is up through relay R at t."""
    st_ = PeerStatus(relays=frozenset({R}), direct_retry_interval=RETRY)
    st_.calculate_state(t - 40)
    assert st_.reconcile_endpoint([R, A, B], t - 40) == (A, True)  # direct ones first
    st_.update_from_wireguard(PeerState(b"k" * 32, A, None, 0, 148))
    st_.calculate_state(t - 24)
    assert st_.reconcile_endpoint([R, A, B], t - 24) == (B, True)
    st_.update_from_wireguard(PeerState(b"k" * 32, B, None, 0, 148))
    st_.calculate_state(t - 8)
    assert st_.reconcile_endpoint([R, A, B], t - 8) == (R, True)  # the relay last
    st_.update_from_wireguard(PeerState(b"k" * 32, R, t - 7, 1000, 1000))
    assert st_.calculate_state(t) is S.UP and st_.relayed
    return st_


def test_relayed_peer_probes_direct_and_goes_back() -> None:
    t = NOW
    st_ = relayed_status(t)
    # Up through the relay: a direct endpoint is tried after the retry interval.
    st_.calculate_state(t - 1)
    assert st_.reconcile_endpoint([R, A, B], t - 1) == (R, False)
    st_.calculate_state(t)
    assert st_.reconcile_endpoint([R, A, B], t) == (A, True)
    assert st_.probing and st_.relayed  # until the probe works
    assert st_.calculate_state(t + 1) is S.UP  # the relayed session still is
    # The peer still sends through the relay: WireGuard roamed back; we insist on A
    # for the probe time, then restore the relay as it was (still up, not "changed").
    st_.update_from_wireguard(PeerState(b"k" * 32, R, t - 7, 1200, 1100))
    st_.calculate_state(t + 1)
    assert st_.reconcile_endpoint([R, A, B], t + 1) == (A, False)
    st_.calculate_state(t + DIRECT_PROBE_TIME)
    assert st_.reconcile_endpoint([R, A, B], t + DIRECT_PROBE_TIME) == (R, True)
    assert not st_.probing and st_.state is S.UP and st_.last_endpoint_change == t - 8
    st_.update_from_wireguard(PeerState(b"k" * 32, R, t - 7, 1300, 1200))
    assert st_.calculate_state(t + 5) is S.UP
    assert st_.reconcile_endpoint([R, A, B], t + 5) == (R, False)
    # The next probe, the retry interval later, tries the next direct endpoint.
    later = t + RETRY
    st_.update_from_wireguard(PeerState(b"k" * 32, R, later - 5, 1400, 1300))
    st_.calculate_state(later)
    assert st_.reconcile_endpoint([R, A, B], later) == (B, True)


def test_relayed_peer_probe_succeeds() -> None:
    t = NOW
    st_ = relayed_status(t)
    assert st_.reconcile_endpoint([R, A, B], t) == (A, True)
    # Bytes counted before WireGuard had A prove nothing: the next step takes the
    # count and asks for a nudge through the tunnel.
    st_.update_from_wireguard(PeerState(b"k" * 32, A, t - 7, 1200, 1100))
    st_.calculate_state(t + 1)
    assert st_.reconcile_endpoint([R, A, B], t + 1) == (A, False)
    assert st_.probing and st_.nudge
    # The peer answered from A itself (it roamed to our direct address): keep A.
    st_.update_from_wireguard(PeerState(b"k" * 32, A, t - 7, 1500, 1100))
    st_.calculate_state(t + 2)
    assert st_.reconcile_endpoint([R, A, B], t + 2) == (A, False)
    assert not st_.probing and st_.state is S.UP and not st_.relayed
    st_.calculate_state(t + 60)
    assert st_.reconcile_endpoint([R, A, B], t + 60) == (A, False)


def test_relay_only_peer_never_probes_and_is_not_harvested() -> None:
    st_ = PeerStatus(relays=frozenset({R}))
    st_.calculate_state(NOW)
    assert st_.reconcile_endpoint([R], NOW) == (R, True)
    st_.update_from_wireguard(PeerState(b"k" * 32, R, NOW + 1, 10, 10))
    assert st_.calculate_state(NOW + 200) is S.UP
    assert st_.reconcile_endpoint([R], NOW + 200) == (R, False)
    assert harvest_endpoints({"k": st_}, {"k": "node"}) == {}
