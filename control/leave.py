"""`kubespan leave`: withdraw this node from the cluster's discovery services.

Stopping or restarting the agent keeps the node registered, so its peers keep it (and
keep routing its traffic through the tunnel) across a restart; a registration that is
never refreshed expires after its TTL (30 min). This command removes it at once, as
Talos does when a machine is reset: every peer drops the node.

It talks to the discovery services directly with the node's id from the state
directory, so it works with the agent stopped, and it refuses while an agent serves
this node's link: that agent would announce the node again at its next round.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

from control import api
from control.agent import service_targets
from control.config import ConfigError, load_config
from control.discovery.pool import delete_affiliate
from control.identity import IdentityError, read_node_id


def agent_running(link: str) -> bool:
    """An agent answers on the link's API socket in this network namespace."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(api.socket_address(link))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kubespan leave",
        description="Remove this node from every configured discovery service now, so "
        "that all its peers drop it. Stop the agent first: stopping or restarting it "
        "alone keeps the node registered (it expires after 30 min if it never returns).",
    )
    parser.add_argument(
        "--config", "-c", action="append", required=True, metavar="FILE", help="machine config"
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(*args.config)
    except ConfigError as exc:
        print(f"kubespan leave: {exc}", file=sys.stderr)
        return 2
    services = service_targets(config)
    if not services:
        print("kubespan leave: no discovery service is configured", file=sys.stderr)
        return 2
    link = config.local.link_name
    if agent_running(link):
        print(
            f"kubespan leave: the agent for link {link!r} is running and would announce "
            "this node again; stop it first (systemctl stop kubespan), then run kubespan "
            "leave",
            file=sys.stderr,
        )
        return 1
    try:
        node_id = read_node_id(config.local.state_dir)
    except IdentityError as exc:
        print(f"kubespan leave: {exc}", file=sys.stderr)
        return 1
    if node_id is None:
        print(
            f"kubespan leave: no node identity in {config.local.state_dir}: this node never "
            "joined, or its state was removed (its registration then expires by itself)",
            file=sys.stderr,
        )
        return 1
    results = asyncio.run(
        delete_affiliate(services, config.cluster_id, config.cluster_secret, node_id)
    )
    failed = 0
    for service in services:
        where = f"discovery service {service.name} ({service.endpoint})"
        error = results[service.name]
        if error is None:
            print(f"node {node_id} removed from {where}")
        else:
            failed += 1
            print(
                f"kubespan leave: could not remove node {node_id} from {where}: {error}",
                file=sys.stderr,
            )
    return 1 if failed else 0
