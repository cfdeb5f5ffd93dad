"""``results.md`` (the table), ``accuracy_vs_T.png`` and the console table of a run."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

GELU_NOTE = {
    "keep": "GELU kept (docs/design.md section 2): it runs in the rate domain in the sequential simulation, and the site after it "
            "is signed because GELU dips to -0.17",
    "relu": "GELU swapped for ReLU before fine-tuning (the site after it is unsigned); the swap damages a "
            "pretrained model until it is fine-tuned",
}
NORM_NOTE = {
    "causal": "LayerNorms in the sequential simulation: causal, per-step differences of the norm of the running "
              "mean (docs/design.md section 2); `--norm_schedule held` holds the norm of the window's mean instead",
    "held": "LayerNorms in the sequential simulation: held, the norm of the mean over the T steps emitted at every "
            "step (each norm waits for its window; not the causal default of docs/design.md section 2)",
}
CODING_NOTE = {
    "weighted": "Weighted spikes (`--coding weighted`, docs/design.md section 1): spike k of the window weighs "
                "2**(T-1-k) levels, so T steps give 2**T - 1 levels per sign; a level costs the spikes of its binary "
                "digits (counted so in the energy); the sequential neurons (`WeightedIFNeuron`) integrate their whole "
                "window before they fire",
}
NEURON_NOTE = {
    "catch_up": "Sequential neurons: catch-up (`BurstIFNeuron(catch_up=True)`): a step may fire every spike the "
                "neuron's count still allows, and unsigned neurons may take back spikes fired too early while their "
                "count stays non-negative, so the count over the window follows the summed input as the parallel "
                "neuron's does; every spike is counted; `--sequential_neuron if` fires at most one spike a step",
    "if": "Sequential neurons: IF / ST-BIF, at most one spike a step (or the calibrated burst); behind other spiking "
          "layers a late surge of input cannot all be fired before the window ends",
}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _changed(row: dict) -> str:
    c = row.get("changed_answers")  # runs saved before it was recorded have none
    return f"{c['changed']}: {c['gained']} / {c['lost']}" if c else "-"


def _speedup(results: dict, row: dict) -> str:
    """Sequential over parallel latency per batch, both on the sequential simulation's samples (and so the
    same batches); '-' for a run saved without the parallel latency on a subset."""
    par = row.get("latency_ms_parallel_on_sequential_samples")
    if par is None:
        if _seq_samples(results, row) != results["samples"]:
            return "-"
        par = row["latency_ms_parallel"]
    return f"{row['latency_ms_sequential'] / par:.1f}x"


def _seq_samples(results: dict, row: dict) -> int:
    """How many test samples the sequential simulation ran on (runs saved before the subset: all)."""
    return row.get("sequential_samples", results["samples"])


def _par_on_seq(row: dict) -> float:
    """Parallel accuracy on the sequential simulation's samples, the figure its accuracy compares with (runs
    saved before the subset existed simulated the whole test set: the parallel accuracy itself)."""
    return row.get("acc_snn_parallel_on_sequential_samples", row["acc_snn_parallel"])


def markdown(results: dict) -> str:
    """The results table and the facts needed to read it."""
    o, r = results["options"], results
    lines = [
        f"# text_cls: {r['model']['name']} on {r['data']['source'].get('dataset')} "
        f"(spike sites: {o['spike_sites']})", "",
        f"Test set: {r['samples']} samples ({r['data']['sizes']['train']} trained on). "
        f"The ANN (float) is {r['ann_reference']}. "
        f"ANN (float): accuracy {_pct(r['acc_ann'])}%, macro-F1 {_pct(r['f1_ann'])}%. "
        f"DA-QCFS ANN at T={r['qcfs_T']}: accuracy {_pct(r['acc_qcfs'])}%, macro-F1 {_pct(r['f1_qcfs'])}%.", "",
        "| T | acc SNN parallel | sequential samples | acc SNN sequential | acc SNN parallel, same samples "
        "| gap (seq - par, same samples) | macro-F1 parallel | agreement par/seq "
        "| agreement par/ANN | changed answers: gained / lost | spike rate | latency ANN ms | latency parallel ms "
        "| latency sequential ms | seq/par, same samples | energy SNN/ANN |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["per_T"]:
        gap = 100 * (row["acc_snn_sequential"] - _par_on_seq(row))
        lines.append(
            f"| {row['T']} | {_pct(row['acc_snn_parallel'])} | {_seq_samples(r, row)} | {_pct(row['acc_snn_sequential'])} | "
            f"{_pct(_par_on_seq(row))} | {gap:+.2f} | "
            f"{_pct(row['f1_snn_parallel'])} | {row['agreement']:.4f} | {row['agreement_with_ann']:.4f} | "
            f"{_changed(row)} | {row['spike_rate']:.4f} | {r['latency_ms_ann']:.1f} | {row['latency_ms_parallel']:.1f} | "
            f"{row['latency_ms_sequential']:.1f} | {_speedup(r, row)} | {row['energy']['energy_ratio']:.3f} |")
    e = r["per_T"][-1]["energy"]
    lines += [
        "",
        "- Accuracies in %. The sequential simulation runs on a seeded subset of the test set (`--sequential_samples`; "
        "'sequential samples' says how many): its accuracy, its agreement with the parallel SNN and the gap compare it "
        "with the parallel SNN on those same samples; every other column is on the whole test set.",
        f"- Latency is the mean per test batch of {o['eval_batchsize']} (samples grouped by "
        "length, trailing all-padding columns dropped), each mode in its own pass; the sequential simulation's batches "
        "hold only its samples, so seq/par divides by the parallel SNN's latency on those same batches.",
        f"- {GELU_NOTE[o['activation']]}.",
        f"- {NORM_NOTE[o['norm_schedule']]}.",
        f"- {CODING_NOTE.get(o.get('coding', 'rate'), NEURON_NOTE[o['sequential_neuron']])}.",
        f"- Parameters: {r['parameters']['weights']:,} weights, {r['parameters']['site_parameters']:,} per-channel "
        f"site values. FLOPs per sample ({r['flops_probe']['tokens']} tokens, torch.utils.flop_counter): ANN "
        f"{r['flops_per_sample_ann'] / 1e9:.3f} G, SNN parallel at T={r['per_T'][-1]['T']} "
        f"{r['per_T'][-1]['flops_per_sample_parallel'] / 1e9:.3f} G, sequential "
        f"{r['per_T'][-1]['flops_per_sample_sequential'] / 1e9:.3f} G.",
        f"- Energy (docs/design.md section 4, 45 nm; memory traffic not counted): coverage {e['coverage']:.3f} of the MACs are "
        "spike-driven; " + e["convention"] + ".",
        f"- Spike rate: spikes per neuron per timestep over the test set (signed sites count |spikes|), "
        "parallel neurons; the sequential neurons' rate is in results.json.",
        f"- Peak memory (MB, {r['machine']['memory_note']}): ANN {r['peak_memory_mb_ann']:.0f}, parallel "
        f"{r['per_T'][-1]['peak_memory_mb_parallel']:.0f}, sequential {r['per_T'][-1]['peak_memory_mb_sequential']:.0f}"
        f" (T={r['per_T'][-1]['T']}).",
        f"- Machine: {r['machine']['platform']}, {r['machine']['device']}, torch threads "
        f"{r['machine']['torch_threads']}. Run time {r['seconds_total']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str | Path) -> None:
    """Accuracy against T: SNN parallel and sequential, with the ANN and DA-QCFS ANN as references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["per_T"]
    Ts = [row["T"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(Ts, [100 * row["acc_snn_parallel"] for row in rows], "o-", label="SNN parallel (ParaInfNeuron)")
    n_seq = {_seq_samples(results, row) for row in rows}
    subset = n_seq != {results["samples"]}
    on = f" ({'/'.join(map(str, sorted(n_seq)))} of {results['samples']} samples)" if subset else ""
    ax.plot(Ts, [100 * row["acc_snn_sequential"] for row in rows], "s--", label=f"SNN sequential (time-stepped){on}")
    if subset:
        ax.plot(Ts, [100 * _par_on_seq(row) for row in rows], "^", mfc="none",
                label=f"SNN parallel on the sequential samples{on}")
    ax.axhline(100 * results["acc_ann"], color="k", lw=1, label="ANN (float)")
    ax.axhline(100 * results["acc_qcfs"], color="gray", lw=1, ls=":", label=f"DA-QCFS ANN (T={results['qcfs_T']})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(Ts, [str(t) for t in Ts])
    ax.set_xlabel("timesteps T")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{results['model']['name']}, spike sites: {results['options']['spike_sites']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def console_table(results: dict) -> Table:
    t = Table(title=f"text_cls: ANN {_pct(results['acc_ann'])}%, DA-QCFS ANN (T={results['qcfs_T']}) "
                    f"{_pct(results['acc_qcfs'])}%")
    for col in ("T", "acc parallel %", "acc seq % (par % same samples)", "agreement", "spike rate", "par ms", "seq ms", "seq/par",
                "energy SNN/ANN"):
        t.add_column(col, justify="right")
    for row in results["per_T"]:
        t.add_row(str(row["T"]), _pct(row["acc_snn_parallel"]),
                  f"{_pct(row['acc_snn_sequential'])} ({_pct(_par_on_seq(row))})",
                  f"{row['agreement']:.4f}", f"{row['spike_rate']:.4f}", f"{row['latency_ms_parallel']:.1f}",
                  f"{row['latency_ms_sequential']:.1f}", _speedup(results, row), f"{row['energy']['energy_ratio']:.3f}")
    return t
