"""Machine config: the KubeSpan-relevant parts of a Talos machine config, validated.

A Talos machine config is a multi-document YAML stream. We read:

* the v1alpha1 document (the one with ``version: v1alpha1`` and no ``kind``):
  ``machine.network.kubespan``, ``cluster.{id, secret, discovery}`` (the form Talos
  wrote before 1.14), and for what the node publishes ``machine.type``,
  ``machine.features.nodeAddressSortAlgorithm``, ``machine.kubelet.registerWithFQDN``,
  ``cluster.network.{podSubnets, serviceSubnets}`` and
  ``cluster.controlPlane.localAPIServerPort``;
* ``DiscoveryIdentityConfig`` (``clusterID``, ``clusterSecret``) and one
  ``DiscoveryServiceConfig`` per discovery service (``name``, ``endpoint``): what
  ``talosctl gen config`` writes since Talos 1.14 instead of ``cluster.id``,
  ``cluster.secret`` and ``cluster.discovery`` (each conflicts with its v1alpha1 form,
  as in Talos);
* a ``KubeSpanConfig`` document (newer Talos; conflicts with
  ``machine.network.kubespan``, as in Talos);
* a ``KubeSpanEndpointsConfig`` document (also accepted spelled
  ``KubespanEndpointsConfig``, as Talos's KubeSpan guide writes it);
* from Talos's Kubernetes documents (1.14+), only what decides the published node
  data: ``KubeNetworkConfig`` (pod and service subnets), ``KubeAPIServerConfig``
  (``apiPort``) and ``KubeNodeConfig`` (``registerWithFQDN``);
* our own ``KubeSpanPyConfig`` document (apiVersion v1alpha1) with what this
  project adds::

      apiVersion: v1alpha1
      kind: KubeSpanPyConfig
      listenPort: 51820            # WireGuard UDP port
      wireguardMode: auto          # auto | kernel | userspace
      podCIDRs: [10.244.1.0/24]    # networks this node advertises (advertiseKubernetesNetworks)
      stateDir: /var/lib/kubespan  # identity files live here
      linkName: kubespan           # WireGuard link name
      # discoveryEndpoint replaces every configured discovery service with this one
      discoveryEndpoint: http://10.0.0.1:3000
      # relays (control.relay) this node registers with and announces as endpoints
      relays: ["203.0.113.10:51821"]
      runRelay: false              # true: this node runs a relay too
      relayPort: 51821             # the UDP port it listens on (all addresses)

Everything else in the stream (other sections, other kinds) is ignored. Inside the
sections and documents we own, unknown keys and wrong types are errors; in Talos's
Kubernetes documents only the keys we read are checked. Every problem is collected
with its YAML path and raised at once as one ``ConfigError``.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from kubespan_dp.netutil import (
    Address,
    InterfaceNameError,
    IPNetwork,
    check_ifname,
    format_endpoint,
    parse_endpoint,
)

# Talos constants (pkg/machinery/constants).
KUBESPAN_LINK_NAME = "kubespan"
KUBESPAN_DEFAULT_PORT = 51820
KUBESPAN_LINK_MTU = 1420
KUBESPAN_LINK_MINIMUM_MTU = 1280
DEFAULT_DISCOVERY_SERVICE_ENDPOINT = "https://discovery.talos.dev/"
DEFAULT_STATE_DIR = "/var/lib/kubespan"
DEFAULT_RELAY_PORT = 51821
CLUSTER_SECRET_SIZE = 32
MAX_CLUSTER_ID_BYTES = 256  # the discovery service rejects longer ids

DEFAULT_CONTROL_PLANE_PORT = 6443  # the kube-apiserver's local port
DEFAULT_POD_SUBNET = "10.244.0.0/16"  # cluster.network without podSubnets
DEFAULT_SERVICE_SUBNET = "10.96.0.0/12"  # cluster.network without serviceSubnets
LEGACY_DISCOVERY_SERVICE_NAME = "legacy"  # what Talos calls the .cluster.discovery service
OVERRIDE_DISCOVERY_SERVICE_NAME = "discoveryEndpoint"  # ours, from KubeSpanPyConfig

WIREGUARD_MODES = ("auto", "kernel", "userspace")
# machine.type as Talos parses it: "" and "join" mean worker.
MACHINE_TYPES = {
    "": "worker",
    "join": "worker",
    "worker": "worker",
    "init": "init",
    "controlplane": "controlplane",
}
CONTROL_PLANE_TYPES = ("init", "controlplane")
ADDRESS_SORT_ALGORITHMS = ("v1", "v2")  # v1 is the default (machine.features)
ENDPOINTS_KINDS = ("KubeSpanEndpointsConfig", "KubespanEndpointsConfig")
KUBESPAN_KIND = "KubeSpanConfig"
PY_KIND = "KubeSpanPyConfig"
DISCOVERY_SERVICE_KIND = "DiscoveryServiceConfig"
DISCOVERY_IDENTITY_KIND = "DiscoveryIdentityConfig"
KUBE_NETWORK_KIND = "KubeNetworkConfig"
KUBE_API_SERVER_KIND = "KubeAPIServerConfig"
KUBE_NODE_KIND = "KubeNodeConfig"
OWNED_KINDS = (
    KUBESPAN_KIND,
    *ENDPOINTS_KINDS,
    PY_KIND,
    DISCOVERY_SERVICE_KIND,
    DISCOVERY_IDENTITY_KIND,
)
KUBE_KINDS = (KUBE_NETWORK_KIND, KUBE_API_SERVER_KIND, KUBE_NODE_KIND)

KUBESPAN_NEEDS_DISCOVERY = (
    "KubeSpan requires cluster discovery to be enabled "
    "(a DiscoveryServiceConfig document, or .cluster.discovery with the service registry)"
)

# Where advertised pod CIDRs come from; shown by --help and by the agent's warning.
POD_CIDRS_HELP = (
    "advertiseKubernetesNetworks: true announces this node's pod CIDRs to its peers. Talos "
    "takes them from the Kubernetes Node object (spec.podCIDRs); this agent does not watch "
    "Kubernetes, so list them in the KubeSpanPyConfig document (podCIDRs: [10.244.1.0/24]) "
    "or with `kubespan gen config --pod-cidr`."
)


class ConfigError(ValueError):
    """All problems found in a config, each as (yaml_path, message)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("invalid config:\n" + "\n".join(f"  {p}: {m}" for p, m in self.problems))


