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


COUNT_DTYPES = (torch.int8, torch.int16, torch.int32)  # the narrowest that holds every count is used


def _counted(module: nn.Module) -> tuple | None:
    """The k and v sites of ``module`` when both emit whole counts (parallel or quant mode), else None."""
    k_site, v_site = getattr(module, "k_site", None), getattr(module, "v_site", None)
    if k_site is None or v_site is None or {k_site.mode, v_site.mode} - {SiteMode.PARALLEL, SiteMode.QUANT}:
        return None
    return k_site, v_site


def _step(site, like: torch.Tensor) -> torch.Tensor:
    """``[1, heads, 1, D]``: the site's step ``theta / L`` per (head, dim), as the site decodes."""
    return (site.theta.detach() / site.levels).to(like.dtype).view(1, like.shape[1], 1, like.shape[-1])


def _as_counts(y: torch.Tensor, step: torch.Tensor) -> torch.Tensor | None:
    """The whole counts ``c`` with ``c * step == y`` bit for bit (as the site decoded them), or None."""
    c = torch.round(y / step)
    return c if torch.equal(c * step, y) else None


def _width(c: torch.Tensor | None) -> torch.dtype | None:
    if c is None or c.numel() == 0:
        return COUNT_DTYPES[0] if c is not None else None
    top = float(c.abs().max())
    return next((d for d in COUNT_DTYPES if top <= torch.iinfo(d).max), None)


class SpikeKVCache(DynamicCache):
    """A :class:`transformers.DynamicCache` whose entries are the sites' decoded keys and values.

    Where a layer's k and v sites emit whole counts (parallel or quant mode), the cache stores the
    counts at the narrowest integer width that holds all of them (int8 while no count passes 127,
    then int16, int32), and decodes them with the sites' steps when attention reads them: the same
    values bit for bit, at a quarter of float32's bytes. A count that is not exact in the decode
    (or a site in ANN mode) keeps that layer in float.

    Args:
        model: the converted model the cache belongs to (its attention layers give the sites).
        data: optional ``[(keys, values)]`` per layer, already decoded (used to rebuild a cache).
    """

    def __init__(self, model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        super().__init__()
        self._attn = attention_layers(model)
        self._steps: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        for idx, (k, v) in enumerate(data or []):
            self._store(idx, k, v, self._attn.get(idx))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        module = self._attn.get(layer_idx)
        if module is None:
            raise ValueError(f"layer {layer_idx} has no STAC attention module; this cache belongs to another model")
        key_states = _encode(getattr(module, "k_site", None), key_states)
        value_states = _encode(getattr(module, "v_site", None), value_states)
        setattr(module, ENCODED_FLAG, True)
        return self._store(layer_idx, key_states, value_states, module)

    def _store(self, idx: int, k: torch.Tensor, v: torch.Tensor, module: nn.Module | None):
        """Append decoded ``k``, ``v`` to layer ``idx`` (as counts where exact); return the layer's decoded keys, values."""
        sites = _counted(module) if module is not None else None
        steps = (_step(sites[0], k), _step(sites[1], v)) if sites is not None else None
        if idx in self._steps and self._steps[idx] is None:
            steps = None  # a layer kept in float stays in float
        kc = vc = None
        if steps is not None:
            kc, vc = _as_counts(k, steps[0]), _as_counts(v, steps[1])
        widths = [_width(kc), _width(vc)]
        layer = self.layers[idx] if idx < len(self.layers) else None
        held = layer.keys.dtype if layer is not None and getattr(layer, "is_initialized", False) else None
        if held is not None and not held.is_floating_point:
            widths.append(held)
        if steps is None or None in widths:
            if idx in self._steps and self._steps[idx] is not None and layer is not None:
                layer.keys, layer.values = self._decoded(idx, layer.keys, layer.values, k.dtype)
            self._steps[idx] = None
            keys, values = super().update(k, v, idx)
            return keys, values
        dtype = max(widths, key=COUNT_DTYPES.index)
        if held is not None and held != dtype:
            layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
            layer.dtype = dtype
        self._steps[idx] = steps
        keys, values = super().update(kc.to(dtype), vc.to(dtype), idx)
        return self._decoded(idx, keys, values, k.dtype)

    def _decoded(self, idx: int, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype | None = None):
        steps = self._steps.get(idx)
        if steps is None or keys.is_floating_point():
            return keys, values
        return keys.to(dtype or steps[0].dtype) * steps[0], values.to(dtype or steps[1].dtype) * steps[1]

    def layer_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(keys, values)]`` per layer, decoded, each ``[B, kv_heads, L, D]``."""
        return [self._decoded(i, layer.keys, layer.values) for i, layer in enumerate(self.layers)]

    def stored_bytes_per_element(self) -> float:
        """Mean bytes one cached key or value element takes as stored (1 for int8 counts, 4 for float32)."""
        size = count = 0
        for layer in self.layers:
            for t in (layer.keys, layer.values):
                size += t.numel() * t.element_size()
                count += t.numel()
        return size / count if count else float("nan")

