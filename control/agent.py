"""The KubeSpan agent: the reconcile loop that a user runs on each node.

On start it loads the machine config and the node's identity, brings up the
WireGuard link (kernel module or our userspace daemon, whichever the mode picks),
publishes the local affiliate to every configured discovery service and watches the
others (merged over the services). Every discovery change, and every 30 s, it
reconciles:

    affiliates -> peer specs -> (WireGuard's view) -> peer states, endpoint choice
               -> routed prefixes -> nftables + rules -> WireGuard peers (a diff)
               -> records, metrics

and then, whether or not that succeeded, announces the node (local affiliate plus
harvested endpoints) to discovery: a node whose nftables or backend fails is still
known to its peers.

Netlink (pyroute2) does not run on uvloop, so this loop is plain asyncio and every
backend or routing call runs in a worker thread. On stop every rule, route, link and
process the agent made is removed, but the node stays registered with discovery (it
expires by its TTL, 30 min, if it never comes back): a restart does not make its peers
drop it. `kubespan leave` removes the registration. SIGHUP applies a new config in
place where it can (MTU, listen port, filters, discovery services, ...); a new cluster,
link name, WireGuard mode or state directory rebuilds everything; disabling KubeSpan
removes everything and withdraws the node from discovery.

Relays (control.relay, KubeSpanPyConfig `relays`): the node announces each relay's
address as one more endpoint, registers with each every 20 s from its WireGuard port,
and reaches a peer through a relay only when the peer's direct endpoints failed (then
it retries them in the background, see control.peerstate). With `runRelay` the node
runs a relay itself, in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace

from control import api, punch, records, routing
from control.affiliate import Affiliate
from control.backends.base import BackendError, PeerConfig, PeerState, WireGuardBackend
from control.backends.select import select_backend
from control.config import POD_CIDRS_HELP, ConfigError, MachineConfig, load_config
from control.discovery.pool import DiscoveryPool, ServiceTarget
from control.endpoints import local_affiliate, system_addresses, system_hostname
from control.identity import (
    IdentityError,
    KubeSpanIdentity,
    first_physical_mac,
    load_or_create_kubespan_identity,
    load_or_create_node_id,
)
from control.keys import decode_key, encode_key
from control.link import LinkError, set_link_address
from control.logsetup import setup_logging
from control.metrics import ReconcileStats, agent_families
from control.peerspec import PeerSpec, build_peer_specs
from control.peerstate import DIRECT_RETRY_INTERVAL, PeerStateName
from control.peersync import PeerTracker
from control.promhttp import MetricsServer
from control.relay import registration as relay_registration
from control.relay.core import RelayCore
from control.relay.server import RelayServer, relay_key
from kubespan_dp.netutil import Address, format_endpoint

log = logging.getLogger("control.agent")

PERSISTENT_KEEPALIVE = 25
RECONCILE_INTERVAL = 30.0
RELAY_REGISTER_INTERVAL = 20.0  # keeps the NAT mapping toward each relay open too
PROBE_RECONCILE_INTERVAL = 1.0  # while a direct endpoint is tried (peerstate)


class AgentError(RuntimeError):
    """The agent cannot start; the message says why and what to fix."""


@dataclass
class AgentOptions:
    config_paths: list[str]
    reconcile_interval: float = RECONCILE_INTERVAL
    metrics_listen: str | None = None  # "host:port"; off by default
    hostname: str | None = None
    direct_retry_interval: float = DIRECT_RETRY_INTERVAL


class Agent:
    def __init__(self, config: MachineConfig, options: AgentOptions) -> None:
        self.config = config
        self.options = options
        self.hostname = options.hostname or system_hostname()  # the FQDN, as Talos
        self.store = records.RecordStore()
        self.api_store = api.ResourceStore()
        self.reconciles = ReconcileStats()
        self.backend: WireGuardBackend | None = None
        self.backend_reason = ""
        self.identity: KubeSpanIdentity | None = None
        self.node_id = ""
        self.discovery: DiscoveryPool | None = None
        self.tracker = PeerTracker()
        self.puncher = punch.Puncher()
        self._own_endpoints: frozenset[Address] = frozenset()
        self.specs: list[PeerSpec] = []
        self._kick = asyncio.Event()
        self._punch_wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._reload = False
        self._api: api.ApiServer | None = None
        self._metrics_server: MetricsServer | None = None
        self.relay: RelayServer | None = None  # this node's relay (runRelay)
        self._register_wake = asyncio.Event()

    @property
    def link(self) -> str:
        return self.config.local.link_name

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        self._api = api.ApiServer(self.api_store, self.link)
        await self._api.start()
        if self.options.metrics_listen:
            host, _, port = self.options.metrics_listen.rpartition(":")
            self._metrics_server = MetricsServer(
                lambda: [
                    *agent_families(self.tracker, self.reconciles, time.time()),
                    *(self.relay.families() if self.relay else []),
                ]
            )
            bound = await self._metrics_server.start(host.strip("[]") or "127.0.0.1", int(port))
            log.info("metrics on http://%s:%d/metrics", host or "127.0.0.1", bound)
        await self._configure_relay(None, self.config)
        registrar = asyncio.create_task(self._register_loop())
        puncher = asyncio.create_task(self._punch_loop())
        try:
            await self._serve()
        finally:
            for task in (registrar, puncher):
                task.cancel()
            await asyncio.gather(registrar, puncher, return_exceptions=True)
            await self._teardown()
            await self._stop_relay()
            await self._api.stop()
            if self._metrics_server:
                await self._metrics_server.stop()

    def stop(self) -> None:
        log.info("stopping")
        self._stopping.set()
        self._kick.set()

    def request_reload(self) -> None:
        self._reload = True
        self._kick.set()

    async def _serve(self) -> None:
        if not self.config.kubespan.enabled:
            await asyncio.to_thread(routing.remove)  # what a previous run may have left
        while not self._stopping.is_set():
            if self._reload:
                self._reload = False
                await self._reload_config()
            if self.config.kubespan.enabled and self.backend is None:
                await self._bring_up()
            if self.backend is not None:
                started = time.monotonic()
                try:
                    await self.reconcile()
                except (BackendError, routing.RoutingError, OSError, ValueError) as exc:
                    log.error("reconcile failed, retrying: %s", exc)
                except Exception:  # a bug or bad data from a peer must not kill the node's mesh
                    log.exception("reconcile failed unexpectedly, retrying")
                self.reconciles.record(time.monotonic() - started)
            if self.backend is not None:  # announce even when the reconcile failed
                await self.announce()
            interval = self.options.reconcile_interval
            if self.tracker.probing():  # a direct probe ends within seconds
                interval = min(interval, PROBE_RECONCILE_INTERVAL)
            try:
                await asyncio.wait_for(self._kick.wait(), interval)
            except TimeoutError:
                pass
            self._kick.clear()

    async def _bring_up(self) -> None:
        cfg = self.config
        state_dir = cfg.local.state_dir
        mac = first_physical_mac(exclude=(self.link,), allow_virtual=True)
        if mac is None:
            raise AgentError(
                "no Ethernet link with a MAC address: cannot derive the KubeSpan address"
            )
        self.identity = load_or_create_kubespan_identity(state_dir, cfg.cluster_id, mac)
        self.node_id = load_or_create_node_id(state_dir)
        backend, self.backend_reason = await asyncio.to_thread(
            select_backend, cfg.local.wireguard_mode
        )
        self.backend = backend
        log.info(
            "node %s: KubeSpan address %s, WireGuard %s (%s)",
            self.node_id,
            self.identity.address.ip,
            backend.mode,
            self.backend_reason,
        )
        try:
            await asyncio.to_thread(
                backend.up,
                self.link,
                self.identity.private_key,
                cfg.local.listen_port,
                routing.WIREGUARD_MARK,  # what the nftables rules let through untouched
                cfg.kubespan.mtu,
            )
            await asyncio.to_thread(set_link_address, self.link, self.identity.link_address)
        except (BackendError, LinkError, ValueError):
            await asyncio.to_thread(backend.down)
            self.backend = None
            raise
        self.discovery = DiscoveryPool(
            cfg.cluster_id, cfg.cluster_secret, self.node_id, on_change=self._kick.set
        )
        await self.discovery.configure(service_targets(cfg))
        self.store.put(records.identity_record(self.identity))
        self._register_wake.set()

    async def _teardown(self, leave: bool = False) -> None:
        """Remove link, daemon and routing; leaves nothing behind on this machine.

        The node stays registered with discovery (peers keep it across a restart; it
        expires by its TTL otherwise) unless ``leave`` withdraws it."""
        if self.discovery is not None:
            left = await self.discovery.close(leave=leave)
            self.discovery = None
            for name, error in left.items():
                if error is None:
                    log.info("node %s withdrawn from discovery service %s", self.node_id, name)
                else:
                    log.warning("could not withdraw from discovery service %s: %s", name, error)
        # The link goes before the routing: once it is gone nothing from a peer can be
        # decrypted here and answered in clear because the marks were removed first.
        if self.backend is not None:
            try:
                await asyncio.to_thread(self.backend.down)
            except BackendError as exc:
                log.error("could not remove the WireGuard link: %s", exc)
            self.backend = None
        try:
            await asyncio.to_thread(routing.remove)
        except routing.RoutingError as exc:
            log.error("could not remove the KubeSpan routing: %s", exc)
        self.tracker = PeerTracker()
        self.puncher = punch.Puncher()
        self._own_endpoints = frozenset()
        self.specs = []
        for kind in records.KINDS:
            self.store.replace_kind(kind, [])
        await self._publish_records()
        log.info("KubeSpan torn down: no link, rules, routes or daemon left")

    async def _reload_config(self) -> None:
        try:
            new = load_config(*self.options.config_paths)
        except (ConfigError, OSError) as exc:
            log.error("config reload rejected, keeping the running config: %s", exc)
            return
        old, self.config = self.config, new
        await self._configure_relay(old, new)
        self._register_wake.set()  # new relays: register with them now
        if self.backend is not None:
            if not new.kubespan.enabled or needs_rebuild(old, new):
                # Another cluster or identity, or KubeSpan off: peers must not keep
                # routing to a node that is no longer theirs.
                await self._teardown(leave=not new.kubespan.enabled or left_cluster(old, new))
            else:
                await self._apply_in_place(old, new)
        log.info("config reloaded (KubeSpan %s)", "enabled" if new.kubespan.enabled else "disabled")

    async def _apply_in_place(self, old: MachineConfig, new: MachineConfig) -> None:
        """Apply what changed without touching the link's peers or sessions (as Talos):
        MTU and listen port on the device, discovery services by starting and stopping
        clients; everything else (filters, networks, flags) takes effect in the next
        reconcile and announcement."""
        assert self.backend is not None and self.identity is not None
        device = (new.kubespan.mtu, new.local.listen_port)
        if device != (old.kubespan.mtu, old.local.listen_port):
            try:
                await asyncio.to_thread(
                    self.backend.up,
                    self.link,
                    self.identity.private_key,
                    new.local.listen_port,
                    routing.WIREGUARD_MARK,
                    new.kubespan.mtu,
                )
            except (BackendError, ValueError) as exc:
                log.error("cannot change the link in place (%s): rebuilding it", exc)
                await self._teardown()
                return
            log.info("link %s: MTU %d, listen port %d applied in place", self.link, *device)
        services = service_targets(new)
        if self.discovery is not None and services != service_targets(old):
            await self.discovery.configure(services)

    # -- reconcile --------------------------------------------------------------------

    async def reconcile(self) -> None:
        assert self.backend is not None and self.identity is not None
        cfg = self.config
        now = time.time()
        affiliates = self._peer_affiliates()
        self.specs = build_peer_specs(affiliates.values(), self.node_id)
        wg_states = await asyncio.to_thread(self.backend.peer_states)
        psk = cfg.secret_bytes
        configs: list[PeerConfig] = []
        self.tracker.relays = frozenset(cfg.local.relays)
        self.tracker.direct_retry_interval = self.options.direct_retry_interval
        probing_before = set(self.tracker.probing())
        self._open_punch_windows(time.monotonic())
        self.tracker.begin_round()
        for spec in self.specs:
            key = decode_key(spec.public_key)
            try_endpoint = self.puncher.endpoint_to_try(spec.public_key, time.monotonic())
            wg = wg_states.get(key)
            endpoint = self.tracker.observe(spec, wg, now, try_endpoint)
            _log_endpoint_change(spec, wg, endpoint, try_endpoint)
            configs.append(
                PeerConfig(key, psk, endpoint, PERSISTENT_KEEPALIVE, tuple(spec.allowed_ips))
            )
        self.tracker.forget_except({s.public_key for s in self.specs})
        self.puncher.forget_except({s.public_key for s in self.specs})
        routed = routing.routed_prefixes(
            {s.public_key: s.allowed_ips for s in self.specs},
            self.tracker.states(),
            cfg.kubespan.allow_down_peer_bypass,
        )
        # Routing before peers: a peer's packets are only decrypted here once our
        # answers are steered back into the tunnel, never answered in clear (at start,
        # after a restart). If the routing fails, the peers wait for it.
        await asyncio.to_thread(routing.apply, routed, self.link, cfg.kubespan.mtu)
        configs = await self._cancel_raced_turns(configs)
        await asyncio.to_thread(self.backend.apply_peers, configs)
        probing = set(self.tracker.probing())
        self._log_probes(probing_before, probing)
        nudges = set(self.tracker.take_nudges())
        await self._nudge([s for s in self.specs if s.public_key in nudges])
        self._update_records(affiliates)
        await self._publish_records()

    # -- relays -------------------------------------------------------------------------

    async def _configure_relay(self, old: MachineConfig | None, new: MachineConfig) -> None:
        """Start, stop or move this node's relay as the config says."""
        want = (new.local.run_relay, new.local.relay_port, new.cluster_id, new.cluster_secret)
        if old is not None and self.relay is not None:
            have = (old.local.run_relay, old.local.relay_port, old.cluster_id, old.cluster_secret)
            if want == have:
                return
        await self._stop_relay()
        if not new.local.run_relay:
            return
        relay = RelayServer(RelayCore(relay_key(new)))
        try:
            await relay.start("::", new.local.relay_port)
        except OSError as exc:
            log.error("cannot start the relay on port %d: %s", new.local.relay_port, exc)
            return
        self.relay = relay

    async def _stop_relay(self) -> None:
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None

    async def _register_loop(self) -> None:
        """Register with every configured relay from WireGuard's port (control.relay)."""
        failing: set[tuple[str, int]] = set()
        while True:
            relays = list(self.config.local.relays)
            if relays and self.backend is not None and self.identity is not None:
                errors = await asyncio.to_thread(
                    relay_registration.register,
                    self.config.local.listen_port,
                    relays,
                    relay_registration.registration_key(
                        self.config.cluster_id, self.config.secret_bytes
                    ),
                    decode_key(self.identity.public_key_b64),
                    time.time_ns(),
                )
                for relay, error in errors.items():
                    if relay not in failing:
                        log.warning("cannot register with relay %s: %s", relay, error)
                failing = set(errors)
            try:
                await asyncio.wait_for(self._register_wake.wait(), RELAY_REGISTER_INTERVAL)
            except TimeoutError:
                pass
            self._register_wake.clear()

    def _log_probes(self, before: set[str], after: set[str]) -> None:
        rows = dict(self.tracker.rows())
        for key in sorted(before ^ after):
            status = rows.get(key)
            if status is None:
                continue
            used = status.last_used_endpoint
            endpoint = format_endpoint(used) if used is not None else "-"
            if key in after:
                log.info("peer %s: trying direct endpoint %s (relayed)", status.label, endpoint)
            elif status.relayed:
                log.info("peer %s: no answer directly, back to relay %s", status.label, endpoint)
            else:
                log.info(
                    "peer %s: direct endpoint %s works (WireGuard: %s, rx %d)",
                    status.label,
                    endpoint,
                    status.endpoint,
                    status.rx_bytes,
                )

    async def _nudge(self, specs: list[PeerSpec]) -> None:
        """Send an ICMPv6 echo through the tunnel to peers whose direct endpoint is being
        tried: the peer answers at once, on the direct path if our echo came that way."""
        if specs:
            await asyncio.to_thread(send_echoes, [str(s.address) for s in specs])

    # -- hole punching ---------------------------------------------------------------

    async def _cancel_raced_turns(self, configs: list[PeerConfig]) -> list[PeerConfig]:
        """Leave WireGuard's endpoint to peers whose punch turn a handshake beat (see
        PeerTracker.cancel_raced_turns); reads WireGuard again only when some peer turns."""
        assert self.backend is not None
        if not self.tracker.has_turns():
            return configs
        wg_states = await asyncio.to_thread(self.backend.peer_states)
        cancelled = self.tracker.cancel_raced_turns(
            {encode_key(k): state for k, state in wg_states.items()}
        )
        if not cancelled:
            return configs
        for spec in self.specs:
            if spec.public_key in cancelled:
                log.info("handshake with %s during a punch turn: turn cancelled", spec.label)
        return [
            replace(c, endpoint=None) if encode_key(c.public_key) in cancelled else c
            for c in configs
        ]

    def _open_punch_windows(self, now: float) -> None:
        """Open punch windows (control.punch) for peers with new endpoints, and for every
        peer not up when this node's own endpoints changed: the peers are probing our
        new endpoint right now, so we probe theirs."""
        assert self.discovery is not None
        own_endpoints = frozenset(self.discovery.own_endpoints)
        own_new = sorted(own_endpoints - self._own_endpoints)
        self._own_endpoints = own_endpoints
        states = self.tracker.states()
        opened = []
        relays = self.tracker.relays
        for spec in self.specs:
            # A relay needs no punching (and its address is no endpoint of the peer's own).
            direct = tuple(e for e in spec.endpoints if e not in relays)
            if self.puncher.observe(spec.public_key, direct, now):
                opened.append((spec, direct))
            elif own_new and states.get(spec.public_key) is not PeerStateName.UP:
                self.puncher.open(spec.public_key, direct, now)
                opened.append((spec, direct))
        if own_new:
            log.info("own endpoints %s new in discovery", ", ".join(map(format_endpoint, own_new)))
        for spec, direct in opened:
            log.info(
                "punching towards %s at %s", spec.label, ", ".join(map(format_endpoint, direct))
            )
        if opened:
            self._punch_wake.set()

    async def _punch_loop(self) -> None:
        """Send the punches that are due and reconcile when a peer's turn to try the next
        endpoint comes; sleeps while no window is open."""
        while True:
            targets, turned = self.puncher.poll(time.monotonic())
            if turned:
                self._kick.set()
            if targets and self.backend is not None:
                port = self.config.local.listen_port
                failed = await asyncio.to_thread(punch.send_punches, port, targets)
                for endpoint, error in failed.items():
                    log.debug("punch to %s failed: %s", format_endpoint(endpoint), error)
            deadline = self.puncher.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(self._punch_wake.wait(), timeout)
            except TimeoutError:
                pass
            self._punch_wake.clear()

    def _peer_affiliates(self) -> dict[str, Affiliate]:
        assert self.discovery is not None
        return {aid: a for aid, a in self.discovery.affiliates.items() if aid != self.node_id}

    async def announce(self) -> None:
        """Publish the local affiliate (and harvested endpoints); independent of reconcile."""
        try:
            await self._publish_local(self._peer_affiliates())
        except Exception:  # the next round tries again
            log.exception("announcing this node to discovery failed")

    async def _publish_local(self, affiliates: dict[str, Affiliate]) -> None:
        assert self.discovery is not None
        addresses = await asyncio.to_thread(system_addresses, None, (self.link,))
        public_ip = self.discovery.public_ip
        public_ips = [public_ip] if public_ip is not None else []
        local = local_affiliate(
            node_id=self.node_id,
            hostname=self.hostname,
            addresses=addresses,
            config=self.config,
            identity=self.identity,
            public_ips=public_ips,
        )
        harvested: dict[str, list] = {}
        if self.config.kubespan.harvest_extra_endpoints:
            for affiliate_id, endpoint in self.tracker.harvest(affiliates).values():
                harvested.setdefault(affiliate_id, []).append(endpoint)
        self.discovery.set_local(local, harvested)

    # -- reporting --------------------------------------------------------------------

    def _update_records(self, affiliates: dict[str, Affiliate]) -> None:
        self.store.replace_kind(
            records.PEER_SPEC, [records.peer_spec_record(s) for s in self.specs]
        )
        self.store.replace_kind(records.PEER_STATUS, self.tracker.status_records())
        harvested = self.tracker.harvest(affiliates)
        self.store.replace_kind(
            records.ENDPOINT,
            [records.endpoint_record(key, aid, ep) for key, (aid, ep) in harvested.items()],
        )

    async def _publish_records(self) -> None:
        for kind in records.KINDS:
            docs = [api.record_to_wire(r, self.hostname) for r in self.store.list(kind)]
            if kind is records.IDENTITY:
                for doc in docs:
                    doc["spec"]["wireguardMode"] = self.backend.mode if self.backend else ""
            await self.api_store.set(kind.aliases[0], docs)


