"""Gemma 2: Gemma with pre/post feed-forward norms (four norms per layer), sliding-window and
global layers alternating (``layer_types``; the model's mask carries the window, which the
spiking attention checks), attention-logit softcapping (``softcap * tanh(w / softcap)`` before
the mask, computed by the spiking attention inside its rate-domain softmax) and final-logit
softcapping (applied to the time-mean logits in the sequential simulation, like the softmax's
nonlinearity, not to each step). Layout and sites: :mod:`.decoder`."""

from __future__ import annotations

from transformers.models.gemma2.modeling_gemma2 import Gemma2MLP, Gemma2RMSNorm

from .decoder import SANDWICH_NORMS, llama_like
from .registry import register, register_gated_mlp, register_norm

register_norm(Gemma2RMSNorm)
register_gated_mlp(Gemma2MLP)
ADAPTER = register(llama_like("gemma2", ("gemma2",), layer_norms=SANDWICH_NORMS))
