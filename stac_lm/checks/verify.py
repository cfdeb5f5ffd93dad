"""The verification report: the SNN measured against the ANN it came from.

Perplexity and top-1 agreement on the evaluation text (the fixed protocol of stac_lm.eval.perplexity),
spike rates per site with fire/saturation checks, the energy estimate with its
coverage, parallel-vs-sequential agreement on a short sequence, and one greedy
continuation of a fixed prompt from each model. The quality gates (``stac_lm.checks.gates``:
perplexity and agreement bars per mode, coding and T, "spikes drive the output", site
activity against calibration, parallel vs sequential) are checks in the same list.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import replace

import torch
from rich.console import Console
from torch import nn

from calibration import CalibrationConfig, ChannelObserver
from calibration.calibrate import fit_site
from spike_modules import iter_sites, set_mode, set_timesteps
from spike_modules.quantizer import weighted_spikes
from spike_modules.site import reset_spike_stats
from stac_lm.eval.perplexity import evaluate_lm

from . import gates
from .hooks import site_hooks
from .sequential import SEQUENTIAL_TOKENS, sequential_section
from spike_modules.energy import counting, energy_summary, group_name, memory_traffic, site_neurons, site_spikes
from spike_modules.energy_profile import silence_by_group, silence_per_token, token_profile
from spike_modules.energy_total import energy_total
from spike_modules.kv_cache import SpikeKVCache
from stac_lm.convert.options import EVAL_WINDOW
from stac_common.runtime import input_device, machine_info

SATURATION_BOUND = 0.95     # spikes per neuron per step of a site without bursts; signed sites count |spikes|
AT_CAP_BOUND = 0.05         # share of a site's (neuron, token) counts at the cap B*T (clipped)
PROBE_TOKENS = 256          # the first tokens of the evaluation text: per-site activity, T change, pass-through
VARIED_MAX_SHARE = 0.5      # a network that collapsed predicts one token (commas) almost everywhere
PROMPT = "The night was cold and the castle walls were silent, when"
NEW_TOKENS = 24
RELU_NOTE = ("--activation relu replaced the model's SiLU/GELU by ReLU without fine-tuning; this damages a "
             "pretrained model, and ppl_relu_ann (the ReLU network without spikes) measures that damage apart "
             "from the spiking error")


@torch.no_grad()
def greedy(model: nn.Module, tokenizer, prompt: str = PROMPT, new_tokens: int = NEW_TOKENS) -> str:
    """Greedy continuation with the KV cache (sites act per element, so cached decoding
    computes what a full pass would)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(input_device(model))
    out = model(ids, use_cache=True, logits_to_keep=1)
    new = []
    for i in range(new_tokens):
        new.append(out.logits[:, -1].argmax(-1, keepdim=True))
        if i + 1 < new_tokens:
            out = model(new[-1], past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    return tokenizer.decode(torch.cat(new, dim=1)[0], skip_special_tokens=False)


def spike_section(model: nn.Module) -> dict:
    """Per-site rates since the last reset, per-group summaries and the overall rate."""
    sites = dict(iter_sites(model))
    rates = {name: site.spike_rate for name, site in sites.items()}
    spikes = steps = 0.0
    groups: dict[str, list[float]] = {}
    for name, site in sites.items():
        spikes += site_spikes(site)
        steps += sum(n.neuron_steps_total for n in site_neurons(site))
        groups.setdefault(group_name(name), []).append(rates[name])
    per_group = {g: {"sites": len(r), "min": min(r), "mean": sum(r) / len(r), "max": max(r)}
                 for g, r in groups.items()}
    peaks = {name: max(n.peak_spikes for n in site_neurons(site)) for name, site in sites.items()}
    top = max(peaks, key=peaks.get) if peaks else None
    at_cap = {name: site.parallel.at_cap_share for name, site in sites.items()}
    return {"per_site": rates, "per_group": per_group, "at_cap_share": at_cap,
            "bursting_sites": [name for name, site in sites.items() if site.bursts],
            "peak_spikes_per_token": {"site": top, "spikes": peaks.get(top), "timesteps": sites[top].T if top else None,
                                      "definition": "most spikes one neuron fired for one token over its T steps "
                                                    "(T means one spike per step; more are bursts)"},
            "mean_spike_rate": spikes / steps if steps else float("nan"),
            "saturation_bound": SATURATION_BOUND, "at_cap_bound": AT_CAP_BOUND,
            "rate_definition": "spikes per neuron per timestep over the whole evaluation text; "
                               "signed sites count |spikes|"}


def _check(name: str, passed: bool, detail: str) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail}


