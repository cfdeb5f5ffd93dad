"""Layer-by-layer conversion: the 8-bit rounding and the calibration of one decoder layer at a time.

The whole-model path (:func:`stac_lm.convert.pipeline.run`) holds the float model, its converted
copy and every site's statistics at once. Here the source model stays where accelerate put it
(:func:`offloaded_source`, or transformers' disk offload: every module's weights on disk, loaded for
its own forward), and
the converted model is built as an empty skeleton (``init_empty_weights``) whose layers are filled
one after another, the way GPTQ and llm-compressor's sequential pipeline calibrate:

1. the input embedding and the output head get their weights (int8 when asked), so the layers'
   calibration inputs come from the same embedding as in the whole-model path;
2. every calibration batch runs up to the first decoder layer; what each layer is called with
   (positions, masks) is captured once (:func:`capture_layer_inputs`, transformers' own forward);
3. per decoder layer: its float weights are loaded from the source, GPTQ's input statistics
   are taken on the float model's inputs (``int8_rounding='gptq'``), the layer's linears get int8
   weights, its sites are observed on the 8-bit network's inputs and fitted, and the batches go
   through it to the next layer; the float weights leave memory with the layer, and with an
   ``offload_folder`` the converted layer's weights go to disk too (its sites stay);
4. a site at the output head is observed through the model's own tail (final norm, head).

Each step is the whole-model path's own function (``quantize_weights_``, ``observe_sites``,
``fit_calibration``, ``input_hessians``) applied to one layer, on the same inputs in the same
order, so the thresholds and weights are the whole-model path's (tested bit for bit).
"""

from __future__ import annotations

import copy
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import align_module_device, has_offloaded_params
from rich.progress import Progress
from torch import nn

from calibration import Calibration, CalibrationConfig
from calibration.calibrate import fit_calibration, observe_sites
from calibration.checkpointing import layers_replaced
from calibration.gptq import input_hessians
from calibration.int8 import find_linears, quantize_weights_
from calibration.int8_embedding import plan_head, quantize_head_
from spike_modules.conversion import ConversionConfig, convert_
from spike_modules.site import iter_sites
from stac_lm.io.offload import ShardReader, hook_offloaded_, offload_layer_, own_tensors, resident_to_, safetensors_index


class _Stop(Exception):
    """Raised by the last layer's catcher: the rest of the forward is not needed."""


def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    names = set(getattr(model, "_no_split_modules", None) or ())
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in names:
            return path, module
    return None


def layer_list(model: nn.Module) -> nn.ModuleList | None:
    """The model's decoder layers (see :func:`decoder_layers`), or None where it has no such list."""
    found = _find_layers(model)
    return found[1] if found else None


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)``: the model's list of decoder layers (of its ``_no_split_modules`` class).

    Raises:
        ValueError: no such list (the model cannot be converted layer by layer).
    """
    found = _find_layers(model)
    if found:
        return found
    names = set(getattr(model, "_no_split_modules", None) or ())
    raise ValueError(f"{type(model).__name__}: no list of decoder layers ({', '.join(sorted(names)) or 'none named'}) "
                     "found; this model cannot be converted layer by layer: leave out --layerwise")


@dataclass
class LayerCall:
    """One batch at one decoder layer: the hidden states and the rest of the call, as transformers made it."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records its call and passes the hidden states on unchanged."""

    def __init__(self, calls: list, last: bool):
        super().__init__()
        self.calls, self.last = calls, last

    def forward(self, hidden, *args, **kwargs):
        self.calls.append(LayerCall(hidden, args, kwargs))
        if self.last:
            raise _Stop
        return hidden


