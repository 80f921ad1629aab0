"""control.punch: punch windows and endpoint turns, on an injected clock (no sleeping)."""

from __future__ import annotations

from ipaddress import IPv6Address

from control.backends.base import PeerState
from control.peerspec import PeerSpec
from control.peersync import PeerTracker
from control.punch import PUNCH_PAYLOAD, Puncher

PRIVATE = ("10.1.0.2", 51820)
PUBLIC = ("192.0.2.10", 51820)
HARVESTED = ("192.0.2.10", 40001)
T0 = 1000.0


def run_clock(puncher: Puncher, until: float, start: float = T0) -> list[tuple[float, list, bool]]:
    """Drive the puncher as the agent's loop does: poll, then jump to the next deadline."""
    now, events = start, []
    while now <= until:
        targets, turned = puncher.poll(now)
        if targets or turned:
            events.append((now, targets, turned))
        deadline = puncher.next_deadline()
        if deadline is None:
            break
        now = max(deadline, now + 1e-6)
    return events


def test_new_endpoints_are_punched_every_interval_for_the_window() -> None:
    puncher = Puncher(interval=0.5, window=10.0, dwell=5.0)
    assert puncher.observe("B", [PRIVATE, PUBLIC], T0)
    events = run_clock(puncher, T0 + 60)
    punch_times = [t - T0 for t, targets, _ in events if targets]
    assert punch_times == [0.5 * i for i in range(20)]  # 0, 0.5, ... 9.5: 20 rounds in 10 s
    assert all(targets == [PRIVATE, PUBLIC] for _, targets, _ in events if targets)
    assert puncher.next_deadline() is None and puncher.active() == []


def test_each_new_endpoint_gets_its_turn_in_wireguard() -> None:
    puncher = Puncher(interval=0.5, window=10.0, dwell=5.0)
    puncher.observe("B", [PRIVATE, PUBLIC], T0)
    assert puncher.endpoint_to_try("B", T0) == PRIVATE
    assert puncher.endpoint_to_try("B", T0 + 4.9) == PRIVATE
    assert puncher.endpoint_to_try("B", T0 + 5.0) == PUBLIC
    assert puncher.endpoint_to_try("B", T0 + 9.9) == PUBLIC
    assert puncher.endpoint_to_try("B", T0 + 10.0) is None  # the usual cycle again
    turns = [t - T0 for t, _, turned in run_clock(puncher, T0 + 60) if turned]
    # The agent reconciles at each turn and at the end (the usual cycle again), only then.
    assert turns == [0.0, 5.0, 10.0]


def test_the_window_stretches_so_every_endpoint_gets_a_turn() -> None:
    puncher = Puncher(interval=0.5, window=10.0, dwell=5.0)
    third = ("2001:db8::10", 51820)
    puncher.observe("B", [PRIVATE, PUBLIC, third], T0)
    assert puncher.endpoint_to_try("B", T0 + 12) == third
    events = run_clock(puncher, T0 + 60)
    assert max(t for t, targets, _ in events if targets) - T0 == 14.5
    assert [t - T0 for t, _, turned in events if turned] == [0.0, 5.0, 10.0, 15.0]


def test_only_new_endpoints_open_a_window() -> None:
    puncher = Puncher()
    puncher.observe("B", [PRIVATE, PUBLIC], T0)
    run_clock(puncher, T0 + 60)
    assert not puncher.observe("B", [PRIVATE, PUBLIC], T0 + 60)
    assert puncher.poll(T0 + 60) == ([], False)
    # A harvested mapping shows up: only it is punched and tried.
    assert puncher.observe("B", [PRIVATE, PUBLIC, HARVESTED], T0 + 61)
    assert puncher.poll(T0 + 61) == ([HARVESTED], True)
    assert puncher.endpoint_to_try("B", T0 + 61) == HARVESTED
    # One that went away and came back is new again.
    run_clock(puncher, T0 + 120, start=T0 + 61.5)
    puncher.observe("B", [PRIVATE], T0 + 120)
    assert puncher.observe("B", [PRIVATE, PUBLIC], T0 + 121)


def test_open_restarts_a_window_over_all_endpoints() -> None:
    puncher = Puncher(interval=0.5, window=10.0, dwell=5.0)
    puncher.observe("B", [PRIVATE, PUBLIC], T0)
    run_clock(puncher, T0 + 60)
    puncher.open("B", [PRIVATE, PUBLIC], T0 + 100)
    assert puncher.poll(T0 + 100) == ([PRIVATE, PUBLIC], True)
    assert puncher.endpoint_to_try("B", T0 + 105) == PUBLIC


