"""Pick the WireGuard implementation at startup: the kernel module or our userspace one.

`auto` probes the kernel by creating a uniquely named throw-away link of kind
`wireguard` and deleting it again; that is the one test that answers "will `up()`
work" (module built in, loadable on demand, or missing; netns and container
restrictions included). Success means kernel mode, anything else means userspace, and
the reason is logged and returned either way. `kernel` demands the module and raises
`KernelWireGuardUnavailable` (leaving nothing behind) when the probe fails.
"""

from __future__ import annotations

import logging
import secrets
import string
from collections.abc import Callable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from control.backends.base import BackendError, WireGuardBackend
from control.backends.kernel import KernelBackend

log = logging.getLogger(__name__)

MODES = ("auto", "kernel", "userspace")
PROBE_PREFIX = "kswgprobe"  # + 6 random chars = 15, the longest interface name


class KernelWireGuardUnavailable(BackendError):
    """Kernel mode was demanded but this kernel cannot create WireGuard links."""


class InvalidMode(BackendError, ValueError):
    pass


def probe_kernel_wireguard(netns: str | None = None) -> tuple[bool, str]:
    """(available, why): try to create and delete a temporary wireguard link."""
    name = PROBE_PREFIX + "".join(
        secrets.choice(string.ascii_lowercase + string.digits) for _ in range(6)
    )
    try:
        ipr = IPRoute(netns=netns) if netns else IPRoute()
    except OSError as e:
        return False, f"cannot open a netlink socket: {e}"
    with ipr:
        try:
            ipr.link("add", ifname=name, kind="wireguard")
        except NetlinkError as e:
            return False, f"the kernel refused a link of kind wireguard: {_explain(e)}"
        # It was created: remove it whatever happens next.
        try:
            for index in ipr.link_lookup(ifname=name):
                ipr.link("del", index=index)
        except NetlinkError as e:
            return False, f"a probe link {name} was created but could not be deleted: {e}"
    return True, "the kernel can create wireguard links"


def _explain(e: NetlinkError) -> str:
    text = e.args[1] if len(e.args) > 1 else str(e)
    if e.code == 95:  # EOPNOTSUPP: no driver for this link kind
        return f"{text} (errno {e.code}): the wireguard module is not loaded and cannot be loaded"
    if e.code == 1:  # EPERM
        return f"{text} (errno {e.code}): not allowed to create links here"
    return f"{text} (errno {e.code})"


def _default_userspace(netns: str | None) -> WireGuardBackend:
    # Imported late: the userspace backend pulls in its own daemon machinery.
    from control.backends.userspace import UserspaceBackend

    return UserspaceBackend(netns=netns)


def select_backend(
    mode: str = "auto",
    *,
    netns: str | None = None,
    userspace_factory: Callable[[], WireGuardBackend] | None = None,
) -> tuple[WireGuardBackend, str]:
    """Return (backend, reason) for `mode` ("auto" | "kernel" | "userspace")."""
    if mode not in MODES:
        raise InvalidMode(f"unknown WireGuard mode {mode!r}; expected one of {', '.join(MODES)}")

    def make_userspace() -> WireGuardBackend:
        return userspace_factory() if userspace_factory else _default_userspace(netns)

    if mode == "userspace":
        reason = "userspace mode requested"
        log.info("WireGuard backend: userspace (%s)", reason)
        return make_userspace(), reason
    available, why = probe_kernel_wireguard(netns)
    if mode == "kernel":
        if not available:
            raise KernelWireGuardUnavailable(
                f"kernel WireGuard mode requested but unavailable: {why}; "
                "use mode 'auto' or 'userspace' to run on the userspace dataplane"
            )
        reason = f"kernel mode requested and {why}"
        log.info("WireGuard backend: kernel (%s)", reason)
        return KernelBackend(netns=netns), reason
    if available:
        reason = f"auto: {why}"
        log.info("WireGuard backend: kernel (%s)", reason)
        return KernelBackend(netns=netns), reason
    reason = f"auto: kernel WireGuard unavailable, {why}"
    log.info("WireGuard backend: userspace (%s)", reason)
    return make_userspace(), reason
