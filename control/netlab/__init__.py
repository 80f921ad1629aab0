"""Network-namespace labs: the one library the demo, the tests and the bench build on.

- `Netns`: a named namespace; commands and processes run inside it, sockets open in it.
- `Lab`: owns what it makes (namespaces, veth pairs, temporary directories, anything
  handed to `defer`) and removes it newest first on `close()`, also after a failure.
- `Bridge` and `Host`: hosts as namespaces on a bridge that sits in a namespace of its
  own, with underlay addresses from the documentation ranges, so nothing touches the
  root namespace's links and no host has a route to the outside.
- `LEDGER` and `leftovers()`: every namespace, process and UAPI socket any lab of this
  process made, so a session finalizer can prove that none of it survived.

Names carry a random suffix so parallel runs do not collide. WireGuard interface names
must be unique per host, not just per namespace: /var/run/wireguard is shared.
"""

from control.netlab.bridge import Bridge, Host
from control.netlab.lab import Lab, add_address, unique_name, wait_until
from control.netlab.ledger import LEDGER, Ledger, leftovers, list_namespaces, pid_alive
from control.netlab.netns import LabError, Netns, missing_facilities, run, stop_processes

__all__ = [
    "LEDGER",
    "Bridge",
    "Host",
    "Lab",
    "LabError",
    "Ledger",
    "Netns",
    "add_address",
    "leftovers",
    "list_namespaces",
    "missing_facilities",
    "pid_alive",
    "run",
    "stop_processes",
    "unique_name",
    "wait_until",
]
