"""Shared helpers for benchmarks: timing with medians, and the RESULT line."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_time(fn: Callable[[], object], repeat: int = 7, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs (after ``warmup`` runs), and all samples."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples


def format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace(" ", "_")


def print_result(**figures: object) -> None:
    """Print the one machine-readable closing line: ``RESULT key=value ...``."""
    print("RESULT " + " ".join(f"{k}={format_value(v)}" for k, v in figures.items()), flush=True)
