"""An 8-bit LM head and input embedding, stored once when tied: :class:`Int8Embedding` and
:func:`quantize_head_` (what ``quantize_weights_(..., head=True)`` runs).

Why: in full mode every linear layer of the blocks is int8, but a float tied embedding/head is
most of a small LM's bytes (SmolLM2-135M: 113 MB of 215 MB, vocab 49152 x hidden 576), and every
decoded token reads the head. Here the head becomes an :class:`~calibration.int8.Int8Linear` (one
symmetric scale per output row, rounded to nearest) and the input embedding an
:class:`Int8Embedding`. When the two were tied, the embedding keeps no table of its own: it reads
the head's ``weight_int8`` ``[vocab, hidden]`` and ``scale`` ``[vocab]``. Head row ``v`` is token
``v``'s embedding, so the head's per-output-row scale is the embedding's per-token scale and one
int8 tensor serves both: the lookup is ``weight_int8[ids] * scale[ids, None]``, exactly the rows of
the head's dequantized weight. An untied embedding gets its own int8 table, quantized the same way.

The head is always per row and rounded to nearest, whatever ``group_size``/GPTQ the blocks use:
a lookup has no input columns over which a group scale or GPTQ's error compensation would pay off,
and the tied table must be one thing for both uses.

Saving: the tied embedding has no state of its own, so the state dict holds the table once (under
the head's path). :func:`prepare_int8_head_` rebuilds the shells from the summary's ``int8_head``
entry (``{"head", "embedding", "tied"}``) before loading.
"""

from __future__ import annotations

import torch
from torch import nn

from spike_modules.layers import SpikeLinear
from spike_modules.linear import FLOAT_LINEARS, float_weight

__all__ = ["Int8Embedding", "int8_head_info", "prepare_int8_head_", "quantize_head_"]


def _scale_of(embedding: nn.Embedding) -> float | None:
    """Gemma's scaled embeddings multiply the looked-up rows by ``embed_scale``; plain ones by nothing.

    Raises:
        ValueError: an embedding class whose forward is neither (its output could not be reproduced).
    """
    if type(embedding).forward is nn.Embedding.forward:
        return None
    if isinstance(embedding, nn.Embedding) and type(embedding).__name__.endswith("ScaledWordEmbedding") \
            and hasattr(embedding, "embed_scale"):
        return float(embedding.embed_scale)
    raise ValueError(f"the input embedding is a {type(embedding).__name__}; the int8 head/embedding reproduces "
                     "nn.Embedding and Gemma's scaled embeddings only: convert with --no-int8_head (head=False)")


def _check_embedding(embedding: nn.Module) -> None:
    """Refuse an input embedding whose lookup an int8 table cannot reproduce."""
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"the input embedding is a {type(embedding).__name__}, not an nn.Embedding; the int8 "
                         "head/embedding cannot replace it: convert with --no-int8_head (head=False)")
    if embedding.max_norm is not None:
        raise ValueError("the input embedding renormalises rows (max_norm); an int8 table cannot: convert with "
                         "--no-int8_head (head=False)")
    _scale_of(embedding)


