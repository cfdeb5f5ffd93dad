"""8-bit weights for full conversion mode: :class:`Int8Linear` and :func:`quantize_weights_`.

Every linear layer inside the blocks (``nn.Linear`` or GPT-2's ``Conv1D``, bare or inside a
:class:`~spike_modules.layers.SpikeLinear`) gets int8 weights; with ``head=True`` the output head
and the input embeddings too, one int8 table when tied (:mod:`calibration.int8_embedding`),
otherwise they stay float. Backends: ``own`` (:class:`Int8Linear`, per-output-channel symmetric,
any device, saved as plain int8/float32 tensors), ``bnb`` and ``torchao`` (see
:mod:`calibration.int8_backends`), and ``none``.

A saved 8-bit model is rebuilt from the float architecture: :func:`prepare_int8_` puts empty
8-bit shells of the saved backend at the saved paths, then ``load_state_dict`` fills them with the
same int8 numbers (every backend: identical outputs after the round trip).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from spike_modules.layers import SpikeLinear
from spike_modules.linear import FLOAT_LINEARS, float_weight

from . import int8_backends
from .gptq import absmax_scale, check_group_size, gptq_int8
from .int8_backends import BackendUnavailableError

BACKENDS = ("own", "bnb", "torchao", "none")

__all__ = ["BACKENDS", "BackendUnavailableError", "Int8Linear", "find_linears", "prepare_int8_",
           "quantize_rows", "quantize_weights_"]


def quantize_rows(weight: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of ``weight`` ``[out, in]``, or per group of ``group_size`` input columns
    of each row: ``(q int8 [out, in], scale float32 [out])``, or ``scale [out, ceil(in / group_size)]``
    with groups (the last group may be narrower).

    ``scale = absmax / 127`` over the row (group) and ``q = round(w / scale)``, so
    ``|w - q * scale| <= scale / 2``. An all-zero row (group) gets ``scale = 1`` and ``q = 0``: it
    decodes to exactly 0. A group as wide as the row is the per-row case.
    """
    w = weight.detach().float()
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds NaN or inf; int8 cannot represent it")
    check_group_size(group_size)
    if not group_size or group_size >= w.shape[1]:
        scale = absmax_scale(w)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return q, scale
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


def _is_quantized(module: nn.Module) -> bool:
    if isinstance(module, Int8Linear):
        return True
    weight = getattr(module, "weight", None) if isinstance(module, nn.Linear) else None
    # bitsandbytes keeps an int8 Int8Params, torchao a tensor subclass
    return weight is not None and (weight.dtype == torch.int8 or type(weight) not in (nn.Parameter, torch.Tensor))


def _embedding_exclusions(model: nn.Module) -> tuple[set[int], set[int]]:
    """(ids of the output-embedding modules, ids of every embedding weight) to leave float."""
    heads, weights = set(), set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        emb = fn() if callable(fn) else None
        for m in (emb, emb.linear if isinstance(emb, SpikeLinear) else None):
            if m is None:
                continue
            if getter == "get_output_embeddings":
                heads.add(id(m))
            if isinstance(getattr(m, "weight", None), torch.Tensor):
                weights.add(id(m.weight))
    return heads, weights


def find_linears(model: nn.Module, paths: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The layers :func:`quantize_weights_` replaces, by qualified name.

    By default every ``nn.Linear``/``Conv1D`` except the output embedding and any layer sharing its
    weight with an embedding (a tied head). A given path may name a ``SpikeLinear``: its ``.linear``
    is taken.

    Raises:
        ValueError: 8-bit layers already present, a path that is missing or not a linear layer,
            or nothing to quantize.
    """
    quantized = [name for name, m in model.named_modules() if _is_quantized(m)]
    if quantized:
        raise ValueError(f"the model already has 8-bit layers ({quantized[0]}, ...); quantize the float model")
    if paths is None:
        head_modules, embedding_weights = _embedding_exclusions(model)
        found = {name: m for name, m in model.named_modules()
                 if isinstance(m, FLOAT_LINEARS) and id(m) not in head_modules
                 and id(m.weight) not in embedding_weights}
    else:
        found = {}
        for path in paths:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"no module at {path!r} in this model") from None
            if isinstance(module, SpikeLinear):
                path, module = f"{path}.linear", module.linear
            if not isinstance(module, FLOAT_LINEARS):
                raise ValueError(f"{path} is a {type(module).__name__}; 8-bit weights apply to nn.Linear, "
                                 "Conv1D or a SpikeLinear wrapping one")
            found[path] = module
    if not found:
        raise ValueError("no linear layers to quantize in this model")
    return found


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _as_linear(layer: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what ``layer`` computes (a ``Conv1D`` transposed), sharing the bias."""
    if isinstance(layer, nn.Linear):
        return layer
    weight = float_weight(layer)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=layer.weight.requires_grad)
    linear.bias = layer.bias
    return linear


