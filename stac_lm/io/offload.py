"""A converted model larger than memory: its decoder layers' weights on disk (or, on a GPU, in CPU memory),
loaded for each forward, and written to (and read from) sharded safetensors one piece at a time.

Offloading is accelerate's: :func:`offload_layer_` writes a layer's weights with ``offload_state_dict``
and gives every module that holds them an ``AlignDevicesHook`` (``offload=True``) that loads them for
that module's forward and drops them after. The spiking sites keep their (small) parameters in memory:
calibration and dead zones write into them, reports read them. A saved model loaded within a budget
(:func:`plan_layers`, :func:`load_budgeted_`) reads its layers on disk through :class:`ShardReader`,
and on a GPU keeps the next ones in CPU memory (accelerate's CPU offload).

:func:`module_state` yields a model's tensors module by module, loading the offloaded ones as it
goes, so :func:`write_shards` never holds more than one shard; :func:`read_shards` fills an empty
(meta) model from the shards with ``load_state_dict(assign=True)``, so loading never holds the
model twice.
"""

from __future__ import annotations

import json
import threading
import weakref
from pathlib import Path
from typing import Iterator

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.utils import OffloadedWeightsLoader, align_module_device, has_offloaded_params, offload_state_dict
from accelerate.utils.offload import PrefixedDataset
from safetensors import safe_open
from safetensors.torch import save_file
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
    tensors = {_join(prefix, p, n): t.detach() for p, m in owners for n, t in own_tensors(m)}
    offload_state_dict(str(folder), tensors)
    hook_offloaded_(owners, OffloadedWeightsLoader(save_folder=str(folder)), prefix, device)
    return sum(t.nbytes for t in tensors.values())


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def hook_offloaded_(owners: list[tuple[str, nn.Module]], weights, prefix: str, device: torch.device) -> None:
    """Each module of ``owners`` keeps its tensors in ``weights`` (under ``prefix.path.``) and loads them
    onto ``device`` for its forward alone (accelerate's ``AlignDevicesHook``, ``offload=True``)."""
    for path, module in owners:
        add_hook_to_module(module, AlignDevicesHook(execution_device=device, offload=True, offload_buffers=True,
                                                    weights_map=PrefixedDataset(weights, _join(prefix, path) + ".")))


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


def safetensors_index(files: list[Path], dtype: str | None = None) -> dict[str, dict]:
    """``{tensor name: where it is}`` over ``files``, as accelerate's ``OffloadedWeightsLoader`` reads an
    index (each tensor read from its file when asked, cast to ``dtype`` if given), with where its bytes
    lie in the file for :class:`ShardReader` (``span``: byte offsets; ``stored``: the file's dtype; ``shape``)."""
    index = {}
    for f in files:
        for k, (span, stored, shape) in _header(Path(f)).items():
            index[k] = {"safetensors_file": str(f), "weight_name": k, "span": span, "stored": stored, "shape": shape,
                        **({"dtype": dtype} if dtype else {})}
    return index


STORED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


def _header(path: Path) -> dict[str, tuple[tuple[int, int], str, list[int]]]:
    """``{name: ((first byte, end byte) in the file, dtype, shape)}`` from a safetensors file's header (an
    8-byte little-endian length, then that much JSON; data offsets count from the header's end).

    Raises:
        ValueError: a file that is not safetensors."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(f.read(size)) if 0 < size < 1 << 30 else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is unreadable)")
    base = 8 + size
    return {k: ((base + v["data_offsets"][0], base + v["data_offsets"][1]), v["dtype"], list(v["shape"]))
            for k, v in header.items() if k != "__metadata__"}


class ShardReader(OffloadedWeightsLoader):
    """accelerate's ``OffloadedWeightsLoader`` over a :func:`safetensors_index`, each tensor read with one
    positioned read from its file, opened once. accelerate's own opens the file (a memory map, its
    header parsed) for every tensor it reads, which made a decoder layer on disk cost tens of times the
    reading of its bytes; a memory map kept open instead would count every page read as the process's
    resident memory, so a budget's peak would grow with the weights read."""

    def __init__(self, index: dict):
        super().__init__(index=index)
        self._files: dict[str, object] = {}
        self._lock = threading.Lock()  # one position per open file: a seek and its read go together
        weakref.finalize(self, _close_all, self._files)

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self.index[key]
        if "span" not in info:
            return super().__getitem__(key)
        path, (start, end) = info["safetensors_file"], info["span"]
        raw = torch.empty(end - start, dtype=torch.uint8)
        with self._lock:
            f = self._files.get(path)
            if f is None:
                f = self._files[path] = open(path, "rb")
            f.seek(start)
            got = f.readinto(raw.numpy())
        if got != end - start:
            raise OSError(f"{path}: {key} ends past the end of the file (changed since it was indexed?)")
        tensor = raw.view(STORED_DTYPES[info["stored"]]).reshape(info["shape"])
        return tensor.to(getattr(torch, info["dtype"])) if "dtype" in info else tensor