@dataclass(frozen=True)
class KubeSpanSettings:
    enabled: bool = False
    advertise_kubernetes_networks: bool = False
    allow_down_peer_bypass: bool = False
    harvest_extra_endpoints: bool = False
    mtu: int = KUBESPAN_LINK_MTU
    # None = no filtering; a list (even empty) = filters applied in order.
    endpoint_filters: tuple[str, ...] | None = None
    exclude_advertised_networks: tuple[IPNetwork, ...] = ()
    extra_announced_endpoints: tuple[Address, ...] = ()

    @property
    def force_routing(self) -> bool:
        """Talos's ForceRouting: route to peers even when they are down."""
        return not self.allow_down_peer_bypass


@dataclass(frozen=True)
class DiscoveryService:
    """One discovery service to register with (Talos's cluster.ServiceEndpoint)."""

    name: str
    endpoint: str  # the URL as configured
    target: str  # "host:port" to dial
    insecure: bool  # plaintext gRPC (an http:// endpoint)

    @classmethod
    def from_url(cls, name: str, endpoint: str) -> DiscoveryService:
        target, insecure = normalize_discovery_endpoint(endpoint)
        return cls(name, endpoint, target, insecure)


@dataclass(frozen=True)
class DiscoverySettings:
    """.cluster.discovery, or the DiscoveryServiceConfig documents (then `services`)."""

    enabled: bool = False
    service_enabled: bool = True
    service_endpoint: str = DEFAULT_DISCOVERY_SERVICE_ENDPOINT
    kubernetes_enabled: bool = True
    services: tuple[DiscoveryService, ...] = ()  # from documents, in document order

    @property
    def service_active(self) -> bool:
        return bool(self.services) or (self.enabled and self.service_enabled)


@dataclass(frozen=True)
class LocalSettings:
    """What this project adds (the KubeSpanPyConfig document)."""

    listen_port: int = KUBESPAN_DEFAULT_PORT
    wireguard_mode: str = "auto"
    pod_cidrs: tuple[IPNetwork, ...] = ()
    state_dir: str = DEFAULT_STATE_DIR
    link_name: str = KUBESPAN_LINK_NAME
    discovery_endpoint: str | None = None
    relays: tuple[Address, ...] = ()  # relays to register with and announce
    run_relay: bool = False  # this node runs a relay on relay_port
    relay_port: int = DEFAULT_RELAY_PORT


