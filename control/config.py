"""Machine config: the KubeSpan-relevant parts of a Talos machine config, validated.

A Talos machine config is a multi-document YAML stream. We read:

* the v1alpha1 document (the one with ``version: v1alpha1`` and no ``kind``):
  ``machine.network.kubespan`` and ``cluster.{id, secret, discovery}``;
* a ``KubeSpanConfig`` document (newer Talos; conflicts with
  ``machine.network.kubespan``, as in Talos);
* a ``KubeSpanEndpointsConfig`` document (also accepted spelled
  ``KubespanEndpointsConfig``, as Talos's KubeSpan guide writes it);
* our own ``KubeSpanPyConfig`` document (apiVersion v1alpha1) with what this
  project adds::

      apiVersion: v1alpha1
      kind: KubeSpanPyConfig
      listenPort: 51820            # WireGuard UDP port
      wireguardMode: auto          # auto | kernel | userspace
      podCIDRs: [10.244.1.0/24]    # networks this node advertises (advertiseKubernetesNetworks)
      stateDir: /var/lib/kubespan  # identity files live here
      linkName: kubespan           # WireGuard link name
      # discoveryEndpoint overrides cluster.discovery.registries.service.endpoint
      discoveryEndpoint: http://10.0.0.1:3000

Everything else in the stream (other sections, other kinds) is ignored. Inside the
sections we own, unknown keys and wrong types are errors. Every problem is collected
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

from control.discovery.target import parse_discovery_endpoint
from kubespan_dp.netutil import (
    Address,
    InterfaceNameError,
    IPNetwork,
    check_ifname,
    parse_endpoint,
)

# Talos constants (pkg/machinery/constants).
KUBESPAN_LINK_NAME = "kubespan"
KUBESPAN_DEFAULT_PORT = 51820
KUBESPAN_LINK_MTU = 1420
KUBESPAN_LINK_MINIMUM_MTU = 1280
DEFAULT_DISCOVERY_SERVICE_ENDPOINT = "https://discovery.talos.dev/"
DEFAULT_STATE_DIR = "/var/lib/kubespan"
CLUSTER_SECRET_SIZE = 32
MAX_CLUSTER_ID_BYTES = 256  # the discovery service rejects longer ids

WIREGUARD_MODES = ("auto", "kernel", "userspace")
ENDPOINTS_KINDS = ("KubeSpanEndpointsConfig", "KubespanEndpointsConfig")
KUBESPAN_KIND = "KubeSpanConfig"
PY_KIND = "KubeSpanPyConfig"


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
        target, tls = parse_discovery_endpoint(endpoint)
        return cls(name, endpoint, target, not tls)


@dataclass(frozen=True)
class DiscoverySettings:
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


@dataclass(frozen=True)
class MachineConfig:
    cluster_id: str = ""
    cluster_secret: str = field(default="", repr=False)
    kubespan: KubeSpanSettings = KubeSpanSettings()
    discovery: DiscoverySettings = DiscoverySettings()
    local: LocalSettings = LocalSettings()

    @property
    def secret_bytes(self) -> bytes:
        """The cluster secret decoded (32 bytes: the AES key and WireGuard PSK)."""
        return base64.b64decode(self.cluster_secret)

    @property
    def discovery_endpoint(self) -> str:
        """The discovery service URL in effect (the local override wins)."""
        return self.local.discovery_endpoint or self.discovery.service_endpoint

    @property
    def discovery_services(self) -> tuple[DiscoveryService, ...]:
        """Every discovery service to register with, in config order (empty: discovery off).

        Minimal until the full DiscoveryServiceConfig support lands: the documents'
        services, else the one service in effect."""
        if self.discovery.services and not self.local.discovery_endpoint:
            return self.discovery.services
        if not self.discovery.service_active:
            return ()
        return (DiscoveryService.from_url("legacy", self.discovery_endpoint),)

    def discovery_target(self) -> tuple[str, bool]:
        """("host:port", insecure) as Talos normalises the service endpoint."""
        target, tls = parse_discovery_endpoint(self.discovery_endpoint)
        return target, not tls


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
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(
            (
                path,
                f"cluster discovery service registry endpoint is invalid: {url!r} "
                "(expected http(s)://host[:port])",
            )
        )
    elif parts.path not in ("", "/") or parts.query or parts.fragment:
        problems.append((path, "cluster discovery service path should be empty"))


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


def _read_v1alpha1(doc: dict, problems: Problems, state: dict) -> None:
    root = _Section(doc, "", problems)
    machine = root.data.get("machine")
    if machine is not None and not isinstance(machine, dict):
        root.error("machine", f"expected a mapping, got {_type_name(machine)}")
    elif isinstance(machine, dict):
        network = machine.get("network")
        if network is not None and not isinstance(network, dict):
            problems.append(("machine.network", f"expected a mapping, got {_type_name(network)}"))
        elif isinstance(network, dict) and "kubespan" in network:
            ks = _Section(network, "machine.network", problems).section("kubespan")
            if ks is not None:
                state["kubespan"] = _read_kubespan(ks, zero_mtu_is_default=True)
                ks.finish()
    cluster = root.data.get("cluster")
    if cluster is not None and not isinstance(cluster, dict):
        root.error("cluster", f"expected a mapping, got {_type_name(cluster)}")
        return
    if not isinstance(cluster, dict):
        return
    c = _Section(cluster, "cluster", problems)
    cid = c.string("id")
    if cid is not None:
        state["cluster_id"] = cid
        if len(cid.encode()) > MAX_CLUSTER_ID_BYTES:
            c.error("id", f"cluster id must be at most {MAX_CLUSTER_ID_BYTES} bytes")
    secret = c.string("secret")
    if secret is not None:
        state["cluster_secret"] = secret
        try:
            raw = base64.b64decode(secret, validate=True)
        except (binascii.Error, ValueError):
            c.error("secret", "cluster secret must be base64 of 32 bytes: not valid base64")
        else:
            if len(raw) != CLUSTER_SECRET_SIZE:
                c.error(
                    "secret",
                    f"cluster secret must be base64 of 32 bytes: decodes to {len(raw)} bytes",
                )
    disc = c.section("discovery")
    if disc is None:
        return
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
    state["local"] = out


def _read_meta_doc(doc: dict, kind: str, problems: Problems, state: dict) -> None:
    s = _Section(doc, kind, problems)
    s.known.update(("apiVersion", "kind"))
    if doc.get("apiVersion") != "v1alpha1":
        s.error(
            "apiVersion", f"unsupported apiVersion {doc.get('apiVersion')!r} (expected v1alpha1)"
        )
        return
    seen = state.setdefault("seen_kinds", set())
    canonical = ENDPOINTS_KINDS[0] if kind in ENDPOINTS_KINDS else kind
    if canonical in seen:
        problems.append((kind, f"duplicate {kind} document"))
        return
    seen.add(canonical)
    if kind == KUBESPAN_KIND:
        state["kubespan_doc"] = _read_kubespan(s)
    elif kind in ENDPOINTS_KINDS:
        _read_endpoints_doc(s, state)
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
        elif kind == KUBESPAN_KIND or kind in ENDPOINTS_KINDS or kind == PY_KIND:
            _read_meta_doc(doc, kind, problems, state)
        elif kind == "DiscoveryServiceConfig":  # minimal: name and endpoint only
            service = DiscoveryService.from_url(str(doc.get("name")), str(doc.get("endpoint")))
            state.setdefault("discovery_services", []).append(service)
        # other kinds and versions belong to parts of Talos we do not implement


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

    d = dict(state.get("discovery", {}))
    endpoint_path = d.pop("service_endpoint_path", None)
    discovery = DiscoverySettings(**d)
    if "discovery_services" in state:
        services = tuple(state["discovery_services"])
        discovery = DiscoverySettings(True, True, services[0].endpoint, False, services)
    local = LocalSettings(**state.get("local", {}))
    cfg = MachineConfig(
        cluster_id=state.get("cluster_id", ""),
        cluster_secret=state.get("cluster_secret", ""),
        kubespan=kubespan,
        discovery=discovery,
        local=local,
    )

    if discovery.service_active and endpoint_path:
        _check_service_url(problems, endpoint_path, discovery.service_endpoint)
    if discovery.service_active or kubespan.enabled:
        if not cfg.cluster_id:
            problems.append(("cluster.id", "cluster discovery service requires .cluster.id"))
        if not cfg.cluster_secret:
            problems.append(
                ("cluster.secret", "cluster discovery service requires .cluster.secret")
            )
    if kubespan.enabled and not discovery.service_active:
        where = (
            "cluster.discovery.enabled"
            if not discovery.enabled
            else "cluster.discovery.registries.service.disabled"
        )
        problems.append(
            (where, "KubeSpan requires cluster discovery to be enabled (with the service registry)")
        )
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