def spike_checks(section: dict) -> list[dict]:
    rates = section["per_site"]
    silent = [n for n, r in rates.items() if not r > 0]          # NaN (never ran) counts as silent
    bursting = set(section["bursting_sites"])
    at_cap = section["at_cap_share"]
    # a neuron without bursts saturates by firing on (nearly) every step; a burst neuron's rate may
    # pass 1 without clipping anything, so for every site the test is the share clipped at its cap
    saturated = [n for n, r in rates.items() if (n not in bursting and r >= SATURATION_BOUND)
                 or at_cap[n] >= AT_CAP_BOUND]
    plain = [r for n, r in rates.items() if n not in bursting]
    lo, hi = min(rates.values()), max(plain, default=float("nan"))
    cap_hi = max((v for v in at_cap.values() if v == v), default=float("nan"))
    return [
        _check("every site fires", not silent,
               f"min rate {lo:.4g}" + (f"; silent: {silent[:6]}" if silent else "")),
        _check("no site saturates", not saturated,
               f"max rate without bursts {hi:.4g} (bound {SATURATION_BOUND}); max share at the cap {cap_hi:.4g} "
               f"(bound {AT_CAP_BOUND})" + (f"; saturated: {saturated[:6]}" if saturated else "")),
    ]


def other_timesteps(T: int) -> int:
    """A clearly different T: half as many levels (twice as many for T=1)."""
    return T // 2 if T > 1 else 2


@torch.no_grad()
def probe_section(ann: nn.Module | None, snn: nn.Module, ids: torch.Tensor, T: int,
                  calib: CalibrationConfig) -> dict:
    """What the gates measure on ``ids`` ``[1, S]`` (sites in parallel mode, statistics reset here).

    Pass-through: per site, of the inputs ``v = phi (x + psi)`` more than ``gates.OFF_LEVEL`` steps
    (``theta / L``, ``L`` the site's levels)
    from every level, the share whose output equals ``x`` or ``v`` within ``gates.SAME`` steps (a
    spiking site outputs levels, so ~0). Activity: per site, the measured rate against the rate the
    calibration rule (``calib``'s rule, percentile, burst cap and budget; no psi/phi fit; spikes per
    count as the site's coding spends them) predicts
    when its thresholds are fitted afresh on these very inputs, so thresholds edited after (or
    apart from) calibration show. T change: relative change of the logits at ``other_timesteps(T)``.
    With ``ann``, also the SNN's relative logit error against it.
    """
    sites = dict(iter_sites(snn))
    rule = replace(calib, T=T, fit_affine=False)
    fitted: dict = {}
    leak = {n: [0, 0] for n in sites}

    def measure(name, site, x, y):
        # fitted here, from this one call: a model's histograms together would not fit in memory
        if name in fitted:
            raise ValueError(f"site {name!r} ran twice in one probe pass; the activity gate needs one call per site")
        observer = ChannelObserver(site.num_channels, name, reservoir_rows=0)
        observer.update(torch.nan_to_num(x.detach(), 0.0, 0.0, 0.0))  # a broken site may feed inf on
        fitted[name] = fit_site(observer, rule, site.signed)[0]
        x, y = x.detach().float(), y.detach().float()
        step = (site.theta.detach() / getattr(site, "levels", site.T)).float()
        v = site.phi.detach().float() * (x + site.psi.detach().float())
        u = v / step
        off = (u - u.round()).abs() > gates.OFF_LEVEL
        same = ((y - x).abs() <= gates.SAME * step) | ((y - v).abs() <= gates.SAME * step)
        leak[name][0] += int(off.sum())
        leak[name][1] += int((off & same).sum())

    reset_spike_stats(snn)
    with site_hooks(snn, measure):
        logits = snn(ids).logits.float()
    measured = {n: s.spike_rate for n, s in sites.items()}
    spikes = {n: [0.0, 0] for n in sites}

    def predict(name, site, x, y):
        p, L = fitted[name], getattr(site, "levels", T)  # levels per sign: T, or 2**T - 1 in weighted coding
        burst = p.burst.to(x.device)
        hi = burst * L
        c = torch.floor(x.detach().float() * (L / p.theta.to(x.device)) + site.init_mem)
        c = torch.minimum(torch.maximum(c, -hi if site.signed else torch.zeros_like(hi)), hi).abs()
        if bool((site.dead > 0).any()):  # what the site's dead zones silenced stays silent in the prediction
            own, _ = site.parallel_counts(x.detach())
            c = c.masked_fill((own == 0) & (site.dead.detach().to(c.device) > 0), 0.0)
        if site.coding == "weighted":  # what a count costs in spikes in the site's coding
            c = weighted_spikes(c, site.T, burst)
        spikes[name][0] += float(c.sum(dtype=torch.float64))
        spikes[name][1] += c.numel() * T

    with site_hooks(snn, predict):
        snn(ids)
    predicted = {n: s / steps if steps else 0.0 for n, (s, steps) in spikes.items()}
    other = other_timesteps(T)
    set_timesteps(snn, other)
    try:
        moved = snn(ids).logits.float()
    finally:
        set_timesteps(snn, T)
    rel_ann = float("nan")
    if ann is not None:
        ref = ann(ids).logits.float().to(logits.device)
        rel_ann = float((logits - ref).norm() / ref.norm())
    return {"tokens": int(ids.shape[1]), "timesteps": T, "other_timesteps": other,
            "relative_logit_change": float((moved - logits).norm() / logits.norm()),
            "relative_logit_error_vs_ann": rel_ann,
            "pass_through_share": {n: (b / a if a else 0.0) for n, (a, b) in leak.items()},
            "off_level_inputs": {n: a for n, (a, _) in leak.items()},
            "measured_rate": measured, "predicted_rate": predicted,
            "prediction": f"rule {calib.rule!r} (percentile {calib.percentile}, max_burst {calib.max_burst}, "
                          f"burst_budget {calib.burst_budget}) fitted on these {int(ids.shape[1])} tokens' "
                          "site inputs, psi = 0, phi = 1"}


