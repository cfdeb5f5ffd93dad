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
from rich.progress import Progress
from torch import nn

from spike_modules.layers import SpikeLinear
from spike_modules.linear import FLOAT_LINEARS, float_weight

from . import int8_backends
from .gptq import check_group_size, gptq_int8
from .int8_backends import BackendUnavailableError
from .int8_linear import Int8Linear, expand_scale, keep_float_weights, quantize_rows  # noqa: F401  (public here too)

BACKENDS = ("own", "bnb", "torchao", "none")

__all__ = ["BACKENDS", "BackendUnavailableError", "Int8Linear", "find_linears", "prepare_int8_",
           "quantize_rows", "quantize_weights_"]


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
