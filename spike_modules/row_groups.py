"""Layers that read the same input, read by rows in one kernel call over their joined table.

A decoder layer's q, k and v projections read one tensor. Read one by one
(:func:`spike_modules.row_sparse.row_linear`), each call finds the nonzero inputs again and pays the
kernel call and the Python around it, and the narrow k and v tables (SmolLM2: 192 outputs) run the
kernel at about half its speed on wide ones. :class:`RowGroup` reads them together: the first
member called with a tensor computes every member's product in one
``embedding_bag_byte_rowwise_offsets`` call over a table whose row ``j`` is the members' rows ``j``
side by side, and keeps the other members' products for their own calls with that same tensor
(same object, same version; a member called with another tensor computes its own product alone).

Only groups whose joined table has at most :data:`JOIN_MAX_OUT` outputs are joined: measured on
SmolLM2's layers (1 thread, the 2-core machine), q/k/v (576 + 192 + 192 outputs) took 103-112 us
joined against 129-148 us one by one, while gate and up (1,536 each) took 178-221 us joined
against 161-194 us: past about a thousand outputs the kernel gains nothing from a wider row and the
joined call only adds a wider sum.

Each output is the same sum of the same rows as the member's own call, in the same order (the
joined table's cut into runs of outputs per thread, :func:`spike_modules.row_sparse._column_parts`,
changes no sum), so joined and alone give the same bits. The joined table lives in the first
member's ``__dict__`` (``drop_row_tables`` drops it) and is rebuilt when a member's weight or scale
changes (data pointer, version, shape) or a member's layer is replaced.

While generating (:func:`spike_modules.site.frozen`), nothing edits the members: how a group is read
(joined or one by one, the tables, scales and runs) is worked out on its first call in the block and
kept until the block ends (:meth:`RowGroup.product`'s ``token``), instead of checking every member at
every call.
Members that cannot be joined (float or grouped-scale layers, offloaded layers, a prefill, inputs
that need gradients) run :func:`~spike_modules.row_sparse.row_linear` each, as before.

:class:`spike_modules.layers.SharedInput` groups the spiking layers behind one site; for a model
without sites (the int8 ANN of ``bench/decode.py``), :func:`group_readers_` finds the layers that
read the same tensor in one forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from .row_sparse import (_KEY, _TABLE, MAX_ROW_TOKENS, RowReadLinear, _column_parts, _int8_parts, _needs_grad, int8_plan,
                         int8_rows, packed_table, read_rows, rescaled, row_linear, tensor_version)

JOIN_MAX_OUT = 1024  # joined tables with more outputs than this are not joined (see the module docstring)
_SCALE = "_row_group_scale"


def _ver(t: torch.Tensor) -> tuple:
    return t.data_ptr(), tensor_version(t), t.shape


class RowGroup:
    """Modules with a ``linear`` child that read the same input (``members``), read by rows
    together (see the module docstring). A plain object, not a module."""

    def __init__(self):
        self.members: list[nn.Module] = []
        self._x: torch.Tensor | None = None
        self._x_version: int | None = None
        self._outs: dict[int, torch.Tensor] = {}
        self._plan: tuple | None = None  # (token, joined plan, member plans): see product

    def product(self, member: nn.Module, x: torch.Tensor, all_rows: bool = False, token: object = None) -> torch.Tensor:
        """``member.linear(x)``, read by rows: taken from the products computed with the group when
        ``x`` is the tensor they were computed for, else computed now for every member at once
        (where they can be joined) or for ``member`` alone.

        ``token`` (generation: the frozen parameters of the site in front, :meth:`DAQCFSSite.lean`): the
        members' weights do not change while it is the same object (:func:`~spike_modules.site.frozen`),
        so how they are read is worked out once per token (:meth:`_plan_for`) instead of at every call."""
        outs = self._outs
        if outs and x is self._x and tensor_version(x) == self._x_version:
            got = outs.pop(id(member), None)
            if got is not None:
                if not outs:
                    self._x = None  # do not keep the input alive past the last reader
                return got
        if token is not None and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() \
                and 0 < x.numel() // x.shape[-1] <= MAX_ROW_TOKENS:
            joined, plans = self._plan_for(token, x)
            if joined is None:
                plan = plans[id(member)]
                if plan is None:
                    return row_linear(member.linear, x, all_rows)
                y = int8_rows(plan, x.reshape(-1, x.shape[-1]), member.linear.__dict__, all_rows)
                return y.reshape(*x.shape[:-1], y.shape[-1])
            joined = _joined_run(joined, x, all_rows)
        else:
            joined = _joined_products(self.members, x, all_rows) if len(self.members) > 1 else None
        if joined is None:
            return row_linear(member.linear, x, all_rows)
        self._outs = {id(m): y for m, y in zip(self.members, joined) if m is not member}
        self._x, self._x_version = (x, tensor_version(x)) if self._outs else (None, None)
        return joined[self.members.index(member)]

    def _plan_for(self, token: object, x: torch.Tensor) -> tuple:
        """``(joined plan or None, {id(member): its own plan or None})`` for ``token``, made on its first call."""
        held = self._plan
        if held is None or held[0] is not token:
            joined = _joined_plan(self.members, x) if len(self.members) > 1 else None
            plans = {} if joined is not None else {id(m): _member_plan(m, x) for m in self.members}
            held = self._plan = (token, joined, plans)
        return held[1], held[2]


def _parts(members: list[nn.Module], x: torch.Tensor) -> list | None:
    """``[(linear, weight_int8, scale)]`` of the members when one joined call can compute them all for
    ``x``, else None."""
    width = x.shape[-1] if x.dim() else 0
    n = x.numel() // width if width else 0
    if not n or n > MAX_ROW_TOKENS or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    got, out = [], 0
    for m in members:
        if not getattr(m, "row_sparse", True):
            return None
        lin = m.linear
        parts = _readable(lin, x)
        if parts is None:
            return None
        q, scale = parts
        out += q.shape[0]
        if out > JOIN_MAX_OUT or q.shape[1] != width or scale.dim() != 1:
            return None  # too wide to gain (gate/up: known at the first member) or not joinable
        got.append((lin, q, scale))
    return got


def _table(holder: dict, parts: list, runs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(table, scale)`` joined over the members' layers: packed rows ``[q_1[:, j], q_2[:, j], ...]`` in
    ``runs`` runs of outputs (:func:`~spike_modules.row_sparse.packed_table`) and their per-output scales one
    after the other; kept in ``holder`` until a member changes."""
    key = (runs, *((id(lin), _ver(q), _ver(s)) for lin, q, s in parts))
    if holder.get(_KEY) != key:
        with torch.no_grad():
            table = packed_table(torch.cat([q for _, q, _ in parts]), runs)
            scale = torch.cat([s.detach() for _, _, s in parts])
        holder[_TABLE], holder[_KEY], holder[_SCALE] = table, key, scale
    return holder[_TABLE], holder[_SCALE]


