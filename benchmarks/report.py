"""How every benchmark reports a repeated measurement."""
from __future__ import annotations

import statistics


def spread(values: list[float]) -> str:
    """'median M (min A, max B)' over the repeats."""
    return f"median {statistics.median(values):,.1f} (min {min(values):,.1f}, max {max(values):,.1f})"
