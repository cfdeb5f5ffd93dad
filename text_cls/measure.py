"""Every measurement of a run on one test set: ANN, DA-QCFS ANN, SNN parallel and sequential per T."""

from __future__ import annotations

import torch
from torch import nn

from calibration import Calibration
from spike_modules.site import set_mode, set_timesteps

from .batching import Encoded, model_inputs
from .energy import counting, energy_summary, flops_per_sample, parameter_count
from .evaluate import (Tracker, changed_answers, float_run, parallel_run, predict, reset_spike_stats, scores,
                       sequential_run, share, spike_rates)
from .model import run_sequential
from .train import progress_bar

PROBE_SAMPLES = 4  # FLOPs are counted on this many test samples at the full fixed length


def _use(snn: nn.Module, calib: Calibration, T: int) -> None:
    calib.apply_to(snn)
    set_timesteps(snn, T)


def measure(ann: nn.Module, snn: nn.Module, calibrations: dict[int, Calibration], batches: list[dict],
            probe: Encoded, qcfs_T: int, device: torch.device, progress: bool = True,
            seq_batches: list[dict] | None = None) -> dict:
    """Run every mode on ``batches`` (the same test batches, same order) and collect the results.

    ``calibrations[T]`` holds the site parameters for each T of the sweep; ``qcfs_T`` is the T of
    the headline DA-QCFS ANN figure. The sequential simulation (T times the work of a parallel pass)
    runs on ``seq_batches`` (default: ``batches``), a subset of the test set, and is compared with the
    parallel pass on the same samples. One progress bar with the time left covers every pass.
    Returns the ``results.json`` body (without options).
    """
    seq_batches = batches if seq_batches is None else seq_batches
    seq_samples = sum(int(b["labels"].shape[0]) for b in seq_batches)
    subset = seq_batches is not batches
    Ts = sorted(calibrations)
    # parallel-pass units: ANN, DA-QCFS ANN, then per T a parallel pass (+ its subset) and T steps of the subset
    total = 2 * len(batches) + sum(len(batches) + (len(seq_batches) if subset else 0) + T * len(seq_batches)
                                   for T in Ts)
    with progress_bar(not progress) as bar:
        return _measure(ann, snn, calibrations, batches, probe, qcfs_T, device, seq_batches, seq_samples, subset,
                        Tracker(bar, total) if progress else None)


def _measure(ann, snn, calibrations, batches, probe, qcfs_T, device, seq_batches, seq_samples, subset,
             tracker) -> dict:
    progress = False  # the tracker's one bar replaces the per-pass bars
    samples = sum(int(b["labels"].shape[0]) for b in batches)
    with counting(ann) as ann_ops:
        ann_res = predict(float_run(ann), batches, device, "ANN (float)", progress, tracker)
    ann_pred = ann_res["logits"].argmax(-1)
    ann_scores = scores(ann_res)
    probe_inputs = model_inputs({"input_ids": probe.input_ids[:PROBE_SAMPLES],
                                 "attention_mask": probe.attention_mask[:PROBE_SAMPLES]}, device)
    n_probe = int(probe_inputs["input_ids"].shape[0])
    flops_ann = flops_per_sample(ann, lambda: ann(**probe_inputs), n_probe)

    _use(snn, calibrations[qcfs_T], qcfs_T)
    qcfs_res = predict(parallel_run(snn, qcfs_T, "quant"), batches, device, f"DA-QCFS ANN T={qcfs_T}", progress, tracker)
    per_T = []
    for T in sorted(calibrations):
        _use(snn, calibrations[T], T)
        reset_spike_stats(snn)
        with counting(snn) as snn_ops:
            par = predict(parallel_run(snn, T), batches, device, f"SNN parallel T={T}", progress, tracker)
        rates = spike_rates(snn)
        set_mode(snn, "parallel")
        flops_par = flops_per_sample(snn, lambda: snn(**probe_inputs), n_probe)
        flops_seq = flops_per_sample(snn, lambda: run_sequential(snn, probe_inputs["input_ids"],
                                                            probe_inputs["attention_mask"], T), n_probe)
        reset_spike_stats(snn)
        seq = predict(sequential_run(snn, T), seq_batches, device, f"SNN sequential T={T} ({seq_samples} samples)",
                      progress, tracker, cost=T)
        seq_rates = spike_rates(snn)
        # the parallel pass on the sequential subset (its own pass: the subset's batches differ)
        par_sub = (predict(parallel_run(snn, T), seq_batches, device, f"SNN parallel T={T}, sequential subset",
                           progress, tracker) if subset else par)
        par_pred, seq_pred = par["logits"].argmax(-1), seq["logits"].argmax(-1)
        par_scores, seq_scores, par_sub_scores = scores(par), scores(seq), scores(par_sub)
        row = {
            "T": T,
            "acc_snn_parallel": par_scores["acc"], "f1_snn_parallel": par_scores["macro_f1"],
            "acc_snn_sequential": seq_scores["acc"], "f1_snn_sequential": seq_scores["macro_f1"],
            "sequential_samples": seq_samples, "acc_snn_parallel_on_sequential_samples": par_sub_scores["acc"],
            "agreement": share(par_sub["logits"].argmax(-1) == seq_pred),
            "agreement_with_ann": share(par_pred == ann_pred),
            "changed_answers": changed_answers(par_pred, ann_pred, par["labels"], int(par["logits"].shape[1])),
            "relative_logit_gap": float((seq["logits"] - par_sub["logits"]).norm() / par_sub["logits"].norm()),
            "latency_ms_parallel": par["latency_ms"], "latency_ms_sequential": seq["latency_ms"],
            "latency_ms_parallel_on_sequential_samples": par_sub["latency_ms"],
            "peak_memory_mb_parallel": par["peak_memory_mb"], "peak_memory_mb_sequential": seq["peak_memory_mb"],
            "spike_rate": rates["overall"], "spike_rate_sequential": seq_rates["overall"],
            "spike_rate_per_layer": rates["per_layer"], "spike_rate_per_kind": rates["per_kind"],
            "spike_rate_per_site": rates["per_site"],
            "flops_per_sample_parallel": flops_par, "flops_per_sample_sequential": flops_seq,
            "energy": energy_summary(ann_ops, snn_ops, samples),
        }
        if T == qcfs_T:  # the parallel neuron computes the QCFS quantizer: the same logits, measured
            row["qcfs_parallel_max_abs_logit_diff"] = float((qcfs_res["logits"] - par["logits"]).abs().max())
        per_T.append(row)
    qcfs_scores = scores(qcfs_res)
    return {
        "samples": samples, "batches": len(batches), "sequential_samples": seq_samples,
        "acc_ann": ann_scores["acc"], "f1_ann": ann_scores["macro_f1"],
        "acc_qcfs": qcfs_scores["acc"], "f1_qcfs": qcfs_scores["macro_f1"], "qcfs_T": qcfs_T,
        "latency_ms_ann": ann_res["latency_ms"], "latency_ms_qcfs": qcfs_res["latency_ms"],
        "peak_memory_mb_ann": ann_res["peak_memory_mb"],
        "flops_per_sample_ann": flops_ann, "flops_probe": {"samples": n_probe, "tokens": int(probe.input_ids.shape[1])},
        "parameters": parameter_count(snn),
        "ann_prediction_counts": torch.bincount(ann_pred, minlength=int(ann_res["logits"].shape[1])).tolist(),
        "per_T": per_T,
    }
