"""Quality gates of the verification report: one table of bars, and the judgements that use it.

Every gate is a check in ``report.json`` (``checks``: name, passed, detail); a failed check makes
``run_conversion.py`` exit 3 and name it. The bars:

========================================  ==========================================================
check                                     bar
========================================  ==========================================================
quality: perplexity ratio SNN/ANN         ``GATES[(mode, coding)].quality[T].ppl_ratio`` (max)
quality: top-1 agreement with the ANN     ``GATES[(mode, coding)].quality[T].agreement`` (min)
spikes drive the output: T changes it     relative logit change T -> T' >= ``T_CHANGE_MIN``
spikes drive the output: no float pass    per site, share of off-level inputs that come out
                                          unchanged <= ``PASS_THROUGH_MAX``
site activity matches calibration         per site, measured rate >= ``ACTIVITY_MIN_RATIO`` x the
                                          rate the calibration rule predicts
sequential neurons give parallel counts   per site and element, the spike count over the window
                                          equals the parallel count of the mean input: share off
                                          <= ``SEQUENTIAL_TIE_SHARE``, never by more than one level
sequential SNN agrees with the ANN        top-1 agreement with the ANN of the time-stepped SNN
                                          >= parallel mode's - ``GATES[(mode, coding)].sequential_margin``
========================================  ==========================================================

Quality bars are measured curves (rate coding: ``docs/bench_convert_rate_nohead.json``, the LM head
dense; weighted spikes: ``docs/frontier.json``; embedded SmolLM2-135M, 8,192 Shakespeare calibration
tokens, 4,096 evaluation tokens of The Tempest) with a stated margin:
perplexity ratio + ``RATIO_MARGIN``, agreement - ``AGREEMENT_MARGIN``. They apply to every model
converted in that mode (the docs make the claim per mode and T). A (mode, coding) without a row,
or a T without bars, has no quality claim: the report lists it as ungated, and says why.
Simplified mode's bars come from ``docs/bench_convert_simplified.json`` (2,048 calibration tokens,
the model's own activation, percentile thresholds with bursts, float weights) with the same
margins. A mode marked not usable (``ModeGates.usable``) fails its quality gate whatever it measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RATIO_MARGIN = 0.10     # a single perplexity moves 1-2% between runs (docs/design.md section 6); shorter calibration costs more
AGREEMENT_MARGIN = 0.07  # about 4.5 standard errors of an agreement near 0.8 on 512 evaluation tokens
T_CHANGE_MIN = 0.01      # the same pass at the same T repeats exactly; other levels move the logits by far more
PASS_THROUGH_MAX = 0.10  # a spiking site's output is on a level: it never equals an off-level input (share ~0)
ACTIVITY_MIN_RATIO = 0.1  # a site firing under a tenth of what its calibration rule predicts is flagged
OFF_LEVEL = 0.05         # an input is "off a level" when it sits more than this many steps from every level
SAME = 0.01              # an output "equals" an input within this many steps
SEQUENTIAL_MARGIN = 0.10  # about 3 standard errors of the difference on 128 tokens where the modes differ on 20%
SEQUENTIAL_TIE_SHARE = 1e-3  # one level off at float ties: 6e-8 to 2.3e-6 measured (docs/bench_convert.json)


@dataclass(frozen=True)
class QualityBar:
    """The bars one (mode, coding, T) must meet, and the measurement they come from."""

    ppl_ratio: float
    agreement: float
    measured: str


def _bar(ratio: float, agreement: float, source: str = "docs/bench_convert_rate_nohead.json") -> QualityBar:
    return QualityBar(round(ratio + RATIO_MARGIN, 3), round(agreement - AGREEMENT_MARGIN, 3),
                      f"{source}: ratio {ratio}, agreement {agreement}")


FRONTIER = "docs/frontier.json (bench/frontier.py, 2-core CPU)"
SIMPLIFIED = "docs/bench_convert_simplified.json (bench/convert.py, 2-core CPU)"


@dataclass(frozen=True)
class ModeGates:
    """Gates of one (mode, coding): ``usable`` False means the mode makes no quality claim yet, so its
    quality gate fails whatever it measures; ``quality`` maps T to bars."""

    usable: bool
    sequential_margin: float
    quality: dict[int, QualityBar] = field(default_factory=dict)
    note: str = ""


# keyed by (mode, coding); a new coding adds its rows here, with the measurement its bars come from
GATES: dict[tuple[str, str], ModeGates] = {
    ("full", "rate"): ModeGates(
        usable=True, sequential_margin=SEQUENTIAL_MARGIN,
        quality={8: _bar(1.148, 0.733), 16: _bar(1.054, 0.865), 32: _bar(1.011, 0.925)},
        note="T=4 (ratio 2.56) is quoted as a measurement, not a claim: no bars"),
    ("full", "weighted"): ModeGates(
        usable=True, sequential_margin=SEQUENTIAL_MARGIN,
        quality={5: _bar(1.070, 0.837, FRONTIER), 6: _bar(1.016, 0.915, FRONTIER), 7: _bar(1.009, 0.947, FRONTIER),
                 8: _bar(1.004, 0.956, FRONTIER)},
        note="T=4 and below, and T=9 and above, were not measured on the full protocol: no bars"),
    ("simplified", "rate"): ModeGates(
        usable=True, sequential_margin=SEQUENTIAL_MARGIN,
        quality={16: _bar(1.039, 0.864, SIMPLIFIED), 32: _bar(1.011, 0.927, SIMPLIFIED)},
        note="measured with the model's own activation; --activation relu breaks a pretrained LM without "
             "fine-tuning and fails these bars (ppl_relu_ann in the report measures the swap alone)"),
}


def check(name: str, passed: bool, detail: str) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail}


def gates_for(mode: str, coding: str) -> ModeGates | None:
    return GATES.get((mode, coding))


def model_coding(model, default: str = "rate") -> str:
    """The spike coding a converted model's sites use (``default`` where they do not say)."""
    from spike_modules import iter_sites

    codings = {getattr(site, "coding", default) for _, site in iter_sites(model)}
    if len(codings) > 1:
        raise ValueError(f"the model's sites use several codings {sorted(codings)}; gates are set per coding")
    return codings.pop() if codings else default


