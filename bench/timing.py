"""Side-by-side timing for the benchmarks: interleaved runs, medians, ratios in one place."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


@torch.inference_mode()
def side_by_side(runs: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall-clock seconds of each callable, run interleaved (A, B, A, B, ...) so that a
    change in machine load hits every candidate alike. ``warmup`` untimed rounds come first."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def model_latency(ann, other, ids: torch.Tensor, repeats: int = 5, warmup: int = 1, name: str = "snn") -> dict:
    """Median forward seconds of ``ann`` and ``other`` on ``ids``, side by side, and their ratio."""
    med = side_by_side({"ann": lambda: ann(ids), name: lambda: other(ids)}, repeats, warmup)
    return {"ann_seconds": med["ann"], f"{name}_seconds": med[name], "ratio": med[name] / med["ann"],
            "tokens": int(ids.numel()), "repeats": repeats, "threads": torch.get_num_threads()}
