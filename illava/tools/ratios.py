"""Speedups of alternated runs (shared by ``illava bench`` and ``illava bench --engine vllm``)."""

from __future__ import annotations

import statistics


def pair_ratios(base: list[float], other: list[float]) -> dict:
    """Speedup of ``other`` over ``base`` (times): the median of the ratios of runs made one after
    the other (same repeat), and the ratio of the fastest runs."""
    pairs = [b / o for b, o in zip(base, other) if o > 0]
    return {
        "pair_median": statistics.median(pairs) if pairs else None,
        "pair_min": min(pairs) if pairs else None,
        "pair_max": max(pairs) if pairs else None,
        "min_ratio": min(base) / min(other) if base and other and min(other) > 0 else None,
    }
