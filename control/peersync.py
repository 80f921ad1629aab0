"""Per-peer status kept across reconciles: WireGuard's view, state, endpoint choice."""

from __future__ import annotations

from control import records
from control.affiliate import Affiliate
from control.backends.base import PeerState
from control.peerspec import PeerSpec
from control.peerstate import (
    DIRECT_RETRY_INTERVAL,
    PeerStateName,
    PeerStatus,
    harvest_endpoints,
    prune_statuses,
)
from kubespan_dp.netutil import Address


class PeerTracker:
    def __init__(self) -> None:
        self._statuses: dict[str, PeerStatus] = {}  # by public key (base64)
        self.endpoint_changes: dict[str, int] = {}
        self.relays: frozenset[Address] = frozenset()  # relay addresses (config)
        self.direct_retry_interval = DIRECT_RETRY_INTERVAL
        # Punch turns of the current reconcile: WireGuard's last handshake as read before
        # the turn (see cancel_raced_turns).
        self._turns: dict[str, float | None] = {}

    def observe(
        self,
        spec: PeerSpec,
        wg: PeerState | None,
        now: float,
        try_endpoint: Address | None = None,
    ) -> Address | None:
        """Update one peer from WireGuard; return the endpoint to set (None: keep WireGuard's).

        `try_endpoint` (hole punching) is switched to at once unless the peer is up."""
        status = self._statuses.setdefault(spec.public_key, PeerStatus(label=spec.label))
        status.label = spec.label
        status.relays = self.relays
        status.direct_retry_interval = self.direct_retry_interval
        status.update_from_wireguard(wg)
        status.calculate_state(now)
        forced = False
        if try_endpoint is not None and try_endpoint != status.last_used_endpoint:
            forced = status.state is not PeerStateName.UP
            if forced:
                self._turns[spec.public_key] = status.last_handshake
                status.update_endpoint(try_endpoint, now)
        endpoint, changed = status.reconcile_endpoint(list(spec.endpoints), now)
        changed = changed or forced
        if changed:
            self.endpoint_changes[spec.public_key] = (
                self.endpoint_changes.get(spec.public_key, 0) + 1
            )
        return endpoint

    def begin_round(self) -> None:
        """A reconcile starts: turns of one that failed before its end are stale."""
        self._turns.clear()

    def has_turns(self) -> bool:
        return bool(self._turns)

    def cancel_raced_turns(self, states: dict[str, PeerState]) -> set[str]:
        """Punch turns that a handshake beat: the peers whose turn must not be set.

        A turn is decided on WireGuard's state as read at the start of a reconcile and
        set at its end, after the routing. A handshake completed in between means
        WireGuard has a working endpoint, which the turn would overwrite: the peer would
        look up while our packets went where they cannot arrive, until it sent
        something. Both ends turn in step, so this is common. `states`: WireGuard's
        view read again just before the set, by key. A cancelled turn keeps WireGuard's
        endpoint, and its change time, so the handshake counts as after it (up)."""
        turns, self._turns = self._turns, {}
        cancelled: set[str] = set()
        for key, handshake in turns.items():
            wg, status = states.get(key), self._statuses.get(key)
            if wg is None or status is None or wg.endpoint is None:
                continue
            if wg.last_handshake is not None and wg.last_handshake != handshake:
                status.endpoint = status.last_used_endpoint = wg.endpoint
                cancelled.add(key)
        return cancelled

    def forget_except(self, keys: set[str]) -> None:
        for key in prune_statuses(self._statuses, keys):
            self.endpoint_changes.pop(key, None)

    def take_nudges(self) -> list[str]:
        """Peers to send something through the tunnel now (a direct probe is on)."""
        due = [key for key, status in self._statuses.items() if status.nudge]
        for key in due:
            self._statuses[key].nudge = False
        return due

    def probing(self) -> list[str]:
        """Peers whose direct endpoint is being tried (see control.peerstate)."""
        return [key for key, status in self._statuses.items() if status.probing]

    def states(self) -> dict[str, PeerStateName]:
        return {key: status.state for key, status in self._statuses.items()}

    def rows(self) -> list[tuple[str, PeerStatus]]:
        return sorted(self._statuses.items())

    def harvest(self, affiliates: dict[str, Affiliate]) -> dict[str, tuple[str, Address]]:
        """public key -> (affiliate id, endpoint) for every peer up with a known endpoint."""
        by_key = {
            a.kubespan.public_key: a.node_id for a in affiliates.values() if a.kubespan is not None
        }
        return {
            key: (h.affiliate_id, h.endpoint)
            for key, h in harvest_endpoints(self._statuses, by_key).items()
        }

    def status_records(self) -> list[records.Record]:
        return [
            records.peer_status_record(
                key,
                label=s.label,
                state=s.state.value,
                endpoint=s.endpoint,
                rx_bytes=s.rx_bytes,
                tx_bytes=s.tx_bytes,
                last_handshake=s.last_handshake,
                last_used_endpoint=s.last_used_endpoint,
                last_endpoint_change=s.last_endpoint_change,
                relayed=s.relayed,
            )
            for key, s in self.rows()
        ]
