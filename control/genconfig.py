"""`kubespan gen config`: a new cluster's machine config, as `talosctl gen config --with-kubespan`.

The output has the layout Talos 1.14+ writes (only the parts this project reads): a
v1alpha1 document with the machine type, then a ``DiscoveryServiceConfig`` document
per discovery service, a ``DiscoveryIdentityConfig`` with a random cluster id and
secret (32 bytes each, standard base64), a ``KubeSpanConfig``, and our
``KubeSpanPyConfig``. Every node of the cluster uses the same file (the id and secret
are what make them one cluster).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Sequence

import yaml

from control.config import (
    DEFAULT_DISCOVERY_SERVICE_ENDPOINT,
    DEFAULT_STATE_DIR,
    DISCOVERY_IDENTITY_KIND,
    DISCOVERY_SERVICE_KIND,
    KUBESPAN_DEFAULT_PORT,
    KUBESPAN_KIND,
    KUBESPAN_LINK_MTU,
    POD_CIDRS_HELP,
    PY_KIND,
    WIREGUARD_MODES,
    ConfigError,
    load_config,
)

CLUSTER_ID_SIZE = 32
CLUSTER_SECRET_SIZE = 32


def _service_name(index: int) -> str:
    return "default" if index == 0 else f"service-{index + 1}"  # talosctl names its one "default"


def generate_config(
    *,
    discovery_endpoint: str | Sequence[str] = DEFAULT_DISCOVERY_SERVICE_ENDPOINT,
    listen_port: int = KUBESPAN_DEFAULT_PORT,
    wireguard_mode: str = "auto",
    pod_cidrs: Sequence[str] = (),
    state_dir: str = DEFAULT_STATE_DIR,
    mtu: int = KUBESPAN_LINK_MTU,
    advertise_kubernetes_networks: bool = False,
    extra_endpoints: Sequence[str] = (),
    machine_type: str = "worker",
) -> str:
    """YAML text of a fresh, valid config (validated before it is returned).

    `discovery_endpoint` is one URL or several (one DiscoveryServiceConfig each)."""
    endpoints = [discovery_endpoint] if isinstance(discovery_endpoint, str) else discovery_endpoint
    docs: list[dict] = [{"version": "v1alpha1", "machine": {"type": machine_type}}]
    for index, endpoint in enumerate(endpoints):
        docs.append(
            {
                "apiVersion": "v1alpha1",
                "kind": DISCOVERY_SERVICE_KIND,
                "name": _service_name(index),
                "endpoint": endpoint,
            }
        )
    docs.append(
        {
            "apiVersion": "v1alpha1",
            "kind": DISCOVERY_IDENTITY_KIND,
            "clusterID": base64.b64encode(os.urandom(CLUSTER_ID_SIZE)).decode(),
            "clusterSecret": base64.b64encode(os.urandom(CLUSTER_SECRET_SIZE)).decode(),
        }
    )
    docs.append(
        {
            "apiVersion": "v1alpha1",
            "kind": KUBESPAN_KIND,
            "enabled": True,
            "advertiseKubernetesNetworks": advertise_kubernetes_networks,
            "allowDownPeerBypass": False,
            "harvestExtraEndpoints": False,
            "mtu": mtu,
        }
    )
    docs.append(
        {
            "apiVersion": "v1alpha1",
            "kind": PY_KIND,
            "listenPort": listen_port,
            "wireguardMode": wireguard_mode,
            "podCIDRs": list(pod_cidrs),
            "stateDir": state_dir,
        }
    )
    if extra_endpoints:
        docs.append(
            {
                "apiVersion": "v1alpha1",
                "kind": "KubeSpanEndpointsConfig",
                "extraAnnouncedEndpoints": list(extra_endpoints),
            }
        )
    text = "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)
    load_config(text)  # never hand out a config we would refuse
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kubespan gen config",
        description="Generate a new cluster's KubeSpan machine config, in the document "
        "layout talosctl 1.14+ writes.",
        epilog=POD_CIDRS_HELP,
    )
    parser.add_argument(
        "-o", "--output", default="-", help="file to write (default: stdout); never overwritten"
    )
    parser.add_argument(
        "--discovery-endpoint",
        action="append",
        help="discovery service URL (http:// = plaintext; default "
        f"{DEFAULT_DISCOVERY_SERVICE_ENDPOINT}); repeat for several services",
    )
    parser.add_argument("--listen-port", type=int, default=KUBESPAN_DEFAULT_PORT)
    parser.add_argument("--wireguard-mode", choices=WIREGUARD_MODES, default="auto")
    parser.add_argument(
        "--pod-cidr",
        action="append",
        default=[],
        help="this node's pod network, advertised with --advertise-kubernetes-networks "
        "(repeatable)",
    )
    parser.add_argument(
        "--advertise-kubernetes-networks",
        action="store_true",
        help="announce the pod CIDRs to peers (see below)",
    )
    parser.add_argument(
        "--machine-type",
        choices=("worker", "controlplane"),
        default="worker",
        help="published to the cluster as Talos does (default worker)",
    )
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    parser.add_argument("--mtu", type=int, default=KUBESPAN_LINK_MTU)
    parser.add_argument(
        "--extra-endpoint", action="append", default=[], help="ip:port to announce (repeatable)"
    )
    args = parser.parse_args(argv)
    try:
        text = generate_config(
            discovery_endpoint=args.discovery_endpoint or DEFAULT_DISCOVERY_SERVICE_ENDPOINT,
            listen_port=args.listen_port,
            wireguard_mode=args.wireguard_mode,
            pod_cidrs=args.pod_cidr,
            state_dir=args.state_dir,
            mtu=args.mtu,
            advertise_kubernetes_networks=args.advertise_kubernetes_networks,
            extra_endpoints=args.extra_endpoint,
            machine_type=args.machine_type,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    try:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # holds the secret
    except OSError as exc:
        print(f"error: cannot create {args.output}: {exc.strerror}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
