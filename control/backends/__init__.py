"""WireGuard backends: kernel (pyroute2 netlink) and userspace (our daemon over UAPI)."""

from control.backends.base import BackendError, PeerConfig, PeerState, WireGuardBackend
from kubespan_dp.netutil import Address, IPNetwork

__all__ = ["Address", "BackendError", "IPNetwork", "PeerConfig", "PeerState", "WireGuardBackend"]
