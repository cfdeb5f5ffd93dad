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
from transformers.cache_utils import DynamicLayer

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


def _width(c: torch.Tensor | None, site=None) -> torch.dtype | None:
    """The narrowest of :data:`COUNT_DTYPES` that holds every count of ``c`` (None: none does, or no
    counts). A ``site`` whose counts are bounded by a number that int8 holds (no bursts) needs no look."""
    if c is None or c.numel() == 0:
        return COUNT_DTYPES[0] if c is not None else None
    bound = (site.__dict__.get("_frozen") or site._fused())[4] if site is not None else None
    if isinstance(bound, float) and bound <= torch.iinfo(COUNT_DTYPES[0]).max:
        return COUNT_DTYPES[0]
    top = float(c.abs().max())
    return next((d for d in COUNT_DTYPES if top <= torch.iinfo(d).max), None)


def _site_counts(site, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts [B, heads, S, D], step [1, heads, 1, D])`` of ``x [B, heads, S, D]`` through a
    per-(head, dim) site (:meth:`DAQCFSSite.counts`): ``counts * step`` is what :func:`_encode` gives."""
    B, h, S, D = x.shape
    c, step = site.counts(x.transpose(1, 2).reshape(B, S, h * D))
    return c.reshape(B, S, h, D).transpose(1, 2), step.to(x.dtype).view(1, h, 1, D)


ROOM_TOKENS = 128  # a layer that runs out of room grows by this many slots, or a quarter of its length if more


def _appended(held: torch.Tensor, new: torch.Tensor, room: tuple | None) -> tuple[torch.Tensor, tuple | None]:
    """``(cat([held, new], -2), room)``: the concatenation as a view into a buffer with space for later
    tokens. ``room`` is ``(buffer, slots written)``; ``new`` goes into the buffer only where ``held`` is
    exactly the written part and it fits. A slot is written once: a tensor handed out earlier (a
    longer cache before a crop) never sees its values change."""
    if held.dim() != new.dim() or held.dtype != new.dtype:  # the first update (an empty 1-d tensor)
        return (torch.cat([held, new], dim=-2), None) if held.numel() else _roomy(new[..., :0, :], new)
    old, total = held.shape[-2], held.shape[-2] + new.shape[-2]
    if (room is None or held.data_ptr() != room[0].data_ptr() or held.stride() != room[0].stride()
            or old != room[1] or held.shape[:-2] != new.shape[:-2] or held.shape[-1] != new.shape[-1]
            or total > room[0].shape[-2]):
        return _roomy(held, new)
    room[0][..., old:total, :].copy_(new)
    return room[0][..., :total, :], (room[0], total)


def _roomy(held: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    old, total = held.shape[-2], held.shape[-2] + new.shape[-2]
    buffer = new.new_empty(*new.shape[:-2], total + max(ROOM_TOKENS, total // 4), new.shape[-1])
    buffer[..., :old, :].copy_(held)
    buffer[..., old:total, :].copy_(new)
    return buffer[..., :total, :], (buffer, total)


class GrowingLayer(DynamicLayer):
    """transformers' :class:`DynamicLayer` whose keys and values are views into buffers with room to
    grow: appending a decoded token copies that token (and, now and then, the cache into a larger
    buffer), where the base class concatenates the whole cache on every step. The tensors it holds
    and returns have the same values; cropping, reordering and the rest are the base class's
    (a view they replace gets a new buffer on the next append)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rooms = self.__dict__.get("_rooms", (None, None))
        self.keys, k_room = _appended(self.keys, key_states, rooms[0])
        self.values, v_room = _appended(self.values, value_states, rooms[1])
        self._rooms = (k_room, v_room)
        return self.keys, self.values


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
        self.layer_class_to_replicate = GrowingLayer
        self._attn = attention_layers(model)
        self._steps: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        for idx, (k, v) in enumerate(data or []):
            self._store(idx, k, v, self._attn.get(idx))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        module = self._attn.get(layer_idx)
        if module is None:
            raise ValueError(f"layer {layer_idx} has no STAC attention module; this cache belongs to another model")
        setattr(module, ENCODED_FLAG, True)
        sites = _counted(module)
        if sites is not None and self._steps.get(layer_idx, ()) is not None and not torch.is_grad_enabled():
            (kc, k_step), (vc, v_step) = _site_counts(sites[0], key_states), _site_counts(sites[1], value_states)
            widths = [_width(kc, sites[0]), _width(vc, sites[1])]
            if None not in widths:
                return self._append(layer_idx, kc, vc, (k_step, v_step), widths, key_states.dtype)
            return self._store(layer_idx, kc * k_step, vc * v_step, module)  # no integer holds them: float
        key_states = _encode(getattr(module, "k_site", None), key_states)
        value_states = _encode(getattr(module, "v_site", None), value_states)
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
        if steps is None or None in widths:
            layer = self.layers[idx] if idx < len(self.layers) else None
            if idx in self._steps and self._steps[idx] is not None and layer is not None:
                layer.keys, layer.values = self._decoded(idx, layer.keys, layer.values, k.dtype)
            self._steps[idx] = None
            keys, values = super().update(k, v, idx)
            return keys, values
        return self._append(idx, kc, vc, steps, widths, k.dtype)

    def _append(self, idx: int, kc: torch.Tensor, vc: torch.Tensor, steps: tuple, widths: list, dtype: torch.dtype):
        """Append counts ``kc``, ``vc`` (whole numbers, any dtype) to layer ``idx`` at the narrowest width that
        holds them and what the layer holds; return the layer's decoded keys and values in ``dtype``."""
        layer = self.layers[idx] if idx < len(self.layers) else None
        held = layer.keys.dtype if layer is not None and getattr(layer, "is_initialized", False) else None
        if held is not None and not held.is_floating_point:
            widths.append(held)
        width = max(widths, key=COUNT_DTYPES.index)
        if held is not None and held != width:
            layer.keys, layer.values = layer.keys.to(width), layer.values.to(width)
            layer.dtype = width
        self._steps[idx] = steps
        keys, values = super().update(kc.to(width), vc.to(width), idx)
        return self._decoded(idx, keys, values, dtype)

    def _decoded(self, idx: int, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype | None = None):
        steps = self._steps.get(idx)
        if steps is None or keys.is_floating_point():
            return keys, values
        if dtype is None or dtype == steps[0].dtype == steps[1].dtype:  # one pass: int * float computes in float
            return keys * steps[0], values * steps[1]
        return keys.to(dtype) * steps[0], values.to(dtype) * steps[1]

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

