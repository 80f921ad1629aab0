"""`kubespan`: the command line of the KubeSpan agent and its tools."""

from __future__ import annotations

import argparse
import asyncio
import sys

DESCRIPTION = """\
KubeSpan in Python: a full-mesh WireGuard network between nodes, with automatic key
management and peer discovery, on kernel WireGuard or our userspace WireGuard.

commands:
  agent               run the KubeSpan agent on this node (needs root)
  leave               remove this node from the discovery services (agent stopped)
  get TYPE            show the running agent's resources: kubespanidentities,
                      kubespanpeerspecs, kubespanpeerstatuses, kubespanendpoints
  discovery-service   run a discovery service (wire-compatible with Sidero's)
  relay               forward WireGuard traffic for nodes behind NATs (a public node)
  gen config          generate a new cluster's machine config with KubeSpan enabled
  demo                build a local N-node mesh in network namespaces and show it working

Run `kubespan COMMAND --help` for a command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(DESCRIPTION)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "agent":
        from control.agent import main as agent_main

        return agent_main(rest)
    if command == "get":
        return get_main(rest)
    if command == "leave":
        from control.leave import main as leave_main

        return leave_main(rest)
    if command == "discovery-service":
        from control.discovery.service_cli import main as service_main

        return service_main(rest)
    if command == "relay":
        from control.relay.server import main as relay_main

        return relay_main(rest)
    if command == "gen":
        if not rest or rest[0] != "config":
            print("usage: kubespan gen config [OPTIONS]", file=sys.stderr)
            return 2
        from control.genconfig import main as gen_main

        return gen_main(rest[1:])
    if command == "demo":
        from control.demo import main as demo_main

        return demo_main(rest)
    print(f"kubespan: unknown command {command!r}\n\n{DESCRIPTION}", file=sys.stderr)
    return 2


def get_main(argv: list[str]) -> int:
    from control import api, records

    parser = argparse.ArgumentParser(
        prog="kubespan get",
        description="Show a resource of the KubeSpan agent running in this network namespace.",
    )
    parser.add_argument("type", help=", ".join(api.RESOURCE_TYPES))
    parser.add_argument("-o", "--output", choices=("table", "yaml", "json"), default="table")
    parser.add_argument("-w", "--watch", action="store_true", help="print again on every change")
    parser.add_argument(
        "--link",
        default="kubespan",
        type=_link_name,
        help="the agent's link name (default kubespan)",
    )
    args = parser.parse_args(argv)
    rtype = api.canonical_type(args.type)
    if rtype is None:
        parser.error(f"unknown resource type {args.type!r}; known: {', '.join(api.RESOURCE_TYPES)}")

    async def show() -> None:
        kind = records.kind_by_name(rtype)
        async for docs in api.query(args.link, rtype, args.watch):
            found = [api.record_from_wire(rtype, doc) for doc in docs]
            print(records.render(found, kind, args.output), end="", flush=True)

    try:
        asyncio.run(show())
    except (ConnectionError, ValueError) as exc:
        print(f"kubespan get: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _link_name(text: str) -> str:
    from kubespan_dp.netutil import InterfaceNameError, check_ifname

    try:
        return check_ifname(text)
    except InterfaceNameError as exc:  # argparse shows only this kind's message as is
        raise argparse.ArgumentTypeError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