def _joined_plan(members: list[nn.Module], x: torch.Tensor) -> tuple | None:
    """``(holder, table, scale, runs of outputs, sizes, per-member scales, biases)``: how one kernel call reads every
    member for ``x``, or None where they cannot be joined."""
    parts = _parts(members, x)
    if parts is None:
        return None
    holder = members[0].__dict__
    runs = _column_parts(x.shape[-1], sum(q.shape[0] for _, q, _ in parts))
    table, scale = _table(holder, parts, runs)
    return (holder, table, scale, runs, [q.shape[0] for _, q, _ in parts], [s for _, _, s in parts],
            [lin.bias for lin, _, _ in parts])


def _joined_run(plan: tuple, x: torch.Tensor, all_rows: bool) -> list[torch.Tensor]:
    """Every member's ``linear(x)`` from one kernel call, as :func:`_joined_plan`'s ``plan`` reads them."""
    holder, table, scale, runs, sizes, scales, biases = plan
    width = x.shape[-1]
    n = x.numel() // width
    y = read_rows(table, x.reshape(n, width), width, runs, scale.shape[0], holder, all_rows)
    if all(b is None for b in biases):  # each member's own formula (y * scale), elementwise on the joined row
        ys = rescaled(y, scale, None).split(sizes, dim=-1)
    else:
        ys = [rescaled(y_i, s, b) for y_i, s, b in zip(y.split(sizes, dim=-1), scales, biases)]
    lead = x.shape[:-1]
    return [(y_i if n == 1 else y_i.contiguous()).reshape(*lead, y_i.shape[-1]) for y_i in ys]


def _joined_products(members: list[nn.Module], x: torch.Tensor, all_rows: bool) -> list[torch.Tensor] | None:
    """Every member's ``linear(x)`` from one kernel call, or None where they cannot be joined."""
    plan = _joined_plan(members, x)
    return None if plan is None else _joined_run(plan, x, all_rows)


def _readable(lin: nn.Module, x: torch.Tensor) -> tuple | None:
    """``(weight_int8, scale)`` of an int8 layer the row kernel can read for ``x`` (a 2-d int8 weight on
    ``x``'s device, not offloaded, no gradients needed), else None."""
    parts = _int8_parts(lin)
    if parts is None or "_hf_hook" in lin.__dict__ or _needs_grad(lin, x):
        return None
    q = parts[0]
    return parts if q.dtype == torch.int8 and q.dim() == 2 and q.device == x.device else None


def _member_plan(member: nn.Module, x: torch.Tensor) -> tuple | None:
    """:func:`~spike_modules.row_sparse.int8_plan` of a member read alone, or None where
    :func:`~spike_modules.row_sparse.row_linear` must look at it (not int8, offloaded, needs gradients)."""
    parts = _readable(member.linear, x)
    return None if parts is None else int8_plan(member.linear, parts[0], parts[1], x.shape[-1])


class _Reads:
    """Forward pre-hook recording which layers read each input tensor (by identity)."""

    def __init__(self):
        self.seen: dict[int, list[nn.Module]] = {}
        self.keep: list[torch.Tensor] = []

    def hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        self.seen.setdefault(id(x), []).append(module)
        self.keep.append(x)  # ids stay unique while the pass runs


@torch.no_grad()
def group_readers_(model: nn.Module, sample: torch.Tensor) -> int:
    """Group the :class:`~spike_modules.row_sparse.RowReadLinear` layers of ``model`` that read the same
    tensor in a forward pass over ``sample`` (token ids ``[1, S]``), so that each group is read by rows
    in one kernel call where it can be joined (:class:`RowGroup`). Returns how many groups of two or
    more were made."""
    reads = _Reads()
    layers = [m for m in model.modules() if isinstance(m, RowReadLinear)]
    handles = [m.register_forward_pre_hook(reads.hook) for m in layers]
    try:
        model(sample)
    finally:
        for h in handles:
            h.remove()
    made = 0
    for members in reads.seen.values():
        if len(members) > 1 and len(set(map(id, members))) == len(members):
            group = RowGroup()
            group.members = members
            for m in members:
                m.rows = group
            made += 1
    return made
