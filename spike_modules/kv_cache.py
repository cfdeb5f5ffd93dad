"""``SpikeKVCache``: a KV cache that holds the decoded (time-summed) keys and values of a converted model.

Spiking state is not KV state. A token's k and v pass their sites once, when the token is
fed; the cache stores what the sites decoded (``theta * count / T`` per channel, the time
mean of the spike trains), and later tokens attend to those stored values. The sites'
neurons are stateless between calls in parallel mode, so nothing else needs keeping: a
prefill followed by decoding computes the same values as one pass over the whole context,
and the spike statistics count each token's k/v spikes once, when it is fed.

It plugs into transformers' attention modules unchanged: their ``past_key_values.update``
call runs the layer's ``k_site``/``v_site`` here and tells ``spike_attention_forward``
(through the module) that the keys and values it receives are already encoded.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from .site import SiteMode

ENCODED_FLAG = "stac_kv_encoded"  # set on an attention module for the one attention call that follows


def attention_layers(model: nn.Module) -> dict[int, nn.Module]:
    """``{layer_idx: attention module}`` of a converted model's (STAC-prepared) attention modules."""
    found = {}
    for m in model.modules():
        if hasattr(m, "stac_sim_T") and hasattr(m, "layer_idx"):
            if m.layer_idx in found:
                raise ValueError(f"two attention modules claim layer_idx {m.layer_idx}")
            found[int(m.layer_idx)] = m
    if not found:
        raise ValueError(f"{type(model).__name__} has no STAC attention modules; convert it with "
                         "smollm2_converter.convert first")
    return found


def _encode(site, x: torch.Tensor) -> torch.Tensor:
    """``x [B, heads, S, D]`` through a per-(head, dim) site, as ``spike_attention_forward`` does."""
    if site is None:
        return x
    if site.mode is SiteMode.SEQUENTIAL:
        raise ValueError(f"{site.name}: the KV cache holds decoded values and runs only with sites in parallel, "
                         "quant or ann mode; the sequential simulation recomputes the whole context")
    B, h, S, D = x.shape
    y = site(x.transpose(1, 2).reshape(B, S, h * D))
    return y.reshape(B, S, h, D).transpose(1, 2)


class SpikeKVCache(DynamicCache):
    """A :class:`transformers.DynamicCache` whose entries are the sites' decoded keys and values.

    Args:
        model: the converted model the cache belongs to (its attention layers give the sites).
        data: optional ``[(keys, values)]`` per layer, already decoded (used to rebuild a cache).
    """

    def __init__(self, model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        super().__init__(ddp_cache_data=data)
        self._attn = attention_layers(model)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        module = self._attn.get(layer_idx)
        if module is None:
            raise ValueError(f"layer {layer_idx} has no STAC attention module; this cache belongs to another model")
        key_states = _encode(getattr(module, "k_site", None), key_states)
        value_states = _encode(getattr(module, "v_site", None), value_states)
        setattr(module, ENCODED_FLAG, True)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def layer_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(keys, values)]`` per layer, each ``[B, kv_heads, L, D]``."""
        return [(layer.keys, layer.values) for layer in self.layers]