def total_energy_section(snn: nn.Module, counts, probe_ids: torch.Tensor) -> dict:
    """Total energy per token against the three ANN baselines (docs/design.md section 5), from the pass
    ``counts`` counted, with how silent the channels were per layer group and, on ``probe_ids``, per token.
    One prefill of ``probe_ids`` gives the per-token silence and the widths the KV cache stores; the
    site statistics are read before it, so they hold the counted pass alone."""
    groups = silence_by_group(snn)
    profile = token_profile(snn, counts, context=(EVAL_WINDOW - 1) / 2, prefill_tokens=EVAL_WINDOW, kv_bytes=0.0)
    cache = SpikeKVCache(snn)
    per_token = silence_per_token(snn, probe_ids, cache)
    kv = replace(profile.attention, snn_kv_bytes=cache.stored_bytes_per_element())
    section = energy_total(replace(profile, attention=kv))
    section["silence"] = {"per_group": groups, "per_token": per_token}
    return section


def verify(ann: nn.Module, snn: nn.Module, tokenizer, eval_ids: torch.Tensor, *, T: int, activation: str,
           mode: str, calibration: CalibrationConfig, coding: str | None = None, use_sparse: bool = False,
           progress: bool = True, console: Console | None = None) -> dict:
    """Measure ``snn`` against ``ann`` on ``eval_ids`` (1-D); returns the report's measured part.

    ``mode`` (``full``/``simplified``) and ``coding`` (default: what the sites say, else ``rate``)
    choose the quality bars (:data:`stac_lm.checks.gates.GATES`); ``calibration`` is the config the
    thresholds were calibrated with (the activity gate predicts rates by its rule). The SNN's
    sites must be in parallel mode.

    Raises:
        ValueError: ``eval_ids`` holds less than one evaluation window.
    """
    coding = gates.model_coding(snn) if coding is None else coding
    console = console or Console(stderr=True)

    def stage(text: str):  # a spinner for the stages without a progress bar of their own
        return console.status(f"verify: {text}") if progress else nullcontext()

    device = input_device(snn)
    ids = eval_ids.to(device)
    reset_spike_stats(snn)
    # one pass over the text gives perplexity, agreement, spike rates and operation counts
    with counting(ann) as ann_counts, counting(snn) as snn_counts, torch.no_grad():
        lm = evaluate_lm({"ann": ann, "snn": snn}, ids, window=EVAL_WINDOW, progress=progress)
    spikes = spike_section(snn)
    checks = spike_checks(spikes)
    report = {"protocol": lm["protocol"], "eval_windows": lm["windows"], "eval_scored_tokens": lm["tokens"],
              "ppl_ann": lm["ppl"]["ann"], "ppl_snn": lm["ppl"]["snn"],
              "ppl_ratio": lm["ppl"]["snn"] / lm["ppl"]["ann"], "top1_agreement": lm["top1_agreement"]["snn"],
              "mean_spike_rate": spikes["mean_spike_rate"], "spikes": spikes}
    if activation == "relu":
        set_mode(snn, "ann")
        try:
            relu = evaluate_lm({"relu_ann": snn}, ids, window=EVAL_WINDOW, progress=progress)
        finally:
            set_mode(snn, "parallel")
        report["ppl_relu_ann"] = relu["ppl"]["relu_ann"]
        report["note"] = RELU_NOTE

    energy = energy_summary(ann_counts, snn_counts, snn)
    energy["memory_traffic"] = memory_traffic(ann, snn, snn_counts, mean_context=(EVAL_WINDOW - 1) / 2)
    report.update(energy=energy, coverage=energy["coverage"], energy_ratio=energy["energy_ratio"])
    report["energy_total"] = total_energy_section(snn, snn_counts, ids[:PROBE_TOKENS][None])
    checks.append(_check("op counts consistent", energy["op_counts_consistent"],
                         f"ANN MACs {energy['ann_macs']:,} vs SNN dense + spike-driven "
                         f"{energy['snn_dense_macs'] + energy['snn_spike_driven_macs']:,}"))
    preds = snn_counts.predictions.flatten()
    top_share = float(preds.bincount().max()) / preds.numel()
    checks.append(_check("predictions varied", top_share < VARIED_MAX_SHARE,
                         f"most frequent SNN prediction on {preds.numel()} positions: {top_share:.1%} "
                         f"(bound {VARIED_MAX_SHARE:.0%})"))

    quality, report["quality_bars"] = gates.quality_checks(mode, coding, T, report["ppl_ratio"],
                                                           report["top1_agreement"])
    checks += quality
    with stage(f"probe ({PROBE_TOKENS} tokens): activity, pass-through, T={other_timesteps(T)}"):
        probe = probe_section(ann, snn, ids[:PROBE_TOKENS][None], T, calibration)
    report["probe"] = probe
    checks += gates.drive_checks(probe["relative_logit_change"], T, probe["other_timesteps"],
                                 probe["pass_through_share"])
    checks += gates.activity_check(probe["measured_rate"], probe["predicted_rate"])
    with stage(f"sequential simulation ({SEQUENTIAL_TOKENS} tokens, T={T})"):
        seq = sequential_section(snn, ids[:SEQUENTIAL_TOKENS][None], T, use_sparse, ann=ann)
    report["sequential"] = seq  # docs/design.md section 2: measured, with a bar per mode
    checks += gates.sequential_checks(mode, coding, seq)
    with stage(f"greedy continuation ({NEW_TOKENS} tokens)"):
        report["generation"] = {"prompt": PROMPT, "new_tokens": NEW_TOKENS,
                                "ann": greedy(ann, tokenizer), "snn": greedy(snn, tokenizer)}
    finite = all(math.isfinite(report[k]) for k in ("ppl_ann", "ppl_snn"))
    checks.append(_check("finite perplexity", finite, f"ANN {report['ppl_ann']:.4g}, SNN {report['ppl_snn']:.4g}"))
    report.update(gated_mode=mode, coding=coding, checks=checks)
    report["all_checks_passed"] = all(c["passed"] for c in checks)
    report["machine"] = machine_info(device)
    return report
