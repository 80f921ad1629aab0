"""A Linux TUN interface: /dev/net/tun with IFF_TUN | IFF_NO_PI (raw IP packets).

The interface exists as long as our file descriptor is open (not persistent), so
closing the fd removes the link. When someone deletes the link (`ip link del`),
reads fail with EBADFD: that is how the device learns it must stop.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

from .netutil import IFNAMSIZ, check_ifname

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_UP = 0x1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
DEFAULT_MTU = 1420


class Tun:
    def __init__(self, name: str, mtu: int = DEFAULT_MTU) -> None:
        check_ifname(name)  # the kernel would refuse it too, with a vaguer EINVAL
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
            ifr = fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            self.name = ifr[:IFNAMSIZ].rstrip(b"\0").decode()
            self.ifindex = socket.if_nametoindex(self.name)
            self.set_mtu(mtu)
        except BaseException:
            os.close(self.fd)
            raise

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