def quality_checks(mode: str, coding: str, T: int, ppl_ratio: float, agreement: float) -> tuple[list[dict], dict]:
    """Quality checks (possibly none) and what the report says about the bars applied."""
    gates = gates_for(mode, coding)
    where = f"{mode} mode, {coding} coding, T={T}"
    if gates is None:
        return [check("quality: bars for this mode and coding", False,
                      f"no quality bars for {where}: measure it and add a row to stac_lm/checks/gates.py GATES")], \
            {"gated": False, "why": "no row in GATES"}
    bar = gates.quality.get(T)
    if not gates.usable:
        shown = f"; bars of a usable T={T} would be ratio <= {bar.ppl_ratio}" if bar else ""
        return [check("quality: mode claims quality", False,
                      f"{gates.note} (measured ratio {ppl_ratio:.4g}, agreement {agreement:.3f}{shown})")], \
            {"gated": True, "usable": False, "note": gates.note}
    if bar is None:
        return [], {"gated": False, "why": f"no bars for T={T} in {mode} mode ({coding} coding): bars exist for "
                                           f"T={sorted(gates.quality)}", "note": gates.note}
    rows = [check("quality: perplexity ratio", ppl_ratio <= bar.ppl_ratio,
                  f"{ppl_ratio:.4g} (bar <= {bar.ppl_ratio}, {where}; {bar.measured} + {RATIO_MARGIN})"),
            check("quality: top-1 agreement", agreement >= bar.agreement,
                  f"{agreement:.4g} (bar >= {bar.agreement}, {where}; {bar.measured} - {AGREEMENT_MARGIN})")]
    return rows, {"gated": True, "usable": True, "ppl_ratio_max": bar.ppl_ratio, "agreement_min": bar.agreement,
                  "measured": bar.measured}