class _Replay(nn.Module):
    """Stands in for a decoder layer: the last one returns the given final hidden states."""

    def __init__(self, final: list | None):
        super().__init__()
        self.final = final

    def forward(self, hidden, *args, **kwargs):
        return self.final.pop(0) if self.final is not None else hidden


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[list[LayerCall]]:
    """``calls[layer][batch]``: what every decoder layer is called with for each batch (the first
    layer's hidden states are the embedding's output; later layers' are filled as layers run)."""
    _, layers = decoder_layers(model)
    n = len(layers)
    calls: list[list[LayerCall]] = [[] for _ in range(n)]
    with layers_replaced(layers, lambda i, _: _Catcher(calls[i], i == n - 1)):
        for batch in batches:
            try:
                model(batch, use_cache=False)
            except _Stop:
                pass
    return calls


class _Bound(nn.Module):
    """A decoder layer called as transformers calls it, on a :class:`LayerCall`."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, call: LayerCall) -> torch.Tensor:
        out = self.layer(call.hidden, *call.args, **call.kwargs)
        if not isinstance(out, torch.Tensor) or out.shape != call.hidden.shape:
            raise ValueError(f"{type(self.layer).__name__} returned {type(out).__name__}, not its hidden states; "
                             "this model cannot be converted layer by layer: leave out --layerwise")
        return out


def _advance(layer: nn.Module, calls: list[LayerCall], following: list[LayerCall]) -> list[LayerCall]:
    """Run ``calls`` through ``layer``; the outputs become the hidden states of ``following`` (the next
    layer's captured calls)."""
    bound = _Bound(layer)
    return [replace(nxt, hidden=bound(c)) for nxt, c in zip(following, calls)]


def module_tensors(module: nn.Module, skip: str | None = None) -> dict[str, torch.Tensor]:
    """A copy of every parameter and persistent buffer of ``module`` by name (those under ``skip`` left
    out), each submodule's loaded from wherever accelerate keeps it."""
    out = {}
    for prefix, sub in module.named_modules():
        if skip is not None and _within(prefix, skip):
            continue
        fresh = has_offloaded_params(sub)  # loaded for this read: nobody else holds them, no copy needed
        with align_module_device(sub):
            out.update((f"{prefix}.{name}" if prefix else name, t.detach() if fresh else t.detach().clone())
                       for name, t in own_tensors(sub))
    return out


def fill_(target: nn.Module, values: dict[str, torch.Tensor], names: dict[str, str], device: torch.device) -> None:
    """Give ``target``'s empty (meta) tensors named in ``names`` (``{target's name: key of values}``)
    their value (taken over, not copied), in the dtype they were declared with; names sharing one tensor (tied
    weights) share one tensor again."""
    by_id: dict[int, list[str]] = {}
    for name, t in [*target.named_parameters(remove_duplicate=False), *target.named_buffers(remove_duplicate=False)]:
        if t.device.type == "meta" and name in names:
            by_id.setdefault(id(t), []).append(name)
    for group in by_id.values():
        key = names[group[0]]
        if key not in values:
            raise ValueError(f"the source model has no weight {key!r} for {group[0]!r} of the converted model")
        parent, _, attr = group[0].rpartition(".")
        owner = target.get_submodule(parent) if parent else target
        old = getattr(owner, attr)
        value = values[key].to(device=device, dtype=old.dtype)
        new = nn.Parameter(value, requires_grad=old.requires_grad) if attr in owner._parameters else value
        for name in group:
            parent, _, attr = name.rpartition(".")
            module = target.get_submodule(parent) if parent else target
            if isinstance(new, nn.Parameter):
                setattr(module, attr, new)
            else:
                module._buffers[attr] = new


def skeleton(config) -> nn.Module:
    """An empty (meta) float32 model of ``config``, as transformers builds it."""
    from transformers import AutoModelForCausalLM

    with init_empty_weights():  # a copy: the conversion changes the config (its attention implementation)
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32).eval()
    model.tie_weights()  # tied embeddings are one tensor, as in a loaded model
    return model


