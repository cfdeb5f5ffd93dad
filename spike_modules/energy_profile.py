"""What one token of a converted model uses, measured: the :class:`~spike_modules.energy_total.TokenProfile`
behind the total energy, and how silent the channels were (per layer group and per token).

Read after a pass counted with :func:`spike_modules.energy.counting` (site statistics reset before
it): spikes per layer come from the counts, fired shares from each site's parallel neuron.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .energy import OpCounts, _attention_dims, group_name, is_weight_linear, stored_width
from .energy_total import AttentionUse, LinearUse, TokenProfile
from .layers import SpikeLinear
from .linear import linear_shape
from .site import DAQCFSSite, iter_sites


def steps_power_of_two(site: DAQCFSSite) -> bool:
    """Whether every channel's step ``theta / L`` is a power-of-two multiple of one step of the site:
    then a spike's value is a shift of a weight (the common factor goes into the output scale)."""
    step = site.theta.detach().double()
    ratio = torch.log2(step / step.max())
    return bool(torch.equal(ratio, ratio.round()))


def accumulator_bits(site: DAQCFSSite, weight_bytes: float, in_features: int) -> int:
    """Bits of the integer sum that ``in_features`` inputs of ``site`` (power-of-two steps), spiking
    into ``weight_bytes``-byte weights, need without overflow: the weight, the largest count (levels
    times the largest burst), the site's span of shifts, the fan-in, and a sign."""
    theta = site.theta.detach().double()
    span = math.ceil(float(torch.log2(theta.max() / theta.min())))
    top = site.levels * float(site.burst.detach().max())
    return int(8 * weight_bytes + math.ceil(math.log2(top + 1)) + span + math.ceil(math.log2(max(in_features, 1))) + 1)


def _share(site: DAQCFSSite | None) -> float | None:
    if site is None:
        return None
    s = site.parallel.active_share
    return s if s == s else 1.0


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def token_profile(snn: nn.Module, counts: OpCounts, context: float, prefill_tokens: int,
                  kv_bytes: float) -> TokenProfile:
    """The SNN's use per token over the pass ``counts`` counted; ``context``: mean keys attended;
    ``kv_bytes``: bytes per cached k/v element as the SNN's cache stores them."""
    tokens = max(counts.tokens, 1)
    behind: dict[int, tuple[str, DAQCFSSite]] = {}
    for path, m in snn.named_modules():
        if isinstance(m, SpikeLinear):
            behind[id(m.linear)] = (f"{path}.linear", m._shared.site)
    linears = []
    for path, m in snn.named_modules():
        if not is_weight_linear(m):
            continue
        i, o = linear_shape(m)
        wb, sb = stored_width(m)
        if id(m) in behind:
            key, site = behind[id(m)]
            spikes = counts.per_module.get(key, {}).get("acs", 0.0) / o / tokens
            shifts = wb < 4 and steps_power_of_two(site)
            linears.append(LinearUse(key, i, o, wb, sb, active_rows=_share(site) * i, spikes=spikes,
                                     folded=wb >= 4 or shifts, weighted=site.coding == "weighted",
                                     accumulator_bits=accumulator_bits(site, wb, i) if shifts else 32))
        else:
            linears.append(LinearUse(path, i, o, wb, sb))
    cfg = snn.config
    heads, head_dim = _attention_dims(cfg)
    attns = [m for m in snn.modules() if hasattr(m, "stac_sim_T") and hasattr(m, "layer_idx")]
    attention = AttentionUse(int(cfg.num_hidden_layers), heads,
                             int(getattr(cfg, "num_key_value_heads", None) or heads), head_dim, float(context),
                             snn_kv_bytes=float(kv_bytes),
                             q_active=_mean([_share(getattr(a, "q_site", None)) for a in attns]),
                             v_active=_mean([_share(getattr(a, "v_site", None)) for a in attns]))
    emb = snn.get_input_embeddings()
    eb, es = stored_width(emb)
    steps = spikes = elements = 0.0
    for _, site in iter_sites(snn):
        n = site.parallel.neuron_steps_total
        steps += n
        elements += n / site.T
        spikes += site.parallel.spikes_total
    return TokenProfile(tuple(linears), attention, int(cfg.hidden_size), eb, es, elements / tokens, steps / tokens,
                        spikes / tokens, prefill_tokens,
                        notes={"tokens_counted": counts.tokens,
                               "active_rows": "input channels with a nonzero count in the token, per layer, "
                                              "averaged over the counted tokens"})


def row_bytes(snn: nn.Module) -> dict[str, float]:
    """Per site that drives linear layers: bytes of weight one input channel's rows take over its readers."""
    out: dict[str, float] = {}
    for m in snn.modules():
        if isinstance(m, SpikeLinear):
            i, o = linear_shape(m.linear)
            wb, _ = stored_width(m.linear)
            out[m._shared.site.name] = out.get(m._shared.site.name, 0.0) + o * wb
    return out


def silence_by_group(snn: nn.Module) -> dict[str, dict]:
    """Per layer group of sites that drive linear layers: the share of (channel, token) pairs that stayed
    silent, and the weight bytes of all their rows, over the pass just counted."""
    rows = row_bytes(snn)
    groups: dict[str, list[float]] = {}
    for name, site in iter_sites(snn):
        if name not in rows:
            continue
        share = site.parallel.active_share
        if share != share:
            continue
        g = groups.setdefault(group_name(name), [0.0, 0.0, 0.0])
        g[0] += (1 - share) * site.num_channels
        g[1] += site.num_channels
        g[2] += rows[name] * site.num_channels
    return {g: {"silent_share": s / n, "weight_bytes": b} for g, (s, n, b) in groups.items()}


@torch.no_grad()
def silence_per_token(snn: nn.Module, ids: torch.Tensor, cache=None) -> dict:
    """Run ``snn(ids)`` (``[1, S]``, into the KV ``cache`` if one is given) and give the distribution
    over its tokens of the share of the spike-driven layers' weight bytes left unread (the rows of
    silent channels)."""
    rows = row_bytes(snn)
    total = sum(rows[s.name] * s.num_channels for _, s in iter_sites(snn) if s.name in rows)
    unread = torch.zeros(ids.shape[-1], dtype=torch.float64)

    def hook(site, args, y):
        silent = (y.detach().reshape(-1, ids.shape[-1], site.num_channels) == 0).sum(-1)[0]
        unread.add_(silent.double().cpu() * rows[site.name])

    handles = [s.register_forward_hook(hook) for _, s in iter_sites(snn) if s.name in rows]
    try:
        snn(ids, past_key_values=cache, use_cache=cache is not None)
    finally:
        for h in handles:
            h.remove()
    share = (unread / total).float()
    q = torch.quantile(share, torch.tensor([0.05, 0.5, 0.95]))
    return {"tokens": int(ids.shape[-1]), "mean": float(share.mean()), "min": float(share.min()),
            "p05": float(q[0]), "median": float(q[1]), "p95": float(q[2]), "max": float(share.max()),
            "definition": "per token: weight bytes of the spike-driven layers whose input channel stayed silent, "
                          "over all of their weight bytes"}