@dataclass(frozen=True)
class NodeSettings:
    """Talos settings that decide what the node publishes about itself."""

    machine_type: str = "worker"  # worker | controlplane | init
    api_server_port: int = DEFAULT_CONTROL_PLANE_PORT
    register_with_fqdn: bool = False  # the nodename is the FQDN, not the short hostname
    address_sort: str = "v1"  # machine.features.nodeAddressSortAlgorithm
    # Kubernetes networks (cluster.network or KubeNetworkConfig); their addresses are
    # never node addresses. Empty when the config has no Kubernetes network section.
    pod_subnets: tuple[IPNetwork, ...] = ()
    service_subnets: tuple[IPNetwork, ...] = ()

    @property
    def control_plane(self) -> bool:
        return self.machine_type in CONTROL_PLANE_TYPES


@dataclass(frozen=True)
class MachineConfig:
    cluster_id: str = ""
    cluster_secret: str = field(default="", repr=False)
    kubespan: KubeSpanSettings = KubeSpanSettings()
    discovery: DiscoverySettings = DiscoverySettings()
    local: LocalSettings = LocalSettings()
    node: NodeSettings = NodeSettings()

    @property
    def secret_bytes(self) -> bytes:
        """The cluster secret decoded (32 bytes: the AES key and WireGuard PSK)."""
        return base64.b64decode(self.cluster_secret)

    @property
    def discovery_services(self) -> tuple[DiscoveryService, ...]:
        """Every discovery service to register with, in config order (empty: discovery off).

        Our KubeSpanPyConfig discoveryEndpoint replaces them all; otherwise the
        DiscoveryServiceConfig documents, or the one .cluster.discovery service."""
        if self.local.discovery_endpoint:
            endpoint = self.local.discovery_endpoint
            return (DiscoveryService.from_url(OVERRIDE_DISCOVERY_SERVICE_NAME, endpoint),)
        if self.discovery.services:
            return self.discovery.services
        if self.discovery.service_active:
            endpoint = self.discovery.service_endpoint
            return (DiscoveryService.from_url(LEGACY_DISCOVERY_SERVICE_NAME, endpoint),)
        return ()

    @property
    def discovery_endpoint(self) -> str:
        """The first discovery service's URL (the local override wins)."""
        services = self.discovery_services
        return services[0].endpoint if services else self.discovery.service_endpoint

    def discovery_target(self) -> tuple[str, bool]:
        """("host:port", insecure) of the first discovery service (see discovery_services)."""
        return normalize_discovery_endpoint(self.discovery_endpoint)

    @property
    def kubernetes_networks(self) -> tuple[IPNetwork, ...]:
        """Pod and service networks: addresses in them are not node addresses.

        Talos excludes the cluster's pod and service subnets plus the node's own pod
        CIDRs; ours are the KubeSpanPyConfig podCIDRs (always excluded: they are pod
        networks whatever the rest of the config says)."""
        nets = (*self.node.pod_subnets, *self.node.service_subnets, *self.local.pod_cidrs)
        return tuple(dict.fromkeys(nets))


def normalize_discovery_endpoint(endpoint: str) -> tuple[str, bool]:
    """("host:port", insecure) from a discovery service URL, as Talos's NormalizeEndpoint:
    the scheme is http, https or grpc; only http is plaintext; the port defaults to 80
    for http, else 443. Raises ValueError."""
    parts = urlsplit(endpoint)
    port = parts.port  # raises ValueError on a bad port
    if not parts.scheme:
        raise ValueError("endpoint scheme is required")
    if parts.scheme not in ("http", "https", "grpc"):
        raise ValueError("endpoint scheme must be http://, https:// or grpc://")
    if not parts.hostname:
        raise ValueError("endpoint host is required")
    insecure = parts.scheme == "http"
    return format_endpoint((parts.hostname, port or (80 if insecure else 443))), insecure


# --- parsing helpers -------------------------------------------------------------------

Problems = list[tuple[str, str]]


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        str: "string",
        list: "list",
        dict: "mapping",
        float: "number",
    }.get(type(value), type(value).__name__)