def _nbytes(layer: nn.Module) -> int:
    return float_weight(layer).nbytes + (0 if layer.bias is None else layer.bias.nbytes)


def _relative_error(weight: torch.Tensor, decoded: torch.Tensor) -> float:
    w = weight.detach().float()
    err = float((w - decoded.to(w.device)).norm())
    return err / float(w.norm()) if err else 0.0


def quantize_weights_(model: nn.Module, backend: str = "own", paths: Iterable[str] | None = None,
                      progress: bool = True, group_size: int = 0, hessians: dict | None = None,
                      head: bool = False) -> dict:
    """Give the linear layers of ``model`` 8-bit weights, in place.

    Args:
        model: a plain Hugging Face model or one converted by STAC (``SpikeLinear.linear`` is replaced).
        backend: one of :data:`BACKENDS`; ``none`` changes nothing.
        paths: qualified names of the layers; default :func:`find_linears`.
        progress: show a rich progress bar.
        group_size: ``own`` only: 0 for one scale per output row, else input columns per scale.
        hessians: ``own`` only: ``{path: (X^T X, rows)}`` of each layer's calibration inputs
            (:func:`calibration.gptq.input_hessians`); given, the weights are rounded with GPTQ's
            error compensation instead of to nearest (same stored format).
        head: ``own`` only: also the output head (an ``Int8Linear``, inside its ``SpikeLinear`` if
            any) and the input embedding (an :class:`~calibration.int8_embedding.Int8Embedding`
            reading the head's int8 table when the two are tied, its own table otherwise); always one
            scale per row, rounded to nearest (see :mod:`calibration.int8_embedding` for why).

    Returns:
        ``{"backend", "group_size", "settings", "layers", "paths", "bytes_before", "bytes_after", "max_rel_error",
        "mean_rel_error", "int8_head"}``: bytes of the replaced layers' weights and biases (with ``head``,
        the head's and embedding's too, a tied table counted once); the relative error
        ``||W - decoded W|| / ||W||`` per layer, from what the backend actually stores; ``layers``,
        ``paths`` and the errors are of the block layers. ``int8_head``: None, or the paths, tying,
        errors and bytes of the head and embedding (:func:`calibration.int8_embedding.quantize_head_`).

    Raises:
        ValueError: unknown backend (lists them), or see :func:`find_linears`.
        BackendUnavailableError: ``bnb``/``torchao`` not installed or not running here (says how to
            install); nothing is changed then.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown 8-bit backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_group_size(group_size)
    if hessians is not None and backend != "own":
        raise ValueError(f"GPTQ rounding is built for the 'own' backend only, not {backend!r}")
    if group_size and backend != "own":
        raise ValueError(f"int8 groups (group size {group_size}) are built by the 'own' backend only; "
                         f"{backend!r} quantizes per output row: use --quant_backend own or group size 0")
    if head and backend not in ("own", "none"):
        raise ValueError(f"the int8 LM head and embedding are built by the 'own' backend only, not {backend!r}: "
                         "use --quant_backend own, or --no-int8_head (head=False) to keep them float")
    granularity = f"per group of {group_size} input columns of each output channel" if group_size \
        else "per output channel"
    rounding = "GPTQ (error-compensating, on calibration inputs)" if hessians is not None else "to nearest"
    settings = {"own": {"granularity": granularity, "symmetric": True, "rounding": rounding},
                "bnb": {"threshold": int8_backends.BNB_THRESHOLD, "has_fp16_weights": False},
                "torchao": {"config": "Int8WeightOnlyConfig(granularity=PerRow())"},
                "none": {}}[backend]
    summary = {"backend": backend, "group_size": group_size, "settings": settings, "layers": 0, "paths": [],
               "bytes_before": 0,
               "bytes_after": 0, "max_rel_error": 0.0, "mean_rel_error": 0.0, "int8_head": None}
    if backend == "none":
        return summary
    targets = find_linears(model, paths)
    head_plan = None
    if head:  # checked before anything is replaced
        from .int8_embedding import plan_head

        head_plan = plan_head(model)
        if head_plan[0] in targets:
            raise ValueError(f"{head_plan[0]!r} is the output head: head=True quantizes it; leave it out of paths")
    if backend != "own":
        int8_backends.require(backend, float_weight(next(iter(targets.values()))).device)
    originals = {path: float_weight(m).detach() for path, m in targets.items()}
    for path, w in originals.items():  # refuse before anything is replaced
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"layer {path!r}: its weight holds {int((~torch.isfinite(w)).sum())} NaN/inf value(s); "
                             "8-bit weights cannot represent them. Check the source checkpoint")
    summary["bytes_before"] = sum(_nbytes(m) for m in targets.values())
    errors = []
    with torch.no_grad(), Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"int8 weights ({backend})", total=len(targets))
        if backend == "torchao":
            for path, layer in targets.items():
                _set(model, path, _as_linear(layer))
            int8_backends.torchao_quantize_(model, list(targets))
        for path, layer in targets.items():
            if backend == "own":
                new = Int8Linear.from_linear(layer, group_size)
                if hessians is not None:
                    q, scale = gptq_int8(float_weight(layer), hessians[path][0].to(new.weight_int8.device),
                                         new.group_size)
                    new.weight_int8.copy_(q)
                    new.scale.copy_(scale)
                _set(model, path, new)
                decoded, stored = new.dequantize(), sum(t.nbytes for t in new.state_dict().values())
            elif backend == "bnb":
                new = int8_backends.bnb_linear(float_weight(layer), layer.bias)
                _set(model, path, new)
                decoded, stored = int8_backends.bnb_dequantize(new), int8_backends.stored_bytes("bnb", new)
            else:
                new = model.get_submodule(path)
                decoded = int8_backends.torchao_dequantize(new)
                stored = int8_backends.stored_bytes("torchao", new)
            new.train(layer.training)  # a new module starts in training mode; bitsandbytes computes differently there
            errors.append(_relative_error(originals.pop(path), decoded))
            summary["bytes_after"] += stored
            bar.advance(task)
    summary.update(layers=len(targets), paths=list(targets), max_rel_error=max(errors),
                   mean_rel_error=sum(errors) / len(errors))
    if head_plan is not None:
        from .int8_embedding import quantize_head_

        summary["int8_head"] = quantize_head_(model, head_plan)
        summary["bytes_before"] += summary["int8_head"]["bytes_before"]
        summary["bytes_after"] += summary["int8_head"]["bytes_after"]
    return summary


def prepare_int8_(model: nn.Module, quantized_paths: Iterable[str], backend: str = "own",
                  group_size: int = 0) -> nn.Module:
    """Put empty 8-bit layers of ``backend`` at ``quantized_paths`` (the ``paths`` of a
    :func:`quantize_weights_` summary) so ``model.load_state_dict`` can load a saved 8-bit model
    into the float architecture. ``group_size``: the summary's (0 for one scale per row, the only
    kind saved before groups existed).

    Raises:
        ValueError: an unknown backend, or a path that is missing or not a linear layer (see
            :func:`find_linears`).
        BackendUnavailableError: ``bnb``/``torchao`` not installed or not running here.
    """
    if backend not in BACKENDS or backend == "none":
        raise ValueError(f"no 8-bit layers of backend {backend!r}; choose one of "
                         f"{', '.join(b for b in BACKENDS if b != 'none')}")
    quantized_paths = list(quantized_paths)
    if not quantized_paths:
        return model
    targets = find_linears(model, quantized_paths)
    if backend != "own":
        int8_backends.require(backend, float_weight(next(iter(targets.values()))).device)
    with torch.no_grad():
        for path, layer in targets.items():
            if backend == "own":
                shell = Int8Linear.shell_like(layer, group_size)
            elif backend == "bnb":  # any weight will do: loading replaces the int8 numbers and scales
                shell = int8_backends.bnb_linear(torch.zeros_like(float_weight(layer)), layer.bias)
            else:
                shell = _as_linear(layer)
            _set(model, path, shell.train(layer.training))
        if backend == "torchao":  # quantizes the float weights there; loading replaces them
            int8_backends.torchao_quantize_(model, list(targets))
    return model
