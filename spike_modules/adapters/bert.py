"""BERT family (BERT, MiniLM, RoBERTa): post-LN encoder, GELU, bidirectional attention, pooler and
classification head.

Site scope (``model.stac_site_scope``, set with :func:`set_site_scope` before conversion):

- ``all`` (default): sites at the inputs of every linear layer in the encoder: the attention
  input (read by query, key and value), ``attention.output.dense``, ``intermediate.dense`` and
  ``output.dense``. All are signed: LayerNorm outputs, attention outputs and GELU's output
  (which dips to -0.17) take both signs; ``output.dense``'s input is unsigned only after
  ``activation='relu'``. Attention probabilities get their site from the converter's
  ``spike_probs``.
- ``ffn``: one site per layer, at the FFN intermediate activation (the input of
  ``output.dense``): the layer-level design of the text-classification seed documents.

Either way every LayerNorm (embeddings included) and the GELU run in the rate domain in the
sequential simulation, and the attention goes through ``SpikeAttention`` (rate-domain softmax).
The pooler and the classifier are outside the encoder and stay float; ``text_cls`` reads them
out from the time-mean of the encoder's output. Decoders and cross-attention are not supported.
"""

from __future__ import annotations

from torch import nn

from .registry import Adapter, AttentionSpec, SiteGroup, register

SITE_SCOPES = ("ffn", "all")
SCOPE_ATTR = "stac_site_scope"


def set_site_scope(model: nn.Module, scope: str) -> None:
    """Choose where :func:`site_groups` puts sites in ``model`` (``ffn`` or ``all``)."""
    if scope not in SITE_SCOPES:
        raise ValueError(f"site scope must be one of {', '.join(SITE_SCOPES)}, got {scope!r}")
    setattr(model, SCOPE_ATTR, scope)


def _prefix(model: nn.Module) -> str:
    """``bert.`` (or ``roberta.``) for a model with a head, ``""`` for the bare encoder model."""
    base = getattr(model, "base_model_prefix", "")
    return f"{base}." if base and hasattr(model, base) else ""


def _check_encoder(model: nn.Module) -> None:
    cfg = model.config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise ValueError("BERT as a decoder (is_decoder / add_cross_attention) is not supported; "
                         "STAC converts BERT-family encoders")
    kind = getattr(cfg, "position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"position_embedding_type {kind!r} is not supported (absolute positions only)")


def _layers(model: nn.Module) -> list[str]:
    _check_encoder(model)
    p = _prefix(model)
    return [f"{p}encoder.layer.{i}" for i in range(len(model.get_submodule(f"{p}encoder.layer")))]


def site_groups(model: nn.Module, activation: str) -> list[SiteGroup]:
    scope = getattr(model, SCOPE_ATTR, "all")
    if scope not in SITE_SCOPES:
        raise ValueError(f"{SCOPE_ATTR} must be one of {', '.join(SITE_SCOPES)}, got {scope!r}")
    groups = []
    for p in _layers(model):
        ffn = SiteGroup(f"{p}.output.dense", (f"{p}.output.dense",), activation != "relu")
        if scope == "ffn":
            groups.append(ffn)
            continue
        groups += [
            SiteGroup(f"{p}.attention.self.qkv", tuple(f"{p}.attention.self.{n}" for n in ("query", "key", "value")),
                      True),
            SiteGroup(f"{p}.attention.output.dense", (f"{p}.attention.output.dense",), True),
            SiteGroup(f"{p}.intermediate.dense", (f"{p}.intermediate.dense",), True),
            ffn,
        ]
    return groups


def activation_paths(model: nn.Module) -> list[str]:
    return [f"{p}.intermediate.intermediate_act_fn" for p in _layers(model)]


def gated_mlp_paths(model: nn.Module) -> list[str]:
    return []


def norm_paths(model: nn.Module) -> list[str]:
    per_layer = [f"{p}.{n}" for p in _layers(model) for n in ("attention.output.LayerNorm", "output.LayerNorm")]
    return [f"{_prefix(model)}embeddings.LayerNorm"] + per_layer


def attentions(model: nn.Module) -> list[AttentionSpec]:
    specs = []
    for p in _layers(model):
        attn = model.get_submodule(f"{p}.attention.self")
        specs.append(AttentionSpec(f"{p}.attention.self", attn.num_attention_heads, attn.num_attention_heads,
                                   attn.attention_head_size))
    return specs


ADAPTER = register(Adapter("bert", ("bert", "roberta"), site_groups, activation_paths, gated_mlp_paths, norm_paths,
                           attentions, head="classifier"))
