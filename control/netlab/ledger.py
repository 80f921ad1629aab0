"""What every lab of this process created, so a finalizer can prove none of it survived.

A lab removes its own things on close; the ledger is the independent check that it did,
including what a daemon was supposed to remove itself (its UAPI socket).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Ledger:
    namespaces: set[str] = field(default_factory=set)
    sockets: set[Path] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)

    def leftovers(self) -> list[str]:
        """Everything recorded here that still exists, one line each."""
        live = set(list_namespaces())
        found = [f"namespace {n}" for n in sorted(self.namespaces & live)]
        found += [f"socket {p}" for p in sorted(self.sockets) if p.exists()]
        found += [f"process {p}" for p in sorted(self.pids) if pid_alive(p)]
        return found


LEDGER = Ledger()


def leftovers() -> list[str]:
    return LEDGER.leftovers()


def list_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def pid_alive(pid: int) -> bool:
    """True while the process runs; a zombie counts as gone (only its parent can reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
