"""Rate limits: per client connection at the reference's pace, per address for a whole site.

Sidero's service gives each client IP one token bucket (15 requests/s, burst 60). Behind a
NAT every node of a cluster shares that IP, and a restart's herd (Hello, Watch and
AffiliateUpdate from each of up to 1,024 nodes) cannot get through. So a request takes a
token from two buckets:

- its connection's (a Talos node keeps one gRPC connection; behind a NAT each has its own
  source port): ``rate``/``burst``, the reference's numbers, so one client, however
  abusive, gets what it got from the reference;
- its client address's: ``ip_rate``/``ip_burst``, large enough for a cluster behind one
  address to reconnect at once, small enough that opening many connections buys an
  abuser little. A trusted proxy that names no client is not a client address; its
  connections have only their own buckets.

Like Go's ``rate.Limiter.Wait``: a request that finds a bucket empty waits for its token if
that wait fits in the time it has (deadline, capped); otherwise it is refused at once and
consumes nothing. Idle buckets (full again) are forgotten by ``gc``, and each table has a
hard size cap, so a flood of addresses or connections costs bounded memory.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    last: float


class TokenBuckets:
    """One token bucket per key (an address, a connection; any hashable)."""

    def __init__(self, rate: float = 15.0, burst: int = 60, max_keys: int = 65536) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[Hashable, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def wait(self, key: Hashable, now: float) -> float | None:
        """Seconds until ``key`` has a token (nothing taken); None if the table is full."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self.gc(now)
                if len(self._buckets) >= self.max_keys:
                    return None
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.last) * self.rate)
        bucket.last = now
        return 0.0 if bucket.tokens >= 1 else (1 - bucket.tokens) / self.rate

    def take(self, key: Hashable) -> None:
        """Take the token ``wait`` promised (the count may go negative: a reservation)."""
        self._buckets[key].tokens -= 1

    def reserve(self, key: Hashable, now: float, max_wait: float) -> float | None:
        """Seconds to wait before serving a request from ``key``, or None to refuse it."""
        wait = self.wait(key, now)
        if wait is None or wait > max_wait:
            return None
        self.take(key)
        return wait

    def gc(self, now: float) -> None:
        full = [
            key
            for key, b in self._buckets.items()
            if b.tokens + (now - b.last) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]


class ClientLimiter:
    def __init__(
        self,
        rate: float = 15.0,
        burst: int = 60,
        ip_rate: float = 256.0,
        ip_burst: int = 4096,
    ) -> None:
        self.connections = TokenBuckets(rate, burst, max_keys=1 << 17)
        self.addresses = TokenBuckets(ip_rate, ip_burst, max_keys=1 << 16)

    def reserve(
        self, connection: str, address: str | None, now: float, max_wait: float
    ) -> float | None:
        """Seconds to wait before serving the request, or None to refuse it (nothing taken)."""
        wait = self.connections.wait(connection, now)
        if address is not None and wait is not None:
            by_address = self.addresses.wait(address, now)
            wait = None if by_address is None else max(wait, by_address)
        if wait is None or wait > max_wait:
            return None
        self.connections.take(connection)
        if address is not None:
            self.addresses.take(address)
        return wait

    def gc(self, now: float) -> None:
        self.connections.gc(now)
        self.addresses.gc(now)