class _Section:
    """A mapping being read at a YAML path; reports wrong types and unknown keys."""

    def __init__(self, data: dict, path: str, problems: Problems):
        self.data = data
        self.path = path
        self.problems = problems
        self.known: set[str] = set()

    def sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> None:
        self.problems.append((self.sub(key), message))

    def _get(self, key: str, check: Callable[[Any], bool], expected: str) -> Any:
        self.known.add(key)
        if key not in self.data or self.data[key] is None:
            return None
        value = self.data[key]
        if not check(value):
            self.error(key, f"expected {expected}, got {_type_name(value)}")
            return None
        return value

    def boolean(self, key: str) -> bool | None:
        return self._get(key, lambda v: isinstance(v, bool), "a boolean")

    def integer(self, key: str) -> int | None:
        return self._get(
            key, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"
        )

    def string(self, key: str) -> str | None:
        return self._get(key, lambda v: isinstance(v, str), "a string")

    def strings(self, key: str) -> list[tuple[str, str]] | None:
        """A list of strings, each with its own path; bad items reported and dropped."""
        items = self._get(key, lambda v: isinstance(v, list), "a list")
        if items is None:
            return None
        out = []
        for i, item in enumerate(items):
            path = f"{self.sub(key)}[{i}]"
            if isinstance(item, str):
                out.append((path, item))
            else:
                self.problems.append((path, f"expected a string, got {_type_name(item)}"))
        return out

    def section(self, key: str) -> _Section | None:
        value = self._get(key, lambda v: isinstance(v, dict), "a mapping")
        return None if value is None else _Section(value, self.sub(key), self.problems)

    def finish(self) -> None:
        for key in self.data:
            if key not in self.known:
                self.problems.append((self.sub(str(key)), "unknown key"))


def parse_cidr(text: str) -> IPNetwork:
    """A prefix as Go's netip.ParsePrefix takes it (host bits allowed, then masked)."""
    if "/" not in text:
        raise ValueError("missing /prefix-length")
    return ip_network(text.strip(), strict=False)


def parse_subnet_or_address(text: str) -> IPNetwork:
    """A CIDR, or a bare address meaning a single-host prefix (endpoint filters)."""
    if "/" in text:
        return parse_cidr(text)
    addr = ip_address(text)
    return ip_network(f"{addr}/{addr.max_prefixlen}")


def _parse_list(
    section: _Section, key: str, parse: Callable[[str], Any], what: str
) -> tuple | None:
    items = section.strings(key)
    if items is None:
        return None
    out = []
    for path, text in items:
        try:
            out.append(parse(text))
        except ValueError as exc:
            section.problems.append((path, f"{what} is not valid: {text!r} ({exc})"))
    return tuple(out)


def _check_service_url(problems: Problems, path: str, url: str) -> None:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        problems.append((path, f"cluster discovery service registry endpoint is invalid: {exc}"))
        return
    if parts.scheme not in ("http", "https", "grpc") or not parts.hostname:
        problems.append(
            (
                path,
                f"cluster discovery service registry endpoint is invalid: {url!r} "
                "(expected http://, https:// or grpc://host[:port])",
            )
        )
    elif parts.path not in ("", "/") or parts.query or parts.fragment:
        problems.append((path, "cluster discovery service path should be empty"))


def _check_secret(s: _Section, key: str) -> None:
    """The cluster secret is the AES-256 key: standard base64 of 32 bytes."""
    secret = s.data.get(key)
    if not isinstance(secret, str) or not secret:
        return
    try:
        raw = base64.b64decode(secret, validate=True)
    except (binascii.Error, ValueError):
        s.error(key, "cluster secret must be base64 of 32 bytes: not valid base64")
        return
    if len(raw) != CLUSTER_SECRET_SIZE:
        s.error(key, f"cluster secret must be base64 of 32 bytes: decodes to {len(raw)} bytes")


def _check_cluster_id(s: _Section, key: str) -> None:
    cid = s.data.get(key)
    if isinstance(cid, str) and len(cid.encode()) > MAX_CLUSTER_ID_BYTES:
        s.error(key, f"cluster id must be at most {MAX_CLUSTER_ID_BYTES} bytes")


def _read_subnets(s: _Section, key: str) -> tuple[IPNetwork, ...] | None:
    return _parse_list(s, key, parse_cidr, "subnet")


# --- the documents ----------------------------------------------------------------------