def _close_all(files: dict[str, object]) -> None:
    for f in files.values():
        f.close()
    files.clear()


def read_shards(model: nn.Module, files: list[Path], leave: set[str] = frozenset()) -> list[str]:
    """Fill ``model`` (empty or not) from ``files`` one file at a time (``assign``: no second copy); a
    tensor the model holds under several names (tied weights, written once) is given to all of them.
    Names in ``leave`` are not read (they stay where they are). Returns the names of the model's state
    that no file gave; ``ValueError`` on a name the model lacks."""
    groups: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(t), []).append(name)
    expected = set(model.state_dict())
    loaded: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            names = [k for k in handle.keys() if k not in leave]
            unexpected = sorted(set(names) - expected)
            if unexpected:
                raise ValueError(f"{f.name} holds {len(unexpected)} tensor(s) the model does not have "
                                 f"({unexpected[0]}, ...)")
            part = {k: handle.get_tensor(k) for k in names}
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
    return sorted(expected - loaded - set(leave))


def budget_device(max_memory: dict[str, str], device: str | torch.device = "cpu") -> torch.device:
    """The device a model loaded within ``max_memory`` computes on: the GPU the budget names
    (``{"0": SIZE, ...}``; ``device`` must be CUDA then), else the CPU (``device`` must be the CPU);
    ``device`` ``auto`` follows the budget.

    Raises:
        ValueError: several GPUs in one budget, or a ``device`` the budget does not name.
    """
    gpus = sorted(k for k in max_memory if k != "cpu")
    device = torch.device(("cuda" if gpus else "cpu") if str(device) == "auto" else device)
    if len(gpus) > 1:
        raise ValueError(f"max_memory {max_memory}: a model loaded within a budget computes on one GPU; name one "
                         f"CUDA index (e.g. 0=20GiB,cpu=6GiB), not {len(gpus)}")
    if not gpus:
        if device.type != "cpu":
            raise ValueError(f"max_memory {max_memory} names no GPU, so the model loads on the CPU with layers on "
                             f"disk; got device {device}: name the GPU in the budget (e.g. 0=20GiB,cpu=6GiB) or use the CPU")
        return torch.device("cpu")
    want = torch.device("cuda", int(gpus[0]))
    if device.type != "cuda" or (device.index is not None and device.index != want.index):
        raise ValueError(f"max_memory {max_memory} puts the model on GPU {want.index}; got device {device}: "
                         f"use --device {want} (or a budget of cpu=SIZE alone for the CPU)")
    return want


