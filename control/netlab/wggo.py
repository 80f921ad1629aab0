"""The two wireguard-go builds the tests and the bench run, found in one place.

- "modern": `wireguard-go` on PATH, Debian's bookworm-backports package (0.0.20231211):
  batched I/O, TUN TSO/GRO and UDP GSO/GRO. The anchor every run measures against.
- "old": Debian bookworm's own 0.0.20220316 (no offloads), unpacked by
  scripts/bootstrap.sh into .cache/wireguard-go-old/ of the repository, for interop.

A missing or wrong build raises `Missing` (tests fail, they do not skip).
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OLD_ROOT = REPO / ".cache" / "wireguard-go-old"
FLAVOURS = ("modern", "old")
# Upstream snapshots from this date on have UDP GSO/GRO (TUN offloads came in 2023-03).
# `--version` cannot tell: it said v0.0.20230223 from that release (no offloads) until
# 2025-05, so the date in the Debian package version decides where there is one.
OFFLOADS_SINCE = 20231002


class Missing(RuntimeError):
    """The requested wireguard-go is not installed (or is the other one)."""


@dataclass(frozen=True)
class WireguardGo:
    flavour: str  # "modern" or "old"
    path: Path
    version: str  # what `wireguard-go --version` says, e.g. "v0.0.20230223"
    package: str  # the Debian package version ("" if unknown)

    def describe(self) -> str:
        pkg = f" (Debian {self.package})" if self.package else ""
        return f"wireguard-go {self.version}{pkg} [{self.flavour}]"


def _snapshot_date(version: str) -> int:
    """20231211 for "v0.0.20231211" or "0.0.20231211-1~bpo12+1"; 0 if not that form."""
    m = re.match(r"v?0\.0\.(\d{8})", version)
    return int(m.group(1)) if m else 0


def _package_version(path: Path) -> str:
    """The Debian version, from the changelog installed next to the binary (a binNMU's
    own changelog comes first)."""
    doc = path.parent.parent / "share" / "doc" / "wireguard-go"
    for name in ("changelog.Debian.amd64.gz", "changelog.Debian.gz"):
        try:
            with gzip.open(doc / name, "rt") as f:
                m = re.match(r"\S+ \(([^)]+)\)", f.readline())
        except OSError:
            continue
        if m:
            return m.group(1)
    return ""


@cache
def find(flavour: str) -> WireguardGo:
    """The wireguard-go of this flavour, checked: it runs and is the right one."""
    hint = "run scripts/bootstrap.sh to install both wireguard-go builds"
    if flavour == "modern":
        exe = shutil.which("wireguard-go")
        if exe is None:
            raise Missing(f"wireguard-go is not on PATH; {hint}")
        path = Path(exe)
    elif flavour == "old":
        path = OLD_ROOT / "usr" / "bin" / "wireguard-go"
        if not path.exists():
            raise Missing(f"{path} is missing; {hint}")
    else:
        raise ValueError(flavour)
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    version = out.split()[1] if out.startswith("wireguard-go ") else out.strip()
    package = _package_version(path)
    offloads = (_snapshot_date(package) or _snapshot_date(version)) >= OFFLOADS_SINCE
    if offloads != (flavour == "modern"):
        found = f"{version} (package {package or 'unknown'})"
        raise Missing(f"{path} is wireguard-go {found}, not the {flavour} one; {hint}")
    return WireguardGo(flavour, path, version, package)


def binary(flavour: str) -> Path:
    return find(flavour).path
