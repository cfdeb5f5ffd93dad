"""The structural swap: put DA-QCFS sites, SpikeNorm, SpikeAttention into a Hugging Face causal LM.

Adapters (``spike_modules.adapters``) say where; the swap registry :data:`SWAPS` says what
replaces a module of a given type; an unsupported type at a place the adapter names is an
error listing the supported ones, never skipped. Every change is recorded in a log
(:func:`conversion_log`), which ``swap_log`` renders as text for ``conversion_log.txt``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple

from spikingjelly.activation_based.functional import invalidate_reset_cache
from torch import nn

# the swap registry lives with the adapters, which fill it (one file per architecture)
from .adapters import SWAPS, adapter_for, register_swap  # noqa: F401  (SWAPS, register_swap: public here too)
from .attention import ATTN_IMPLEMENTATION, attach_attention_sites
from .layers import SharedInput, SpikeLinear
from .linear import in_features
from .norm import SpikeNorm
from .quantizer import check_coding, check_max_levels, coding_levels
from .site import DAQCFSSite, iter_sites

MODES = ("full", "simplified")
ACTIVATIONS = ("keep", "relu")
STRUCTURE = ("activation", "spike_qkv", "spike_probs", "spike_norm", "spike_head")
# docs/design.md section 1: simplified spikes the attention probabilities too; full keeps them in
# the rate domain (dynamic synaptic weights on spiking V), where T=16 costs far less.
MODE_DEFAULTS = {
    "full": {"activation": "keep", "spike_qkv": True, "spike_probs": False, "spike_norm": True, "spike_head": False},
    "simplified": {"activation": "keep", "spike_qkv": True, "spike_probs": True, "spike_norm": True,
                   "spike_head": False},
}


@dataclass(frozen=True)
class ConversionConfig:
    """What to swap. Fields left ``None`` take the ``mode``'s default (:data:`MODE_DEFAULTS`);
    after construction every field holds its resolved value, so ``asdict`` round-trips.

    Args:
        T: timesteps of every site.
        mode: ``full`` or ``simplified`` (sets the defaults below).
        activation: ``keep``, or ``relu`` to replace GELU/SiLU by ReLU (damages a pretrained
            model unless fine-tuned; the report must say so).
        spike_qkv: sites on q, k (after rotary) and v where they meet in the attention matmuls.
        spike_probs: a site on the attention probabilities (else they stay in the rate domain).
        spike_norm: in the sequential simulation, norms emit per-step differences (SpikeNorm,
            causal); False holds the norm of the whole window's mean at every step. Parallel
            mode computes the same float norm either way.
        spike_head: a site at the input of the output head (LM head).
        coding: ``rate`` or ``weighted`` spikes at every site (``spike_modules.site.DAQCFSSite``).
        kv_levels: weighted coding: the attention's k and v sites quantise to at most this many
            levels per sign (``DAQCFSSite.max_levels``; 127: a KV cache of int8 counts at any T);
            None: the coding's ``2**T - 1``.
    """

    T: int = 16
    mode: str = "full"
    activation: str | None = None
    spike_qkv: bool | None = None
    spike_probs: bool | None = None
    spike_norm: bool | None = None
    spike_head: bool | None = None
    coding: str = "rate"
    kv_levels: int | None = None

    def __post_init__(self):
        check_coding(self.coding)
        coding_levels(self.T, self.coding)
        check_max_levels(self.kv_levels, self.coding)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for key in STRUCTURE:
            if getattr(self, key) is None:
                object.__setattr__(self, key, MODE_DEFAULTS[self.mode][key])
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        for key in STRUCTURE[1:]:
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be True or False, got {getattr(self, key)!r}")


class SwapRecord(NamedTuple):
    """One change: ``path`` in the model, the old type (``-`` for an added module), the new one."""

    path: str
    old: str
    new: str


def _resolve(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    parent_path, _, attr = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
        module = getattr(parent, attr)
    except AttributeError:
        raise ValueError(f"the adapter expects a module at {path!r}, which this model does not have") from None
    return parent, attr, module


def _builder(role: str, module: nn.Module, path: str):
    for source, build in SWAPS[role].items():
        if isinstance(module, source):
            return build
    names = ", ".join(sorted(t.__name__ for t in SWAPS[role]))
    raise ValueError(f"{path} is a {type(module).__name__}; as a {role} STAC converts: {names}")


def _swap(model: nn.Module, path: str, role: str, config: ConversionConfig, log: list[SwapRecord]) -> None:
    parent, attr, module = _resolve(model, path)
    new = _builder(role, module, path)(module, config)
    setattr(parent, attr, new)
    label = type(new).__name__ + (f"(causal={new.causal})" if isinstance(new, SpikeNorm) else "")
    log.append(SwapRecord(path, type(module).__name__, label))


def _add_sites(model: nn.Module, name: str, linears: tuple[str, ...], signed: bool, config: ConversionConfig,
               log: list[SwapRecord]) -> None:
    found = [_resolve(model, path) for path in linears]
    for path, (_, _, module) in zip(linears, found):
        _builder("linear", module, path)
    widths = {in_features(m) for _, _, m in found}
    if len(widths) != 1:
        raise ValueError(f"site group {name}: its layers read inputs of different widths {widths}")
    site = DAQCFSSite(widths.pop(), config.T, signed=signed, name=f"{linears[0]}.site", coding=config.coding)
    shared = SharedInput(site, len(found))
    for k, (path, (parent, attr, module)) in enumerate(zip(linears, found)):
        setattr(parent, attr, SpikeLinear(module, shared, owner=k == 0))
        log.append(SwapRecord(path, type(module).__name__, "SpikeLinear"))
    log.append(SwapRecord(site.name, "-", f"DAQCFSSite(channels={site.num_channels}, signed={signed}, "
                                          f"readers={len(found)})"))


def _check_all(model: nn.Module, adapter, config: ConversionConfig, attentions) -> None:
    """Resolve every place the adapter names and check its type, changing nothing."""
    gated = adapter.gated_mlp_paths(model)
    roles = [(p, "gated_mlp") for p in gated] + [(p, "norm") for p in adapter.norm_paths(model)]
    if config.activation == "keep":
        roles += [(p, "activation") for p in adapter.activation_paths(model)
                  if not any(p.startswith(g + ".") for g in gated)]
    groups = [g.linears for g in adapter.site_groups(model, config.activation)]
    roles += [(p, "linear") for linears in groups + ([(adapter.head,)] if config.spike_head else []) for p in linears]
    for path, role in roles:
        _builder(role, _resolve(model, path)[2], path)
    for path in adapter.activation_paths(model):
        _resolve(model, path)
    for spec in attentions:
        _resolve(model, spec.path)


def convert_(model: nn.Module, config: ConversionConfig) -> nn.Module:
    """Swap in the spiking structure in place and return ``model``; sites start in ``ann`` mode.

    The log of every change is kept on the model (:func:`conversion_log`), and the config as
    ``model.stac_conversion_config``.

    Raises:
        ValueError: unsupported architecture (lists the supported ones), an already converted
            model, or a module that is not where or what the adapter expects (never skipped silently).
    """
    adapter = adapter_for(model)
    if hasattr(model, "stac_conversion_log") or any(True for _ in iter_sites(model)):
        raise ValueError("this model already has spiking sites; convert the original model")
    attentions = adapter.attentions(model)
    _check_all(model, adapter, config, attentions)  # every error is raised before the first change
    log: list[SwapRecord] = []
    if config.activation == "relu":
        for path in adapter.activation_paths(model):
            parent, attr, module = _resolve(model, path)
            setattr(parent, attr, nn.ReLU())
            log.append(SwapRecord(path, type(module).__name__, "ReLU"))
    gated = adapter.gated_mlp_paths(model)
    for path in gated:
        _swap(model, path, "gated_mlp", config, log)
    for path in adapter.activation_paths(model):
        if not any(path.startswith(g + ".") for g in gated):  # a gated MLP runs its activation itself
            _swap(model, path, "activation", config, log)
    for group in adapter.site_groups(model, config.activation):
        _add_sites(model, group.name, group.linears, group.signed, config, log)
    if config.spike_head:
        _add_sites(model, adapter.head, (adapter.head,), True, config, log)
    for path in adapter.norm_paths(model):
        _swap(model, path, "norm", config, log)
    for spec in attentions:
        _, _, attn = _resolve(model, spec.path)
        for name, site in attach_attention_sites(attn, spec.path, spec.heads, spec.kv_heads, spec.head_dim, config.T,
                                                 config.spike_qkv, config.spike_probs, coding=config.coding,
                                                 kv_levels=config.kv_levels):
            log.append(SwapRecord(name, "-", f"DAQCFSSite(channels={site.num_channels}, signed={site.signed})"))
    old = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError(f"{type(model).__name__} does not accept a custom attention implementation "
                         f"(still {model.config._attn_implementation!r}); STAC cannot convert its attention")
    log.append(SwapRecord("config._attn_implementation", str(old), ATTN_IMPLEMENTATION))
    invalidate_reset_cache(model)  # SpikingJelly caches which modules reset_net visits
    model.stac_conversion_log = log
    model.stac_conversion_config = config
    return model


def convert(model: nn.Module, config: ConversionConfig) -> nn.Module:
    """A converted copy of ``model``; the original is left untouched."""
    return convert_(copy.deepcopy(model), config)


def conversion_log(model: nn.Module) -> list[SwapRecord]:
    """What :func:`convert_` changed in ``model``, in order; ``ValueError`` if it was not converted."""
    log = getattr(model, "stac_conversion_log", None)
    if log is None:
        raise ValueError(f"{type(model).__name__} was not converted by STAC: it has no conversion log")
    return list(log)


def swap_log(model: nn.Module) -> str:
    """The conversion log as text, one ``path: old -> new`` line per change (for ``conversion_log.txt``)."""
    return "".join(f"{r.path}: {r.old} -> {r.new}\n" for r in conversion_log(model))
