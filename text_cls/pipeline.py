"""The text-classification run: data -> float fine-tune -> convert -> DA-QCFS fine-tune -> calibrate
per T -> evaluate every mode -> write the run directory (atomically, at the end).

Everything that can be refused (options, output directory, data, model) is refused before the
first training step; an error or Ctrl-C leaves no run directory behind.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from calibration import Calibration, CalibrationConfig, fit_calibration, observe_sites
from stac_common.io import atomic_dir, check_output_free, write_json
from stac_common.runtime import StepTimer, resolve_device

from .batching import Encoded, encode, eval_batches, model_inputs, pick, sequential_count
from .data import load_splits, write_splits
from .measure import measure
from .model import (EMBEDDED_MODEL, SiteSpec, convert_classifier, float_copy, is_embedded, load_classifier,
                    relu_swap_)
from .options import TextClsOptions
from .report import console_table, markdown, plot
from .saving import write_model
from .select import agreement_score, candidate_configs, logits_of, select_calibration
from .train import finetune_

RESULTS_FILE, TABLE_FILE, PLOT_FILE = "results.json", "results.md", "accuracy_vs_T.png"
# token rows per site kept for the psi/phi fit: the fit costs rows x channels x 35 quantizer passes per T,
# about 40 s per T at 4096 rows for MiniLM's 30 sites on 2 cores; 2048 rows take a quarter of that
RESERVOIR_ROWS = 2048


def _subset(data: Encoded, n: int) -> Encoded:
    return Encoded(data.input_ids[:n], data.attention_mask[:n], data.labels[:n])


def calibration_config(opts: TextClsOptions, T: int, fit_affine: bool) -> CalibrationConfig:
    return CalibrationConfig(T=T, rule=opts.threshold_rule, percentile=opts.percentile, seed=opts.seed,
                             fit_affine=fit_affine and opts.fit_affine, reservoir_rows=RESERVOIR_ROWS,
                             coding=opts.coding)


def _run_batch(model, batch) -> None:
    model(**model_inputs(batch, next(model.parameters()).device))


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device), "torch": torch.__version__,
            "memory_note": "GPU peak allocated per mode" if device.type == "cuda"
            else "CPU: the process's peak resident set so far, a high-water mark over the run"}
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    return info


def run(opts: TextClsOptions, console: Console | None = None) -> dict | None:
    """Do the run ``opts`` describe and write ``opts.savedir``; returns ``results.json``'s content
    (``None`` on the non-main processes of ``accelerate launch``).

    Raises:
        ValueError: bad input of any kind, before training (``DataError``, ``OutputExistsError`` included).
        MissingAssetError: the model is not available offline.
    """
    from accelerate import Accelerator

    t_start = time.perf_counter()
    check_output_free(opts.savedir, opts.overwrite)
    device = resolve_device(opts.device)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    if device.type == "cuda":  # "cuda" (from --device auto) names no index, and set_device refuses it
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    step = StepTimer(console, opts.progress)
    with step("read data", spinner=True):
        splits = load_splits(opts.dataset, opts.train_file, opts.test_file, opts.text_column, opts.label_column,
                             opts.encoding, opts.validation_fraction, opts.test_fraction, opts.seed,
                             opts.max_train_samples, opts.max_eval_samples, opts.datadir, opts.distill_samples)
    torch.manual_seed(opts.seed)  # before the load: a new classification head is drawn from torch's generator
    with step("load model", spinner=True):
        ann, tok = load_classifier(opts.model_name, splits.num_classes, dict(enumerate(splits.classes)))
    positions = getattr(ann.config, "max_position_embeddings", None)
    if positions is not None and opts.max_len > positions:
        raise ValueError(f"--max_len {opts.max_len} is longer than the model's {positions} positions")
    with step("tokenize", spinner=True):
        train, val, test = (encode(tok, rows, opts.max_len) for rows in (splits.train, splits.validation, splits.test))
        # the DA-QCFS fine-tune distils on the training samples and any more that --distill_samples lends it
        distill_data = encode(tok, splits.train + splits.distill_extra, opts.max_len) if splits.distill_extra else train
    accelerator = Accelerator(cpu=device.type == "cpu")
    device = accelerator.device
    spec = SiteSpec(opts.spike_sites, opts.activation, opts.time_step, opts.norm_schedule, opts.sequential_neuron,
                    opts.probs_scale, opts.coding)
    if opts.activation == "relu":
        relu_swap_(ann)  # before the float fine-tune, so the float ANN is the ReLU network the SNN converts
    ann.to(device)
    training = {}
    train_args = dict(batch_size=opts.batchsize, seed=opts.seed, accelerator=accelerator,
                      freeze_embeddings=opts.freeze_embeddings, progress=opts.progress)
    if not opts.direct_inference and opts.ann_epochs:
        with step(f"phase 1a: float fine-tune ({opts.ann_epochs} epoch(s), {len(train)} samples)"):
            training["ann"] = finetune_(ann, train, epochs=opts.ann_epochs, lr=opts.learning_rate,
                                        desc="float fine-tune", **train_args)
    snn = convert_classifier(ann, spec).to(device)
    calib_batches = eval_batches(_subset(train, opts.calib_samples), opts.eval_batchsize)
    qcfs_training = not opts.direct_inference and opts.trainsnn_epochs > 0
    rules = tuple(dict.fromkeys((opts.threshold_rule, *opts.threshold_candidates)))
    with step("calibrate the sites (per-channel thresholds)"):
        observers, n = observe_sites(snn, calib_batches, calibration_config(opts, opts.time_step, False),
                                     run_batch=_run_batch, progress=opts.progress)
        # thresholds for DA-QCFS training: the percentile/max rules do not depend on T, so one set serves the cycle
        base = fit_calibration(observers, replace(calibration_config(opts, opts.time_step, False), n_samples=n),
                               model_id=str(opts.model_name))
        base.apply_to(snn)
        per_t = None
        if qcfs_training and opts.train_thresholds != "shared":  # thresholds fitted for each T of the cycle
            per_t = {T: fit_calibration(observers, replace(calibration_config(opts, T, False), n_samples=n,
                                                           rule=opts.train_thresholds), model_id=str(opts.model_name))
                     for T in opts.time_steps}
        # the parameters each T trains with (and keeps without phase 2): its own, or the one set at its T
        trained_with = per_t or {T: replace(base, config=replace(base.config, T=T)) for T in opts.time_steps}
    score = None
    if qcfs_training and opts.trainsnn_epochs > 1:  # several epochs: keep the one that best follows the float ANN
        val_batches = eval_batches(val, opts.eval_batchsize)
        teacher = ann if opts.ann_epochs else None
        score = lambda: agreement_score(snn, teacher, val_batches, trained_with, device)  # noqa: E731
    if qcfs_training:
        with step(f"phase 1b: DA-QCFS fine-tune ({opts.trainsnn_epochs} epoch(s), {len(distill_data)} samples, "
                  f"T cycling {list(opts.train_cycle)})"):
            training["qcfs"] = finetune_(snn, distill_data, epochs=opts.trainsnn_epochs, lr=opts.snn_learning_rate,
                                         timesteps=opts.train_cycle, desc="DA-QCFS fine-tune", distill=opts.distill,
                                         temperature=opts.distill_temperature,
                                         float_loss=opts.float_loss, thresholds=per_t, score=score,
                                         hidden_distill=opts.hidden_distill,
                                         teacher=ann if opts.ann_epochs else None, **train_args)
    if qcfs_training and not opts.ann_epochs:
        ann = float_copy(snn, ann)
        reference = "the DA-QCFS-trained weights run as a float network (sites off, the original modules)"
    elif opts.ann_epochs and not opts.direct_inference:
        reference = ("a separate float fine-tune (phase 1a), before the DA-QCFS fine-tune" if qcfs_training else
                     "the float fine-tune (phase 1a), whose weights the SNN keeps (no DA-QCFS fine-tune)")
    else:
        reference = "the checkpoint as given (--direct_inference)" if opts.direct_inference else "the checkpoint"
    calibrations: dict[int, Calibration] = {}
    selection: dict[int, list[dict]] = {}
    with step("phase 2: calibrate per T" + (f" (choosing among {', '.join(rules)} on {len(val)} validation samples)"
                                            if len(rules) > 1 else "")
              if opts.calibrate_th else "phase 2: keep the training thresholds"):
        if opts.calibrate_th and qcfs_training:  # the weights moved: observe the trained network again
            observers, n = observe_sites(snn, calib_batches, calibration_config(opts, opts.time_step, True),
                                         run_batch=_run_batch, progress=opts.progress)
        if opts.calibrate_th and len(rules) > 1:
            val_batches = eval_batches(val, opts.eval_batchsize)
            float_logits = logits_of(ann, val_batches, device)
            val_labels = torch.cat([b["labels"] for b in val_batches])
        for T in opts.time_steps:
            cfg = replace(calibration_config(opts, T, opts.calibrate_th), n_samples=n)
            if not opts.calibrate_th:
                calibrations[T] = trained_with[T]
            elif len(rules) == 1:
                calibrations[T] = fit_calibration(observers, cfg, model_id=str(opts.model_name))
            else:
                kept = trained_with[T] if qcfs_training else None
                calibrations[T], selection[T] = select_calibration(
                    snn, observers, candidate_configs(cfg, rules), val_batches, float_logits, val_labels, device,
                    str(opts.model_name), kept, opts.select_by)
    if not accelerator.is_main_process:
        return None
    with step("phase 3: evaluate ANN, DA-QCFS ANN, SNN parallel and sequential"):
        ann_val = measure_val(ann, val, opts, device)
        seq_test = pick(test, sequential_count(test, opts.sequential_samples), opts.seed)
        results = measure(ann, snn, calibrations, eval_batches(test, opts.eval_batchsize), test, opts.time_step,
                          device, opts.progress,
                          None if seq_test is test else eval_batches(seq_test, opts.eval_batchsize))
    calibrations[opts.time_step].apply_to(snn)
    results.update({
        "calibration_selection": {str(T): rows for T, rows in selection.items()},
        "samples_per_stage": {"float_fine_tune": len(train) if training.get("ann") else 0,
                              "qcfs_fine_tune": len(distill_data) if training.get("qcfs") else 0,
                              "calibration": n, "calibration_choice": len(val) if selection else 0,
                              "validation": len(val), "test": len(test),
                              "sequential": results["sequential_samples"]},
        "acc_ann_validation": ann_val, "ann_reference": reference, "options": opts.to_dict(), "data": splits.describe(),
        "model": {"name": EMBEDDED_MODEL if is_embedded(opts.model_name) else opts.model_name,
                  "model_type": ann.config.model_type, "layers": ann.config.num_hidden_layers,
                  "hidden": ann.config.hidden_size, "neuron_type": opts.neuron_type,
                  "gelu": "kept (rate domain)" if opts.activation == "keep" else "swapped for ReLU",
                  "norm_schedule": opts.norm_schedule, "sequential_neuron": opts.sequential_neuron,
                  "coding": opts.coding},
        "training": training, "machine": machine_info(device), "step_seconds": dict(step.seconds),
    })
    results["seconds_total"] = time.perf_counter() - t_start
    with step("save", spinner=True), atomic_dir(opts.savedir, opts.overwrite) as tmp:
        write_splits(splits, tmp / "data")
        info = {"classes": splits.classes, "max_len": opts.max_len, "options": opts.to_dict(),
                "source_model": results["model"]}
        write_model(tmp / "model", snn.cpu(), tok, calibrations, opts.time_step, spec, info)
        write_json(tmp / RESULTS_FILE, results)
        (tmp / TABLE_FILE).write_text(markdown(results))
        plot(results, tmp / PLOT_FILE)
    Console(stderr=True).print(console_table(results))
    return results


@torch.inference_mode()
def measure_val(model, data: Encoded, opts: TextClsOptions, device) -> float:
    """Float ANN accuracy on the validation split (the split the test set was kept apart from)."""
    correct = 0
    for batch in eval_batches(data, opts.eval_batchsize):
        logits = model(**model_inputs(batch, device)).logits
        correct += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
    return correct / len(data)