class Int8Embedding(nn.Module):
    """``weight_int8[ids] * scale[ids, None]`` (times ``embed_scale`` for Gemma's scaled embeddings).

    Args:
        num_embeddings, embedding_dim: table shape ``[vocab, hidden]``.
        padding_idx: kept from the source embedding (it only matters for gradients).
        embed_scale: the factor a scaled embedding applies to its rows, else None.
        tied_to: an :class:`~calibration.int8.Int8Linear` head of shape ``[vocab, hidden]`` whose
            ``weight_int8``/``scale`` this embedding reads (none of its own: the table is stored once);
            None for an untied embedding with its own buffers.

    The head is kept in ``__dict__``, not as a submodule, so it appears once in ``named_modules`` and
    the state dict (energy and memory counts see the table once); ``model.to(...)`` moves the head's
    buffers and this embedding reads them wherever they are.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 embed_scale: float | None = None, tied_to: nn.Module | None = None, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        if tied_to is None:
            self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8,
                                                            device=device))
            self.register_buffer("scale", torch.ones(num_embeddings, dtype=torch.float32, device=device))
        else:
            shape = tuple(tied_to.weight_int8.shape)
            if shape != (num_embeddings, embedding_dim) or tied_to.scale.dim() != 1:
                raise ValueError(f"a tied int8 embedding [{num_embeddings}, {embedding_dim}] needs a head of the same "
                                 f"shape with one scale per row; got weight {shape}, scale {tuple(tied_to.scale.shape)}")
            self.__dict__["tied_to"] = tied_to
        if embed_scale is not None:  # not saved: rebuilt from the architecture, as the source model does
            self.register_buffer("embed_scale", torch.tensor(float(embed_scale), device=device), persistent=False)
        else:
            self.embed_scale = None

    def __getattr__(self, name: str):
        tied = self.__dict__.get("tied_to")
        if tied is not None and name in ("weight_int8", "scale"):
            return getattr(tied, name)
        return super().__getattr__(name)

    @property
    def tied(self) -> bool:
        return self.__dict__.get("tied_to") is not None

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, tied_to: nn.Module | None = None) -> Int8Embedding:
        """Quantize ``embedding`` (one scale per token), or read ``tied_to``'s table if given."""
        from .int8_linear import quantize_rows

        new = cls.shell_like(embedding, tied_to)
        if tied_to is None:
            q, scale = quantize_rows(embedding.weight)
            new.weight_int8.copy_(q)
            new.scale.copy_(scale)
        return new

    @classmethod
    def shell_like(cls, embedding: nn.Embedding, tied_to: nn.Module | None = None) -> Int8Embedding:
        """An empty ``Int8Embedding`` of ``embedding``'s shape, device and scaling, to load into."""
        _check_embedding(embedding)
        w = embedding.weight
        return cls(w.shape[0], w.shape[1], embedding.padding_idx, embed_scale=_scale_of(embedding),
                   tied_to=tied_to, device=w.device)

    @property
    def weight(self) -> torch.Tensor:
        """The float table this embedding computes with, decoded on each access (a temporary the size
        of a float table; nothing is kept). For callers that read ``get_input_embeddings().weight``'s
        device and dtype; writing into it changes nothing."""
        return self.dequantize()

    def dequantize(self) -> torch.Tensor:
        """The ``[vocab, hidden]`` table in the scale's dtype: ``weight_int8 * scale[:, None]``."""
        scale = self.scale
        return self.weight_int8.to(scale.dtype) * scale[:, None]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        scale = self.scale
        rows = self.weight_int8[input_ids].to(scale.dtype) * scale[input_ids].unsqueeze(-1)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(rows.dtype)

    def extra_repr(self) -> str:
        tied = ", tied to the head's table" if self.tied else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, int8{tied}"


def _path_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of this model")


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _head_and_embedding(model: nn.Module) -> tuple[str, nn.Module, str, nn.Module]:
    """``(head path, head linear, embedding path, embedding)``; a head inside a ``SpikeLinear`` is its ``.linear``."""
    getters = [getattr(model, g, None) for g in ("get_output_embeddings", "get_input_embeddings")]
    if not all(callable(g) for g in getters):
        raise ValueError(f"{type(model).__name__} has no get_output_embeddings/get_input_embeddings; the int8 head "
                         "needs a transformers causal LM")
    head, embedding = getters[0](), getters[1]()
    if head is None or embedding is None:
        raise ValueError(f"{type(model).__name__} has no output head or no input embedding to make int8")
    head_path = _path_of(model, head)
    if isinstance(head, SpikeLinear):  # a spiking site in front of the head (spike_head)
        head_path, head = f"{head_path}.linear", head.linear
    return head_path, head, _path_of(model, embedding), embedding


