"""Operation counts and the energy estimate of docs/design.md section 4 (45 nm: MAC 4.6 pJ, accumulate 0.9 pJ).

Conventions (stated in every report):

- A linear layer behind a spiking site is spike-driven: each spike adds one weight row,
  so it costs ``spikes x out_features`` accumulates (ACs). A site shared by several
  readers (q/k/v, gate/up) feeds all of them: ``spikes x sum of their out_features``.
  A signed site counts ``|spikes|``; a neuron that fires several spikes in a step counts
  every spike (the site's own spike counter).
- Every other linear layer (the LM head included) costs ``tokens x in x out`` MACs.
- Attention matmuls (``QK^T`` and ``PV``) are sized by shape, causal: only the
  ``S(S+1)/2`` query-key pairs a causal kernel needs (plus ``S x P`` with ``P`` cached
  positions), per batch row and query head, ``head_dim`` MACs each, for each of the two
  matmuls. In the ANN, and in an SNN without a q (or v) site, they cost those MACs. Behind a
  q site ``QK^T`` is spike-driven: each spike of a query adds its (stored) key element for
  every key that query may attend, ``|spikes| x allowed keys`` accumulates. Behind a v site
  ``PV`` is spike-driven: each spike of a value adds its query's (float) probability for
  every query that may attend that position. The probabilities stay in the rate domain.
- A weighted spike (``coding='weighted'``: step ``k`` weighs ``2**(T-1-k)``) adds a weight
  shifted by ``T-1-k`` places: an accumulate plus an integer add on the exponent, 0.9 + 0.1 pJ.
- An 8-bit layer applies its scales to partial sums: one multiply-add per output and scale group
  (one group per row, or one per ``group_size`` input columns) per token, counted as MACs.
- Element-wise work (norms, activations, softmax, residual adds, embedding lookups) is not
  counted. Memory traffic is estimated apart (:func:`memory_traffic`), never in the energy ratio.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from spike_modules import DAQCFSSite, SiteMode, SpikeStats, iter_sites
from spike_modules.attention import OP_COUNTER
from spike_modules.layers import SpikeLinear
from spike_modules.linear import linear_shape

E_MAC_PJ = 4.6
E_AC_PJ = 0.9
E_SHIFT_PJ = 0.1  # 32-bit integer add (same 45 nm table): the exponent shift of a weighted spike's weight
CONVENTION = (
    "ops counted with forward hooks over the whole evaluation text; MAC 4.6 pJ, accumulate (spike x weight) 0.9 pJ "
    "(45 nm); a weighted spike (coding 'weighted') adds a weight shifted by its step's place: an accumulate plus a "
    "32-bit integer add on the exponent, 0.9 + 0.1 pJ; a linear layer behind a spiking site costs |spikes| x (sum "
    "of its readers' out_features) accumulates; other linear layers (the LM head without a head site) cost tokens "
    "x in x out MACs; attention matmuls are sized over the causal S(S+1)/2 query-key pairs per head (plus S x P "
    "with P cached positions): QK^T behind a q site costs |q spikes| x allowed keys accumulates, PV behind a v site "
    "|v spikes| x queries allowed to see them, else head_dim MACs per pair; an 8-bit layer's scales cost one MAC "
    "per output and scale group per token; element-wise ops (norms, activations, "
    "softmax, residual adds) are not counted; memory traffic is estimated apart (memory_traffic), not in the ratio")


def group_name(path: str) -> str:
    """A module path with its layer index replaced by ``*`` (``model.layers.*.mlp.down_proj``)."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", path)


def site_neurons(site: DAQCFSSite) -> list[SpikeStats]:
    """The site's neurons (parallel, sequential, burst...); only the active mode's one counts."""
    return [m for m in site.modules() if isinstance(m, SpikeStats)]


def site_spikes(site: DAQCFSSite) -> float:
    """Spikes counted so far by all of the site's neurons (every spike of a burst counts)."""
    return sum(n.spikes_total for n in site_neurons(site))


def _attention_dims(config) -> tuple[int, int]:
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, int(head_dim)


