"""Per-client-IP token buckets (15 requests/s, burst 60, as the reference service).

Like Go's ``rate.Limiter.Wait``: a request that finds the bucket empty waits for its
token if that wait fits in the time it has (deadline, capped); otherwise it is refused
at once and consumes nothing. Idle buckets (full again) are forgotten by ``gc``, and the
table has a hard size cap, so a flood of source addresses costs bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    last: float


class IPRateLimiter:
    def __init__(self, rate: float = 15.0, burst: int = 60, max_ips: int = 65536) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.max_ips = max_ips
        self._buckets: dict[str, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def reserve(self, ip: str, now: float, max_wait: float) -> float | None:
        """Seconds to wait before serving a request from ``ip``, or None to refuse it."""
        bucket = self._buckets.get(ip)
        if bucket is None:
            if len(self._buckets) >= self.max_ips:
                self.gc(now)
                if len(self._buckets) >= self.max_ips:
                    return None
            bucket = self._buckets[ip] = _Bucket(float(self.burst), now)
        tokens = min(float(self.burst), bucket.tokens + (now - bucket.last) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        if wait > max_wait:
            return None
        bucket.tokens = tokens - 1
        bucket.last = now
        return wait

    def gc(self, now: float) -> None:
        full = [
            ip
            for ip, b in self._buckets.items()
            if b.tokens + (now - b.last) * self.rate >= self.burst
        ]
        for ip in full:
            del self._buckets[ip]
