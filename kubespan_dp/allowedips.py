"""Cryptokey routing table: longest-prefix match from IP address to peer.

Outbound, a packet goes to the peer owning the longest allowed-IPs prefix that
contains its destination; inbound, a decrypted packet is kept only if its
source maps back to the peer it came from. Both lookups run for every packet.

The table is one path-compressed binary trie per address family, the shape
wireguard-go uses. Each node stands for a prefix (``cidr`` leading bits of
``prefix``) and has two children, chosen by the address bit right after the
node's prefix. Nodes exist for every inserted prefix, plus peerless branch
nodes where two prefixes part ways; a peerless node therefore always has two
children, and removal splices out nodes that no longer satisfy that. A lookup
walks down while the address still matches, remembering the last peer seen,
so it touches at most one node per distinct prefix length on its path.

Addresses are plain integers on the lookup path; ``ipaddress`` objects appear
only at the API edges (insert/remove/entries_for). As in wireguard-go, a
network given with host bits set is stored with those bits masked off.
"""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Network, IPv6Network

from .netutil import IPAddress, IPNetwork

_WIDTH = {4: 32, 6: 128}


class _Node:
    __slots__ = ("prefix", "cidr", "shift", "peer", "children", "parent")

    def __init__(self, key: int, cidr: int, width: int, peer: object | None) -> None:
        self.shift = width - cidr  # address >> shift == prefix means "inside"
        self.prefix = key >> self.shift
        self.cidr = cidr
        self.peer = peer
        self.children: list[_Node | None] = [None, None]
        self.parent: _Node | None = None

    @property
    def key(self) -> int:
        return self.prefix << self.shift


def _lookup(node: _Node | None, address: int) -> object | None:
    found = None
    while node is not None:
        shift = node.shift
        if address >> shift != node.prefix:
            break
        if node.peer is not None:
            found = node.peer
        if shift == 0:
            break
        node = node.children[(address >> (shift - 1)) & 1]
    return found


