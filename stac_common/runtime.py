"""What every STAC pipeline shares, the LM's and text classification's: the device a run asks for,
where a model goes on it, the machine a figure was measured on, and timed, logged steps."""

from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager, nullcontext
from importlib.metadata import version
from typing import Iterator

import torch
from rich.console import Console
from torch import nn


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present; ``cuda`` (or ``cuda:N``) asked without that GPU is a ``ValueError``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} was asked but this machine has no CUDA GPU that torch can use "
                             f"(torch {torch.__version__}); use --device cpu or auto")
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(device)


def place(model: nn.Module, device: torch.device, share: float = 0.4) -> nn.Module:
    """Move ``model`` to ``device``. On CUDA a model larger than ``share`` of the free GPU memory
    goes through accelerate's device placement (whole decoder layers per device, CPU offload)."""
    if device.type == "cpu":
        return model.to(device)
    need = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    free, _ = torch.cuda.mem_get_info(device)
    if need <= share * free:
        return model.to(device)
    from accelerate import dispatch_model, infer_auto_device_map

    budget = {device.index or 0: int(share * free), "cpu": int(64 * 2**30)}
    device_map = infer_auto_device_map(model, max_memory=budget,
                                       no_split_module_classes=getattr(model, "_no_split_modules", None))
    return dispatch_model(model, device_map=device_map)


def input_device(model: nn.Module) -> torch.device:
    """The device ``model`` takes its input ids on: where its input embedding computes.

    That is the accelerate hook's execution device when the embedding is dispatched or offloaded
    (its weight then sits on the meta device), else the device of the embedding's own table
    (``weight``, or ``weight_int8`` of an int8 embedding, read without decoding the table)."""
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    table = getattr(embedding, "weight_int8", None)
    return (table if table is not None else embedding.weight).device


def embedding_dtype(model: nn.Module) -> torch.dtype:
    """The float dtype the input embedding computes in (an int8 table's scale dtype)."""
    embedding = model.get_input_embeddings()
    scale = getattr(embedding, "scale", None)
    return scale.dtype if isinstance(scale, torch.Tensor) and getattr(embedding, "weight_int8", None) is not None \
        else embedding.weight.dtype


def map_large_allocations(threshold: int = 1 << 16) -> bool:
    """On glibc, serve blocks of ``threshold`` bytes and more by ``mmap``, so memory freed goes back to
    the system at once. glibc otherwise raises that threshold each time a large block is freed (up to
    32 MiB), and blocks below it (a layer's activations and dequantized weights) are then carved
    from its heap, which keeps freed space resident: a layer-by-layer conversion's peak resident memory
    grows with the passes instead of staying at one layer's. Returns whether it was set (False
    elsewhere than glibc)."""
    import ctypes
    import ctypes.util

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD


def machine_info(device: torch.device) -> dict:
    """The machine a figure was measured on: platform, CPUs and threads, device, library versions."""
    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "versions": {p: version(p) for p in ("torch", "transformers", "spikingjelly", "safetensors")}}
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    return info


class StepTimer:
    """Times named steps and logs each one to a rich console (stderr).

    ``spinner=True`` shows a rich status spinner for a step that has no progress bar of its
    own (rich allows one live display at a time, so never around a step that draws a bar).
    """

    def __init__(self, console: Console | None = None, progress: bool = True):
        self.console = console or Console(stderr=True)
        self.progress = progress
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, spinner: bool = False) -> Iterator[None]:
        self.console.print(f"[bold cyan]>[/] {name} ...")
        t0 = time.perf_counter()
        with self.console.status(name) if spinner and self.progress else nullcontext():
            yield
        dt = time.perf_counter() - t0
        self.seconds[name] = self.seconds.get(name, 0.0) + dt
        self.console.print(f"  [green]done[/] {name} in {dt:.1f} s")