def _read_kubespan(s: _Section, zero_mtu_is_default: bool = False) -> dict:
    """Keys shared by machine.network.kubespan and the KubeSpanConfig document.

    ``zero_mtu_is_default``: in machine.network.kubespan, Talos reads mtu 0 as 1420."""
    out: dict[str, Any] = {}
    for key, attr in (
        ("enabled", "enabled"),
        ("advertiseKubernetesNetworks", "advertise_kubernetes_networks"),
        ("allowDownPeerBypass", "allow_down_peer_bypass"),
        ("harvestExtraEndpoints", "harvest_extra_endpoints"),
    ):
        value = s.boolean(key)
        if value is not None:
            out[attr] = value
    mtu = s.integer("mtu")
    if mtu == 0 and zero_mtu_is_default:
        mtu = None
    if mtu is not None:
        out["mtu"] = mtu
        if mtu < KUBESPAN_LINK_MINIMUM_MTU:
            s.error("mtu", f"kubespan link MTU must be at least {KUBESPAN_LINK_MINIMUM_MTU}")
        elif mtu > 65535:
            s.error("mtu", "kubespan link MTU must be at most 65535")
    filters = s.section("filters")
    if filters is not None:
        items = filters.strings("endpoints")
        if items is not None:
            good = []
            for path, text in items:
                try:
                    parse_subnet_or_address(text.removeprefix("!"))
                    good.append(text)
                except ValueError:
                    s.problems.append((path, f"KubeSpan endpoint filter is not valid: {text!r}"))
            out["endpoint_filters"] = tuple(good)
        nets = _parse_list(
            filters,
            "excludeAdvertisedNetworks",
            parse_cidr,
            "KubeSpan exclude advertised networks filter",
        )
        if nets is not None:
            out["exclude_advertised_networks"] = nets
        filters.finish()
    return out


def _read_machine(machine: _Section, state: dict) -> None:
    """machine.*: KubeSpan (ours) and, leniently, what shapes the published node data."""
    mtype = machine.string("type")
    if mtype is not None:
        if mtype in MACHINE_TYPES:
            state["machine_type"] = MACHINE_TYPES[mtype]
        else:
            machine.error("type", f"unknown machine type {mtype!r}")
    features = machine.section("features")
    if features is not None:
        algorithm = features.string("nodeAddressSortAlgorithm")
        if algorithm:
            if algorithm.lower() in ADDRESS_SORT_ALGORITHMS:
                state["address_sort"] = algorithm.lower()
            else:
                features.error(
                    "nodeAddressSortAlgorithm",
                    f"invalid node address sort algorithm: {algorithm!r} (expected v1 or v2)",
                )
    kubelet = machine.section("kubelet")
    if kubelet is not None:
        fqdn = kubelet.boolean("registerWithFQDN")
        if fqdn is not None:
            state["register_with_fqdn"] = fqdn
    network = machine.section("network")
    if network is not None and "kubespan" in network.data:
        ks = network.section("kubespan")
        if ks is not None:
            state["kubespan"] = _read_kubespan(ks, zero_mtu_is_default=True)
            ks.finish()


def _read_cluster_network(network: _Section, state: dict) -> None:
    """cluster.network: when present, Talos defaults the subnets it leaves empty."""
    pods = _read_subnets(network, "podSubnets")
    services = _read_subnets(network, "serviceSubnets")
    state["pod_subnets"] = pods or (ip_network(DEFAULT_POD_SUBNET),)
    state["service_subnets"] = services or (ip_network(DEFAULT_SERVICE_SUBNET),)


def _read_v1alpha1(doc: dict, problems: Problems, state: dict) -> None:
    root = _Section(doc, "", problems)
    machine = root.section("machine")
    if machine is not None:
        _read_machine(machine, state)
    c = root.section("cluster")
    if c is None:
        return
    cid = c.string("id")
    if cid:
        state["cluster_id"] = cid
        _check_cluster_id(c, "id")
    secret = c.string("secret")
    if secret:
        state["cluster_secret"] = secret
        _check_secret(c, "secret")
    network = c.section("network")
    if network is not None:
        _read_cluster_network(network, state)
    control_plane = c.section("controlPlane")
    if control_plane is not None:
        port = control_plane.integer("localAPIServerPort")
        if port:  # 0 means the default, as in Talos
            state["api_server_port"] = port
    disc = c.section("discovery")
    if disc is None:
        return
    state["has_discovery_block"] = True  # present at all: conflicts with the documents
    d: dict[str, Any] = {}
    enabled = disc.boolean("enabled")
    if enabled is not None:
        d["enabled"] = enabled
    regs = disc.section("registries")
    if regs is not None:
        k8s = regs.section("kubernetes")
        if k8s is not None:
            disabled = k8s.boolean("disabled")
            if disabled is not None:
                d["kubernetes_enabled"] = not disabled
            k8s.finish()
        svc = regs.section("service")
        if svc is not None:
            disabled = svc.boolean("disabled")
            if disabled is not None:
                d["service_enabled"] = not disabled
            endpoint = svc.string("endpoint")
            if endpoint:
                d["service_endpoint"] = endpoint
                d["service_endpoint_path"] = svc.sub("endpoint")
            svc.finish()
        regs.finish()
    disc.finish()
    state["discovery"] = d


