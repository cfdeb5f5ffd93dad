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

import functools
import math

import torch
from torch import nn
from transformers import DynamicCache

from .kv_layer import ESCAPE_BYTES, GrowingLayer, decoded_slots
from .site import DAQCFSSite, SiteMode, silence_

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


COUNTED_MODES = (SiteMode.PARALLEL, SiteMode.QUANT)  # site modes that emit whole counts
SLOT_DTYPES = (torch.int8, torch.int16, torch.int32)  # a slot: the narrowest that holds the site's levels


def _counted(module: nn.Module) -> tuple | None:
    """The k and v sites of ``module`` when both emit whole counts (parallel or quant mode), else None."""
    sites = module._modules  # nn.Module keeps its submodules (and None set over them) here
    k_site, v_site = sites.get("k_site"), sites.get("v_site")
    if k_site is None or v_site is None or k_site.mode not in COUNTED_MODES or v_site.mode not in COUNTED_MODES:
        return None
    return k_site, v_site


def _step(site, like: torch.Tensor) -> torch.Tensor:
    """``[1, heads, 1, D]``: the site's step ``theta / L`` per (head, dim), as the site decodes."""
    return (site.theta.detach() / site.levels).to(like.dtype).view(1, like.shape[1], 1, like.shape[-1])


def _as_counts(y: torch.Tensor, step: torch.Tensor) -> torch.Tensor | None:
    """The whole counts ``c`` with ``c * step == y`` bit for bit (as the site decoded them), or None."""
    c = torch.round(y / step)
    return c if torch.equal(c * step, y) else None


@functools.lru_cache(maxsize=None)
def _slot_for(levels: int) -> tuple[torch.dtype, int]:
    """``(dtype, its largest value)``: the narrowest of :data:`SLOT_DTYPES` that holds ``levels`` (int8 for
    weighted T <= 7)."""
    dtype = next((d for d in SLOT_DTYPES if levels <= torch.iinfo(d).max), SLOT_DTYPES[-1])
    return dtype, torch.iinfo(dtype).max


def _narrowed(c: torch.Tensor | None, site) -> tuple | None:
    """``(slots, escapes)`` of counts ``c`` from ``site``: each count clamped into a slot that holds the
    site's levels (:func:`_slot_for`), and the counts past it (bursts) as escapes ``(positions [N, 4],
    int32 counts [N])`` (None without any); None where ``c`` is not a tensor of finite counts."""
    got = None if c is None else _bursts(c, site, site.__dict__.get("_frozen") or site._fused())
    return None if got is None else (got[0].to(_slot_for(int(site.levels))[0]), got[1])


def _bursts(c: torch.Tensor, site, fz: tuple) -> tuple | None:
    """``(c, None)`` where the counts ``c`` of ``site`` (its fused parameters ``fz``) fit its slots, else ``(c``
    clamped to them, ``escapes)`` as :func:`_narrowed` gives them; None where ``c`` holds a count that is not
    finite or past int32. A site whose counts cannot pass its levels (no bursts) needs no look."""
    top_slot = _slot_for(int(site.levels))[1]
    bound = fz[4]
    if isinstance(bound, float) and bound <= top_slot or c.numel() == 0:
        return c, None
    top = _largest_count(c)
    if top is None:
        return None
    if top <= top_slot:
        return c, None
    big = c.abs() > top_slot
    return c.clamp(-top_slot, top_slot), (big.nonzero(), c[big].to(torch.int32))


def _largest_count(c: torch.Tensor) -> float | None:
    """The largest ``|count|`` of ``c`` (one call), or None where a count is not finite or past int32."""
    top = float(torch.linalg.vector_norm(c, math.inf))  # NaN stays NaN
    return top if math.isfinite(top) and top <= torch.iinfo(torch.int32).max else None


def _joined_sites(k_site, v_site, fk: tuple, fv: tuple) -> tuple:
    """``(scale, shift, lo, hi, keep, top_slot)`` over the k site's channels then the v site's, from their
    frozen parameters ``fk``, ``fv`` (:meth:`~spike_modules.site.DAQCFSSite.lean`): what each computes its
    counts and dead zone with (``keep`` None without a dead zone at either; -1 where a channel has none, as
    ``DAQCFSSite._silence`` reads it), and ``top_slot``, the smaller slot bound where a site's counts may pass
    its slot (bursts), else None."""
    def joined(a, b):
        return torch.cat([torch.as_tensor(t, dtype=fk[0].dtype, device=fk[0].device).expand(n)
                          for t, n in ((a, k_site.num_channels), (b, v_site.num_channels))])

    keeps = [site.__dict__.get("_dead_keep") for site in (k_site, v_site)]
    keep = None if keeps[0] is None and keeps[1] is None else joined(*(-1.0 if k is None else k for k in keeps))
    tops = [_slot_for(int(site.levels))[1] for site in (k_site, v_site)]
    bursts = [not (isinstance(f[4], float) and f[4] <= top) for f, top in ((fk, tops[0]), (fv, tops[1]))]
    return (joined(fk[0], fv[0]), joined(fk[1], fv[1]), joined(fk[3], fv[3]), joined(fk[4], fv[4]), keep,
            min(tops) if any(bursts) else None)