def sequential_checks(mode: str, coding: str, seq: dict) -> list[dict]:
    """The two parallel-vs-sequential gates of ``seq`` (``stac_lm.checks.sequential.sequential_section``)."""
    sites = seq["sites"]
    rows = [check("sequential neurons give parallel counts",
                  sites["off_share"] <= SEQUENTIAL_TIE_SHARE and sites["max_off_levels"] <= 1.5,
                  f"{sites['off_elements']:,} of {sites['elements']:,} site outputs off the parallel count "
                  f"(share {sites['off_share']:.2g}, bar <= {SEQUENTIAL_TIE_SHARE:g}), at most "
                  f"{sites['max_off_levels']:.4g} levels (bar: one, a float tie); worst site {sites['worst_site']!r}")]
    gates = gates_for(mode, coding)
    if gates is None:
        return rows  # quality_checks already fails this (mode, coding)
    if "ann_agreement" not in seq:
        return rows + [check("sequential SNN agrees with the ANN", False,
                             "measured without an ANN: the gate needs the ANN's top-1 on the simulated tokens")]
    par, sim = seq["ann_agreement"]["parallel"], seq["ann_agreement"]["sequential"]
    return rows + [check("sequential SNN agrees with the ANN", sim >= par - gates.sequential_margin,
                         f"top-1 agreement with the ANN on {seq['tokens']} tokens: time-stepped {sim:.3f}, parallel "
                         f"{par:.3f} (bar: parallel - {gates.sequential_margin}); the two modes agree on "
                         f"{seq['top1_agreement']:.3f} (reported, not gated: stac_lm/checks/sequential.py)")]


def drive_checks(t_change: float, T: int, other: int, pass_through: dict[str, float]) -> list[dict]:
    """"Spikes drive the output": another T moves the logits, and no site passes its float input on."""
    leaky = {n: s for n, s in pass_through.items() if not s <= PASS_THROUGH_MAX}
    worst = max(pass_through.values(), default=float("nan"))
    return [check("spikes drive the output: T changes the logits", t_change >= T_CHANGE_MIN,
                  f"relative logit change T={T} -> {other}: {t_change:.4g} (bar >= {T_CHANGE_MIN})"),
            check("spikes drive the output: no site passes float through", not leaky,
                  f"largest share of off-level inputs a site passed on unchanged: {worst:.3g} "
                  f"(bar <= {PASS_THROUGH_MAX})" + (f"; {len(leaky)} sites, e.g. {sorted(leaky)[:4]}" if leaky else ""))]


def activity_check(measured: dict[str, float], predicted: dict[str, float]) -> list[dict]:
    """A site whose rate falls far below what its calibration rule predicts is flagged (NaN counts as 0)."""
    low = {n: (m, predicted[n]) for n, m in measured.items()
           if predicted.get(n, 0.0) > 0 and not m >= ACTIVITY_MIN_RATIO * predicted[n]}
    ratios = [m / predicted[n] for n, m in measured.items() if predicted.get(n, 0.0) > 0 and m == m]
    lo = min(ratios, default=float("nan"))
    detail = (f"lowest measured / predicted rate {lo:.3g} (bar >= {ACTIVITY_MIN_RATIO}) over {len(ratios)} sites")
    if low:
        name, (m, p) = min(low.items(), key=lambda kv: kv[1][0] / kv[1][1] if kv[1][0] == kv[1][0] else -1)
        detail += f"; {len(low)} sites below, e.g. {name}: {m:.3g} against {p:.3g}"
    return [check("site activity matches calibration", not low, detail)]