def _read_endpoints_doc(s: _Section, state: dict) -> None:
    eps = _parse_list(s, "extraAnnouncedEndpoints", parse_endpoint, "extra announced endpoint")
    if eps is not None:
        state["extra_endpoints"] = eps


def _read_py_doc(s: _Section, state: dict) -> None:
    out: dict[str, Any] = {}
    port = s.integer("listenPort")
    if port is not None:
        if 1 <= port <= 65535:
            out["listen_port"] = port
        else:
            s.error("listenPort", f"listen port must be in 1-65535, got {port}")
    mode = s.string("wireguardMode")
    if mode is not None:
        if mode in WIREGUARD_MODES:
            out["wireguard_mode"] = mode
        else:
            s.error("wireguardMode", f"must be one of {', '.join(WIREGUARD_MODES)}, got {mode!r}")
    cidrs = _parse_list(s, "podCIDRs", parse_cidr, "pod CIDR")
    if cidrs is not None:
        out["pod_cidrs"] = cidrs
    state_dir = s.string("stateDir")
    if state_dir is not None:
        if state_dir:
            out["state_dir"] = state_dir
        else:
            s.error("stateDir", "must not be empty")
    link = s.string("linkName")
    if link is not None:
        try:
            out["link_name"] = check_ifname(link)
        except InterfaceNameError as exc:
            s.error("linkName", str(exc))
    endpoint = s.string("discoveryEndpoint")
    if endpoint:
        _check_service_url(s.problems, s.sub("discoveryEndpoint"), endpoint)
        out["discovery_endpoint"] = endpoint
    _read_relay_settings(s, out)
    state["local"] = out


def _read_relay_settings(s: _Section, out: dict[str, Any]) -> None:
    relays = _parse_list(s, "relays", parse_endpoint, "relay address (ip:port)")
    if relays is not None:
        unique = tuple(dict.fromkeys(relays))
        if len(unique) != len(relays):
            s.error("relays", "a relay is listed twice")
        out["relays"] = unique
    run = s.boolean("runRelay")
    if run is not None:
        out["run_relay"] = run
    port = s.integer("relayPort")
    if port is not None:
        if not 1 <= port <= 65535:
            s.error("relayPort", f"relay port must be in 1-65535, got {port}")
        elif port == out.get("listen_port", KUBESPAN_DEFAULT_PORT):
            s.error("relayPort", f"relay port {port} is WireGuard's listen port")
        else:
            out["relay_port"] = port
    elif out.get("run_relay") and out.get("listen_port") == DEFAULT_RELAY_PORT:
        s.error(
            "relayPort", f"the default relay port {DEFAULT_RELAY_PORT} is WireGuard's listen port"
        )


def _read_discovery_service_doc(s: _Section, state: dict) -> None:
    name = s.string("name")
    endpoint = s.string("endpoint")
    if not name:
        s.error("name", "name is required")
    if not endpoint:
        s.error("endpoint", "endpoint is required")
    elif name:
        try:
            service = DiscoveryService.from_url(name, endpoint)
        except ValueError as exc:
            s.error("endpoint", f"discovery service endpoint is invalid: {exc}")
        else:
            state.setdefault("discovery_services", []).append(service)
    state.setdefault("discovery_service_docs", []).append(s.path)


