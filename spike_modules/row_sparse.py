"""Row-reading linear layers for parallel-mode decoding: read only the weight rows of inputs that fired.

Decoding one token at a time, a linear layer is bound by memory, not arithmetic: a dense product
reads every weight once per token. Behind a spiking site the input is a vector of decoded spike
counts, and ``W @ y`` needs only the columns ``W[:, j]`` of the channels ``j`` with ``y_j != 0``
(docs/design.md section 5 counts exactly these bytes). How many are zero depends on the coding and
the calibration: the embedded SmolLM2 converted by an earlier ``make demo`` (weighted coding, T=7,
127 levels, no dead zones) fires on 98% of the channels at the q/k/v, o and gate/up inputs and 90%
at the down projection's, per decoded token (measured on its evaluation text), so there the speed
comes from the int8 row kernel itself, and a sparser site (dead zones, fewer levels) reads fewer
rows. :func:`row_linear` computes ``linear(x)`` that way for a few tokens: it stores the weight
once as an ``[in, out]`` table (row
``j`` = column ``j`` of the weight) and sums the rows of the nonzero inputs, each weighted by its
value, with an embedding-bag kernel that reads those rows and nothing else:

- STAC's int8 layer (``weight_int8`` ``[out, in]`` and ``scale``): the table is PyTorch's packed
  8-bit embedding format (``torch.ops.quantized.embedding_bag_byte_rowwise_offsets``), row ``j`` =
  ``q[:, j] + 128`` as uint8 followed by a float32 scale 1.0 and offset -128.0, so a stored
  byte decodes to ``q`` exactly and the kernel returns ``sum_j x_j q[:, j]`` in float32; the per-output ``scale`` and the
  bias are applied after, as :class:`calibration.int8.Int8Linear` applies them. With per-group
  scales (``group_size``) each token's rows are summed per group (one bag per token and group)
  and the groups' sums scaled and added: one multiply-add per output and group, as the layer's
  ``rescale_ops`` counts. It reads a quarter of the bytes of a float layer, and at full density
  it is still faster than the dense float product on one token (``bench/decode.py`` runs the int8
  ANN through it with every row). Whether a layer looks for its zero inputs or reads every row is
  decided from the zeros it saw (:func:`_skip_zeros`); both give the same bits. The kernel runs one
  bag on one thread, so a table over :data:`SPLIT_BYTES` is cut into one run of outputs per thread
  (:func:`packed_table`, the runs' tables stacked), each run's bag reading the same input rows. Each
  output is then still one bag's sum over the fired rows in ascending order: the same bits whatever
  the thread count. Splitting the block tables of 256 KB and up (SmolLM2: all but k and v) took a
  decoding step from 42.5 to 39.5 ms on the idle 2-core machine, when the runs were of input rows and
  their sums were added after; runs of outputs leave out that addition and made the last bits
  independent of the thread count (with the row plans of :mod:`spike_modules.row_groups`, 0.2-5.6 ms
  per token faster in four alternating pairs of runs of the two codes). With several tokens a split
  table reads every row. Time decoding on a quiet machine: an earlier measurement on a shared,
  loaded machine had the waiting threads burn twice the CPU time.
- ``nn.Linear`` (a transposed float copy, kept) and GPT-2's ``Conv1D`` (its own ``[in, out]``
  weight, no copy): ``F.embedding_bag`` in sum mode. A float row costs as many bytes as the dense
  product's, so it only wins when few inputs fired: above :data:`FLOAT_MAX_SHARE` nonzero inputs
  the dense product runs (measured roughly, 1 thread, on SmolLM2's layer shapes: at 20% nonzero the
  rows took 0.15-1x the dense time, at 50% 0.7-1.5x).

Narrow layers that read one input (q, k and v) are read in one call over their joined table by
:mod:`spike_modules.row_groups`, which builds on the pieces here.

The result equals the dense layer up to float summation order. Beyond :data:`MAX_ROW_TOKENS`
tokens (a prefill) the dense product is faster and runs. The dense product also runs, by design,
where the kernel does not apply: tensors that need gradients (the tables are detached copies),
inputs that are not float32 on the CPU (the packed kernel is CPU and float32 only), and layers whose
weights cannot be read by rows (bitsandbytes' and torchao's 8-bit layers keep packed formats of
their own; :func:`row_readable` says which).

The tables live in the layer's ``__dict__``, not in its state dict, and are rebuilt when the
weight tensor is replaced or changed in place (its data pointer or version counter moves, as
``load_state_dict`` and optimiser steps do). An edit through ``.data`` moves neither:
:func:`drop_row_tables` then drops the stale tables.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

MAX_ROW_TOKENS = 4  # beyond this many tokens per call, the dense product (a GEMM) is faster
FLOAT_MAX_SHARE = 0.3  # float layers: the row kernel above this share of nonzero inputs is slower than dense
SPLIT_BYTES = 256 << 10  # int8 tables of this size and up are read by all threads, one bag each
# looking for the nonzero inputs (nonzero, index_select, and then a search or the indices repeated per run:
# about 10 us) costs about as long as reading this many weight bytes. Measured, when tables were split by input rows,
# decoding the embedded SmolLM2 (make demo's SNN, 256-token prompt,
# the 2-core CPU, alone): 64 KB had every block layer with 6-13% zeros look, 1-1.5 ms per token slower than
# reading every row; 256 KB looks only at the LM head (13% zeros), as fast as never looking or faster
FIND_COST_BYTES = 256 << 10
RECHECK_CALLS = 32  # a layer that reads every row looks at its share of zeros again every this many calls
_TABLE = "_row_table"
_KEY = "_row_table_key"
# the 8 bytes closing each packed row: float32 scale 1.0 and offset -128.0, so a stored byte b reads as b - 128
_SCALE_OFFSET = torch.tensor([1.0, -128.0], dtype=torch.float32).view(torch.uint8)


def _int8_parts(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(weight_int8, scale)`` of an int8 layer, else None. Int8Linear keeps both as buffers: read
    from ``_buffers`` first, a dict lookup where ``hasattr`` goes through ``Module.__getattr__`` (a
    decoding step makes a few hundred calls)."""
    b = linear._buffers
    q, scale = b.get("weight_int8"), b.get("scale")
    if q is None or scale is None:
        if not (hasattr(linear, "weight_int8") and hasattr(linear, "scale")):
            return None
        q, scale = linear.weight_int8, linear.scale
    return q, scale


