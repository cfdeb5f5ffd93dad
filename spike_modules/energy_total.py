"""Total energy per token, arithmetic plus data movement, of an SNN and three ANN baselines
(docs/design.md section 5).

Counting and pricing are apart: :class:`TokenProfile` holds what one token uses (layers, the
channels that fired, spikes, attention context), :func:`token_actions` turns it into *actions*
per token (a MAC at a width, an add, a shift, bytes of a memory) for one model and one scenario,
and an :class:`~spike_modules.energy_table.EnergyTable` prices them. No price is written here.

The models, each at the widths it stores and computes with:

==========  =======  =====================================  ==========================  ==========
model       weights  linear layers                          attention matmuls           KV cache
==========  =======  =====================================  ==========================  ==========
ann_fp32    4 B      MAC fp32                               MAC fp32                    4 B
ann_bf16    2 B      MAC bf16                               MAC bf16                    2 B
ann_int8    1 B      MAC int8 (W8A8), per output a rescale  MAC bf16 (int8 cache         1 B + fp16
            + scale  (MAC fp32), per input a quantisation   dequantised)                scale per
                     (mult fp32)                                                        token, head
snn         stored   rows of channels that fired only:      behind a q (v) site: only   as stored
            width    see below                              the q (v) elements that
                                                            fired, MAC fp32
==========  =======  =====================================  ==========================  ==========

An SNN layer behind a site reads, per token, the weight row of each input channel that fired and
no other (a silent channel costs neither its arithmetic nor its row). Its arithmetic depends on
whether a spike can be added without a multiply: with float weights the per-channel step
``theta / L`` folds into the weights, and each spike is an add (plus a shift for a weighted spike's
place); with int8 weights and per-channel steps that are not powers of two, the step cannot fold
into the integer weights, so each (fired channel, output) pair costs a MAC of the int8 weight
with the decoded float value (priced fp32). Every site encodes its input with one fp32 MAC per
channel; membranes (fp32, read and written per step) and spike events (4-byte addresses, written
and read) stay on chip.

Scenarios:

- ``decode_dram`` (the headline): batch-1 decoding, every weight streamed from DRAM once per
  token, the KV cache read from DRAM (mean context of the evaluation windows).
- ``prefill_dram``: a batch of ``prefill_tokens`` tokens shares each weight read; over that many
  tokens every input channel fires somewhere, so the SNN reads every row too. KV written to DRAM
  once, read on chip.
- ``decode_sram``: batch-1 decoding with weights and KV cache in large on-chip SRAM (neuromorphic
  chips hold their weights next to the cores).

Not counted, the same in every model: element-wise work (norms, activations, softmax, residual
adds), the LM head's argmax, control.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .energy_table import EnergyTable

MODELS = ("snn", "ann_fp32", "ann_bf16", "ann_int8")
BASELINES = MODELS[1:]
SCENARIOS = ("decode_dram", "prefill_dram", "decode_sram")
HEADLINE = "decode_dram"
CATEGORIES = ("arithmetic", "weights", "kv_cache", "on_chip")
KV_SCALE_BYTES = 2  # ann_int8: one fp16 scale per token, KV head and k/v


@dataclass(frozen=True)
class AnnSpec:
    weight_bytes: float
    scale_bytes: int        # per output row
    mac: str
    attention_mac: str
    kv_bytes: float         # per cached element, scales excluded
    act_in: int             # bytes per linear input element, on chip
    act_out: int
    int8: bool = False


ANNS = {
    "ann_fp32": AnnSpec(4, 0, "mac_fp32", "mac_fp32", 4, 4, 4),
    "ann_bf16": AnnSpec(2, 0, "mac_bf16", "mac_bf16", 2, 2, 2),
    "ann_int8": AnnSpec(1, 4, "mac_int8", "mac_bf16", 1, 1, 2, int8=True),
}


@dataclass(frozen=True)
class LinearUse:
    """One linear layer's use per token.

    ``weight_bytes``/``scale_bytes``: the SNN's stored width (1 and 4 per output row for int8,
    4 and 0 for float32). ``active_rows``: input channels that fired per token (``None``: no
    site in front, a dense layer). ``spikes``: spikes (nonzero digits) per token over its inputs.
    ``folded``: a spike is an add (float weights, or power-of-two steps), else a fired
    (channel, output) pair is a MAC. ``weighted``: a spike also costs a shift.
    ``accumulator_bits``: the integer accumulator's width a folded spike adds into (int weights):
    over 32 bits, adds and shifts are priced at 64 bits.
    """

    name: str
    in_features: int
    out_features: int
    weight_bytes: float = 4.0
    scale_bytes: int = 0
    active_rows: float | None = None
    spikes: float = 0.0
    folded: bool = True
    weighted: bool = False
    accumulator_bits: int = 32


@dataclass(frozen=True)
class AttentionUse:
    """Attention per decoded token: ``context`` keys attended on average per layer; the SNN's
    q and v element shares that fired (``None``: no site, dense); its KV bytes per element."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    context: float
    snn_kv_bytes: float = 4.0
    q_active: float | None = None
    v_active: float | None = None


