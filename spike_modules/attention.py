"""SpikeAttention: attention whose q, k, v (and optionally probabilities) pass through DA-QCFS sites.

It plugs into transformers' attention interface as ``attn_implementation="stac_spike"``; the
model's own attention modules stay (projections, rotary positions, KV cache, output
projection are theirs), and :func:`attach_attention_sites` registers the sites on each of them
as ``q_site``, ``k_site``, ``v_site`` and ``p_site`` (e.g. ``model.layers.3.self_attn.q_site``),
where ``iter_sites``, calibration and ``state_dict`` find them.

Sites (docs/design.md section 1):

- ``q_site``, ``k_site``, ``v_site``: signed, one channel per (head, head_dim) pair, so
  ``heads * head_dim`` channels (key/value heads for k and v under grouped-query attention).
  k is taken after the rotary embedding. Measured on SmolLM2-135M (T=16, max rule on 2048
  tokens of hamlet_gut, 1,536 held-out tokens, only these sites spiking) this calibrates
  better than one threshold per head_dim shared across heads: perplexity 41.5 against 42.8
  (ANN 39.8), top-1 agreement with the ANN 0.82 against 0.78.
- ``p_site``: unsigned, one channel per query head, on the softmax probabilities. With the
  module's ``stac_probs_scale`` set to ``"max"`` (:func:`set_probs_scale`) the site sees each row
  divided by its largest probability (``exp(s - max s)``, in (0, 1]) and the output is divided by
  the row sum of the decoded values: softmax with its normalisation moved after probs.V. A
  row's small probabilities then keep their share of the levels however many keys the row
  spreads over, where a fixed threshold per head rounds the probabilities of diffuse rows to zero.

With all sites in ``ann`` mode the function computes exactly what transformers' eager
attention computes (same operations in the same order). The KV cache holds the float k/v
(the cache update happens before the attention function); the sites encode the whole key and
value set on every call. With a :class:`spike_modules.kv_cache.SpikeKVCache` the cache holds
the decoded k/v instead, each token's k/v pass their sites once (when fed), and this function
takes them as they come: without a probability site, softcap or dropout as one
``scaled_dot_product_attention`` call, else through the eager path with the kv heads unrepeated.
Sites act per element, so either way a prefill followed by decoding gives the same values as one
full pass.

In the sequential simulation q.k^T with the mask and softmax form one causal rate-domain op,
and probs.V another (``spike_modules.temporal``); the sites run their SpikingJelly neurons.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

from .kv_cache import ENCODED_FLAG
from .quantizer import weighted_spikes
from .site import DAQCFSSite, SiteMode
from .temporal import apply_site, rate_op

ATTN_IMPLEMENTATION = "stac_spike"
OP_COUNTER = "stac_op_counter"  # set by spike_modules.energy.counting on attention modules while it counts
QKV = ("q_site", "k_site", "v_site")
KV_SITES = QKV[1:]  # the sites whose counts a KV cache stores
PROBS = "p_site"
PROBS_SCALES = ("sum", "max")
SCALE_ATTR = "stac_probs_scale"


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, kv_heads, S, D]`` to ``[B, kv_heads * n_rep, S, D]``, each kv head repeated for its query heads."""
    if n_rep == 1:
        return x
    B, h, S, D = x.shape
    return x[:, :, None].expand(B, h, n_rep, S, D).reshape(B, h * n_rep, S, D)


def _head_site(site: DAQCFSSite | None, x: torch.Tensor) -> torch.Tensor:
    """Site over ``[N, heads, S, D]`` with one channel per (head, dim): seen as ``[N, S, heads*D]``."""
    if site is None:
        return x
    N, h, S, D = x.shape
    flat = x.transpose(1, 2).reshape(N, S, h * D)
    lean = site.lean()  # generation: the site's lean path without the module call (as the spiking layers take it)
    y = site.lean_values(flat, lean) if lean is not None and h * D == site.num_channels else apply_site(site, flat)
    return y.reshape(N, S, h, D).transpose(1, 2)