def plan_layers(model: nn.Module, max_memory: dict[str, str], layers: tuple[str, nn.ModuleList]) -> list[str]:
    """Where each decoder layer of the empty ``model`` keeps its weights under ``max_memory`` (for the
    weights): a CUDA index (``"0"``), ``"cpu"`` or ``"disk"``. The model computes on the budget's GPU
    if it names one (:func:`budget_device`), else on the CPU.

    The embeddings, head, norms and sites stay on that device with room to load the largest layer
    (unless every layer fits there too); the first layers that fit beside them stay on it. With a
    GPU, the next layers that fit ``cpu=SIZE`` keep their weights in CPU memory, loaded onto the GPU
    for each forward; the rest read from disk for each forward. Activations and the KV cache come on top.

    Raises:
        ValueError: several GPUs, or a budget too small for what must stay on the device.
    """
    from stac_lm.convert.options import memory_bytes

    gpu = budget_device(max_memory, "auto")
    where = "cpu" if gpu.type == "cpu" else str(gpu.index)
    budget = memory_bytes(max_memory[where])
    resident, heavy = layer_bytes(model, layers[1])
    if resident + sum(heavy) <= budget:
        return [where] * len(heavy)
    if resident + max(heavy) > budget:
        raise ValueError(f"max_memory {where}={max_memory[where]} does not hold the embeddings, head, norms and sites "
                         f"({_size(resident)}) with room for one layer ({_size(max(heavy))}); give at least "
                         f"{_size(resident + max(heavy))}")
    placed = _first_fitting(heavy, budget - resident - max(heavy), where)
    if where != "cpu" and "cpu" in max_memory:  # in CPU memory, loaded onto the GPU for each forward
        placed += _first_fitting(heavy[len(placed):], memory_bytes(max_memory["cpu"]), "cpu")
    return placed + ["disk"] * (len(heavy) - len(placed))


def layer_bytes(model: nn.Module, layers: nn.ModuleList) -> tuple[int, list[int]]:
    """``(bytes of everything outside the decoder layers' weights, bytes of each layer's weights)``; the
    sites' parameters count with the first, as they stay on the device whatever the budget."""
    heavy = [sum(t.nbytes for _, m in _heavy_modules(layer) for _, t in own_tensors(m)) for layer in layers]
    total = sum(t.nbytes for _, t in [*model.named_parameters(), *model.named_buffers()])
    return total - sum(heavy), heavy


def _first_fitting(sizes: list[int], room: int, where: str) -> list[str]:
    kept = 0
    while kept < len(sizes) and sizes[kept] <= room:
        room -= sizes[kept]
        kept += 1
    return [where] * kept


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


def load_budgeted_(model: nn.Module, files: list[Path], layers: tuple[str, nn.ModuleList], placement: list[str],
                   device: torch.device) -> list[str]:
    """Fill the empty ``model`` from ``files`` as ``placement`` says (:func:`plan_layers`), to compute on
    ``device``: the weights of the decoder layers on ``"disk"`` (all but their sites') stay in the
    files, read for each forward (accelerate's hooks, as :func:`offload_layer_`); on a GPU, those of
    the layers on ``"cpu"`` stay in CPU memory, loaded onto it for each forward (accelerate's CPU
    offload); everything else is read and sits on ``device``. Returns the names no file gave."""
    path, modules = layers
    on_disk = [i for i, where in enumerate(placement) if where == "disk"]
    owners = {i: _heavy_modules(modules[i]) for i in on_disk}
    leave = {_join(path, str(i), p, n) for i, mods in owners.items() for p, m in mods for n, _ in own_tensors(m)}
    missing = read_shards(model, files, leave)
    index = {k: v for k, v in safetensors_index(files).items() if k in leave}
    absent = sorted(leave - set(index))
    if absent:
        return missing + absent
    weights = ShardReader(index)
    for i, mods in owners.items():
        hook_offloaded_(mods, weights, _join(path, str(i)), device)
    if device.type != "cpu":
        for i in (i for i, where in enumerate(placement) if where == "cpu"):
            hook_in_memory_(modules[i], device)
        resident_to_(model, device)
    return missing


def hook_in_memory_(layer: nn.Module, device: torch.device) -> None:
    """``layer``'s weights (all but its sites') stay where they are (CPU memory) and load onto ``device``
    for each forward of the module holding them (accelerate's ``AlignDevicesHook``, ``offload=True``)."""
    for _, module in _heavy_modules(layer):
        add_hook_to_module(module, AlignDevicesHook(execution_device=device, offload=True, offload_buffers=True))


def resident_to_(model: nn.Module, device: torch.device) -> None:
    """Move every tensor of ``model`` that is not offloaded (on the meta device) to ``device``; a tensor
    held under several names (tied weights) stays one tensor."""
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in list(table.items()):
                if t is None or t.device.type == "meta" or t.device == device:
                    continue
                if id(t) not in moved:
                    value = t.data.to(device)
                    moved[id(t)] = nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                        else value
                table[name] = moved[id(t)]
