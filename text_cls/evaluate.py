"""Evaluation: logits of every mode on the same batches, accuracy, macro-F1, agreement, latency, memory."""

from __future__ import annotations

import re
import resource
import sys
import time
from typing import Callable

import torch
from torch import nn

from spike_modules.site import iter_sites, reset_spike_stats, set_mode, set_timesteps  # noqa: F401
from spike_modules.energy import group_name, site_neurons

from .batching import model_inputs
from .model import run_sequential
from .train import progress_bar

LAYER = re.compile(r".*?\.layer\.\d+")  # "bert.encoder.layer.3" from a site's qualified name


def macro_f1(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes (those in the labels or the predictions) of ``2 TP / (2 TP + FP + FN)``."""
    classes = torch.unique(torch.cat([pred, labels]))
    scores = []
    for c in classes:
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def peak_memory_mb(device: torch.device) -> float:
    """GPU: peak allocated since the last reset. CPU: the process's peak resident set (a high-water
    mark over the whole run, not per mode)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Tracker:
    """One progress bar (with the time left) over a whole evaluation: each pass adds ``cost`` units per
    batch (a sequential pass at T costs about T parallel ones), so the estimate covers every pass to come."""

    def __init__(self, bar, total: float):
        self.bar, self.task = bar, bar.add_task("evaluate", total=total, info="")

    def start(self, desc: str) -> None:
        self.bar.update(self.task, info=desc)

    def advance(self, units: float) -> None:
        self.bar.advance(self.task, units)


@torch.inference_mode()
def predict(run: Callable[[dict], torch.Tensor], batches: list[dict], device: torch.device, desc: str,
            progress: bool = True, tracker: Tracker | None = None, cost: float = 1.0) -> dict:
    """Run ``run(inputs) -> logits`` on every batch; logits, labels, latency per batch (ms) and peak memory.
    With a ``tracker`` the pass advances that shared bar by ``cost`` per batch instead of showing its own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    logits, labels, times = [], [], []
    if tracker is not None:
        tracker.start(desc)
    with progress_bar(not progress or tracker is not None) as bar:
        task = bar.add_task(desc, total=len(batches), info="")
        for batch in batches:
            inputs = model_inputs(batch, device)
            _sync(device)
            t0 = time.perf_counter()
            out = run(inputs)
            _sync(device)
            times.append(time.perf_counter() - t0)
            logits.append(out.float().cpu())
            labels.append(batch["labels"])
            bar.advance(task)
            if tracker is not None:
                tracker.advance(cost)
    logits_all = torch.cat(logits)
    return {"logits": logits_all, "labels": torch.cat(labels), "latency_ms": 1000 * sum(times) / len(times),
            "batches": len(batches), "peak_memory_mb": peak_memory_mb(device)}


def scores(result: dict) -> dict:
    pred = result["logits"].argmax(-1)
    return {"acc": share(pred == result["labels"]), "macro_f1": macro_f1(pred, result["labels"])}


def changed_answers(pred: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Where ``pred`` answers otherwise than ``reference`` (the float ANN): how many, how many of those
    turn a wrong answer right (``gained``) or a right one wrong (``lost``), and ``pred``'s answers per
    class. The accuracy difference is ``(gained - lost) / samples``; with ``changed`` answers it moves
    by about ``sqrt(changed)`` samples from run to run, which tells how far one run can be read."""
    changed = pred != reference
    return {"changed": int(changed.sum()), "gained": int((changed & (pred == labels)).sum()),
            "lost": int((changed & (reference == labels)).sum()),
            "prediction_counts": torch.bincount(pred, minlength=num_classes).tolist()}


def share(hits: torch.Tensor) -> float:
    """Fraction of true entries, as an exact ratio of counts (no float32 rounding)."""
    return int(hits.sum()) / hits.numel()


def float_run(model: nn.Module) -> Callable[[dict], torch.Tensor]:
    return lambda inputs: model(**inputs).logits


def parallel_run(model: nn.Module, T: int, mode: str = "parallel") -> Callable[[dict], torch.Tensor]:
    """One pass with the sites in ``parallel`` (ParaInfNeuron) or ``quant`` (the QCFS ANN) mode at T."""
    def run(inputs):
        set_timesteps(model, T)
        set_mode(model, mode)
        return model(**inputs).logits
    return run


def sequential_run(model: nn.Module, T: int) -> Callable[[dict], torch.Tensor]:
    """The time-stepped simulation (SpikingJelly neurons, state reset before every batch)."""
    return lambda inputs: run_sequential(model, inputs["input_ids"], inputs.get("attention_mask"), T)


def spike_rates(model: nn.Module) -> dict:
    """Spike rates since the last reset: per site, per layer, per site kind, and overall.

    A rate is spikes per neuron per timestep; signed sites count ``|spikes|``.
    """
    per_site, per_layer, per_kind = {}, {}, {}
    spikes = steps = 0.0
    for name, site in iter_sites(model):
        s = sum(n.spikes_total for n in site_neurons(site))
        k = sum(n.neuron_steps_total for n in site_neurons(site))
        per_site[name] = s / k if k else float("nan")
        spikes, steps = spikes + s, steps + k
        layer = m.group(0) if (m := LAYER.match(name)) else name
        for key, table in ((layer, per_layer), (group_name(name), per_kind)):
            a, b = table.get(key, (0.0, 0))
            table[key] = (a + s, b + k)
    ratio = lambda t: {k: (a / b if b else float("nan")) for k, (a, b) in t.items()}  # noqa: E731
    return {"overall": spikes / steps if steps else float("nan"), "per_layer": ratio(per_layer),
            "per_kind": ratio(per_kind), "per_site": per_site}