def send_echoes(addresses: list[str]) -> None:
    """One ICMPv6 echo request to each address (errors ignored: it is only a nudge)."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    except OSError as exc:
        log.debug("cannot open an ICMPv6 socket: %s", exc)
        return
    with sock:
        for address in addresses:
            try:  # type 128 echo request; the kernel fills in the checksum
                sock.sendto(b"\x80\x00\x00\x00\x4b\x53\x00\x01kubespan", (address, 0))
            except OSError as exc:
                log.debug("echo to %s failed: %s", address, exc)


def _log_endpoint_change(
    spec: PeerSpec, wg: PeerState | None, endpoint: Address | None, tried: Address | None
) -> None:
    """Say when the agent points WireGuard at another endpoint for a peer (and whether
    a punch turn did)."""
    had = wg.endpoint if wg is not None else None
    if endpoint is None or endpoint == had:
        return
    log.info(
        "peer %s: endpoint %s -> %s%s",
        spec.label,
        format_endpoint(had) if had is not None else "none",
        format_endpoint(endpoint),
        " (punch turn)" if endpoint == tried else "",
    )


def service_targets(config: MachineConfig) -> list[ServiceTarget]:
    """The configured discovery services as the clients connect to them."""
    return [ServiceTarget(s.name, s.target, s.insecure) for s in config.discovery_services]


def needs_rebuild(old: MachineConfig, new: MachineConfig) -> bool:
    """Changes that need a new link, identity or discovery session (not in place)."""
    return (
        new.cluster_id,
        new.cluster_secret,
        new.local.link_name,
        new.local.wireguard_mode,
        new.local.state_dir,
    ) != (
        old.cluster_id,
        old.cluster_secret,
        old.local.link_name,
        old.local.wireguard_mode,
        old.local.state_dir,
    )


def left_cluster(old: MachineConfig, new: MachineConfig) -> bool:
    """The node's old registration would be stale: another cluster or identity."""
    return (new.cluster_id, new.local.state_dir) != (old.cluster_id, old.local.state_dir)