def offloaded_source(directory: str | Path, config, device: torch.device = torch.device("cpu")) -> nn.Module | None:
    """The float32 model whose safetensors are in ``directory``, empty in memory: each module reads its
    weights from the files (cast to float32) for its own forward, through accelerate's hooks over an
    index of the files, and computes on ``device``; nothing is read at load. None where the files' tensor names are not the
    model's own (older checkpoints that transformers renames on load): load those through
    transformers' disk offload instead.
    """
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    index = safetensors_index(files, dtype="float32")
    model = skeleton(config)
    groups: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(t), []).append(name)
    persistent = set(model.state_dict())
    for names in groups.values():
        names = [n for n in names if n in persistent]
        stored = next((n for n in names if n in index), None)
        if names and stored is None:
            return None
        index.update((n, index[stored]) for n in names)  # a tied weight is read under each of its names
    owners = [(p, m) for p, m in model.named_modules() if own_tensors(m)]
    hook_offloaded_(owners, ShardReader(index), "", device)
    resident_to_(model, device)  # what no file holds (buffers computed at build, such as rotary frequencies)
    model.hf_device_map = {"": "disk"}  # as transformers marks a model it offloaded
    return model


def converted_skeleton(ann: nn.Module, cfg: ConversionConfig) -> tuple[nn.Module, dict[str, str]]:
    """The converted structure of ``ann`` with empty weights, and ``{converted name: source name}``
    of every tensor (the conversion wraps the source's modules, so tensors keep their identity)."""
    model = skeleton(ann.config)
    source: dict[int, str] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        source.setdefault(id(t), name)
    model = convert_(model, cfg)
    names = {name: source[id(t)] for name, t in [*model.named_parameters(remove_duplicate=False),
                                                 *model.named_buffers(remove_duplicate=False)] if id(t) in source}
    return model, names


