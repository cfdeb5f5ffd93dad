"""Error-compensating int8 rounding (GPTQ): the same 8-bit format, rounded for the inputs it will see.

Round-to-nearest int8 (:func:`calibration.int8.quantize_rows`) minimises each weight's own error.
What matters is the layer's output error ``||X W^T - X Q^T||`` on real inputs ``X``. GPTQ
(Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") rounds the input columns one after another and spreads each column's rounding
error over the columns not yet rounded, weighted by the inverse of ``H = X^T X``; the result is
stored exactly as before (int8 values and float32 scales), so inference and the energy estimate
do not change. ``H`` comes from the calibration text (:func:`input_hessians`).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["absmax_scale", "check_group_size", "gptq_int8", "input_hessians"]


def check_group_size(group_size) -> None:
    """``group_size`` is 0 (one scale per row) or a positive integer (columns per scale)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
        raise ValueError(f"the int8 group size must be 0 (one scale per output row) or a positive number of input "
                         f"columns, got {group_size!r}")


def absmax_scale(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 scales over the last dimension: ``absmax / 127``, 1 where all are zero."""
    absmax = w.abs().amax(dim=-1)
    return torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))


@torch.no_grad()
def input_hessians(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[torch.Tensor]) -> dict:
    """``{path: (X^T X [in, in] float64, rows)}`` of the inputs each of ``layers`` receives while
    ``model`` runs ``batches`` (one forward each, as given). Layers that read the same input tensor
    (q/k/v, gate/up) share one matrix."""
    acc: dict[str, list] = {}
    owner: dict[str, str] = {}  # path -> the path whose matrix it shares
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # this forward's inputs: id -> (tensor, first reader)

    def hook(path):
        def fn(module, args):
            x = args[0]
            first = seen.get(id(x))
            if first is not None and first[0] is x and first[1] != path:
                owner.setdefault(path, first[1])
                return
            seen[id(x)] = (x, path)
            if path in owner:
                return
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            h = acc.setdefault(path, [torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64,
                                                  device=flat.device), 0])
            h[0].addmm_(flat.T, flat)
            h[1] += flat.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(p)) for p, m in layers.items()]
    try:
        for batch in batches:
            seen.clear()
            model(batch)
    finally:
        for h in handles:
            h.remove()
    seen.clear()
    out = {p: tuple(acc[owner.get(p, p)]) for p in layers if owner.get(p, p) in acc}
    missing = sorted(set(layers) - set(out))
    if missing:
        raise ValueError(f"calibration never ran {len(missing)} layer(s) to be quantized ({missing[0]}, ...); "
                         "their inputs are unknown")
    return out


@torch.no_grad()
def gptq_int8(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 0, damp: float = 0.01,
              block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``weight [out, in]`` to symmetric int8 with GPTQ's error compensation.

    Args:
        weight: the float weight (a ``Conv1D`` weight transposed first, see ``float_weight``).
        hessian: ``X^T X [in, in]`` of the layer's inputs.
        group_size: 0 for one scale per output row, else input columns per scale (a divisor of
            ``block`` or a multiple of it, so groups never straddle a block).
        damp: added to the diagonal, as a fraction of its mean (keeps the inverse stable).
        block: columns updated together (speed only; the result does not depend on it).

    Returns:
        ``(q int8 [out, in], scale float32 [out] or [out, groups])``, the format of
        :func:`calibration.int8.quantize_rows`.
    """
    check_group_size(group_size)
    W = weight.detach().float().clone()
    out, width = W.shape
    if hessian.shape != (width, width):
        raise ValueError(f"the input Hessian is {tuple(hessian.shape)}, the weight takes {width} inputs")
    if not 0 < group_size < width:
        group_size = 0
    if group_size and block % group_size:
        block = group_size * max(1, block // group_size)
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * H.diagonal().mean())
    # the inverse in float64, the column loop in float32 (as GPTQ's reference does): twice as fast
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    groups = -(-width // group_size) if group_size else 0
    scale = torch.empty(out, groups, dtype=torch.float32, device=W.device) if groups else absmax_scale(W)
    Q = torch.zeros_like(W)
    for i1 in range(0, width, block):
        i2 = min(i1 + block, width)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if group_size and col % group_size == 0:
                scale[:, col // group_size] = absmax_scale(W1[:, i:i + group_size])
            s = scale[:, col // group_size] if group_size else scale
            w, d = W1[:, i], Hinv1[i, i]
            q = torch.clamp(torch.round(w / s), -127, 127)
            Q[:, col] = q
            err = (w - q * s) / d
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q.to(torch.int8), scale.float()