def test_a_late_poll_sends_one_round_not_a_burst() -> None:
    puncher = Puncher(interval=0.5, window=10.0, dwell=5.0)
    puncher.observe("B", [PUBLIC], T0)
    assert puncher.poll(T0) == ([PUBLIC], True)
    assert puncher.poll(T0 + 3.0) == ([PUBLIC], False)  # the loop was held up 3 s
    assert puncher.poll(T0 + 3.1) == ([], False)
    assert puncher.next_deadline() == T0 + 3.5


def test_peers_share_rounds_and_are_forgotten() -> None:
    puncher = Puncher()
    puncher.observe("B", [PUBLIC], T0)
    puncher.observe("C", [PUBLIC, HARVESTED], T0)
    assert puncher.poll(T0) == ([PUBLIC, HARVESTED], True)  # one datagram per endpoint
    puncher.forget_except({"C"})
    assert puncher.active() == ["C"] and puncher.endpoint_to_try("B", T0) is None
    assert puncher.observe("B", [PUBLIC], T0 + 1)  # forgotten: new again


def test_punch_payload_is_no_wireguard_message() -> None:
    # WireGuard's shortest message is a 32-byte keepalive; every implementation drops
    # anything shorter than its 4-byte type field before looking at it.
    assert len(PUNCH_PAYLOAD) < 4


def spec(*endpoints: tuple[str, int]) -> PeerSpec:
    return PeerSpec("B", IPv6Address("fd00::b"), (), tuple(endpoints), "b")


def test_tracker_switches_to_the_endpoint_to_try_unless_the_peer_is_up() -> None:
    tracker = PeerTracker()
    s = spec(PRIVATE, PUBLIC)
    assert tracker.observe(s, None, T0) == PRIVATE  # first candidate, as always
    # Two seconds later, well inside the 15 s the cycle would wait: the punch turn wins.
    assert tracker.observe(s, None, T0 + 2, try_endpoint=PUBLIC) == PUBLIC
    assert tracker.endpoint_changes["B"] == 2
    # Up on it (a handshake after the change): a later turn does not move it.
    wg = PeerState(b"B", endpoint=PUBLIC, last_handshake=T0 + 3, rx_bytes=1, tx_bytes=1)
    assert tracker.observe(s, wg, T0 + 4, try_endpoint=PRIVATE) == PUBLIC
    assert tracker.states()["B"] == "up" and tracker.endpoint_changes["B"] == 2


def test_a_turn_that_a_handshake_beat_is_cancelled() -> None:
    """A handshake completes between reading WireGuard and setting the turn's endpoint:
    the turn is not set, WireGuard keeps its endpoint and the peer counts as up."""
    tracker = PeerTracker()
    s = spec(PUBLIC, PRIVATE)
    assert tracker.observe(s, None, T0) == PUBLIC
    tracker.begin_round()
    read = PeerState(b"B", endpoint=PUBLIC, last_handshake=None, rx_bytes=0, tx_bytes=0)
    assert tracker.observe(s, read, T0 + 5, try_endpoint=PRIVATE) == PRIVATE
    assert tracker.has_turns()
    fresh = PeerState(b"B", endpoint=HARVESTED, last_handshake=T0 + 5.1, rx_bytes=1, tx_bytes=1)
    assert tracker.cancel_raced_turns({"B": fresh}) == {"B"}
    assert not tracker.has_turns() and tracker.cancel_raced_turns({"B": fresh}) == set()
    # WireGuard stays where the handshake came from: up, and the next turn is not forced.
    assert tracker.observe(s, fresh, T0 + 6, try_endpoint=PRIVATE) == HARVESTED
    assert tracker.states()["B"] == "up"


def test_a_turn_without_a_handshake_stays() -> None:
    tracker = PeerTracker()
    s = spec(PUBLIC, PRIVATE)
    tracker.observe(s, None, T0)
    tracker.begin_round()
    read = PeerState(b"B", endpoint=PUBLIC, last_handshake=T0 - 400, rx_bytes=0, tx_bytes=0)
    assert tracker.observe(s, read, T0 + 5, try_endpoint=PRIVATE) == PRIVATE
    assert tracker.cancel_raced_turns({"B": read}) == set()
    turned = PeerState(b"B", endpoint=PRIVATE, last_handshake=T0 - 400, rx_bytes=0, tx_bytes=0)
    assert tracker.observe(s, turned, T0 + 6) == PRIVATE
    # A reconcile that failed before its end leaves no turn behind for the next one.
    tracker.observe(s, turned, T0 + 30, try_endpoint=PUBLIC)
    tracker.begin_round()
    assert not tracker.has_turns()


def test_a_single_endpoint_turns_once_then_waits_out_the_window() -> None:
    puncher = Puncher(interval=0.5, window=10.0, dwell=5.0)
    puncher.observe("B", [PUBLIC], T0)
    events = run_clock(puncher, T0 + 60)
    assert [t - T0 for t, _, turned in events if turned] == [0.0, 5.0]
    assert len([t for t, targets, _ in events if targets]) == 20