def _is_int8(linear: nn.Module) -> bool:
    return _int8_parts(linear) is not None


def row_readable(linear: nn.Module) -> bool:
    """Whether :func:`row_linear` can read ``linear`` by rows: STAC's int8 layer, a float32
    ``nn.Linear`` with a plain weight, or ``Conv1D``. Not bitsandbytes' or torchao's layers (an
    ``nn.Linear`` whose weight is int8 or a tensor subclass): those always run dense."""
    parts = _int8_parts(linear)
    if parts is not None:
        return parts[0].dtype == torch.int8 and parts[0].dim() == 2
    if isinstance(linear, Conv1D):
        return linear.weight.dtype == torch.float32
    return (isinstance(linear, nn.Linear) and type(linear.weight) in (nn.Parameter, torch.Tensor)
            and linear.weight.dtype == torch.float32)


def tensor_version(x: torch.Tensor) -> int | None:
    """In-place change counter; inference-mode tensors have none (identity must do)."""
    return None if x.is_inference() else x._version


def _weight(linear: nn.Module) -> torch.Tensor:
    return linear.weight_int8 if _is_int8(linear) else linear.weight


def packed_table(q: torch.Tensor, parts: int = 1) -> torch.Tensor:
    """An int8 weight ``q`` ``[out, in]`` as the kernel's packed table: row ``j`` is ``q[:, j] + 128`` as uint8,
    then the float32 scale 1.0 and offset -128.0 (so a byte reads as ``q``); ``[in, out + 8]``. With ``parts``
    > 1, the outputs are cut into ``parts`` runs of ``ceil(out / parts)`` (the last padded with zero weights)
    and the runs' tables stacked: ``[parts * in, ceil(out / parts) + 8]``, part ``p``'s row ``j`` at ``p * in + j``."""
    with torch.no_grad():
        out, width = q.shape
        cols = -(-out // parts)
        if cols * parts != out:
            q = torch.cat([q, q.new_zeros(cols * parts - out, width)])
        table = torch.empty(parts, width, cols + 8, dtype=torch.uint8, device=q.device)
        table[..., :cols] = (q.view(parts, cols, width).transpose(1, 2).to(torch.int16) + 128).to(torch.uint8)
        table[..., cols:] = _SCALE_OFFSET.to(q.device)
        return table.view(parts * width, cols + 8)


def _build(linear: nn.Module, w: torch.Tensor, parts: int) -> torch.Tensor:
    if _is_int8(linear):
        return packed_table(w, parts)
    return w.detach().t().contiguous()  # nn.Linear: [out, in] -> [in, out]


def row_table(linear: nn.Module, w: torch.Tensor | None = None, parts: int = 1) -> torch.Tensor:
    """``linear``'s weight (``w``, if the caller has it at hand) as an ``[in, out]`` table (packed
    uint8 for int8 layers, in ``parts`` runs of outputs: :func:`packed_table`), built on first use and kept
    until the weight changes. ``Conv1D``'s weight already is one."""
    w = _weight(linear) if w is None else w
    if isinstance(linear, Conv1D):
        return w.detach()
    key = (w.data_ptr(), tensor_version(w), w.shape, w.dtype, parts)
    d = linear.__dict__
    if d.get(_KEY) != key:
        d[_TABLE], d[_KEY] = _build(linear, w, parts), key
    return d[_TABLE]


def drop_row_tables(model: nn.Module) -> int:
    """Drop every kept table of ``model`` (after an edit through ``.data``, or to free the memory);
    they are rebuilt on next use. Returns how many were dropped."""
    dropped = 0
    for m in model.modules():
        if m.__dict__.pop(_TABLE, None) is not None:
            dropped += 1
        m.__dict__.pop(_KEY, None)
    return dropped


def _needs_grad(linear: nn.Module, x: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for p in linear.parameters(recurse=False))


def _bags(flat: torch.Tensor, span: int, parts: int, all_rows: bool):
    """``(indices, weights, offsets)`` of the bags of ``flat`` ``[n, in]``: per token, either one bag per run of
    ``span`` input rows (scale groups; ``parts`` 1) or one bag per part of a table in ``parts`` runs of outputs
    (:func:`packed_table`; ``span`` the whole row): part ``p`` reads rows ``p * in + j``. Indices stay ascending
    within a bag, so a bag adds its rows in the same order whether zero inputs are left out or not (a zero adds
    nothing). Zero inputs are looked for with one token only (``all_rows`` otherwise)."""
    n, width = flat.shape
    runs = -(-width // span)
    dev = flat.device
    if all_rows or (n > 1 and parts > 1):
        idx, offsets = _every_row(dev, n, width, span, parts)
        return idx, (flat if parts == 1 else torch.cat((flat,) * parts, 1)).reshape(-1), offsets  # cat: one op
    if n == 1:
        idx = flat[0].nonzero().squeeze(1)
        vals = flat[0].index_select(0, idx)
        if parts > 1:  # the same rows of every part, one bag each
            k = idx.numel()
            idx = (idx + _every_row(dev, 1, width, width, parts)[1][:, None]).reshape(-1)
            return idx, torch.cat((vals,) * parts), torch.arange(parts, device=dev) * k
        starts = _every_row(dev, 1, width, span, 1)[1]  # each run's bag starts where its first row falls
        return idx, vals, starts if runs == 1 else torch.searchsorted(idx, starts)
    nz = flat.nonzero()
    idx = nz[:, 1]
    vals = flat[nz[:, 0], idx]
    bag = nz[:, 0] * runs + idx // span if runs > 1 else nz[:, 0]
    counts = torch.bincount(bag, minlength=n * runs)
    return idx, vals, counts.cumsum(0) - counts


_EVERY_ROW: dict = {}


def _every_row(device: torch.device, n: int, width: int, span: int, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, offsets)`` of every row of ``n`` tokens, each in runs of ``span`` rows (``parts`` 1) or in
    ``parts`` bags over the parts' rows (``span`` the whole row), made once per shape and device (read only): a
    decoding step makes a few hundred calls. With one token and ``parts`` > 1, the offsets are the parts'
    first rows (``p * width``)."""
    key = (device, n, width, span, parts)
    got = _EVERY_ROW.get(key)
    if got is None:
        if parts > 1:
            idx = (torch.arange(width, device=device) + width * torch.arange(parts, device=device)[:, None])
            idx = idx.reshape(-1).repeat(n)
            offsets = torch.arange(n * parts, device=device) * width
        else:
            idx = torch.arange(width, device=device).repeat(n)
            starts = torch.arange(-(-width // span), device=device) * span
            offsets = (starts[None] + width * torch.arange(n, device=device)[:, None]).reshape(-1)
        got = _EVERY_ROW[key] = (idx, offsets)
    return got


def _skip_zeros(d: dict) -> bool:
    """Whether this call of an int8 layer (``d``: its ``__dict__``, or a joined group's) looks for the
    inputs that fired, or reads every row.

    The two give the same bits (rows are added in ascending order either way, and a zero input adds
    nothing), so this is a choice of speed alone. Finding the nonzero inputs costs a few kernel calls,
    about the time it takes to read :data:`FIND_COST_BYTES` of weights; it pays when the rows it skips
    weigh more. The share of zeros is measured on the calls that look (every call while looking pays,
    and every :data:`RECHECK_CALLS`-th call otherwise, so a layer whose inputs become sparser is seen).
    """
    calls = d.get("_row_calls", 0)
    d["_row_calls"] = calls + 1
    return d.get("_row_skip", True) or calls % RECHECK_CALLS == 0


def _note_zeros(d: dict, found: int, n: int, width: int, out: int) -> None:
    d["_row_skip"] = (n * width - found) * out > FIND_COST_BYTES


def _column_parts(width: int, out: int) -> int:
    """Runs of outputs an int8 table without groups is cut into (:func:`packed_table`): one, or, for a table
    over :data:`SPLIT_BYTES`, one per thread, since the kernel runs bags in parallel and one bag on one thread.
    Each output is still one bag's sum over every input row in ascending order, so the bits do not depend on
    the cut."""
    threads = torch.get_num_threads()
    if threads < 2 or width * out < SPLIT_BYTES:
        return 1
    return min(threads, out)


def row_linear(linear: nn.Module, x: torch.Tensor, all_rows: bool = False) -> torch.Tensor:
    """``linear(x)`` computed from the weight rows of the nonzero entries of ``x`` only (every row with
    ``all_rows``, which skips finding them: a dense input; the same result, since a zero adds nothing).
    Falls back to ``linear(x)`` itself where the module docstring says, so it is always safe to call."""
    width = x.shape[-1] if x.dim() else 0
    n = x.numel() // width if width else 0
    if (not n or n > MAX_ROW_TOKENS or x.dtype != torch.float32 or x.device.type != "cpu"
            or _needs_grad(linear, x) or "_hf_hook" in linear.__dict__):  # hooked (offloaded): its forward loads it
        return linear(x)
    int8 = _int8_parts(linear)
    if int8 is None and not row_readable(linear):  # an int8 layer is checked below, from what is at hand
        return linear(x)
    flat = x.reshape(n, width)
    if int8 is None:
        idx, vals, offsets = _bags(flat, width, 1, all_rows)
        if idx.numel() > FLOAT_MAX_SHARE * flat.numel():  # before the table: a dense-only layer keeps no copy
            return linear(x)
        y = F.embedding_bag(idx, row_table(linear), offsets, mode="sum", per_sample_weights=vals)
        if linear.bias is not None:
            y = y + linear.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
    q, scale = int8
    if q.dtype != torch.int8 or q.dim() != 2:
        return linear(x)
    y = int8_rows(int8_plan(linear, q, scale, width), flat, linear.__dict__, all_rows)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def int8_plan(linear: nn.Module, q: torch.Tensor, scale: torch.Tensor, width: int) -> tuple:
    """``(table, scale, bias, span, parts)`` of an int8 layer (``q`` ``[out, in]`` int8, its ``scale``) read by
    rows from inputs of ``width`` columns: what :func:`int8_rows` reads. Grouped scales: one bag per group of
    ``span`` input rows; else the whole row (``span = width``) in ``parts`` runs of outputs (:func:`_column_parts`)."""
    if scale.dim() == 2:
        return row_table(linear, q), scale, linear.bias, getattr(linear, "group_size", 0) or width, 1
    parts = _column_parts(width, scale.shape[0])
    return row_table(linear, q, parts), scale, linear.bias, width, parts


def int8_rows(plan: tuple, flat: torch.Tensor, d: dict, all_rows: bool) -> torch.Tensor:
    """``[n, out]``: the int8 layer of :func:`int8_plan`'s ``plan`` applied to ``flat`` ``[n, in]``, read by rows
    (the zero inputs looked for as the calls recorded in ``d`` decide, :func:`read_rows`)."""
    table, scale, bias, span, parts = plan
    n, width = flat.shape
    y = read_rows(table, flat, span, parts, scale.shape[0], d, all_rows)
    if scale.dim() == 2:  # [n * groups, out] partial sums, each group scaled by its own [out] scale
        y = (y.view(n, -(-width // span), -1) * scale.t()).sum(1)
        return y if bias is None else y + bias
    return rescaled(y, scale, bias)  # the dense layer's own formula


def read_rows(table: torch.Tensor, flat: torch.Tensor, span: int, parts: int, out: int, d: dict,
              all_rows: bool) -> torch.Tensor:
    """The sums of the packed ``table``'s rows weighted by the inputs ``flat`` ``[n, in]``: ``[n * runs, out]``
    per token and run of ``span`` input rows (a table in one part), or ``[n, out]`` from a table in ``parts``
    runs of outputs (:func:`packed_table`, ``span = in``). The zero inputs are looked for or not as
    :func:`_skip_zeros` decides from the calls recorded in ``d`` (``all_rows``: never)."""
    n, width = flat.shape
    look = not all_rows and (n == 1 or parts == 1) and _skip_zeros(d)  # _bags looks with one token only
    idx, vals, offsets = _bags(flat, span, parts, not look)
    if look:
        _note_zeros(d, idx.numel() // parts, n, width, out)
    y = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(table, idx, offsets, False, 0, False, vals, None,
                                                               False)
    if parts == 1:
        return y
    y = y.view(n, -1)  # the parts' outputs side by side
    return y if y.shape[1] == out else y[:, :out]


def rescaled(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """An int8 layer's integer sums ``y`` times its per-output ``scale``, plus ``bias``: its own formula."""
    return y * scale if bias is None else torch.addcmul(bias, y, scale)


class RowReadLinear(nn.Module):
    """A dense-input layer through the row kernel with every row (``all_rows``): the int8 ANN of
    ``bench/decode.py``, so that it runs the same kernel as the SNN. The wrapped layer is the
    child ``linear``, unchanged."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.__dict__.get("rows")  # spike_modules.row_groups.group_readers_ sets it
        if group is not None:
            return group.product(self, x, all_rows=True)
        return row_linear(self.linear, x, all_rows=True)


def read_by_rows_(model: nn.Module, kind: type[nn.Module]) -> int:
    """Wrap every ``kind`` layer of ``model`` in :class:`RowReadLinear`, in place; returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, RowReadLinear(m))
    return len(targets)
