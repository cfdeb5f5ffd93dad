"""8-bit weights for full conversion mode: :class:`Int8Linear` and :func:`quantize_weights_`.

Every linear layer inside the blocks (``nn.Linear`` or GPT-2's ``Conv1D``, bare or inside a
:class:`~spike_modules.layers.SpikeLinear`) gets int8 weights; the embeddings and the (tied)
output head stay float. Backends: ``own`` (:class:`Int8Linear`, per-output-channel symmetric,
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
from transformers.pytorch_utils import Conv1D

from spike_modules.layers import SpikeLinear

from . import int8_backends
from .int8_backends import BackendUnavailableError

BACKENDS = ("own", "bnb", "torchao", "none")

__all__ = ["BACKENDS", "BackendUnavailableError", "Int8Linear", "find_linears", "prepare_int8_",
           "quantize_rows", "quantize_weights_"]


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of ``weight`` ``[out, in]``: ``(q int8 [out, in], scale float32 [out])``.

    ``scale = absmax / 127`` and ``q = round(w / scale)``, so ``|w - q * scale| <= scale / 2``.
    An all-zero row gets ``scale = 1`` (positive) and ``q = 0``: it decodes to exactly 0.
    """
    w = weight.detach().float()
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds NaN or inf; int8 cannot represent it")
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def float_weight(linear: nn.Module) -> torch.Tensor:
    """The weight of ``linear`` as ``[out, in]``. GPT-2's ``Conv1D`` computes ``x @ W + b`` with
    ``W`` stored ``[in, out]``, so it is transposed here, once, explicitly."""
    if isinstance(linear, Conv1D):
        return linear.weight.T
    if isinstance(linear, nn.Linear):
        return linear.weight
    raise TypeError(f"not a supported linear layer: {type(linear).__name__} (supported: nn.Linear, Conv1D)")


class Int8Linear(nn.Module):
    """``y = x @ (weight_int8 * scale[:, None]).T + bias`` with int8 weights per output channel.

    Buffers ``weight_int8`` (int8 ``[out, in]``) and ``scale`` (float32 ``[out]``) are saved in the
    state dict; ``bias`` is the source layer's parameter, not a copy. No float weight is kept: each
    forward converts the int8 weight to ``x``'s dtype (a temporary the size of one float weight),
    multiplies and scales the output columns, ``(x @ q.T) * scale``, which equals the formula
    above and is as fast as a float layer at 256 tokens. In float16 the unscaled product can pass
    65504, so there the weight is dequantized first. ``model.to(dtype)`` casts ``scale`` as well.

    Args:
        in_features, out_features: widths (``Int8Linear.from_linear`` fills everything).
        bias: whether the layer has a bias (zeros until loaded).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Module) -> Int8Linear:
        """Quantize an ``nn.Linear`` or ``Conv1D`` (on its device) into a new ``Int8Linear``."""
        weight = float_weight(linear)
        layer = cls(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
        q, scale = quantize_rows(weight)
        layer.weight_int8.copy_(q)
        layer.scale.copy_(scale)
        layer.bias = linear.bias
        return layer

    @classmethod
    def shell_like(cls, linear: nn.Module) -> Int8Linear:
        """An empty ``Int8Linear`` with ``linear``'s widths, bias, device and bias dtype, to load into."""
        weight = float_weight(linear)
        return cls(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device=weight.device,
                   dtype=weight.dtype)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``[out, in]`` this layer computes with."""
        return self.weight_int8.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16:
            return F.linear(x, self.dequantize().to(x.dtype), self.bias)
        cached = self.__dict__.get("_float_weight")
        w = cached if cached is not None and cached.dtype == x.dtype else self.weight_int8.to(x.dtype)
        y = F.linear(x, w)
        scale = self.scale.to(x.dtype)
        return y * scale if self.bias is None else torch.addcmul(self.bias, y, scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def keep_float_weights(model: nn.Module, keep: bool = True, dtype: torch.dtype = torch.float32) -> int:
    """``keep=True``: every :class:`Int8Linear` of ``model`` computes with a kept ``dtype`` copy of
    its int8 weight instead of converting it on every call. Same values, so the same outputs bit
    for bit, without the conversion that dominates one-token decoding; the price is memory (the
    copies take as much as float weights). Weights changed later are not seen until called again.
    ``keep=False`` drops the copies. Returns the bytes the copies now take."""
    total = 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            if keep:
                m.__dict__["_float_weight"] = m.weight_int8.to(dtype)
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
                 if isinstance(m, (nn.Linear, Conv1D)) and id(m) not in head_modules
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
            if not isinstance(module, (nn.Linear, Conv1D)):
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
                      progress: bool = True) -> dict:
    """Give the linear layers of ``model`` 8-bit weights, in place.

    Args:
        model: a plain Hugging Face model or one converted by STAC (``SpikeLinear.linear`` is replaced).
        backend: one of :data:`BACKENDS`; ``none`` changes nothing.
        paths: qualified names of the layers; default :func:`find_linears`.
        progress: show a rich progress bar.

    Returns:
        ``{"backend", "settings", "layers", "paths", "bytes_before", "bytes_after", "max_rel_error",
        "mean_rel_error"}``: bytes of the replaced layers' weights and biases; the relative error
        ``||W - decoded W|| / ||W||`` per layer, from what the backend actually stores.

    Raises:
        ValueError: unknown backend (lists them), or see :func:`find_linears`.
        BackendUnavailableError: ``bnb``/``torchao`` not installed or not running here (says how to
            install); nothing is changed then.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown 8-bit backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    settings = {"own": {"granularity": "per output channel", "symmetric": True},
                "bnb": {"threshold": int8_backends.BNB_THRESHOLD, "has_fp16_weights": False},
                "torchao": {"config": "Int8WeightOnlyConfig(granularity=PerRow())"},
                "none": {}}[backend]
    summary = {"backend": backend, "settings": settings, "layers": 0, "paths": [], "bytes_before": 0,
               "bytes_after": 0, "max_rel_error": 0.0, "mean_rel_error": 0.0}
    if backend == "none":
        return summary
    targets = find_linears(model, paths)
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
                new = Int8Linear.from_linear(layer)
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
    return summary


def prepare_int8_(model: nn.Module, quantized_paths: Iterable[str], backend: str = "own") -> nn.Module:
    """Put empty 8-bit layers of ``backend`` at ``quantized_paths`` (the ``paths`` of a
    :func:`quantize_weights_` summary) so ``model.load_state_dict`` can load a saved 8-bit model
    into the float architecture.

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
                shell = Int8Linear.shell_like(layer)
            elif backend == "bnb":  # any weight will do: loading replaces the int8 numbers and scales
                shell = int8_backends.bnb_linear(torch.zeros_like(float_weight(layer)), layer.bias)
            else:
                shell = _as_linear(layer)
            _set(model, path, shell.train(layer.training))
        if backend == "torchao":  # quantizes the float weights there; loading replaces them
            int8_backends.torchao_quantize_(model, list(targets))
    return model
