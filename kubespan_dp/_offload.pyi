"""Type stub for the TUN offload kernels' test wrappers (kubespan_dp/_offload.pyx)."""

from collections.abc import Sequence

Buffer = bytes | bytearray | memoryview

VNET_HDR_LEN: int
F_NEEDS_CSUM: int
F_DATA_VALID: int
GSO_NONE: int
GSO_TCPV4: int
GSO_UDP: int
GSO_TCPV6: int
GSO_UDP_L4: int
GSO_ECN: int
GRO_MAX_PACKETS: int
ERRORS: dict[int, str]

class OffloadError(ValueError):
    code: int
    reason: str
    def __init__(self, code: int) -> None: ...

def vnet_header(
    flags: int = 0,
    gso_type: int = 0,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
) -> bytes: ...
def parse_vnet_header(data: Buffer) -> tuple[int, int, int, int, int, int]: ...
def checksum(data: Buffer) -> int: ...
def complete_checksum(packet: Buffer, csum_start: int, csum_offset: int) -> bytes: ...
def segment(
    vnet_header: Buffer, packet: Buffer, mtu: int, max_segments: int = 64, part: int = 0
) -> list[bytes]: ...
def coalesce(
    packets: Sequence[Buffer], uso: bool = False, arena_size: int | None = None, seed: int = ...
) -> list[tuple[bytes, bytes]]: ...
