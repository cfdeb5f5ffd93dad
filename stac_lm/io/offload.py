"""A converted model larger than memory: its decoder layers' weights on disk, loaded for each forward, and
written to (and read from) sharded safetensors one piece at a time.

Offloading is accelerate's: :func:`offload_layer_` writes a layer's weights with ``offload_state_dict``
and gives every module that holds them an ``AlignDevicesHook`` (``offload=True``) that loads them for
that module's forward and drops them after. The spiking sites keep their (small) parameters in memory:
calibration and dead zones write into them, reports read them.

:func:`module_state` yields a model's tensors module by module, loading the offloaded ones as it
goes, so :func:`write_shards` never holds more than one shard; :func:`read_shards` fills an empty
(meta) model from the shards with ``load_state_dict(assign=True)``, so loading never holds the
model twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.utils import OffloadedWeightsLoader, align_module_device, has_offloaded_params, offload_state_dict
from accelerate.utils.offload import PrefixedDataset
from safetensors.torch import load_file, save_file
from torch import nn

from spike_modules.site import DAQCFSSite

SHARD_BYTES = 2 ** 30  # at most this many bytes of tensors per weights file


def own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A module's own parameters and persistent buffers (not its children's): what its state dict holds."""
    skip = module._non_persistent_buffers_set
    return [*module.named_parameters(recurse=False),
            *((n, b) for n, b in module.named_buffers(recurse=False) if n not in skip)]


def _heavy_modules(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of ``layer`` that hold tensors, sites and their neurons left out."""
    sites = [p for p, m in layer.named_modules() if isinstance(m, DAQCFSSite)]
    return [(p, m) for p, m in layer.named_modules()
            if own_tensors(m) and not any(p == s or p.startswith(s + ".") for s in sites)]


def offload_layer_(layer: nn.Module, folder: str | Path, prefix: str, device: torch.device) -> int:
    """Write ``layer``'s weights (all but its sites') under ``prefix`` into ``folder`` and leave them
    there: each module holding them loads them onto ``device`` for its forward. Returns the bytes written."""
    owners = _heavy_modules(layer)
    tensors = {f"{prefix}.{p}.{n}" if p else f"{prefix}.{n}": t.detach() for p, m in owners for n, t in own_tensors(m)}
    offload_state_dict(str(folder), tensors)
    loader = OffloadedWeightsLoader(save_folder=str(folder))
    for path, module in owners:
        weights = PrefixedDataset(loader, f"{prefix}.{path}." if path else f"{prefix}.")
        add_hook_to_module(module, AlignDevicesHook(execution_device=device, offload=True, weights_map=weights,
                                                    offload_buffers=True))
    return sum(t.nbytes for t in tensors.values())


def is_offloaded(model: nn.Module) -> bool:
    """Whether any module of ``model`` keeps its weights off the device (accelerate's offload)."""
    return any(has_offloaded_params(m) for m in model.modules())


def module_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s state dict as ``(name, tensor)`` pairs, module by module, offloaded tensors loaded
    for the time their module is visited; a resident tensor reachable under several names (tied
    weights) comes once. Offloaded tensors are loaded fresh for each module, never shared."""
    seen: set[int] = set()  # ids of resident tensors only: they stay alive, so their ids stay theirs
    for path, module in model.named_modules():
        offloaded = has_offloaded_params(module)
        with align_module_device(module):
            for name, t in own_tensors(module):
                if not offloaded:
                    if id(t) in seen:
                        continue
                    seen.add(id(t))
                yield (f"{path}.{name}" if path else name), t.detach()


def shard_names(stem: str, n: int) -> list[str]:
    """Hugging Face's shard names: ``stem-00001-of-00003.safetensors``, ..."""
    return [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], directory: Path, filename: str,
                 max_bytes: int | None = None) -> list[str]:
    """Write ``tensors`` as ``filename`` (one file) or as shards of at most ``max_bytes`` (default
    :data:`SHARD_BYTES`) with ``filename``'s ``.index.json`` (Hugging Face's layout). Returns the files written."""
    max_bytes = max_bytes or SHARD_BYTES
    stem = filename.removesuffix(".safetensors")
    parts, part, size, total, where = [], {}, 0, 0, {}
    for name, t in tensors:
        if part and size + t.nbytes > max_bytes:
            parts.append(_flush(part, directory, len(parts)))
            part, size = {}, 0
        part[name] = t.contiguous().cpu()
        size += t.nbytes
        total += t.nbytes
    parts.append(_flush(part, directory, len(parts)))
    if len(parts) == 1:
        (directory / parts[0][0]).rename(directory / filename)
        return [filename]
    names = shard_names(stem, len(parts))
    for (tmp, keys), final in zip(parts, names):
        (directory / tmp).rename(directory / final)
        where.update((k, final) for k in keys)
    index = directory / f"{filename}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": where}, indent=1, sort_keys=True))
    return [*names, index.name]


def _flush(part: dict, directory: Path, i: int) -> tuple[str, list[str]]:
    name = f".part-{i:05d}.safetensors"
    save_file(part, str(directory / name), metadata={"format": "pt"})
    return name, list(part)


def weight_files(directory: Path, filename: str) -> list[Path] | None:
    """The shards of ``filename`` in ``directory`` by its index, in order; None where there is no index."""
    index = directory / f"{filename}.index.json"
    if not index.is_file():
        return None
    weight_map = json.loads(index.read_text())["weight_map"]
    return [directory / f for f in sorted(set(weight_map.values()))]


def read_shards(model: nn.Module, files: list[Path]) -> list[str]:
    """Fill ``model`` (empty or not) from ``files`` one file at a time (``assign``: no second copy); a
    tensor the model holds under several names (tied weights, written once) is given to all of them.
    Returns the names of the model's state that no file gave; ``ValueError`` on a name the model lacks."""
    groups: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(t), []).append(name)
    expected = set(model.state_dict())
    loaded: set[str] = set()
    for f in files:
        part = load_file(str(f))
        unexpected = sorted(set(part) - expected)
        if unexpected:
            raise ValueError(f"{f.name} holds {len(unexpected)} tensor(s) the model does not have ({unexpected[0]}, ...)")
        model.load_state_dict(part, strict=False, assign=True)
        loaded.update(part)
        del part
    for names in groups.values():  # tie again what assign untied
        given = [n for n in names if n in loaded]
        for name in (n for n in names if n not in loaded) if given else ():
            parent, _, attr = name.rpartition(".")
            src_parent, _, src_attr = given[0].rpartition(".")
            setattr(model.get_submodule(parent), attr, getattr(model.get_submodule(src_parent), src_attr))
            loaded.add(name)
    return sorted(expected - loaded)
