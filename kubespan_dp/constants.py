"""WireGuard protocol constants: the one source for the Python core and the C fast path.

The Python core (messages, timers, replay, padding) imports them from here, and
setup.py writes every upper-case int and float of this module into the C header
``kubespan_dp/_wg_constants.h`` (generated at build time, not in git) that the fast
path's .pxd files read.  So this file holds plain numbers only and imports nothing:
setup.py loads it on its own, before anything is built.
"""

# Message types and sizes (wireguard-go device/noise-protocol.go, messages)
INITIATION = 1
RESPONSE = 2
COOKIE_REPLY = 3
TRANSPORT = 4

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TAG_SIZE = 16  # Poly1305
TRANSPORT_HEADER_SIZE = 16  # type(4) | receiver index(4) | counter(8)
TRANSPORT_MIN_SIZE = TRANSPORT_HEADER_SIZE + TAG_SIZE  # a keepalive
PADDING_MULTIPLE = 16

# Key lifetime (wireguard-go device/constants.go); times in seconds
REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
KEEPALIVE_TIMEOUT = 10.0

# Replay window (RFC 6479 as in wireguard-go replay.go): 128 blocks of 64 bits
BLOCK_BITS = 64
RING_BLOCKS = 128
WINDOW_SIZE = (RING_BLOCKS - 1) * BLOCK_BITS  # 8128
