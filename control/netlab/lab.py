"""A lab: owns what it creates and removes it, newest first, on `close()`."""

from __future__ import annotations

import secrets
import shutil
import string
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self, TypeVar

from control.netlab.netns import Netns, run

IFNAMSIZ = 15  # longest interface name the kernel takes
T = TypeVar("T")
_ALPHABET = string.ascii_lowercase + string.digits


def unique_name(prefix: str, length: int = 6) -> str:
    """`prefix` plus a random suffix of `length` characters, cut to fit an interface name."""
    tail = "".join(secrets.choice(_ALPHABET) for _ in range(length))
    return prefix[: max(0, IFNAMSIZ - length)] + tail


class Lab:
    """Namespaces, veth pairs and anything handed to `defer`, removed on `close()`.

    Namespaces are called TAG-NAME, TAG being the lab's prefix plus a random suffix, so
    one lab's namespaces are easy to spot and two labs never collide. `close()` keeps
    going when a cleanup fails and collects the failures in `errors`.
    """

    def __init__(self, prefix: str = "ks") -> None:
        self.tag = unique_name(prefix, 6)
        self.errors: list[str] = []
        self._cleanups: list[Callable[[], object]] = []
        self._names: set[str] = set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def defer(self, fn: Callable[[], object]) -> None:
        """Run `fn` on close, before everything deferred earlier."""
        self._cleanups.append(fn)

    def netns(self, name: str = "ns") -> Netns:
        """A new namespace TAG-NAME (TAG-NAME2, TAG-NAME3, ... if NAME is taken here)."""
        full, n = f"{self.tag}-{name}", 1
        while full in self._names:
            n += 1
            full = f"{self.tag}-{name}{n}"
        self._names.add(full)
        ns = Netns(full)
        self.defer(ns.delete)
        return ns

    def veth(
        self, a: Netns, b: Netns, name_a: str | None = None, name_b: str | None = None
    ) -> tuple[str, str]:
        """A veth pair with one end in each namespace, both up, no addresses.

        The pair goes with its namespaces, so it needs no cleanup of its own."""
        name_a = name_a or unique_name("va", 6)
        name_b = name_b or unique_name("vb", 6)
        run(
            ["ip", "link", "add", name_a, "netns", a.name, "type", "veth"]
            + ["peer", "name", name_b, "netns", b.name]
        )
        a.run("ip", "link", "set", name_a, "up")
        b.run("ip", "link", "set", name_b, "up")
        return name_a, name_b

    def tempdir(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.defer(lambda: shutil.rmtree(path, ignore_errors=True))
        return path

    def close(self) -> None:
        while self._cleanups:
            fn = self._cleanups.pop()
            try:
                fn()
            except Exception as e:  # keep cleaning; the caller reads `errors`
                self.errors.append(f"{fn!r}: {e!r}")


def add_address(ns: Netns, dev: str, cidr: str) -> None:
    # No duplicate address detection: an IPv6 address is usable at once.
    extra = ["nodad"] if ":" in cidr else []
    ns.run("ip", "addr", "add", cidr, "dev", dev, *extra)


def wait_until(
    pred: Callable[[], T], timeout: float = 20, interval: float = 0.1, what: str = "condition"
) -> T:
    """Poll `pred` until it returns something true, and return that; TimeoutError after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