def _read_discovery_identity_doc(s: _Section, state: dict) -> None:
    # Talos never decodes the id (any string is a valid id); the secret is the AES key.
    cid, secret = s.string("clusterID"), s.string("clusterSecret")
    if not cid:
        s.error("clusterID", "clusterID is required")
    else:
        _check_cluster_id(s, "clusterID")
    if not secret:
        s.error("clusterSecret", "clusterSecret is required")
    else:
        _check_secret(s, "clusterSecret")
    state["identity_doc"] = (cid or "", secret or "")


def _read_kube_doc(s: _Section, kind: str, state: dict) -> None:
    """Talos's Kubernetes documents: only the keys we use (the first document counts)."""
    if kind == KUBE_NETWORK_KIND:
        state["kube_pod_subnets"] = _read_subnets(s, "podSubnets") or ()
        state["kube_service_subnets"] = _read_subnets(s, "serviceSubnets") or ()
    elif kind == KUBE_API_SERVER_KIND:
        port = s.integer("apiPort")
        state["kube_api_port"] = port if port is not None else DEFAULT_CONTROL_PLANE_PORT
    else:
        fqdn = s.boolean("registerWithFQDN")
        state["kube_register_with_fqdn"] = bool(fqdn)


def _read_meta_doc(doc: dict, kind: str, problems: Problems, state: dict) -> None:
    named = kind == DISCOVERY_SERVICE_KIND
    # Talos names a document by kind and, for named kinds, name: its duplicates check.
    name = doc.get("name")
    doc_id = f"{kind}/{name}" if named and name else kind
    s = _Section(doc, doc_id, problems)
    s.known.update(("apiVersion", "kind"))
    if doc.get("apiVersion") != "v1alpha1":
        if kind in KUBE_KINDS:
            return  # a version of a document we do not own: not ours to judge
        s.error(
            "apiVersion", f"unsupported apiVersion {doc.get('apiVersion')!r} (expected v1alpha1)"
        )
        return
    seen = state.setdefault("seen_kinds", set())
    canonical = ENDPOINTS_KINDS[0] if kind in ENDPOINTS_KINDS else doc_id
    if canonical in seen:
        problems.append((doc_id, f"duplicate {doc_id} document"))
        return
    seen.add(canonical)
    if kind in KUBE_KINDS:
        _read_kube_doc(s, kind, state)
        return  # not ours: other keys are Talos's business
    if kind == KUBESPAN_KIND:
        state["kubespan_doc"] = _read_kubespan(s)
    elif kind in ENDPOINTS_KINDS:
        _read_endpoints_doc(s, state)
    elif kind == DISCOVERY_SERVICE_KIND:
        _read_discovery_service_doc(s, state)
    elif kind == DISCOVERY_IDENTITY_KIND:
        _read_discovery_identity_doc(s, state)
    else:
        _read_py_doc(s, state)
    s.finish()


def _read_stream(text: str, problems: Problems, state: dict) -> None:
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        problems.append(("<yaml>", f"not valid YAML: {exc}".replace("\n", " ")))
        return
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            problems.append(
                (f"<document {index + 1}>", f"expected a mapping, got {_type_name(doc)}")
            )
            continue
        kind = doc.get("kind")
        if kind is None and doc.get("version") == "v1alpha1":
            if state.get("has_v1alpha1"):
                problems.append((f"<document {index + 1}>", "duplicate v1alpha1 document"))
                continue
            state["has_v1alpha1"] = True
            _read_v1alpha1(doc, problems, state)
        elif kind in OWNED_KINDS or kind in KUBE_KINDS:
            _read_meta_doc(doc, kind, problems, state)
        # other kinds and versions belong to parts of Talos we do not implement


def _build_discovery(state: dict, problems: Problems) -> DiscoverySettings:
    """.cluster.discovery or the DiscoveryServiceConfig documents (never both, as Talos)."""
    d = dict(state.get("discovery", {}))
    endpoint_path = d.pop("service_endpoint_path", None)
    docs = state.get("discovery_service_docs", [])
    if docs and state.get("has_discovery_block"):
        for doc_id in docs:
            problems.append(
                (
                    doc_id,
                    "discovery service is already configured in .cluster.discovery "
                    "of the v1alpha1 config",
                )
            )
    if docs:
        services = tuple(state.get("discovery_services", ()))
        # Talos's Kubernetes registry is a .cluster.discovery setting: off without one.
        first = services[0].endpoint if services else DEFAULT_DISCOVERY_SERVICE_ENDPOINT
        return DiscoverySettings(True, True, first, False, services)
    discovery = DiscoverySettings(**d)
    if discovery.service_active and endpoint_path:
        _check_service_url(problems, endpoint_path, discovery.service_endpoint)
    return discovery


