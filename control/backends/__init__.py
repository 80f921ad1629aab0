"""WireGuard backends: kernel (pyroute2 netlink) and userspace (our daemon over UAPI)."""

from control.backends.base import (
    Address,
    BackendError,
    IPNetwork,
    PeerConfig,
    PeerState,
    WireGuardBackend,
)

__all__ = ["Address", "BackendError", "IPNetwork", "PeerConfig", "PeerState", "WireGuardBackend"]
