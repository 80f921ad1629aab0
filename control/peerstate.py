"""Peer connection state and endpoint selection, as Talos's KubeSpan computes them.

A peer is judged only from two instants: when we last pointed WireGuard at a new
endpoint for it (T0) and when the last handshake completed (H). WireGuard re-handshakes
at least every REJECT_AFTER_TIME + REKEY_TIMEOUT + REKEY_ATTEMPT_TIME = 275 s while
traffic or keepalives flow, so a peer with no handshake for that long is down.
Right after an endpoint change we want a faster verdict: a handshake after T0 means
up; without one, the first 15 s are "unknown" (give it time) and after that "down"
(try the next candidate).

    time since T0      handshake after T0      handshake within 275 s
    -------------      ------------------      ----------------------
    > 275 s            (ignored)               yes -> up, no -> down
    < 15 s             yes -> up, no -> unknown
    otherwise          yes -> up, no -> down

A verdict of "down" for a peer we never gave an endpoint is reported as "unknown":
there is nothing to blame. A down peer (or one without an endpoint yet) moves to the
next candidate endpoint, round robin.

Relays (control.relay): candidates that are relay addresses come last, so the direct
endpoints are tried first. While a peer is up through a relay, a direct endpoint is
tried every DIRECT_RETRY_INTERVAL, for DIRECT_PROBE_TIME only: once WireGuard has the
direct endpoint (the next reconcile) the agent sends an echo through the tunnel, so
the peer answers at once. The probe works when a handshake completes or traffic comes
back with WireGuard still on the direct endpoint (had the peer's packets come through
the relay, WireGuard would have roamed back to it); otherwise the relay is restored as
if nothing happened, without waiting for the peer to be declared down. The peer stays
"up" and "relayed" during a probe; traffic toward it may be lost for those seconds.

Everything here is pure: `now` is passed in, as wall-clock seconds on the same clock
as WireGuard's last-handshake time (`PeerState.last_handshake`). None means "never".
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from control.backends.base import PeerState
from kubespan_dp.netutil import Address

PEER_DOWN_INTERVAL = float(180 + 5 + 90)  # REJECT_AFTER_TIME + REKEY_TIMEOUT + REKEY_ATTEMPT_TIME
ENDPOINT_CONNECTION_TIMEOUT = 15.0
DIRECT_RETRY_INTERVAL = 120.0  # while relayed, try a direct endpoint this often
DIRECT_PROBE_TIME = 3.0  # a nudge through the tunnel is answered in one round trip
RECONCILE_INTERVAL = 30.0  # the agent also reconciles on every event


class PeerStateName(enum.StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


def _since(now: float, instant: float | None) -> float:
    return float("inf") if instant is None else now - instant


def _after(a: float | None, b: float | None) -> bool:
    """Whether instant a is strictly after instant b (never is before everything)."""
    if a is None:
        return False
    return b is None or a > b


def calculate_state(
    now: float,
    last_handshake: float | None,
    last_endpoint_change: float | None,
    has_endpoint: bool,
) -> PeerStateName:
    """The state table from the module docstring."""
    since_change = _since(now, last_endpoint_change)
    handshake_after_change = _after(last_handshake, last_endpoint_change)
    if since_change > PEER_DOWN_INTERVAL:
        up = _since(now, last_handshake) < PEER_DOWN_INTERVAL
        state = PeerStateName.UP if up else PeerStateName.DOWN
    elif since_change < ENDPOINT_CONNECTION_TIMEOUT:
        state = PeerStateName.UP if handshake_after_change else PeerStateName.UNKNOWN
    else:
        state = PeerStateName.UP if handshake_after_change else PeerStateName.DOWN
    if state is PeerStateName.DOWN and not has_endpoint:
        state = PeerStateName.UNKNOWN
    return state


def pick_next_endpoint(
    candidates: Sequence[Address],
    last_used: Address | None,
    current: Address | None,
) -> Address | None:
    """The candidate after `last_used` (round robin), or None when there is no change to make.

    A peer with a single candidate that is already in use has nowhere to rotate to.
    A `last_used` no longer among the candidates restarts at the first one.
    """
    if not candidates:
        return None
    if last_used is None:
        return candidates[0]
    try:
        idx = candidates.index(last_used)
    except ValueError:
        idx = -1
    if len(candidates) == 1 and idx == 0 and current == last_used:
        return None
    return candidates[(idx + 1) % len(candidates)]


@dataclass
class PeerStatus:
    """What the agent knows about one peer; updated in place on every reconcile."""

    label: str = ""
    state: PeerStateName = PeerStateName.UNKNOWN
    endpoint: Address | None = None  # as WireGuard reports it now (may have roamed)
    last_handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_used_endpoint: Address | None = None  # the endpoint we last configured
    last_endpoint_change: float | None = None
    relays: frozenset[Address] = frozenset()  # endpoints that are relays
    # While a direct endpoint is probed: the relay to go back to and when we had
    # switched to it; the bytes received when WireGuard surely had the direct endpoint
    # (the reconcile after the switch), and whether to nudge the peer now.
    probe_fallback: tuple[Address, float | None] | None = None
    probe_rx: int | None = None
    nudge: bool = False
    direct_retry_interval: float = DIRECT_RETRY_INTERVAL
    last_direct_probe: float | None = None
    last_probed: Address | None = None

    @property
    def relayed(self) -> bool:
        """Reached through a relay (also while a direct endpoint is only being tried)."""
        return self.probing or (self.endpoint is not None and self.endpoint in self.relays)

    def update_from_wireguard(self, wg: PeerState | None) -> None:
        """Copy WireGuard's view of the peer (None: the device does not have it yet)."""
        if wg is None:
            self.endpoint, self.last_handshake, self.rx_bytes, self.tx_bytes = None, None, 0, 0
            return
        self.endpoint = wg.endpoint
        self.last_handshake = wg.last_handshake
        self.rx_bytes = wg.rx_bytes
        self.tx_bytes = wg.tx_bytes

    def calculate_state(self, now: float) -> PeerStateName:
        if self.probing:  # the peer is up through the relay; only a path is being tried
            self.state = PeerStateName.UP
            return self.state
        self.state = calculate_state(
            now, self.last_handshake, self.last_endpoint_change, self.last_used_endpoint is not None
        )
        return self.state

    def should_change_endpoint(self) -> bool:
        return self.state is PeerStateName.DOWN or self.last_used_endpoint is None

    def update_endpoint(self, endpoint: Address, now: float) -> None:
        self.endpoint = endpoint
        self.last_used_endpoint = endpoint
        self.last_endpoint_change = now
        self.state = PeerStateName.UNKNOWN

    def reconcile_endpoint(
        self, candidates: Sequence[Address], now: float
    ) -> tuple[Address | None, bool]:
        """One reconcile step for the endpoint, after `calculate_state(now)`.

        Returns (endpoint to configure in WireGuard or None to leave WireGuard's own,
        whether we switched to a new candidate). When WireGuard reports an endpoint
        other than the one we set, the peer roamed and we leave it alone.
        """
        candidates = [c for c in candidates if c not in self.relays] + [
            c for c in candidates if c in self.relays
        ]
        if self.probe_fallback is not None:
            return self._probe_step(now)
        if self._should_probe_direct(candidates, now):
            direct = [c for c in candidates if c not in self.relays]
            assert self.last_used_endpoint is not None
            self.probe_fallback = (self.last_used_endpoint, self.last_endpoint_change)
            self.probe_rx = None
            self.last_direct_probe = now
            target = pick_next_endpoint(direct, self.last_probed, None) or direct[0]
            self.last_probed = target
            self.update_endpoint(target, now)
            return target, True
        changed = False
        if self.should_change_endpoint():
            new = pick_next_endpoint(candidates, self.last_used_endpoint, self.endpoint)
            if new is not None:
                self.update_endpoint(new, now)
                changed = True
        if self.last_used_endpoint is not None and self.endpoint in (None, self.last_used_endpoint):
            self.endpoint = self.last_used_endpoint
            return self.last_used_endpoint, changed
        return None, changed

    def _should_probe_direct(self, candidates: Sequence[Address], now: float) -> bool:
        return (
            self.state is PeerStateName.UP
            and self.relayed
            and self.endpoint == self.last_used_endpoint
            and any(c not in self.relays for c in candidates)
            # the interval counts from the last probe, or from the switch to the relay
            and _since(now, self.last_direct_probe or self.last_endpoint_change)
            >= self.direct_retry_interval
        )

    @property
    def probing(self) -> bool:
        return self.probe_fallback is not None

    def _probe_step(self, now: float) -> tuple[Address | None, bool]:
        """A direct endpoint is being tried: keep it if it works, else restore the relay."""
        assert self.probe_fallback is not None and self.last_used_endpoint is not None
        relay, relay_since = self.probe_fallback
        direct = self.endpoint == self.last_used_endpoint  # not roamed back to the relay
        if self.probe_rx is None:
            # Bytes counted so far may have come through the relay before WireGuard had
            # the direct endpoint; from now on, more bytes and no roam = a direct answer.
            self.probe_rx, self.nudge = self.rx_bytes, True
            return self.last_used_endpoint, False
        handshake = _after(self.last_handshake, self.last_endpoint_change)
        if direct and (handshake or self.rx_bytes > self.probe_rx):
            self.probe_fallback = None
            if not handshake:  # the relayed session goes on, on the direct path
                self.last_endpoint_change = relay_since
            self.state = PeerStateName.UP
            return self.last_used_endpoint, False
        if _since(now, self.last_endpoint_change) < DIRECT_PROBE_TIME:
            return self.last_used_endpoint, False
        self.probe_fallback = None
        self.endpoint = self.last_used_endpoint = relay
        self.last_endpoint_change = relay_since
        self.calculate_state(now)
        return relay, True


