"""``GrowingLayer``: a transformers cache layer whose tensors grow in place, and keep escapes.

transformers' :class:`DynamicLayer` concatenates the whole cache with each new token. This layer
keeps its keys and values as views into buffers with room to grow: appending a token copies that
token (and, now and then, the cache into a larger buffer). A slot is written once, so a tensor
handed out before a crop never changes.

Escapes (:class:`spike_modules.kv_cache.SpikeKVCache`): the cache holds each key and value as a
count in a slot as wide as its site's levels (int8 for 127); a count past them (a burst) keeps its
slot clamped and is also listed, with its
position ``(batch, head, slot, dim)``, as an int32 escape that overrides the slot when the cache is
decoded. The layer carries its escapes through the batch operations transformers runs on a cache
(beam reordering, batch selection and repetition); entries past the layer's length (after a crop
or a slice) are ignored, and dropped when their slots are written again.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

ROOM_TOKENS = 128  # a layer that runs out of room grows by this many slots, or a quarter of its length if more
ESCAPE_BYTES = 8   # an escape as stored: its position in the layer (int32) and its count (int32)
NAMES = ("keys", "values")


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


def decoded_slots(slots: torch.Tensor, step: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Integer ``slots`` times their ``step`` in ``dtype`` (None: the step's): one pass where the step has that
    dtype (an integer times a float computes in float), else converted first."""
    return slots * step if dtype is None or dtype == step.dtype else slots.to(dtype) * step


def _entry(pos: torch.Tensor, count: torch.Tensor, value: torch.Tensor, top: int) -> tuple:
    """Escapes as held: ``(positions [N, 4], counts [N], decoded values [N], last slot, positions as the
    index tuple index_put_ takes)``, the tuple made once rather than at every decode."""
    return pos, count, value, top, tuple(pos.unbind(1))


def _rebatched(escapes: tuple | None, order: torch.Tensor) -> tuple | None:
    """Escapes after the batch rows become ``order`` (new row ``j`` is old row ``order[j]``)."""
    if escapes is None:
        return None
    pos, count, value, top = escapes[:4]
    order = order.to(pos.device)
    j, e = (pos[:, 0][None, :] == order[:, None]).nonzero(as_tuple=True)
    moved = pos[e].clone()
    moved[:, 0] = j
    return _entry(moved, count[e], value[e], top) if e.numel() else None


def _within(escapes: tuple | None, length: int) -> tuple | None:
    """The escapes whose slot is below ``length`` (all of them, without a look, where the last is)."""
    if escapes is None or escapes[3] < length:
        return escapes
    keep = escapes[0][:, 2] < length
    if not bool(keep.any()):
        return None
    pos = escapes[0][keep]
    return _entry(pos, escapes[1][keep], escapes[2][keep], int(pos[:, 2].max()))


