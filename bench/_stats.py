"""Shared by the benchmarks: nearest-rank quantiles (no interpolation, so p99 of 20 runs is the slowest run)."""

from __future__ import annotations


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