@dataclass(frozen=True)
class HarvestedEndpoint:
    affiliate_id: str
    endpoint: Address


def harvest_endpoints(
    statuses: Mapping[str, PeerStatus],
    affiliate_by_key: Mapping[str, str],
) -> dict[str, HarvestedEndpoint]:
    """Endpoints seen working, to report as extra endpoints of their affiliates.

    `statuses` and `affiliate_by_key` are keyed by the peer's public key (any stable
    form, e.g. base64). Only peers that are up with a known endpoint and a known
    affiliate count. Result keyed by public key.
    """
    out: dict[str, HarvestedEndpoint] = {}
    for key, status in statuses.items():
        if status.state is not PeerStateName.UP or status.endpoint is None or status.relayed:
            continue  # (a relay's address is no endpoint of the peer's own)
        affiliate_id = affiliate_by_key.get(key)
        if affiliate_id is None:
            continue
        out[key] = HarvestedEndpoint(affiliate_id, status.endpoint)
    return out


def prune_statuses(statuses: dict[str, PeerStatus], keep: Iterable[str]) -> list[str]:
    """Drop (in place) the statuses of peers no longer specified; the keys dropped."""
    wanted = set(keep)
    gone = [key for key in statuses if key not in wanted]
    for key in gone:
        del statuses[key]
    return gone