def _probs_site(site: DAQCFSSite | None, p: torch.Tensor) -> torch.Tensor:
    """Site over probabilities ``[N, heads, Sq, Sk]`` with one channel per head."""
    if site is None:
        return p
    return apply_site(site, p.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def set_probs_scale(model: nn.Module, scale: str) -> None:
    """``sum`` (the softmax probabilities as they are, default) or ``max`` (each row over its largest
    probability, normalised after probs.V) for every probability site of ``model``."""
    if scale not in PROBS_SCALES:
        raise ValueError(f"probs_scale must be one of {', '.join(PROBS_SCALES)}, got {scale!r}")
    for m in model.modules():
        if isinstance(getattr(m, PROBS, None), DAQCFSSite):
            setattr(m, SCALE_ATTR, scale)


def _over_row_max(p: torch.Tensor) -> torch.Tensor:
    return p / p.amax(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def _normalised_matmul(e: torch.Tensor, v: torch.Tensor, matmul=torch.matmul) -> torch.Tensor:
    """``(e @ v) / sum(e)`` per row; a row without any value yet (early steps) gives 0."""
    return matmul(e, v) / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


def _grouped_matmul(n_rep: int):
    """``a @ b`` for ``a [B, heads, S, X]`` and ``b [B, kv_heads, X, Y]`` whose kv head ``j`` serves
    query heads ``j n_rep .. (j + 1) n_rep - 1``: the kv heads are not repeated (copied) first.
    Decoding with a :class:`SpikeKVCache` runs it; the cache would otherwise be copied n_rep
    times on every token."""
    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        B, H, S, X = a.shape
        return torch.matmul(a.reshape(B, b.shape[1], n_rep * S, X), b).view(B, H, S, b.shape[-1])
    return matmul


def _check_prepared(module: nn.Module) -> int | None:
    if not hasattr(module, "stac_sim_T"):
        raise ValueError(f"attn_implementation={ATTN_IMPLEMENTATION!r} runs only on attention modules prepared by "
                         f"STAC's conversion; {type(module).__name__} was not (convert the model with "
                         "smollm2_converter.convert)")
    T = module.stac_sim_T
    sites = module._modules  # the sites are submodules (or None set over them): a dict lookup, not __getattr__
    for name in (*QKV, PROBS):
        site = sites.get(name)
        if site is not None and (site.mode is SiteMode.SEQUENTIAL) != (T is not None):
            raise ValueError(f"{site.name}: site mode {site.mode.value!r} does not match the simulation state "
                             f"(T={T}); switch modes with smollm2_converter.sequential_mode / run_sequential, not by hand")
    return T


# keyword arguments transformers passes that change nothing here: positions are already in q
# and k (rotary) or in the hidden states (learned), the cache update happened before this call
# and the mask carries causality and padding
IGNORED_KWARGS = frozenset({"position_ids", "cache_position", "use_cache", "output_attentions",
                            "output_hidden_states", "return_dict", "is_causal", "layer_idx"})


def _check_features(module: nn.Module, kwargs: dict) -> None:
    """Refuse every attention feature this function does not implement, instead of dropping it."""
    unknown = sorted(k for k, v in kwargs.items() if k not in IGNORED_KWARGS and v is not None and v is not False)
    if unknown:
        raise ValueError(f"{type(module).__name__} asks the attention for {', '.join(unknown)}, which STAC's spiking "
                         "attention does not implement (it handles scaling, dropout, grouped-query heads, "
                         "sliding windows through the model's mask, and logit softcapping)")


def _check_window(mask: torch.Tensor | None, q_len: int, k_len: int, window: int) -> None:
    """The model's mask must hide every key outside the window (keys ``i - window + 1 .. i`` for the
    query at cache slot ``i``; the queries are the last ``q_len`` of the ``k_len`` slots)."""
    if k_len <= window:
        return
    if mask is None:
        raise ValueError(f"sliding_window={window} with {k_len} keys but no attention mask: STAC's spiking attention "
                         "applies the window through the model's mask")
    q_slot = torch.arange(k_len - q_len, k_len, device=mask.device)[:, None]
    outside = torch.arange(k_len, device=mask.device)[None, :] <= q_slot - window  # [Sq, Sk]
    if mask.dtype == torch.bool:
        let_through = mask[..., outside]
    else:
        let_through = mask[..., outside] > torch.finfo(mask.dtype).min / 2
    if bool(let_through.any()):
        raise ValueError(f"the attention mask lets queries see keys outside sliding_window={window}; STAC's spiking "
                         "attention needs the model to build its sliding-window mask")


def spike_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None,
                            dropout: float = 0.0, softcap: float | None = None, sliding_window: int | None = None,
                            **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over ``query [B, heads, Sq, D]``, ``key``/``value [B, kv_heads, Sk, D]`` with an
    additive float mask ``[B or 1, 1, Sq, Sk]``; returns ``(output [B, Sq, heads, D], probs)``.

    ``softcap`` (Gemma 2): scores become ``softcap * tanh(scores / softcap)`` before the mask, as
    in transformers' eager attention, inside the rate-domain softmax. ``sliding_window``
    (Mistral, Qwen2, Gemma 2/3, Phi-3): the model's mask applies it; this function checks that it
    does. Any other feature transformers passes (attention sinks, packed-sequence lengths, ...)
    is refused with a ``ValueError``.
    """
    T = _check_prepared(module)
    _check_features(module, kwargs)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if sliding_window is not None:
        _check_window(attention_mask, query.shape[2], key.shape[2], int(sliding_window))
    n_rep = query.shape[1] // key.shape[1]
    sites = module._modules
    q = _head_site(sites.get("q_site"), query)
    matmul = torch.matmul
    site = sites.get(PROBS)
    if module.__dict__.pop(ENCODED_FLAG, False):  # a SpikeKVCache encoded (and stored) them already
        if T is None and OP_COUNTER not in module.__dict__:  # the counter reads repeated heads
            if site is None and softcap is None and not (dropout and module.training):
                return _fused_attention(q, key, value, attention_mask, scaling, n_rep)
            k, v, matmul = key, value, _grouped_matmul(n_rep)
        else:
            k, v = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    else:
        k = _repeat_kv(_head_site(getattr(module, "k_site", None), key), n_rep)
        v = _repeat_kv(_head_site(getattr(module, "v_site", None), value), n_rep)

    def probs_of(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        w = matmul(q, k.transpose(2, 3)) * scaling
        if softcap is not None:  # the order of transformers' eager attention (Gemma 2)
            w = torch.tanh(w / softcap) * softcap
        if attention_mask is not None:
            w = w + attention_mask
        # at least float32 (as eager attention), never below the model's dtype: a float64 model's
        # mask minimum would be -inf in float32 and turn a fully masked padding row into NaN
        return nn.functional.softmax(w, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)

    by_max = site is not None and getattr(module, SCALE_ATTR, "sum") == "max"
    if T is None:
        probs = probs_of(q, k)
        probs = nn.functional.dropout(probs, p=dropout, training=module.training)
        if by_max:
            probs = _probs_site(site, _over_row_max(probs))
            out = _normalised_matmul(probs, v, matmul)
        else:
            probs = _probs_site(site, probs)
            out = matmul(probs, v)
        counter = module.__dict__.get(OP_COUNTER)
        if counter is not None:
            _count_matmuls(module, counter, q, v, attention_mask)
    elif by_max:
        probs = _probs_site(site, rate_op(lambda a, b: _over_row_max(probs_of(a, b)), T, q, k))
        out = rate_op(_normalised_matmul, T, probs, v)
    else:
        probs = _probs_site(site, rate_op(probs_of, T, q, k))
        out = rate_op(torch.matmul, T, probs, v)
    return out.transpose(1, 2).contiguous(), probs


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                     n_rep: int) -> tuple[torch.Tensor, None]:
    """``softmax(q k^T scaling + mask) v`` as one ``scaled_dot_product_attention`` call, the kv heads
    not repeated: what the eager path computes when no probability site, softcap or dropout acts
    (equal up to float rounding). Decoding with a :class:`SpikeKVCache` runs it: a token's
    attention is then one call, as the ANN's is."""
    out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=n_rep > 1)
    return out.transpose(1, 2).contiguous(), None


def _head_spikes(site: DAQCFSSite, x: torch.Tensor) -> torch.Tensor:
    """Spikes per (batch, head, position) of decoded values ``x [B, heads, S, D]`` of ``site``
    (heads * D channels; under grouped-query attention x holds the repeated kv heads)."""
    B, h, S, D = x.shape
    step = (site.theta / site.levels).to(x.dtype)
    reps = h * D // step.numel()
    counts = torch.round(x.detach() / step.view(-1, D).repeat_interleave(reps, 0).view(1, h, 1, D))
    if site.coding == "weighted":
        burst = site.burst.view(-1, D).repeat_interleave(reps, 0).view(1, h, 1, D)
        return weighted_spikes(counts, site.T, burst).sum(-1)
    return counts.abs().sum(-1)


def _count_matmuls(module: nn.Module, counter, q: torch.Tensor, v: torch.Tensor,
                   attention_mask: torch.Tensor | None) -> None:
    """Report the accumulates of spike-driven ``QK^T`` (a q spike adds its key element once per key
    it may attend) and ``PV`` (a v spike adds the probability of each query that may attend it)."""
    Sq, Sk = q.shape[2], v.shape[2]
    if attention_mask is None:
        allowed = torch.ones(1, Sq, Sk, dtype=q.dtype, device=q.device)
    else:
        allowed = (attention_mask[:, 0, :, -Sk:] == 0).to(q.dtype)  # [B or 1, Sq, Sk]
    q_site, v_site = getattr(module, "q_site", None), getattr(module, "v_site", None)
    if q_site is not None and q_site.mode is SiteMode.PARALLEL:
        acs = (_head_spikes(q_site, q) * allowed.sum(-1)[:, None, :]).sum()
        counter("qk", float(acs), q_site.coding == "weighted")
    if v_site is not None and v_site.mode is SiteMode.PARALLEL:
        acs = torch.matmul(allowed[:, None], _head_spikes(v_site, v)[..., None]).sum()
        counter("pv", float(acs), v_site.coding == "weighted")


def attach_attention_sites(module: nn.Module, path: str, heads: int, kv_heads: int, head_dim: int, T: int,
                           spike_qkv: bool, spike_probs: bool, coding: str = "rate",
                           kv_levels: int | None = None) -> list[tuple[str, DAQCFSSite]]:
    """Register the attention sites on ``module`` (at ``path`` in the model) and mark it for
    :func:`spike_attention_forward`. Returns ``[(qualified name, site)]`` of the new sites.
    ``kv_levels``: the k and v sites' ``max_levels`` (what a KV cache stores; None: the coding's)."""
    if heads % kv_heads:
        raise ValueError(f"{path}: {heads} query heads are not a multiple of {kv_heads} key/value heads")
    for name in (*QKV, PROBS):
        if hasattr(module, name):
            raise ValueError(f"{path} already has an attribute {name!r}; convert the original model")
    added = []
    if spike_qkv:
        for name, h in zip(QKV, (heads, kv_heads, kv_heads)):
            cap = kv_levels if name in KV_SITES else None
            added.append((name, DAQCFSSite(h * head_dim, T, signed=True, name=f"{path}.{name}", coding=coding,
                                           max_levels=cap)))
    if spike_probs:
        added.append((PROBS, DAQCFSSite(heads, T, signed=False, name=f"{path}.{PROBS}", coding=coding)))
    for name, site in added:
        module.add_module(name, site)
    module.stac_sim_T = None
    return [(site.name, site) for _, site in added]


AttentionInterface.register(ATTN_IMPLEMENTATION, spike_attention_forward)
# the eager mask: an additive float mask, which the rate-domain softmax applies on every step
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)
