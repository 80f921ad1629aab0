"""A Linux TUN interface: /dev/net/tun with IFF_TUN | IFF_NO_PI (raw IP packets).

The interface exists as long as our file descriptor is open (not persistent), so
closing the fd removes the link. When someone deletes the link (`ip link del`),
reads fail with EBADFD: that is how the device learns it must stop.

With ``offload=True`` the TUN is opened as wireguard-go opens it: IFF_VNET_HDR (every
read and write starts with a 10-byte virtio_net_hdr) and TUNSETOFFLOAD, so the
kernel hands over TSO/USO super-packets with partial checksums and takes coalesced
ones (see _wg_offload.pxd). Whatever the kernel refuses is left out: USO first
(Linux 6.2+), then every offload, back to a plain TUN. KUBESPAN_WG_TUN_OFFLOAD=0
forces the plain TUN.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

from .netutil import IFNAMSIZ, check_ifname

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
VNET_HDR_LEN = 10  # struct virtio_net_hdr
# include/uapi/linux/if_tun.h
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
OFFLOAD_NAMES = {
    TUN_F_CSUM: "csum",
    TUN_F_TSO4: "tso4",
    TUN_F_TSO6: "tso6",
    TUN_F_USO4: "uso4",
    TUN_F_USO6: "uso6",
}
TCP_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
UDP_OFFLOADS = TUN_F_USO4 | TUN_F_USO6
IFF_UP = 0x1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
DEFAULT_MTU = 1420


def offload_allowed() -> bool:
    """False when KUBESPAN_WG_TUN_OFFLOAD=0 forces plain TUN devices."""
    return os.environ.get("KUBESPAN_WG_TUN_OFFLOAD", "1") != "0"


class Tun:
    """``vnet_hdr``: reads and writes carry a virtio_net_hdr; ``offloads``: what the
    kernel accepted of OFFLOAD_NAMES (empty without ``vnet_hdr``)."""

    def __init__(self, name: str, mtu: int = DEFAULT_MTU, offload: bool = False) -> None:
        check_ifname(name)  # the kernel would refuse it too, with a vaguer EINVAL
        self.vnet_hdr = False
        self.offload_flags = 0  # TUN_F_* the kernel accepted
        self.fd = -1
        if offload and offload_allowed():
            try:
                self.fd = self._open(name, IFF_VNET_HDR)
            except OSError:
                pass  # a kernel without IFF_VNET_HDR: try plain below
            else:
                self.offload_flags = self._set_offloads()
                if not self.offload_flags:  # a vnet header without offloads only costs
                    os.close(self.fd)
                    self.fd = -1
            self.vnet_hdr = self.offload_flags != 0
        if self.fd < 0:
            self.fd = self._open(name, 0)
        try:
            self.ifindex = socket.if_nametoindex(self.name)
            self.set_mtu(mtu)
        except BaseException:
            os.close(self.fd)
            raise

    def _open(self, name: str, extra_flags: int) -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI | extra_flags)
            ifr = fcntl.ioctl(fd, TUNSETIFF, ifr)
            self.name = ifr[:IFNAMSIZ].rstrip(b"\0").decode()
            if extra_flags & IFF_VNET_HDR:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _set_offloads(self) -> int:
        """The richest offload set the kernel takes (TUN_F_* flags), 0 for none."""
        for flags in (TCP_OFFLOADS | UDP_OFFLOADS, TCP_OFFLOADS):
            try:
                fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
            except OSError:
                continue
            return flags
        return 0

    @property
    def offloads(self) -> frozenset[str]:
        return frozenset(n for f, n in OFFLOAD_NAMES.items() if self.offload_flags & f)

    def _ifreq(self, request: int, fmt: str, value: int = 0) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifr = struct.pack(f"16s{fmt}", self.name.encode(), value).ljust(40, b"\0")
            out = fcntl.ioctl(s.fileno(), request, ifr)
        return struct.unpack_from(fmt, out, IFNAMSIZ)[0]

    def set_mtu(self, mtu: int) -> None:
        self._ifreq(SIOCSIFMTU, "i", mtu)

    @property
    def mtu(self) -> int:
        return self._ifreq(SIOCGIFMTU, "i")

    def set_up(self) -> None:
        flags = self._ifreq(SIOCGIFFLAGS, "H")
        self._ifreq(SIOCSIFFLAGS, "H", flags | IFF_UP)

    def exists(self) -> bool:
        """Is our link still there (same index, same name)?"""
        try:
            return socket.if_nametoindex(self.name) == self.ifindex
        except OSError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
