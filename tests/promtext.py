"""Read Prometheus text exposition in tests by value, not by formatting."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

SampleKey = tuple[str, frozenset[tuple[str, str]]]


def key(name: str, **labels: str) -> SampleKey:
    return name, frozenset(labels.items())


def samples(text: str) -> dict[SampleKey, float]:
    """Every sample in ``text``: {key(name, **labels): value}."""
    return {
        key(s.name, **s.labels): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def types(text: str) -> dict[str, str]:
    """Metric name -> type, as the ``# TYPE`` lines declare them."""
    return {
        parts[2]: parts[3]
        for parts in (line.split() for line in text.splitlines())
        if parts[:2] == ["#", "TYPE"]
    }
