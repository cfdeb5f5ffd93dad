"""Parallel mode against the time-stepped simulation (docs/design.md section 2), in two parts.

**Per site.** In the simulation every site runs its SpikingJelly neuron over the T steps of a
time-varying input. Parallel mode claims that the neuron's spike count over the window is the
closed-form count of the site's mean input. This is checked on every site and element of the
simulated tokens: the counts must agree except where the mean input sits on a level boundary
within float rounding (one level off, on a tiny share of elements; counted before a dead zone
silences the count, :func:`levels_off`, since a tie at a dead zone's edge jumps to silence). A neuron that loses spikes,
fires late without catching up or is not reset fails it.

**Whole model.** The logits of the two are compared as well, but two implementations of the
same quantized network differ on their top-1 token far more than their float arithmetic does:
an input that sits within rounding of a level boundary flips one level, and the flip cascades
through every later quantizer. (On the embedded SmolLM2 at T=16 with rate coding, perturbing the
parallel model's input embeddings by a relative 1e-5 leaves the same top-1 on 0.82 of tokens,
where the two modes agree on 0.80: ``python -m bench.sequential``, docs/bench_sequential.json.)
Top-1 agreement between the two modes is therefore reported, not gated. The gate asks what a
user relies on: that the time-stepped SNN agrees with the ANN about as often as parallel mode
does on the same tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from spike_modules.simulation import run_sequential
from spike_modules.site import DAQCFSSite

from .hooks import site_hooks

SEQUENTIAL_TOKENS = 128  # length of the comparison: ~1.5 min at T=32 on 2 CPU cores for SmolLM2-135M
NOTE = ("sites: each site's spike count over the T steps against the parallel count of its mean input (equal but "
        "at float ties); model: top-1 of the two modes, and each against the ANN, on the first tokens of the "
        "evaluation text. The top-1 of the two modes differs where a tie flips one level and the flip cascades "
        "through later quantizers; it is reported, and the gate compares agreement with the ANN instead")


class SiteCounts:
    """Accumulates, over every site's sequential call, how many elements' spike counts differ from
    the parallel count of the site's time-mean input, and by how many levels at most."""

    def __init__(self):
        self.elements = 0
        self.off = 0
        self.max_off = 0.0
        self.worst: tuple[float, str] = (0.0, "")

    def __call__(self, name: str, site: DAQCFSSite, x: torch.Tensor, y: torch.Tensor) -> None:
        # x, y: [T, ...] (the site unfolds time itself); the decoded mean is counts * step
        counts, step = site.parallel_counts(x.float().mean(0), silence=False)
        diff = levels_off(y.float().mean(0) / step, counts, site.dead.detach())
        off = int((diff > 0.5).sum())
        self.elements += diff.numel()
        self.off += off
        self.max_off = max(self.max_off, float(diff.max()))
        share = off / diff.numel()
        if share > self.worst[0]:
            self.worst = (share, name)

    def summary(self) -> dict:
        return {"elements": self.elements, "off_elements": self.off,
                "off_share": self.off / self.elements if self.elements else float("nan"),
                "max_off_levels": self.max_off, "worst_site": self.worst[1], "worst_site_off_share": self.worst[0]}


def levels_off(seq: torch.Tensor, counts: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """How many levels the sequential neuron's count ``seq`` (dead zone applied) is from the parallel
    count ``counts`` of the mean input *before* the dead zone (``dead`` in counts, per channel).

    A float tie moves the count by one level, and then the dead zone acts: at the edge of a dead
    zone of 1.9 a tie between 2 and 1 is a tie between 2 and 0 after silence. So a silent ``seq``
    (0) is as far from ``counts`` as the nearest silenced count (``|c| <= ceil(dead) - 1``), and a
    count that fired is compared as it is."""
    silenced = (torch.ceil(dead) - 1).clamp(min=0)  # the largest count magnitude a dead zone silences
    to_silence = (counts.abs() - silenced).clamp(min=0)
    return torch.where(seq == 0, to_silence, (seq - counts).abs())


def _agree(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean())


@torch.no_grad()
def sequential_section(snn: nn.Module, ids: torch.Tensor, T: int, use_sparse: bool,
                       ann: nn.Module | None = None) -> dict:
    """Parallel mode against the time-stepped simulation on ``ids`` ``[1, S]`` (see the module doc);
    with ``ann``, each mode's top-1 agreement with it on the same tokens."""
    par = snn(ids).logits.float()
    sites = SiteCounts()
    with site_hooks(snn, sites):
        seq = run_sequential(snn, ids, T, sparse=use_sparse).float()
    if sites.elements == 0:
        raise RuntimeError("the sequential simulation ran no site: the model has no spiking sites to compare")
    top = par.argmax(-1), seq.argmax(-1)
    out = {"tokens": int(ids.shape[1]), "relative_logit_error": float((seq - par).norm() / par.norm()),
           "max_abs_logit_diff": float((seq - par).abs().max()), "top1_agreement": _agree(*top),
           "sites": sites.summary(), "sparse": use_sparse, "note": NOTE}
    if ann is not None:
        ref = ann(ids).logits.float().to(par.device).argmax(-1)
        out["ann_agreement"] = {"parallel": _agree(top[0], ref), "sequential": _agree(top[1], ref)}
    return out