def _to_network(network: object) -> IPNetwork:
    if isinstance(network, (IPv4Network, IPv6Network)):
        return network
    if isinstance(network, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
        return network.network
    return ipaddress.ip_network(network, strict=False)  # type: ignore[arg-type]


class AllowedIPs:
    """Longest-prefix-match table mapping IPv4/IPv6 prefixes to peer objects.

    Peers are compared by identity and need not be hashable.
    """

    def __init__(self) -> None:
        self._roots: dict[int, _Node | None] = {4: None, 6: None}
        # id(peer) -> that peer's nodes, in the order they were assigned to it.
        self._by_peer: dict[int, dict[_Node, None]] = {}

    # -- lookups (packet path) ---------------------------------------------

    def lookup(self, address: IPAddress | bytes) -> object | None:
        """The peer whose longest allowed prefix contains ``address``.

        ``address`` is an ``ipaddress`` address or its raw 4- or 16-byte form.
        """
        if isinstance(address, (bytes, bytearray, memoryview)):
            if len(address) == 4:
                return _lookup(self._roots[4], int.from_bytes(address, "big"))
            if len(address) == 16:
                return _lookup(self._roots[6], int.from_bytes(address, "big"))
            raise ValueError(f"raw address must be 4 or 16 bytes, got {len(address)}")
        return _lookup(self._roots[address.version], int(address))

    def lookup_packet_destination(self, packet: bytes) -> object | None:
        """Peer for the destination of an IP packet; None if malformed or unrouted."""
        return self._lookup_header_address(packet, 16, 24)

    def lookup_packet_source(self, packet: bytes) -> object | None:
        """Peer for the source of an IP packet; None if malformed or unrouted."""
        return self._lookup_header_address(packet, 12, 8)

    def _lookup_header_address(
        self, packet: bytes, v4_offset: int, v6_offset: int
    ) -> object | None:
        """Look up the address at the given IPv4/IPv6 header offset (4 or 16 bytes)."""
        if not packet:
            return None
        version = packet[0] >> 4
        if version == 4:
            if len(packet) < 20:
                return None
            return _lookup(self._roots[4], int.from_bytes(packet[v4_offset : v4_offset + 4], "big"))
        if version == 6:
            if len(packet) < 40:
                return None
            return _lookup(
                self._roots[6], int.from_bytes(packet[v6_offset : v6_offset + 16], "big")
            )
        return None

    # -- changes -----------------------------------------------------------

    def insert(self, network: IPNetwork, peer: object) -> None:
        """Route ``network`` to ``peer``, taking it over from any previous owner."""
        if peer is None:
            raise ValueError("peer must not be None")
        net = _to_network(network)
        version, cidr = net.version, net.prefixlen
        width = _WIDTH[version]
        key = int(net.network_address)
        node = self._roots[version]
        if node is None:
            self._attach(self._new(key, cidr, width, peer), None, 0, version)
            return
        parent: _Node | None = None
        bit = 0
        # Descend through nodes whose prefix contains the new one.
        while node is not None and node.cidr <= cidr and key >> node.shift == node.prefix:
            if node.cidr == cidr:
                if node.peer is not None:
                    self._unregister(node)
                # else a branch node where prefixes part: it becomes an entry
                node.peer = peer
                self._register(node)
                return
            parent = node
            bit = (key >> (node.shift - 1)) & 1
            node = node.children[bit]
        new = self._new(key, cidr, width, peer)
        if node is None:
            self._attach(new, parent, bit, version)
            return
        # ``node`` is not inside the new prefix's ancestry: it is either more
        # specific than the new prefix or diverges from it. Place the new node
        # (or a branch node where they part) in ``node``'s slot.
        common = min(width - (node.key ^ key).bit_length(), cidr)
        if common == cidr:
            new.children[(node.key >> (width - cidr - 1)) & 1] = node
            node.parent = new
            self._attach(new, parent, bit, version)
            return
        branch = _Node(key & ~((1 << (width - common)) - 1), common, width, None)
        side = (key >> (width - common - 1)) & 1
        branch.children[side] = new
        branch.children[side ^ 1] = node
        new.parent = branch
        node.parent = branch
        self._attach(branch, parent, bit, version)

    def remove(self, network: IPNetwork, peer: object) -> None:
        """Drop exactly ``network`` if ``peer`` owns it; otherwise do nothing."""
        net = _to_network(network)
        node = self._find_exact(net)
        if node is not None and node.peer is peer:
            self._remove_node(node, net.version)

    def remove_peer(self, peer: object) -> None:
        """Drop every prefix routed to ``peer``."""
        nodes = self._by_peer.get(id(peer))
        if not nodes:
            return
        for node in list(nodes):
            self._remove_node(node, 4 if node.shift + node.cidr == 32 else 6)

    def entries_for(self, peer: object) -> list[IPNetwork]:
        """``peer``'s prefixes, in the order they were (last) assigned to it."""
        nodes = self._by_peer.get(id(peer), {})
        return [self._network_of(node) for node in nodes]

    def clear(self) -> None:
        self._roots = {4: None, 6: None}
        self._by_peer.clear()

    # -- internals -----------------------------------------------------------

    def _new(self, key: int, cidr: int, width: int, peer: object) -> _Node:
        node = _Node(key, cidr, width, peer)
        self._register(node)
        return node

    def _register(self, node: _Node) -> None:
        self._by_peer.setdefault(id(node.peer), {})[node] = None

    def _unregister(self, node: _Node) -> None:
        key = id(node.peer)
        nodes = self._by_peer[key]
        del nodes[node]
        if not nodes:
            del self._by_peer[key]

    def _attach(self, node: _Node | None, parent: _Node | None, bit: int, version: int) -> None:
        """Put ``node`` in ``parent``'s child slot ``bit``, or at the root."""
        if node is not None:
            node.parent = parent
        if parent is None:
            self._roots[version] = node
        else:
            parent.children[bit] = node

    @staticmethod
    def _slot(node: _Node) -> int:
        parent = node.parent
        return 0 if parent is None or parent.children[0] is node else 1

    def _find_exact(self, net: IPNetwork) -> _Node | None:
        key, cidr = int(net.network_address), net.prefixlen
        node = self._roots[net.version]
        while node is not None and node.cidr <= cidr and key >> node.shift == node.prefix:
            if node.cidr == cidr:
                return node
            node = node.children[(key >> (node.shift - 1)) & 1]
        return None

    def _remove_node(self, node: _Node, version: int) -> None:
        self._unregister(node)
        node.peer = None
        left, right = node.children
        if left is not None and right is not None:
            return  # still a branch point
        child = left if left is not None else right
        parent = node.parent
        self._attach(child, parent, self._slot(node), version)
        if child is not None or parent is None or parent.peer is not None:
            return
        # ``parent`` is a peerless branch left with one child: splice it out.
        sibling = parent.children[0] or parent.children[1]
        self._attach(sibling, parent.parent, self._slot(parent), version)

    @staticmethod
    def _network_of(node: _Node) -> IPNetwork:
        if node.shift + node.cidr == 32:
            return IPv4Network((node.key, node.cidr))
        return IPv6Network((node.key, node.cidr))