def int8_head_info(model: nn.Module) -> dict | None:
    """``{"head", "embedding", "tied"}`` paths of an int8 head and embedding (as :func:`quantize_head_`
    left them), or None when the input embedding is not an :class:`Int8Embedding`."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if not isinstance(embedding, Int8Embedding):
        return None
    head_path, head, emb_path, _ = _head_and_embedding(model)
    if embedding.tied and embedding.__dict__["tied_to"] is not head:
        raise ValueError(f"the int8 embedding {emb_path!r} reads a table that is not the head's ({head_path!r})")
    return {"head": head_path, "embedding": emb_path, "tied": embedding.tied}


def plan_head(model: nn.Module) -> tuple[str, nn.Module, str, nn.Module, bool]:
    """Check, before anything is replaced, that the head and embedding can be made int8:
    ``(head path, float head, embedding path, float embedding, tied)``.

    Raises:
        ValueError: no head/embedding, a head that is not a float linear layer, an embedding this
            module cannot reproduce, a head of another shape than a tied embedding, or NaN/inf weights.
    """
    head_path, head, emb_path, embedding = _head_and_embedding(model)
    if not isinstance(head, FLOAT_LINEARS):
        raise ValueError(f"the output head {head_path!r} is a {type(head).__name__}; the int8 head needs a float "
                         "nn.Linear (quantize a float model, with head=True from the start)")
    _check_embedding(embedding)
    w, e = float_weight(head), embedding.weight
    tied = w.shape == e.shape and w.data_ptr() == e.data_ptr() and w.stride() == e.stride()
    for path, t in ((head_path, w), (emb_path, e)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path!r}: its weight holds NaN/inf values; int8 cannot represent them. Check the "
                             "source checkpoint")
    return head_path, head, emb_path, embedding, tied


def quantize_head_(model: nn.Module, plan: tuple | None = None) -> dict:
    """Make the output head :class:`~calibration.int8.Int8Linear` and the input embedding
    :class:`Int8Embedding` (reading the head's table when tied), in place.

    Returns:
        ``{"head", "embedding", "tied", "rel_error", "embedding_rel_error", "bytes_before", "bytes_after"}``:
        paths, ``||W - decoded W|| / ||W||`` of each, and the bytes of the float weights (a tied
        table once) and of the int8 tables with their scales.

    Raises:
        ValueError: see :func:`plan_head`.
    """
    from .int8_linear import Int8Linear, row_error

    head_path, head, emb_path, embedding, tied = plan if plan is not None else plan_head(model)
    with torch.no_grad():
        w, e = float_weight(head).detach(), embedding.weight.detach()
        before = w.nbytes + (0 if head.bias is None else head.bias.nbytes) + (0 if tied else e.nbytes)
        new_head = Int8Linear.from_linear(head).train(head.training)
        new_emb = Int8Embedding.from_embedding(embedding, new_head if tied else None).train(embedding.training)
        _set(model, head_path, new_head)
        _set(model, emb_path, new_emb)
        after = sum(t.nbytes for t in new_head.state_dict().values()) + \
            sum(t.nbytes for t in new_emb.state_dict().values())
        return {"head": head_path, "embedding": emb_path, "tied": tied,
                "rel_error": row_error(w, new_head.weight_int8, new_head.scale),
                "embedding_rel_error": row_error(e, new_emb.weight_int8, new_emb.scale),
                "bytes_before": before, "bytes_after": after}


def prepare_int8_head_(model: nn.Module, info: dict) -> nn.Module:
    """Put empty int8 shells at ``info``'s ``head`` and ``embedding`` paths (the ``int8_head`` entry of
    a :func:`~calibration.int8.quantize_weights_` summary), tied as ``info["tied"]`` says, so
    ``load_state_dict`` fills them with the saved table(s).

    Raises:
        ValueError: a path that is missing or of the wrong kind (the directory and the
            architecture disagree).
    """
    from .int8_linear import Int8Linear

    try:
        head_path, emb_path, tied = str(info["head"]), str(info["embedding"]), bool(info["tied"])
    except (KeyError, TypeError):
        raise ValueError(f"the int8 head entry {info!r} lacks head/embedding/tied; re-save the model") from None
    modules = {}
    for path in (head_path, emb_path):
        try:
            modules[path] = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"no module at {path!r} for the int8 head/embedding in this model") from None
    head, embedding = modules[head_path], modules[emb_path]
    if not isinstance(head, FLOAT_LINEARS):
        raise ValueError(f"{head_path!r} is a {type(head).__name__}; the int8 head replaces a float linear layer")
    shell = Int8Linear.shell_like(head).train(head.training)
    _set(model, head_path, shell)
    _set(model, emb_path, Int8Embedding.shell_like(embedding, shell if tied else None).train(embedding.training))
    return model
