"""Markdown tables from the benchmark JSON reports, so docs quote them without retyping.

    python -m bench.tables docs/bench_neurons.json docs/bench_calibration_smollm2.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


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


def convert(report: dict) -> str:
    lines = ["| mode | T | ppl ANN | ppl SNN | ratio | top-1 agreement | spikes/neuron/step | coverage | energy SNN/ANN "
             "| latency SNN/ANN | parallel-vs-sequential top-1 | top-1 vs ANN, time-stepped / parallel "
             "| conversion s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        seq = r.get("sequential") or {}
        ann = seq.get("ann_agreement")
        vs_ann = f"{ann['sequential']:.3f} / {ann['parallel']:.3f}" if ann else "not measured"
        lines.append(f"| {r['mode']} | {r['T']} | {r['ppl_ann']:.2f} | {r['ppl_snn']:.2f} | {r['ppl_ratio']:.3f} "
                     f"| {r['top1_agreement']:.3f} | {r['mean_spike_rate']:.3f} | {r['coverage']:.3f} "
                     f"| {r['energy_ratio']:.3f} | {r['latency']['ratio']:.2f}x | {seq.get('top1_agreement', float('nan')):.3f} "
                     f"| {vs_ann} | {r['conversion_seconds']:.0f} |")
    return "\n".join(lines)


def sparse(report: dict) -> str:
    rates = [p["rate"] for p in report["layers"][0]["points"]]
    lines = ["| layer (in -> out) | " + " | ".join(f"rate {r:g}" for r in rates) + " | break-even rate |",
             "|---|" + "---:|" * (len(rates) + 1)]
    for layer in report["layers"]:
        cells = " | ".join(f"{p['sparse_over_dense']:.2f}" for p in layer["points"])
        even = layer["break_even_rate"]
        lines.append(f"| {layer['layer']} ({layer['in']} -> {layer['out']}) | {cells} | "
                     f"{'never faster' if even is None else f'<= {even:g}'} |")
    model = report.get("whole_model")
    if model:
        lines.append(f"\nWhole model ({model['mode']}, T={model['timesteps']}, {model['tokens']} tokens, mean spike rate "
                     f"{model['mean_spike_rate']:.3f}): sparse {model['sparse_seconds']:.2f} s vs dense "
                     f"{model['dense_seconds']:.2f} s (x{model['sparse_over_dense']:.2f}); logits differ by "
                     f"{model['relative_logit_diff']:.1e} relative, top-1 equal on {model['top1_equal']:.1%}.")
    return "\n".join(lines)


def frontier(report: dict) -> str:
    lines = ["| coding | T | threshold percentile | LM head | weights | ppl ratio | top-1 agreement | energy SNN/ANN | coverage |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in report["points"]:
        lines.append(f"| {r['coding']} | {r['T']} | {r['percentile']:g} | {'spiking' if r['spike_head'] else 'dense'} "
                     f"| {'int8' if r['int8_weights'] else 'float'} | {r['ppl_ratio']:.3f} | {r['top1_agreement']:.3f} "
                     f"| {r['energy_ratio']:.3f} | {r['coverage']:.3f} |")
    return "\n".join(lines)


def text_cls(report: dict) -> str:
    """One row per T of a ``bench/text_cls.py`` report: accuracy against the float ANN, agreement, timing."""
    r = report["results"]
    src = r["data"]["source"]
    data = Path(src["train_file"]).parent.name if src.get("dataset") == "files" else src.get("dataset")
    stages = r["samples_per_stage"]
    lines = [f"{data}: {len(r['data']['classes'])} classes, {stages['qcfs_fine_tune']} training, {stages['validation']} "
             f"validation, {stages['test']} test samples (sequential on {stages['sequential']}); float ANN "
             f"{100 * r['acc_ann']:.2f}%, DA-QCFS ANN at T={r['qcfs_T']} {100 * r['acc_qcfs']:.2f}%; whole run "
             f"{r['seconds_total']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in r["step_seconds"].items()) + ")",
             "",
             "| T | SNN parallel % | minus ANN (points) | agreement with ANN | sequential agreement (samples) "
             "| energy SNN/ANN | calibration kept |",
             "|---:|---:|---:|---:|---:|---:|:---|"]
    for row in r["per_T"]:
        chosen = [c for c in r.get("calibration_selection", {}).get(str(row["T"]), []) if c.get("chosen")]
        how = (f"{chosen[0]['rule']}{' + psi/phi' if chosen[0]['fit_affine'] else ''}"
               f"{'' if chosen[0]['refit'] else ' (as trained)'}") if chosen else "(no choice)"
        lines.append(f"| {row['T']} | {100 * row['acc_snn_parallel']:.2f} | "
                     f"{100 * (row['acc_snn_parallel'] - r['acc_ann']):+.2f} | {row['agreement_with_ann']:.4f} | "
                     f"{row['agreement']:.4f} ({row['sequential_samples']}) | {row['energy']['energy_ratio']:.3f} | "
                     f"{how} |")
    for T, lat in report.get("side_by_side_latency", {}).items():
        lines.append(f"\nSide by side at T={T} (batch {lat['batch']}): parallel / ANN {lat['parallel_over_ann']:.2f}x "
                     f"(deployed, no spike statistics: {lat['parallel_deployed_over_ann']:.2f}x), sequential / "
                     f"parallel {lat['sequential_over_parallel']:.1f}x.")
    return "\n".join(lines)


def main() -> None:
    for path in sys.argv[1:]:
        with open(path) as f:
            report = json.load(f)
        print(f"<!-- {path} -->")
        if report.get("benchmark") == "bench/frontier.py" or "points" in report:  # older runs had no name
            print(frontier(report))
        elif "side_by_side_latency" in report and "results" in report:  # bench/text_cls.py
            print(text_cls(report))
        elif report.get("benchmark") == "bench/neurons.py":
            print(neurons(report))
        elif report.get("benchmark") == "bench/convert.py":
            print(convert(report))
        elif report.get("benchmark") == "bench/sparse.py":
            print("sparse time / dense time per layer call\n\n" + sparse(report))
        elif report.get("benchmark") == "bench/calibration_smollm2.py":
            print("squared error\n\n" + calibration(report, "sq_error"))
            print("\nper-channel mean error\n\n" + calibration(report, "mean_error"))
        else:
            print(f"(no table for {report.get('benchmark', 'this file')}: see the markdown it came with)")
        print()


if __name__ == "__main__":
    main()
