"""Markdown tables from the benchmark JSON reports, so docs quote them without retyping.

    python bench/tables.py docs/bench_neurons.json docs/bench_calibration_smollm2.json
"""

from __future__ import annotations

import json
import sys


def neurons(report: dict) -> str:
    lines = ["| T | parallel ms | sequential ms | speedup | target (0.8T, T>=8) | parallel peak MB | sequential peak MB | counts agree |",
             "|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in report["results"]:
        target = f"{r['speedup_target']:.1f}x" if r["T"] >= 8 else "(none)"
        lines.append(f"| {r['T']} | {r['parallel']['median_s'] * 1e3:.1f} | {r['sequential']['median_s'] * 1e3:.0f} "
                     f"| {r['speedup']:.1f}x | {target} | {r['parallel']['peak_mem_mb']:.0f} "
                     f"| {r['sequential']['peak_mem_mb']:.0f} | {'yes' if r['counts_agree'] else 'NO'} |")
    return "\n".join(lines)


CALIB_COLUMNS = [("global_percentile", "one threshold per site (p99.9)"), ("per_channel_max", "per-channel max"),
                 ("per_channel_percentile", "per-channel p99.9"), ("per_channel_mse", "per-channel MSE search"),
                 ("per_channel_mse_daqcfs", "per-channel MSE + psi/phi")]


def calibration(report: dict, metric: str) -> str:
    lines = ["| T | " + " | ".join(title for _, title in CALIB_COLUMNS) + " |",
             "|---:|" + "---:|" * len(CALIB_COLUMNS)]
    for r in report["results"]:
        lines.append(f"| {r['T']} | " + " | ".join(f"{r[k][metric]:.4f}" for k, _ in CALIB_COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    for path in sys.argv[1:]:
        with open(path) as f:
            report = json.load(f)
        print(f"<!-- {path} -->")
        if report["benchmark"] == "bench/neurons.py":
            print(neurons(report))
        else:
            print("squared error\n\n" + calibration(report, "sq_error"))
            print("\nper-channel mean error\n\n" + calibration(report, "mean_error"))
        print()


if __name__ == "__main__":
    main()
