"""One adapter per architecture family, and the registries an adapter file fills.

An architecture is one file in this package. It says *where* things go (an :class:`Adapter`:
groups of linear layers inside the blocks that read the same input through one site and
whether that input can be negative, the activations, the gated MLPs, the norms, the
attention modules, the head) and registers *what* its own module types become::

    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm
    from .decoder import llama_like
    from .registry import register, register_gated_mlp, register_norm

    register_norm(Qwen2RMSNorm)          # SpikeNorm wraps it (rate domain in the simulation)
    register_gated_mlp(Qwen2MLP)         # act(gate) * up runs as one rate-domain op
    ADAPTER = register(llama_like("qwen2", ("qwen2",)))

and nothing else: every module of this package except ``registry`` and ``decoder`` is imported
when the package is, so the new file is found by its presence. Attention features (sliding windows,
softcapping, grouped-query heads) are handled by ``spike_modules.attention``, which refuses any
feature it does not know; :func:`check_supported` refuses an unsupported model from its config
alone, before any weights are loaded, with the list of supported families.
"""

from __future__ import annotations

import importlib
import pkgutil

from .registry import (  # noqa: F401  (the public names of the registry)
    ADAPTERS, SWAP_ROLES, SWAPS, Adapter, AttentionSpec, Builder, SiteGroup, adapter_for, attention_spec,
    check_supported, register, register_activation, register_gated_mlp, register_norm, register_swap,
    supported_families,
)

SHARED = ("registry", "decoder")  # the registries and the Llama-style layout, not families
FAMILIES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in SHARED))
for _family in FAMILIES:
    importlib.import_module(f".{_family}", __name__)