class GrowingLayer(DynamicLayer):
    """:class:`DynamicLayer` with buffers that grow in place and escapes (see the module docstring).
    The tensors it holds and returns have the values the base class's would have."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.__dict__.pop("_lean", None)  # the slots change here: lean_append waits for decoded_copy
        rooms = self.__dict__.get("_rooms", (None, None))
        self.keys, k_room = _appended(self.keys, key_states, rooms[0])
        self.values, v_room = _appended(self.values, value_states, rooms[1])
        self._rooms = (k_room, v_room)
        return self.keys, self.values

    def _escapes(self) -> dict:
        """``{"keys"|"values": escapes as :func:`_entry` holds them, or None}``."""
        return self.__dict__.setdefault("_escape", {name: None for name in NAMES})

    def add_escapes(self, start: int, keys: tuple | None, values: tuple | None, steps: tuple) -> None:
        """Record escapes ``(positions [N, 4], counts [N])`` of the slots just written from ``start`` on
        (positions relative to it), decoded once with ``steps`` (the keys' and values' ``[1, heads, 1, D]``);
        the entries an earlier, longer cache left there are dropped."""
        held = self._escapes()
        for name, new, step in zip(NAMES, (keys, values), steps):
            old = _within(held[name], start)
            if new is not None:
                pos = new[0].clone()
                pos[:, 2] += start
                value = new[1].to(step.dtype) * step[0, pos[:, 1], 0, pos[:, 3]]
                top = start + int(new[0][:, 2].max())
                old = (_entry(pos, new[1], value, top) if old is None
                       else _entry(*(torch.cat([a, b]) for a, b in zip(old[:3], (pos, new[1], value))), top))
            held[name] = old

    def escapes(self, name: str) -> tuple | None:
        """The escapes ``(positions, counts, decoded values, last slot, index tuple)`` of ``keys`` or
        ``values`` within the layer's length, or None."""
        if not self.is_initialized:
            return None
        return _within(self._escapes()[name], getattr(self, name).shape[-2])

    def clear_escapes(self) -> None:
        self.__dict__.pop("_escape", None)

    def escaped(self, name: str, decoded: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``decoded`` (the layer's ``name`` from slot ``start`` on, times its step) with each escaped slot set
        to its count times its step, decoded once when recorded: the site's decode of that count bit for
        bit; in place."""
        got = _within(self._escapes()[name], start + decoded.shape[-2])
        if got is None or got[3] < start:
            return decoded
        index, value = got[4], got[2]
        if start:
            keep = got[0][:, 2] >= start
            pos = got[0][keep]  # a copy
            pos[:, 2] -= start
            index, value = tuple(pos.unbind(1)), value[keep]
        if value.device != decoded.device or value.dtype != decoded.dtype:
            index, value = tuple(i.to(decoded.device) for i in index), value.to(decoded.device, decoded.dtype)
        return decoded.index_put_(index, value)

    def decoded_copy(self, start: int, steps: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values decoded in ``dtype`` (each slot times its step from ``steps``, the
        keys' and values' ``[1, heads, 1, D]``; each escape its decoded count), as views into a working copy
        kept beside the slots, which grows as they do: a decoded token decodes only its own slots (from
        ``start``), where decoding the whole cache anew reads every slot at every token. A copy that does
        not hold exactly the slots before ``start`` (the first call, after a crop, another dtype or
        device; batch operations drop it) is decoded whole again. Like the slots, a slot of the copy is
        written once, so tensors handed out earlier never change."""
        copy = self.__dict__.get("_copy")
        keys = self.keys
        if (copy is None or copy[0][1] != start or copy[0][0].dtype != dtype or copy[0][0].device != keys.device
                or copy[0][0].shape[:-2] != keys.shape[:-2]):
            copy, start = (None, None), 0
        out, rooms = [], []
        for name, step, room in zip(NAMES, steps, copy):
            slots = getattr(self, name)[..., start:, :]
            new = self.escaped(name, decoded_slots(slots, step, dtype), start)
            held = new[..., :0, :] if room is None else room[0][..., :start, :]
            view, room = _appended(held, new, room)
            out.append(view)
            rooms.append(room)
        self.__dict__["_copy"] = tuple(rooms)
        self._note_lean()
        return out[0], out[1]

    def lean_append(self, counts: tuple, slots: tuple, escapes: tuple, steps: tuple) -> tuple | None:
        """Append the keys' and values' float ``counts`` ``[B, heads, S, D]``: ``slots`` (the counts, or them
        clamped where ``escapes`` hold the bursts, as :func:`spike_modules.kv_cache._bursts` gives them) into
        the slots, ``counts * steps`` into the working copy, each written once, in place. The same slots,
        escapes and copy as an append through :meth:`update` and :meth:`decoded_copy`, in fewer tensor
        operations: a decoded token appends once per layer. Returns the decoded keys and values, or None
        (nothing written) unless the last append left the slots and their copy in step with room for these
        (:meth:`_note_lean`; then append the general way)."""
        lean = self.__dict__.get("_lean")
        if lean is None:
            return None
        length, room, k_ptr, v_ptr, dtype, device, lead, k_dim, v_dim, k_slots, v_slots, k_copy, v_copy = lean
        kc, vc = counts
        total = length + kc.shape[-2]
        keys, values = self.keys, self.values
        if (total > room or keys.shape[-2] != length or keys.data_ptr() != k_ptr or values.data_ptr() != v_ptr
                or kc.dtype != dtype or vc.dtype != dtype or kc.device != device or kc.shape[:-2] != lead
                or vc.shape[:-2] != lead or kc.shape[-1] != k_dim or vc.shape[-1] != v_dim
                or vc.shape[-2] != kc.shape[-2]):
            return None
        k_slots[..., length:total, :].copy_(slots[0])
        v_slots[..., length:total, :].copy_(slots[1])
        torch.mul(kc, steps[0], out=k_copy[..., length:total, :])
        torch.mul(vc, steps[1], out=v_copy[..., length:total, :])
        self.keys, self.values = k_slots[..., :total, :], v_slots[..., :total, :]
        self._rooms = ((k_slots, total), (v_slots, total))
        self.__dict__["_copy"] = ((k_copy, total), (v_copy, total))
        self.__dict__["_lean"] = (total, *lean[1:])
        if escapes[0] is not None or escapes[1] is not None:
            self.add_escapes(length, escapes[0], escapes[1], steps)
        return k_copy[..., :total, :], v_copy[..., :total, :]

    def _note_lean(self) -> None:
        """After :meth:`decoded_copy`: where the slots and their working copy hold exactly the layer's tokens in
        buffers with room, note what :meth:`lean_append` needs to append in place (and checks); else nothing."""
        d = self.__dict__
        d.pop("_lean", None)
        rooms, copy = d.get("_rooms"), d.get("_copy")
        if rooms is None or copy is None or rooms[0] is None or rooms[1] is None:
            return
        keys, values = self.keys, self.values
        length = keys.shape[-2]
        held = (*rooms, *copy)
        if (any(n != length for _, n in held) or keys.data_ptr() != rooms[0][0].data_ptr()
                or values.data_ptr() != rooms[1][0].data_ptr() or keys.shape[:-2] != values.shape[:-2]):
            return
        d["_lean"] = (length, min(t.shape[-2] for t, _ in held), keys.data_ptr(), values.data_ptr(),
                      copy[0][0].dtype, copy[0][0].device, keys.shape[:-2], keys.shape[-1], values.shape[-1],
                      rooms[0][0], rooms[1][0], copy[0][0], copy[1][0])

    def drop_copy(self) -> None:
        """Forget the working copy :meth:`decoded_copy` keeps (the next call decodes the whole layer)."""
        self.__dict__.pop("_copy", None)
        self.__dict__.pop("_lean", None)

    def escape_count(self) -> int:
        return sum(0 if (got := self.escapes(name)) is None else int(got[1].numel()) for name in NAMES)

    def _rebatch(self, order: torch.Tensor) -> None:
        self.drop_copy()
        held = self._escapes()
        for name in NAMES:
            held[name] = _rebatched(held[name], order)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._rebatch(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._rebatch(torch.arange(self.keys.shape[0])[indices.cpu() if torch.is_tensor(indices) else indices])
        super().batch_select_indices(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            self._rebatch(beam_idx.cpu())
        super().reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        self.drop_copy()
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        self.clear_escapes()
        self.drop_copy()
        super().reset()