# -- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubespan agent",
        description="Run the KubeSpan agent: bring up the WireGuard link, publish this node to the "
        "discovery service, keep a full mesh with every other node and route traffic "
        "for them through it. Needs root. SIGHUP reloads the config (in place where it "
        "can); SIGINT/SIGTERM stop the agent and remove everything it set up on this "
        "machine, but the node stays registered with discovery so that its peers keep "
        "it across a restart (`kubespan leave` withdraws it).",
        epilog=POD_CIDRS_HELP,
    )
    parser.add_argument(
        "--config",
        "-c",
        action="append",
        required=True,
        metavar="FILE",
        help="machine config (Talos multi-document YAML); repeat to combine files",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default)",
    )
    parser.add_argument(
        "--log-json", action="store_true", help="log JSON lines instead of readable text"
    )
    parser.add_argument("--hostname", help="the hostname to publish (default: this machine's)")
    parser.add_argument(
        "--reconcile-interval",
        type=float,
        default=RECONCILE_INTERVAL,
        metavar="SECONDS",
        help="periodic reconcile interval (default 30, as Talos)",
    )
    parser.add_argument(
        "--direct-retry-interval",
        type=float,
        default=DIRECT_RETRY_INTERVAL,
        metavar="SECONDS",
        help="while a peer is reached through a relay, try one of its direct endpoints "
        f"this often (default {DIRECT_RETRY_INTERVAL:.0f})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(json_lines=args.log_json, level=logging.DEBUG if args.verbose else logging.INFO)
    try:
        config = load_config(*args.config)
    except ConfigError as exc:
        print(f"kubespan agent: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"kubespan agent: cannot read config: {exc}", file=sys.stderr)
        return 2
    if not config.kubespan.enabled:
        log.warning("KubeSpan is disabled in the config: removing anything a previous run left")
    if config.kubespan.enabled and not config.discovery_services:
        print(
            "kubespan agent: KubeSpan needs the discovery service registry enabled", file=sys.stderr
        )
        return 2
    options = AgentOptions(
        args.config,
        args.reconcile_interval,
        args.metrics_listen,
        args.hostname,
        args.direct_retry_interval,
    )
    agent = Agent(config, options)
    try:
        asyncio.run(agent.run())
    except (AgentError, IdentityError, BackendError, LinkError) as exc:
        log.error("%s", exc)
        return 1
    return 0
