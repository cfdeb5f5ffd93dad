"""The registries an adapter file fills: where conversion acts (:class:`Adapter`, by model type) and
what each source module type becomes (:data:`SWAPS`, by role)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn
from transformers import activations as hf_act
from transformers.pytorch_utils import Conv1D

from ..layers import SpikeGatedMLP
from ..norm import SpikeNorm, allow_norm
from ..temporal import RateActivation


@dataclass(frozen=True)
class SiteGroup:
    """Linear layers (qualified names) that read one input through one site."""

    name: str
    linears: tuple[str, ...]
    signed: bool


@dataclass(frozen=True)
class AttentionSpec:
    """An attention module (qualified name) and its head layout."""

    path: str
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Adapter:
    """Where conversion acts in one architecture family; every callable takes the model.

    ``site_groups(model, activation)``: sites at the block linears' inputs.
    ``activation_paths``: the MLP activations (replaced by ReLU under ``activation='relu'``).
    ``gated_mlp_paths``: MLPs computing ``down(act(gate) * up)``; their activation is part of
    the gated MLP's rate-domain op and is not wrapped on its own.
    ``norm_paths``, ``attentions``, ``head``: the norms, attention modules and output head.
    ``check_config(config)``: raises ``ValueError`` for a configuration this family's adapter
    cannot convert (runs before any weights are loaded); ``None`` accepts every one.
    """

    family: str
    model_types: tuple[str, ...]
    site_groups: Callable[[nn.Module, str], list[SiteGroup]]
    activation_paths: Callable[[nn.Module], list[str]]
    gated_mlp_paths: Callable[[nn.Module], list[str]]
    norm_paths: Callable[[nn.Module], list[str]]
    attentions: Callable[[nn.Module], list[AttentionSpec]]
    head: str
    check_config: Callable[[object], None] | None = None


ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    """Make ``adapter`` the one for its ``model_types``; a type claimed twice is an error."""
    for t in adapter.model_types:
        if t in ADAPTERS and ADAPTERS[t].family != adapter.family:
            raise ValueError(f"model type {t!r} is already claimed by the {ADAPTERS[t].family} adapter")
        ADAPTERS[t] = adapter
    return adapter


def supported_families() -> str:
    """``family (model types); ...`` of every registered adapter, for error messages."""
    families = sorted({f"{a.family} ({', '.join(a.model_types)})" for a in ADAPTERS.values()})
    return "; ".join(families)


def check_supported(config) -> Adapter:
    """The adapter for a Hugging Face ``config``, checked before any weights are loaded.

    Raises:
        ValueError: an unknown ``model_type`` (the message lists the supported families), or a
            configuration the family's adapter refuses (ALiBi, encoder-decoder, cross-attention...).
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported architecture {model_type!r}; STAC converts: {supported_families()}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{model_type}: encoder-decoder models are not supported; STAC converts decoder-only causal "
                         "LMs and BERT-family encoders")
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", None) == "alibi":
        raise ValueError(f"{model_type}: ALiBi attention biases are not supported by STAC's spiking attention")
    adapter = ADAPTERS[model_type]
    if adapter.check_config is not None:
        adapter.check_config(config)
    return adapter


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s architecture; ``ValueError`` listing the supported ones otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported architecture {model_type!r} ({type(model).__name__}); "
                         f"STAC converts: {supported_families()}")
    return check_supported(config)


def attention_spec(model: nn.Module, path: str) -> AttentionSpec:
    """The head layout of the attention module at ``path``, read from the model's config and the
    module (``head_dim``, or ``head_size`` as in GPT-NeoX); key/value heads default to all heads."""
    attn = model.get_submodule(path)
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None)
    if head_dim is None:
        raise ValueError(f"{path}: {type(attn).__name__} has no head_dim or head_size attribute")
    return AttentionSpec(path, heads, kv_heads, int(head_dim))


# -- what replaces a module of a given type ----------------------------------------------------

Builder = Callable[[nn.Module, object], nn.Module]  # (module, ConversionConfig) -> replacement
SWAP_ROLES = ("linear", "norm", "gated_mlp", "activation")
# role -> {source type: builder}; first exact-or-subclass match wins. Linear layers are built by
# site group (sites shared between readers) in conversion.convert_, so their builder is None.
SWAPS: dict[str, dict[type, Builder | None]] = {role: {} for role in SWAP_ROLES}


def register_swap(role: str, source: type[nn.Module], build: Builder | None) -> None:
    """Teach the converter a source type for ``role`` (``norm``, ``gated_mlp``, ``activation``;
    ``linear`` with ``build=None``): ``build(module, conversion_config)`` returns its replacement."""
    if role not in SWAPS:
        raise ValueError(f"role must be one of {', '.join(SWAP_ROLES)}, got {role!r}")
    if (role == "linear") != (build is None):
        raise ValueError("linear layers take build=None (conversion builds them by site group); "
                         "every other role needs a builder")
    SWAPS[role][source] = build


def _spike_norm(module: nn.Module, cfg) -> nn.Module:
    return SpikeNorm(module, causal=cfg.spike_norm)


def register_norm(*types: type[nn.Module]) -> None:
    """Norms over the last dimension (LayerNorm, RMSNorm variants): SpikeNorm wraps them."""
    for t in types:
        allow_norm(t)
        register_swap("norm", t, _spike_norm)


def register_gated_mlp(*types: type[nn.Module], build: Builder | None = None) -> None:
    """MLPs computing ``down(act(gate(x)) * up(x))``; the default builder is :class:`SpikeGatedMLP`
    (``gate_proj``/``up_proj``/``down_proj``/``act_fn``), a fused layout passes its own."""
    for t in types:
        register_swap("gated_mlp", t, build or (lambda m, cfg: SpikeGatedMLP(m)))


def register_activation(*types: type[nn.Module]) -> None:
    """Elementwise activations without parameters: they run in the rate domain in the simulation."""
    for t in types:
        register_swap("activation", t, lambda m, cfg: RateActivation(m))


# shared by every family: plain and GPT-2 linear layers, LayerNorm, the common activations
register_swap("linear", nn.Linear, None)
register_swap("linear", Conv1D, None)  # GPT-2's: weight stored [in, out]; wrapped, never copied
register_norm(nn.LayerNorm)
register_activation(
    nn.ReLU, nn.SiLU, nn.GELU, nn.Tanh, nn.Sigmoid, hf_act.SiLUActivation, hf_act.GELUActivation,
    hf_act.NewGELUActivation, hf_act.FastGELUActivation, hf_act.QuickGELUActivation, hf_act.GELUTanh,
    hf_act.AccurateGELUActivation, hf_act.ClippedGELUActivation)
