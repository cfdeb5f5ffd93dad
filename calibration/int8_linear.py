"""STAC's own int8 linear layer (:class:`Int8Linear`, one symmetric scale per output row or per group of
input columns) and the rounding it stores: the pieces :mod:`calibration.int8` (the model walk) and
:mod:`calibration.int8_embedding` (the LM head and embeddings) both build on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spike_modules.linear import float_weight

from .gptq import absmax_scale, check_group_size


ROW_BLOCK_ELEMENTS = 1 << 24  # elements per block of rows in the per-row rounding and its error


def _row_blocks(w: torch.Tensor):
    """``(first row, rows)`` blocks of ``w`` of about :data:`ROW_BLOCK_ELEMENTS` elements."""
    step = max(1, ROW_BLOCK_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], step):
        yield start, w[start:start + step]


def row_error(weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> float:
    """``||W - q * scale[:, None]|| / ||W||`` of a per-row int8 table, a block of rows at a time."""
    err = norm = 0.0
    for start, part in _row_blocks(weight.detach()):
        part = part.float()
        rows = slice(start, start + len(part))
        decoded = q[rows].to(scale.dtype) * scale[rows, None]
        err += float((part - decoded).double().pow(2).sum())
        norm += float(part.double().pow(2).sum())
    return (err ** 0.5) / (norm ** 0.5) if err else 0.0


def quantize_rows(weight: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of ``weight`` ``[out, in]``, or per group of ``group_size`` input columns
    of each row: ``(q int8 [out, in], scale float32 [out])``, or ``scale [out, ceil(in / group_size)]``
    with groups (the last group may be narrower).

    ``scale = absmax / 127`` over the row (group) and ``q = round(w / scale)``, so
    ``|w - q * scale| <= scale / 2``. An all-zero row (group) gets ``scale = 1`` and ``q = 0``: it
    decodes to exactly 0. A group as wide as the row is the per-row case.
    """
    w = weight.detach()
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    check_group_size(group_size)
    if not group_size or group_size >= w.shape[1]:  # rows apart, a block at a time: an LM head's temporaries stay small
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
        for start, part in _row_blocks(w):
            part = part.float()
            if not torch.isfinite(part).all():
                raise ValueError("the weight holds NaN or inf; int8 cannot represent it")
            s = absmax_scale(part)
            scale[start:start + len(part)] = s
            q[start:start + len(part)] = torch.round(part / s[:, None]).clamp_(-127, 127)
        return q, scale
    w = w.float()
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds NaN or inf; int8 cannot represent it")
    out, width = w.shape
    groups = -(-width // group_size)
    padded = nn.functional.pad(w, (0, groups * group_size - width)).view(out, groups, group_size)
    scale = absmax_scale(padded)
    q = torch.round(padded / scale[:, :, None]).clamp_(-127, 127).view(out, -1)[:, :width]
    return q.to(torch.int8).contiguous(), scale


def expand_scale(scale: torch.Tensor, width: int, group_size: int) -> torch.Tensor:
    """A ``[out]`` or ``[out, groups]`` scale (groups of ``group_size`` columns) as one factor per
    weight, ``[out, width]``."""
    if scale.dim() == 1:
        return scale[:, None].expand(-1, width)
    return scale.repeat_interleave(group_size, dim=1)[:, :width]


class Int8Linear(nn.Module):
    """``y = x @ (weight_int8 * scale).T + bias`` with int8 weights, one scale per output channel or
    per group of ``group_size`` input columns of each output channel.

    Buffers ``weight_int8`` (int8 ``[out, in]``) and ``scale`` (float32 ``[out]``, or ``[out, groups]``
    with groups) are saved in the state dict; ``bias`` is the source layer's parameter, not a copy.
    No float weight is kept: each forward converts the int8 weight to ``x``'s dtype (a temporary
    the size of one float weight). Per row, it multiplies and scales the output columns,
    ``(x @ q.T) * scale``, which equals the formula above and is as fast as a float layer at 256
    tokens; with groups it decodes the weight first. In float16 the unscaled product can pass
    65504, so there the weight is always decoded first. ``model.to(dtype)`` casts ``scale`` as well.

    Per-group scales cost one multiply-add per group and output to rescale the group's partial sum
    (``rescale_ops``); the energy estimate counts them.

    Args:
        in_features, out_features: widths (``Int8Linear.from_linear`` fills everything).
        bias: whether the layer has a bias (zeros until loaded).
        group_size: 0 for one scale per output row, else input columns per scale.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 dtype: torch.dtype = torch.float32, group_size: int = 0):
        super().__init__()
        check_group_size(group_size)
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size if 0 < group_size < in_features else 0
        groups = -(-in_features // self.group_size) if self.group_size else 0
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        shape = (out_features, groups) if groups else (out_features,)
        self.register_buffer("scale", torch.ones(shape, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Module, group_size: int = 0) -> Int8Linear:
        """Quantize an ``nn.Linear`` or ``Conv1D`` (on its device) into a new ``Int8Linear``."""
        weight = float_weight(linear)
        layer = cls(weight.shape[1], weight.shape[0], bias=False, device=weight.device, group_size=group_size)
        q, scale = quantize_rows(weight, layer.group_size)
        layer.weight_int8.copy_(q)
        layer.scale.copy_(scale)
        layer.bias = linear.bias
        return layer

    @classmethod
    def shell_like(cls, linear: nn.Module, group_size: int = 0) -> Int8Linear:
        """An empty ``Int8Linear`` with ``linear``'s widths, bias, device and bias dtype, to load into."""
        weight = float_weight(linear)
        return cls(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device=weight.device,
                   dtype=weight.dtype, group_size=group_size)

    @property
    def rescale_ops(self) -> int:
        """Multiply-adds per token that apply the scales to partial sums: one per output and group."""
        return self.out_features * (self.scale.shape[1] if self.scale.dim() == 2 else 1)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``[out, in]`` this layer computes with."""
        return self.weight_int8.float() * expand_scale(self.scale.float(), self.in_features, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cached = self.__dict__.get("_float_weight")
        if self.group_size or x.dtype == torch.float16:
            w = cached if cached is not None and cached.dtype == x.dtype and self.group_size else None
            return F.linear(x, w if w is not None else self.dequantize().to(x.dtype), self.bias)
        w = cached if cached is not None and cached.dtype == x.dtype else self.weight_int8.to(x.dtype)
        y = F.linear(x, w)
        scale = self.scale.to(x.dtype)
        return y * scale if self.bias is None else torch.addcmul(self.bias, y, scale)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{group}"


def keep_float_weights(model: nn.Module, keep: bool = True, dtype: torch.dtype = torch.float32) -> int:
    """``keep=True``: every :class:`Int8Linear` of ``model`` computes with a kept ``dtype`` copy of
    its int8 weight instead of converting it on every call. Same values, so the same outputs bit
    for bit, without the conversion that dominates one-token decoding; the price is memory (the
    copies take as much as float weights). Weights changed later are not seen until called again.
    ``keep=False`` drops the copies. Returns the bytes the copies now take."""
    total = 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            if keep:  # with groups, the decoded weight (the scales cannot be applied after the product)
                m.__dict__["_float_weight"] = m.dequantize().to(dtype) if m.group_size else m.weight_int8.to(dtype)
                total += m.__dict__["_float_weight"].nbytes
            else:
                m.__dict__.pop("_float_weight", None)
    return total