def _site_counts(site, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts [B, heads, S, D], step [1, heads, 1, D])`` of ``x [B, heads, S, D]`` through a
    per-(head, dim) site (:meth:`DAQCFSSite.counts`): ``counts * step`` is what :func:`_encode` gives."""
    B, h, S, D = x.shape
    c, step = site.counts(x.transpose(1, 2).reshape(B, S, h * D))
    return c.reshape(B, S, h, D).transpose(1, 2), step.to(x.dtype).view(1, h, 1, D)


class SpikeKVCache(DynamicCache):
    """A :class:`transformers.DynamicCache` whose entries are the sites' decoded keys and values.

    Where a layer's k and v sites emit whole counts (parallel or quant mode), the cache stores each
    count in a slot as wide as the site's levels need (int8 up to 127 levels: weighted T <= 7), and a
    count past them (a burst) also as an escape (its position and int32 count,
    :mod:`spike_modules.kv_layer`); attention reads the counts decoded with the sites' steps: the same
    values bit for bit, at a quarter of float32's bytes (int8 slots) plus 8 bytes per escape. The
    layers are :class:`~spike_modules.kv_layer.GrowingLayer`, which append in place. A count that is
    not exact in the decode (or a site in ANN mode) keeps that layer in float.

    Attention kernels (torch's ``scaled_dot_product_attention``) read float keys and values, so each
    layer also keeps a decoded working copy (``float_copy``, the default) to which a token adds only
    its own decoded slots: the float bytes an ANN's cache holds, beside the slots. Without it each
    call decodes the whole cache anew (no float bytes kept between calls, but every slot read and
    decoded at every token, a cost that grows with the context). The energy model prices the
    slots (:meth:`stored_bytes_per_element`), as hardware that decodes them on the way to its
    arithmetic would read them.

    Args:
        model: the converted model the cache belongs to (its attention layers give the sites).
        data: optional ``[(keys, values)]`` per layer, already decoded (used to rebuild a cache).
        float_copy: keep the decoded working copy (faster decoding, 4 more bytes per element in float32).
    """

    def __init__(self, model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 float_copy: bool = True):
        super().__init__()
        self.float_copy = bool(float_copy)
        self._joined: dict[int, tuple] = {}  # layer -> (k site's frozen parameters, v site's, _joined_sites of them)
        self.layer_class_to_replicate = GrowingLayer
        self._attn = attention_layers(model)
        self._steps: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        for idx, (k, v) in enumerate(data or []):
            self._store(idx, k, v, self._attn.get(idx))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        module = self._attn.get(layer_idx)
        if module is None:
            raise ValueError(f"layer {layer_idx} has no STAC attention module; this cache belongs to another model")
        module.__dict__[ENCODED_FLAG] = True  # what setattr would do for a plain value, without nn.Module's checks
        sites = _counted(module)
        if sites is not None and self._steps.get(layer_idx, ()) is not None and not torch.is_grad_enabled():
            lean = self._lean_update(layer_idx, sites, key_states, value_states)
            if lean is not None:
                return lean
            (kc, k_step), (vc, v_step) = _site_counts(sites[0], key_states), _site_counts(sites[1], value_states)
            k, v = _narrowed(kc, sites[0]), _narrowed(vc, sites[1])
            if k is not None and v is not None:
                return self._append(layer_idx, k, v, (k_step, v_step), key_states.dtype)
            return self._store(layer_idx, kc * k_step, vc * v_step, module)  # not whole finite counts: float
        key_states = _encode(getattr(module, "k_site", None), key_states)
        value_states = _encode(getattr(module, "v_site", None), value_states)
        return self._store(layer_idx, key_states, value_states, module)

    def _lean_update(self, idx: int, sites: tuple, key_states: torch.Tensor, value_states: torch.Tensor):
        """What the general path of :meth:`update` returns (and stores), bit for bit, in fewer tensor
        operations, for a layer whose slots and working copy hold its cache and whose sites take the lean
        path (:meth:`~spike_modules.site.DAQCFSSite.lean`: generation); None where that does not hold. The k
        and v sites count in one pass over their joined channels (:func:`_joined_sites`): each channel's
        counts are its own site's, element for element."""
        if not self.float_copy or self.offloading or idx >= len(self.layers) or self._steps.get(idx) is None:
            return None
        (ks, vs), fk, fv = sites, sites[0].lean(), sites[1].lean()
        B, h, S, D = key_states.shape
        hv, Dv = value_states.shape[1], value_states.shape[-1]
        if (fk is None or fv is None or fk[2].dtype != key_states.dtype or fv[2].dtype != value_states.dtype
                or h * D != ks.num_channels or hv * Dv != vs.num_channels):
            return None
        held = self._joined.get(idx)
        if held is None or held[0] is not fk or held[1] is not fv:
            held = self._joined[idx] = (fk, fv, _joined_sites(ks, vs, fk, fv))
        scale, shift, lo, hi, keep, top_slot = held[2]
        x = torch.cat((key_states.transpose(1, 2).reshape(B, S, h * D),
                       value_states.transpose(1, 2).reshape(B, S, hv * Dv)), -1)
        c = DAQCFSSite._counts(x, scale, shift, lo, hi)  # over both sites' channels
        if keep is not None:
            silence_(c, keep)
        kc = c[..., :h * D].view(B, S, h, D).transpose(1, 2)
        vc = c[..., h * D:].view(B, S, hv, Dv).transpose(1, 2)
        slots, escapes = (kc, vc), (None, None)
        if top_slot is not None:  # a site with bursts: counts may pass a slot
            top = _largest_count(c)
            if top is None:
                return None
            if top > top_slot:
                gk, gv = _bursts(kc, ks, fk), _bursts(vc, vs, fv)
                slots, escapes = (gk[0], gv[0]), (gk[1], gv[1])
        steps = (fk[2].view(1, h, 1, D), fv[2].view(1, hv, 1, Dv))
        got = self.layers[idx].lean_append((kc, vc), slots, escapes, steps)
        if got is not None:
            self._steps[idx] = steps
        return got

    def _store(self, idx: int, k: torch.Tensor, v: torch.Tensor, module: nn.Module | None):
        """Append decoded ``k``, ``v`` to layer ``idx`` (as counts where exact); return the layer's decoded keys, values."""
        sites = _counted(module) if module is not None else None
        steps = (_step(sites[0], k), _step(sites[1], v)) if sites is not None else None
        if idx in self._steps and self._steps[idx] is None:
            steps = None  # a layer kept in float stays in float
        kn = vn = None
        if steps is not None:
            kn, vn = _narrowed(_as_counts(k, steps[0]), sites[0]), _narrowed(_as_counts(v, steps[1]), sites[1])
        if kn is None or vn is None:
            layer = self.layers[idx] if idx < len(self.layers) else None
            if idx in self._steps and self._steps[idx] is not None and layer is not None:
                layer.keys, layer.values = self._decoded(idx, layer.keys, layer.values, k.dtype)
                layer.clear_escapes()
                layer.drop_copy()
            self._steps[idx] = None
            keys, values = super().update(k, v, idx)
            return keys, values
        return self._append(idx, kn, vn, steps, k.dtype)

    def _append(self, idx: int, k: tuple, v: tuple, steps: tuple, dtype: torch.dtype):
        """Append ``(slots, escapes)`` of keys and values to layer ``idx``; return the layer's decoded
        keys and values in ``dtype``."""
        layer = self.layers[idx] if idx < len(self.layers) else None
        start = layer.get_seq_length() if layer is not None else 0
        self._steps[idx] = steps
        keys, values = super().update(k[0], v[0], idx)
        layer = self.layers[idx]
        layer.add_escapes(start, k[1], v[1], steps)
        if self.float_copy:
            return layer.decoded_copy(start, steps, dtype)
        return self._decoded(idx, keys, values, dtype)

    def _decoded(self, idx: int, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype | None = None):
        """Layer ``idx``'s ``keys``, ``values`` (its own tensors) decoded: each slot times its step, each escape
        its count times its step."""
        steps = self._steps.get(idx)
        if steps is None or keys.is_floating_point():
            return keys, values
        k, v = decoded_slots(keys, steps[0], dtype), decoded_slots(values, steps[1], dtype)
        layer = self.layers[idx]
        return layer.escaped("keys", k), layer.escaped("values", v)

    def layer_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(keys, values)]`` per layer, decoded, each ``[B, kv_heads, L, D]``."""
        return [self._decoded(i, layer.keys, layer.values) for i, layer in enumerate(self.layers)]

    def stored_bytes_per_element(self) -> float:
        """Mean bytes one cached key or value element takes as stored: its slot (1 for int8), plus
        :data:`~spike_modules.kv_layer.ESCAPE_BYTES` per escape, over the elements (4 for float32)."""
        size = count = 0
        for layer in self.layers:
            for t in (layer.keys, layer.values):
                size += t.numel() * t.element_size()
                count += t.numel()
            if isinstance(layer, GrowingLayer):
                size += layer.escape_count() * ESCAPE_BYTES
        return size / count if count else float("nan")