@dataclass(frozen=True)
class TokenProfile:
    """What one token uses: linear layers, attention, the embedding row, and the SNN's sites
    (``site_elements``: channels encoded, ``neuron_steps``: channels x T, ``spikes``; per token)."""

    linears: tuple
    attention: AttentionUse
    hidden: int
    embedding_bytes: float = 4.0
    embedding_scale_bytes: int = 0
    site_elements: float = 0.0
    neuron_steps: float = 0.0
    spikes: float = 0.0
    prefill_tokens: int = 512
    notes: dict = field(default_factory=dict)


def _add(actions: dict, category: str, action: str, count: float) -> None:
    if count:
        cat = actions.setdefault(category, {})
        cat[action] = cat.get(action, 0.0) + float(count)


def _memory(scenario: str) -> tuple[str, str]:
    """(memory the weights are read from, memory the KV cache is read from)."""
    if scenario == "decode_sram":
        return "sram_large", "sram_large"
    return "dram", ("sram_large" if scenario == "prefill_dram" else "dram")


def _linear_actions(actions: dict, lin: LinearUse, model: str, weight_mem: str, reuse: float) -> None:
    i, o = lin.in_features, lin.out_features
    if model != "snn":
        spec = ANNS[model]
        _add(actions, "arithmetic", spec.mac, i * o)
        if spec.int8:
            _add(actions, "arithmetic", "mac_fp32", o)      # rescale the int32 sum
            _add(actions, "arithmetic", "mult_fp32", i)     # quantise the input
        _add(actions, "weights", weight_mem, (i * o * spec.weight_bytes + o * spec.scale_bytes) / reuse)
        _add(actions, "on_chip", "sram_small", i * spec.act_in + o * spec.act_out)
        return
    rows = i if lin.active_rows is None or reuse > 1 else lin.active_rows
    if lin.active_rows is None:
        _add(actions, "arithmetic", "mac_fp32", i * o)
    elif lin.folded:
        wide = "64" if lin.accumulator_bits > 32 else "32"
        _add(actions, "arithmetic", f"add_int{wide}" if lin.weight_bytes < 4 else "add_fp32", lin.spikes * o)
        if lin.weighted:
            _add(actions, "arithmetic", f"shift_int{wide}", lin.spikes * o)
    else:
        _add(actions, "arithmetic", "mac_fp32", lin.active_rows * o)
    if lin.scale_bytes:
        _add(actions, "arithmetic", "mac_fp32", o)          # the int8 row's rescale
    _add(actions, "weights", weight_mem, (rows * o * lin.weight_bytes + o * lin.scale_bytes) / reuse)
    _add(actions, "on_chip", "sram_small", o * 4)