def _build_identity(state: dict, problems: Problems) -> tuple[str, str]:
    """(cluster id, secret) from .cluster.id/.cluster.secret or DiscoveryIdentityConfig."""
    legacy = (state.get("cluster_id", ""), state.get("cluster_secret", ""))
    if "identity_doc" not in state:
        return legacy
    if any(legacy):
        problems.append(
            (
                DISCOVERY_IDENTITY_KIND,
                "cluster identity is already configured in .cluster.id/.cluster.secret "
                "of the v1alpha1 config",
            )
        )
        return legacy
    return state["identity_doc"]


def _build_node(state: dict) -> NodeSettings:
    # A KubeNetworkConfig document wins over cluster.network (Talos reads it first).
    if "kube_pod_subnets" in state:
        pods, services = state["kube_pod_subnets"], state["kube_service_subnets"]
    else:
        pods, services = state.get("pod_subnets", ()), state.get("service_subnets", ())
    return NodeSettings(
        machine_type=state.get("machine_type", "worker"),
        api_server_port=state.get(
            "kube_api_port", state.get("api_server_port", DEFAULT_CONTROL_PLANE_PORT)
        ),
        register_with_fqdn=state.get(
            "kube_register_with_fqdn", state.get("register_with_fqdn", False)
        ),
        address_sort=state.get("address_sort", "v1"),
        pod_subnets=tuple(pods),
        service_subnets=tuple(services),
    )


def _build(state: dict, problems: Problems) -> MachineConfig:
    ks_fields = state.get("kubespan")
    if "kubespan_doc" in state:
        if ks_fields is not None:
            problems.append(
                (
                    KUBESPAN_KIND,
                    "kubespan is already configured in v1alpha1 machine.network.kubespan",
                )
            )
        ks_fields = state["kubespan_doc"]
    ks_fields = dict(ks_fields or {})
    if "extra_endpoints" in state:
        ks_fields["extra_announced_endpoints"] = state["extra_endpoints"]
    kubespan = KubeSpanSettings(**ks_fields)

    discovery = _build_discovery(state, problems)
    cluster_id, cluster_secret = _build_identity(state, problems)
    cfg = MachineConfig(
        cluster_id=cluster_id,
        cluster_secret=cluster_secret,
        kubespan=kubespan,
        discovery=discovery,
        local=LocalSettings(**state.get("local", {})),
        node=_build_node(state),
    )

    if (discovery.service_active or kubespan.enabled) and "identity_doc" not in state:
        # (a DiscoveryIdentityConfig document reports its own missing fields)
        if not cfg.cluster_id:
            problems.append(
                (
                    "cluster.id",
                    "cluster discovery requires a cluster id "
                    "(.cluster.id or a DiscoveryIdentityConfig document)",
                )
            )
        if not cfg.cluster_secret:
            problems.append(
                (
                    "cluster.secret",
                    "cluster discovery requires a cluster secret "
                    "(.cluster.secret or a DiscoveryIdentityConfig document)",
                )
            )
    if kubespan.enabled and not discovery.service_active:
        if not state.get("has_discovery_block"):
            where = DISCOVERY_SERVICE_KIND
        elif not discovery.enabled:
            where = "cluster.discovery.enabled"
        else:
            where = "cluster.discovery.registries.service.disabled"
        problems.append((where, KUBESPAN_NEEDS_DISCOVERY))
    return cfg


def _source_text(source: str | os.PathLike) -> str:
    """A PathLike or a one-line string without ": " is a file path; anything else is YAML."""
    if isinstance(source, str) and (
        "\n" in source or ": " in source or source.lstrip().startswith("{")
    ):
        return source
    path = Path(source)
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([(str(path), f"cannot read config file: {exc}")]) from exc


def load_config(*sources: str | os.PathLike) -> MachineConfig:
    """Load and validate a config from one or more files or YAML texts (documents concatenated).

    Raises ConfigError carrying every problem found.
    """
    if not sources:
        raise TypeError("load_config needs at least one source")
    problems: Problems = []
    state: dict[str, Any] = {}
    for source in sources:
        _read_stream(_source_text(source), problems, state)
    cfg = _build(state, problems)
    if problems:
        raise ConfigError(problems)
    return cfg