def _is_attention(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The innermost modules whose class is named ``*Attention`` (``LlamaAttention``, ``GPT2Attention``;
    for BERT ``BertSelfAttention``, not the ``BertAttention`` wrapping it): one per layer.

    Raises:
        ValueError: not one per layer, so an attention op count would silently be wrong.
    """
    found = [m for m in model.modules()
             if _is_attention(m) and not any(_is_attention(c) for c in m.modules() if c is not m)]
    layers = getattr(model.config, "num_hidden_layers", None)
    if len(found) != layers:
        raise ValueError(f"found {len(found)} attention modules (classes named *Attention) for {layers} "
                         "layers; the attention op count would be wrong")
    return found


@dataclass
class OpCounts:
    """Operation counts of one forward pass.

    ``dense_macs`` includes ``attention_macs``; ``spike_driven_macs`` is what the spike-driven
    layers would cost as dense MACs (the ANN's cost of the same layers).
    """

    tokens: int
    dense_macs: int = 0
    attention_macs: int = 0
    spike_acs: float = 0.0
    shifted_acs: float = 0.0  # the part of spike_acs made by weighted spikes (each adds a shifted weight)
    spike_driven_macs: int = 0
    rescale_macs: int = 0  # int8 layers: one multiply-add per output and scale group per token (not in the ANN)
    per_module: dict[str, dict] = field(default_factory=dict)
    predictions: torch.Tensor | None = None  # top-1 tokens of the last counted forward [B, S]

    @property
    def total_macs_equivalent(self) -> int:
        """Dense MACs plus the MACs the spike-driven layers replace: the ANN's count for the same net."""
        return self.dense_macs + self.spike_driven_macs

    @property
    def energy_pj(self) -> float:
        return (self.dense_macs + self.rescale_macs) * E_MAC_PJ + self.spike_acs * E_AC_PJ + self.shifted_acs * E_SHIFT_PJ

    def add_acs(self, path: str, acs: float, weighted: bool) -> None:
        self.spike_acs += acs
        self.per_module[path]["acs"] += acs
        if weighted:
            self.shifted_acs += acs
            self.per_module[path]["shifted_acs"] = self.per_module[path].get("shifted_acs", 0.0) + acs

    def per_group(self) -> dict[str, dict]:
        """Per-module counts summed over layers (``model.layers.*.mlp.down_proj``)."""
        out: dict[str, dict] = {}
        for path, d in self.per_module.items():
            g = out.setdefault(group_name(path), {"kind": d["kind"], "macs": 0, "acs": 0.0, "shifted_acs": 0.0,
                                                  "rescale_macs": 0, "mac_equivalent": 0})
            for k in ("macs", "acs", "shifted_acs", "rescale_macs", "mac_equivalent"):
                g[k] += d.get(k, 0)
        return out


@contextmanager
def counting(model: nn.Module, causal: bool = True) -> Iterator[OpCounts]:
    """Count the operations of every forward of ``model`` inside the block (conventions in the
    module docstring). The yielded :class:`OpCounts` is filled in when the block ends;
    ``predictions`` holds the top-1 of the last forward's logits (tokens for an LM, classes for
    a classifier). ``causal=False`` (an encoder such as BERT) counts the attention matmuls over
    all ``S x S`` query-key pairs; ``tokens`` counts every position computed, padding included.

    Raises:
        ValueError: the model's attention modules cannot be found (one per layer), so the count
            would silently miss them.
    """
    readers: dict[int, list[str]] = {}   # id(site) -> paths of its spike-driven linear layers
    sites: dict[int, DAQCFSSite] = {}
    driven: set[str] = set()             # paths of the linear layers behind a site
    shapes: dict[str, tuple[int, int]] = {}
    attentions = attention_modules(model)
    for path, m in model.named_modules():
        if isinstance(m, SpikeLinear):
            site, lin_path = m._shared.site, f"{path}.linear" if path else "linear"
            sites[id(site)] = site
            readers.setdefault(id(site), []).append(lin_path)
            driven.add(lin_path)
        shape = linear_shape(m)
        if shape is not None:
            shapes[path] = shape
    heads, head_dim = _attention_dims(model.config)
    counts = OpCounts(tokens=0)
    seen_tokens: dict[str, int] = {}
    attention_paths = {id(m): p for p, m in model.named_modules() if any(m is a for a in attentions)}

    def linear_hook(path, width):
        def hook(module, args, output):
            seen_tokens[path] = seen_tokens.get(path, 0) + args[0].numel() // width
        return hook

    def attention_hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        B, S = int(hidden.shape[0]), int(hidden.shape[1])
        cache = kwargs.get("past_key_values")
        # with a KV cache, each of the S new queries also meets the P cached keys
        P = cache.get_seq_length(module.layer_idx) if cache is not None else 0
        pairs = S * P + S * (S + 1) // 2 if causal else S * S
        macs = B * heads * head_dim * pairs  # per matmul
        path = attention_paths[id(module)]
        for op, site in (("qk", getattr(module, "q_site", None)), ("pv", getattr(module, "v_site", None))):
            entry = counts.per_module.setdefault(f"{path}.{op}", {"kind": "dense", "macs": 0, "acs": 0.0,
                                                                  "mac_equivalent": 0})
            entry["mac_equivalent"] += macs
            if site is not None and site.mode is SiteMode.PARALLEL:
                entry["kind"] = "spike"
                counts.spike_driven_macs += macs
            else:
                entry["macs"] += macs
                counts.attention_macs += macs

    def model_hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        counts.tokens += int(ids.numel())
        counts.predictions = output.logits.detach().argmax(-1)

    handles = [model.register_forward_hook(model_hook, with_kwargs=True)]
    handles += [model.get_submodule(p).register_forward_hook(linear_hook(p, shape[0])) for p, shape in shapes.items()]
    handles += [m.register_forward_pre_hook(attention_hook, with_kwargs=True) for m in attentions]
    for m in attentions:  # spike_modules.attention adds the accumulates of spike-driven QK^T and PV
        m.__dict__[OP_COUNTER] = lambda op, acs, weighted, m=m: counts.add_acs(
            f"{attention_paths[id(m)]}.{op}", acs, weighted)
    before = {k: site_spikes(s) for k, s in sites.items()}
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()
        for m in attentions:
            m.__dict__.pop(OP_COUNTER, None)
    spikes = {k: site_spikes(s) - before[k] for k, s in sites.items()}
    for path, tokens in seen_tokens.items():
        i, o = shapes[path]
        macs = tokens * i * o
        spiking = path in driven
        rescale = tokens * int(getattr(model.get_submodule(path), "rescale_ops", 0))
        counts.rescale_macs += rescale
        counts.per_module[path] = {"kind": "spike" if spiking else "dense", "macs": 0 if spiking else macs,
                                   "acs": 0.0, "rescale_macs": rescale, "mac_equivalent": macs}
        if spiking:
            counts.spike_driven_macs += macs
        else:
            counts.dense_macs += macs
    for key, paths in readers.items():
        for p in paths:
            if p in counts.per_module:  # a reader that ran: its weights were read for every spike
                counts.add_acs(p, spikes[key] * shapes[p][1], sites[key].coding == "weighted")
    counts.dense_macs += counts.attention_macs


@torch.no_grad()
def count_ops(model: nn.Module, input_ids: torch.Tensor) -> OpCounts:
    """Run ``model(input_ids)`` once and count its operations (see :func:`counting`).

    Raises:
        ValueError: ``input_ids`` is not ``[B, S]``, or see :func:`counting`.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    with counting(model) as counts:
        model(input_ids)
    return counts


def _group_table(model: nn.Module | None, counts: OpCounts) -> dict[str, dict]:
    """Per layer group: counts summed over layers, share of the SNN's energy and, where a site
    drives the group, its coding and spikes per neuron per token."""
    groups = counts.per_group()
    total = counts.energy_pj or float("nan")
    for g in groups.values():
        g["energy_share"] = ((g["macs"] + g["rescale_macs"]) * E_MAC_PJ + g["acs"] * E_AC_PJ + g["shifted_acs"] * E_SHIFT_PJ) / total
    if model is None:
        return groups
    for path, m in model.named_modules():
        if isinstance(m, SpikeLinear) and hasattr(m, "site"):
            g = groups.get(group_name(f"{path}.linear"))
            site = m.site
            if g is None or site.parallel.neuron_steps_total == 0:
                continue
            g.setdefault("_spk", [0.0, 0])
            g["_spk"][0] += site.parallel.spikes_total
            g["_spk"][1] += site.parallel.neuron_steps_total // site.T
            g["coding"] = site.coding
    for g in groups.values():
        spk = g.pop("_spk", None)
        if spk:
            g["spikes_per_neuron_per_token"] = spk[0] / spk[1]
    return groups


def energy_summary(ann: OpCounts, snn: OpCounts, model: nn.Module | None = None) -> dict:
    """The report's energy section: coverage, energy ratio and the counts behind them (per layer
    group with its coding, spikes per neuron per token and share of the SNN's energy when the
    converted ``model`` is given)."""
    e_ann, e_snn = ann.energy_pj, snn.energy_pj
    ann_macs = ann.total_macs_equivalent
    return {
        "convention": CONVENTION,
        "memory_traffic_counted": False,
        "pj_per_mac": E_MAC_PJ,
        "pj_per_ac": E_AC_PJ,
        "pj_per_weighted_spike_shift": E_SHIFT_PJ,
        "tokens": snn.tokens,
        "ann_macs": ann_macs,
        "snn_dense_macs": snn.dense_macs,
        "snn_attention_macs": snn.attention_macs,
        "snn_spike_acs": snn.spike_acs,
        "snn_shifted_acs": snn.shifted_acs,
        "snn_spike_driven_macs": snn.spike_driven_macs,
        "snn_rescale_macs": snn.rescale_macs,
        "coverage": snn.spike_driven_macs / ann_macs if ann_macs else 0.0,
        "ann_energy_uj_per_token": e_ann / ann.tokens * 1e-6,
        "snn_energy_uj_per_token": e_snn / snn.tokens * 1e-6,
        "energy_ratio": e_snn / e_ann if e_ann else float("nan"),
        "op_counts_consistent": ann_macs == snn.total_macs_equivalent,
        "per_group": _group_table(model, snn),
    }


MEMORY_ASSUMPTIONS = (
    "bytes moved per token when decoding one token at a time (batch 1, no weight reuse across tokens): a dense "
    "layer reads all its weights; an event-driven layer reads the weight row of each input channel that fired at "
    "least once in the token's T steps (rows read once per token, the steps of one token back to back); weights at "
    "their stored width (int8 1 byte plus a float32 scale per output row or scale group, float32 4 bytes); the KV "
    "cache (float32 k and v of the mean earlier context) is read by both; each spiking neuron reads and writes its "
    "float32 membrane once per step; each spike is a 4-byte address event written once and read once; activations between layers "
    "and on-chip buffering are not modelled")


def is_weight_linear(m: nn.Module) -> bool:
    """A linear-like layer that holds its weight (float, or STAC's int8 ``weight_int8``)."""
    return linear_shape(m) is not None and (hasattr(m, "weight") or hasattr(m, "weight_int8"))


def stored_width(module: nn.Module) -> tuple[float, int]:
    """(bytes per weight, bytes of scales per output row) as ``module`` stores its weight."""
    if hasattr(module, "weight_int8"):
        scale = module.scale
        return 1.0, 4 * (scale.shape[1] if scale.dim() == 2 else 1)
    return float(module.weight.element_size()), 0


def _weight_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes as stored, bytes at int8 with a float32 scale per row) of a linear-like layer's weight."""
    i, o = linear_shape(module)
    per_weight, per_row = stored_width(module)
    return int(i * o * per_weight) + o * per_row, i * o + 4 * o


def memory_traffic(ann: nn.Module, snn: nn.Module, snn_counts: OpCounts, mean_context: float) -> dict:
    """Estimated bytes moved per token by ``ann`` and ``snn`` (assumptions in :data:`MEMORY_ASSUMPTIONS`),
    from the statistics of the pass just counted in ``snn_counts`` (spikes, active channel shares)."""
    def dense_bytes(model):
        stored = int8 = 0
        for m in model.modules():
            if is_weight_linear(m):
                s, q = _weight_bytes(m)
                stored, int8 = stored + s, int8 + q
        return stored, int8

    ann_stored, ann_int8 = dense_bytes(ann)
    snn_weights = 0.0
    steps = spikes = 0.0
    behind_site = set()
    for m in snn.modules():
        if isinstance(m, SpikeLinear):
            site = m._shared.site
            s, _ = _weight_bytes(m.linear)
            share = site.parallel.active_share
            snn_weights += (share if share == share else 1.0) * s
            behind_site.add(id(m.linear))
    for m in snn.modules():
        if id(m) not in behind_site and is_weight_linear(m):
            snn_weights += _weight_bytes(m)[0]
    for _, site in iter_sites(snn):
        steps += site.parallel.neuron_steps_total
        spikes += site.parallel.spikes_total
    tokens = max(snn_counts.tokens, 1)
    cfg = snn.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    _, head_dim = _attention_dims(cfg)
    kv = 2 * cfg.num_hidden_layers * kv_heads * head_dim * 4 * mean_context
    membrane = 8 * steps / tokens
    events = 8 * spikes / tokens
    snn_total = snn_weights + kv + membrane + events
    return {"assumptions": MEMORY_ASSUMPTIONS, "mean_context": mean_context,
            "ann_bytes_per_token": {"weights": ann_stored, "kv_cache": kv, "total": ann_stored + kv},
            "ann_int8_bytes_per_token": {"weights": ann_int8, "kv_cache": kv, "total": ann_int8 + kv},
            "snn_bytes_per_token": {"weights": snn_weights, "kv_cache": kv, "membranes": membrane,
                                    "spike_events": events, "total": snn_total},
            "snn_over_ann": snn_total / (ann_stored + kv), "snn_over_ann_int8": snn_total / (ann_int8 + kv)}