def _within(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def _outer_fill_(snn: nn.Module, ann: nn.Module, names: dict[str, str], device: torch.device) -> None:
    """Weights of everything but the decoder layers (embeddings, final norm, head)."""
    snn_layers, _ = decoder_layers(snn)
    fill_(snn, module_tensors(ann, skip=decoder_layers(ann)[0]),
          {k: v for k, v in names.items() if not _within(k, snn_layers)}, device)


def _layer_fill_(layer: nn.Module, ann_layer: nn.Module, names: dict[str, str], prefix: str, ann_prefix: str,
                 device: torch.device) -> None:
    """One decoder layer's weights from the source's layer (loaded from wherever accelerate keeps it)."""
    p, s = prefix + ".", ann_prefix + "."
    own = {k[len(p):]: v[len(s):] for k, v in names.items() if k.startswith(p) and v.startswith(s)}
    fill_(layer, module_tensors(ann_layer), own, device)


def _merge_quantization(parts: list[tuple[str, dict]], head: dict | None) -> dict:
    """One summary of the per-layer :func:`quantize_weights_` summaries, as the whole-model call gives."""
    first = parts[0][1]
    layers = sum(s["layers"] for _, s in parts)
    summary = {"backend": first["backend"], "group_size": first["group_size"], "settings": first["settings"],
               "layers": layers, "paths": [f"{p}.{q}" for p, s in parts for q in s["paths"]],
               "bytes_before": sum(s["bytes_before"] for _, s in parts),
               "bytes_after": sum(s["bytes_after"] for _, s in parts),
               "max_rel_error": max(s["max_rel_error"] for _, s in parts),
               "mean_rel_error": sum(s["mean_rel_error"] * s["layers"] for _, s in parts) / layers,
               "int8_head": head}
    if head is not None:
        summary["bytes_before"] += head["bytes_before"]
        summary["bytes_after"] += head["bytes_after"]
    return summary


def peak_memory(device: torch.device | None = None) -> dict:
    """The process's peak resident memory so far (and the peak CUDA allocation on a GPU), in bytes."""
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device is not None and device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


@torch.no_grad()
def convert_layerwise(ann: nn.Module, cfg: ConversionConfig, batches: list[torch.Tensor], ccfg: CalibrationConfig, *,
                      backend: str, rounding: str, group_size: int, int8_head: bool, device: torch.device,
                      model_id: str = "", offload_folder: str | None = None,
                      progress: bool = True) -> tuple[nn.Module, Calibration, dict | None, list]:
    """Convert, round to 8 bits and calibrate ``ann`` one decoder layer at a time.

    ``ann`` may live anywhere accelerate put it (disk, CPU, GPU): one layer's float weights are
    loaded at a time. With ``offload_folder``, each converted layer's weights are written there and
    leave memory too (:func:`stac_lm.io.offload.offload_layer_`; its sites stay). Returns ``(snn, calibration, quantization summary or None, seconds per layer)``;
    the sites are calibrated and left in ANN mode, as :func:`calibration.calibrate` leaves them.

    Raises:
        ValueError: a model without a decoder-layer list, a backend other than ``own``/``none``,
            or see the whole-model functions.
    """
    if backend not in ("own", "none"):
        raise ValueError(f"layer-by-layer conversion builds 8-bit weights with --quant_backend own only, not {backend!r}")
    snn, names = converted_skeleton(ann, cfg)
    ann_path, ann_layers = decoder_layers(ann)
    path, layers = decoder_layers(snn)
    _outer_fill_(snn, ann, names, device)
    resident_to_(snn, device)  # the sites' parameters and the buffers built with the skeleton
    float_calls = capture_layer_inputs(snn, batches) if backend == "own" and rounding == "gptq" else None
    head = quantize_head_(snn, plan_head(snn)) if backend == "own" and int8_head else None
    calls = capture_layer_inputs(snn, batches)  # the 8-bit network's inputs: after the int8 embedding
    n_samples = sum(int(b.shape[0]) for b in batches)
    ccfg = replace(ccfg, n_samples=n_samples)
    first, params, stats, parts, seconds = 0, {}, {}, [], []
    n = len(layers)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("layer by layer", total=n)
        for i, layer in enumerate(layers):
            start = time.perf_counter()
            prefix = f"{path}.{i}"
            _layer_fill_(layer, ann_layers[i], names, prefix, f"{ann_path}.{i}", device)
            if backend == "own":
                hessians = None
                if float_calls is not None:  # GPTQ: the float model's inputs, as the whole-model path takes them
                    hessians = input_hessians(_Bound(layer), find_linears(layer), float_calls[i])
                    if i + 1 < n:
                        float_calls[i + 1] = _advance(layer, float_calls[i], float_calls[i + 1])
                    float_calls[i] = []
                parts.append((prefix, quantize_weights_(layer, backend, progress=False, group_size=group_size,
                                                        hessians=hessians)))
            outs: list[torch.Tensor] = []  # the layer's outputs in ANN mode: the next layer's inputs
            observers, _ = observe_sites(_Bound(layer), calls[i], ccfg, progress=False, first_index=first,
                                         run_batch=lambda bound, call: outs.append(bound(call)))
            fitted = fit_calibration({f"{prefix}.{k[len('layer.'):]}": v for k, v in observers.items()}, ccfg)
            Calibration(ccfg, fitted.sites).apply_to(layer, prefix=prefix)
            params.update(fitted.sites)
            stats.update(fitted.stats)
            first += len(observers)
            if i + 1 < n:
                calls[i + 1] = [replace(c, hidden=o) for c, o in zip(calls[i + 1], outs)]
            calls[i] = []
            if offload_folder is not None:
                offload_layer_(layer, offload_folder, prefix, device)
            seconds.append(time.perf_counter() - start)
            bar.advance(task)
    if any(True for name, _ in iter_sites(snn) if name not in params):  # a site at the head, after the final norm
        final = outs
        with layers_replaced(layers, lambda i, _: _Replay(final if i == n - 1 else None)):
            observers, _ = observe_sites(snn, batches, ccfg, progress=False, first_index=first,
                                         run_batch=lambda model, batch: model(batch, use_cache=False))
        fitted = fit_calibration(observers, ccfg)
        params.update(fitted.sites)
        stats.update(fitted.stats)
    calibration = Calibration(ccfg, params, model_id=model_id, stats=stats)
    calibration.apply_to(snn)
    quantization = _merge_quantization(parts, head) if backend == "own" else None
    return snn, calibration, quantization, seconds