def token_actions(profile: TokenProfile, model: str, scenario: str = HEADLINE) -> dict[str, dict[str, float]]:
    """Actions per token, ``{category: {action: count}}`` (bytes for memories), of ``model``
    (:data:`MODELS`) in ``scenario`` (:data:`SCENARIOS`).

    Raises:
        ValueError: unknown model or scenario.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
    weight_mem, kv_mem = _memory(scenario)
    reuse = float(profile.prefill_tokens) if scenario == "prefill_dram" else 1.0
    actions: dict[str, dict[str, float]] = {}
    for lin in profile.linears:
        _linear_actions(actions, lin, model, weight_mem, reuse)
    a = profile.attention
    elements = a.layers * a.kv_heads * a.head_dim * 2      # one token's k and v, every layer
    pairs = a.layers * a.heads * a.head_dim * a.context    # per matmul
    if model == "snn":
        for share in (a.q_active, a.v_active):
            _add(actions, "arithmetic", "mac_fp32", pairs * (1.0 if share is None else share))
        kv_bytes = a.snn_kv_bytes
        _add(actions, "weights", weight_mem, profile.hidden * profile.embedding_bytes + profile.embedding_scale_bytes)
        _add(actions, "arithmetic", "mac_fp32", profile.site_elements)            # each site's affine encoding
        _add(actions, "on_chip", "sram_small", 8 * profile.neuron_steps + 8 * profile.spikes)
    else:
        spec = ANNS[model]
        _add(actions, "arithmetic", spec.attention_mac, 2 * pairs)
        kv_bytes = spec.kv_bytes + (KV_SCALE_BYTES / a.head_dim if spec.int8 else 0.0)
        _add(actions, "weights", weight_mem, profile.hidden * spec.weight_bytes + spec.scale_bytes)
    if scenario == "prefill_dram":
        _add(actions, "kv_cache", "dram", elements * kv_bytes)                    # written once
        _add(actions, "kv_cache", kv_mem, elements * kv_bytes * a.context)         # read on chip
    else:
        _add(actions, "kv_cache", kv_mem, elements * kv_bytes * (a.context + 1))  # read the context, write one
    return actions


def price(actions: dict[str, dict[str, float]], table: EnergyTable) -> dict:
    """pJ per category and in total; bytes per memory category."""
    out = {c: sum(n * table.price(act) for act, n in actions.get(c, {}).items()) for c in CATEGORIES}
    out["total"] = sum(out[c] for c in CATEGORIES)
    out["bytes"] = {c: sum(actions.get(c, {}).values()) for c in CATEGORIES if c != "arithmetic"}
    return out


def scenario_table(profile: TokenProfile, table: EnergyTable) -> dict:
    """Per scenario: each model's priced actions (pJ per token) and the SNN's ratios to each baseline."""
    out = {}
    for scenario in SCENARIOS:
        models = {m: dict(price(acts := token_actions(profile, m, scenario), table), actions=acts) for m in MODELS}
        snn = models["snn"]["total"]
        out[scenario] = {"pj_per_token": {m: models[m]["total"] for m in MODELS}, "models": models,
                         **{f"snn_over_{b}": snn / models[b]["total"] for b in BASELINES}}
    return out


def crossing_context(profile: TokenProfile, table: EnergyTable, baseline: str, scenario: str = HEADLINE) -> dict:
    """Where the SNN's and ``baseline``'s energy per token in ``scenario`` cross as the context grows.

    Both are affine in the context (the KV cache read per token and the attention products grow with
    it, nothing else does), so two contexts give the lines. Returns ``{"context": keys attended where
    the two cost the same, or None where they do not cross at a longer context than the profile's,
    "snn_cheaper_beyond": whether the SNN is the cheaper one past it (or, without a crossing, at every
    longer context), "snn_pj_per_context_token", "baseline_pj_per_context_token"}``: the slopes."""
    def totals(context: float) -> tuple[float, float]:
        p = replace(profile, attention=replace(profile.attention, context=context))
        return tuple(price(token_actions(p, m, scenario), table)["total"] for m in ("snn", baseline))
    c0 = float(profile.attention.context)
    (s0, b0), (s1, b1) = totals(c0), totals(c0 + 1.0)
    slope_snn, slope_base = s1 - s0, b1 - b0
    gap, closing = s0 - b0, slope_base - slope_snn   # the gap shrinks by ``closing`` per context token
    crosses = gap != 0.0 and closing != 0.0 and gap / closing > 0.0
    return {"context": c0 + gap / closing if crosses else None,
            "snn_cheaper_beyond": closing > 0.0 if closing != 0.0 else gap < 0.0,
            "snn_pj_per_context_token": slope_snn, "baseline_pj_per_context_token": slope_base}


CONVENTION = (
    "total energy per token = arithmetic + data movement, each model at the widths it stores and computes with "
    "(ann_fp32: 4-byte weights, fp32 MACs, fp32 KV cache; ann_bf16: 2-byte weights, bf16 MACs accumulating in fp32, "
    "bf16 KV; ann_int8: W8A8, 1-byte weights + an fp32 scale per output row, int8 MACs into int32, a rescale per "
    "output and a quantisation per input, attention in bf16 over an int8 KV cache with an fp16 scale per token and "
    "head; snn: its stored widths, reading only the weight rows of input channels that fired in the token, a spike "
    "an add (+ a shift if weighted; 64-bit where the accumulator needs more than 32 bits) where the site's steps "
    "fold into the weights (float weights, or power-of-two steps), else a MAC per fired (channel, "
    "output) pair, one fp32 MAC per site channel to encode, membranes and spike events on chip). Headline "
    "scenario decode_dram: batch 1, weights and KV cache read from DRAM once per token at the evaluation windows' "
    "mean context. Element-wise work (norms, activations, softmax, residual adds) is left out of every model. "
    "Prices: the table in 'table' (energy_table.EnergyTable)")


def energy_total(profile: TokenProfile, table: EnergyTable | None = None) -> dict:
    """The report's ``energy_total`` section: headline ratios (``decode_dram``), every scenario,
    the profile it was counted from and the price table."""
    table = table or EnergyTable.load()
    scenarios = scenario_table(profile, table)
    head = scenarios[HEADLINE]
    return {"scenario": HEADLINE, "convention": CONVENTION,
            **{f"snn_over_{b}": head[f"snn_over_{b}"] for b in BASELINES},
            "crossing_context": {b: crossing_context(profile, table, b) for b in BASELINES},
            "pj_per_token": head["pj_per_token"], "scenarios": scenarios, "table": table.to_dict(),
            "profile": {"attention": asdict(profile.attention), "hidden": profile.hidden,
                        "embedding_bytes": profile.embedding_bytes, "site_elements": profile.site_elements,
                        "neuron_steps": profile.neuron_steps, "spikes": profile.spikes,
                        "prefill_tokens": profile.prefill_tokens, "linears": len(profile.linears),
                        "notes": profile.notes}}
