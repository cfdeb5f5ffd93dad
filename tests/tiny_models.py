"""Tiny random causal LMs saved as Hugging Face folders, with a tokenizer built in code (offline)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
import transformers as tf
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from stac_common.assets import shakespeare_text

VOCAB = 320


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with 320 tokens, trained on Hamlet (the calibration text's first play)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(shakespeare_text(["hamlet_gut"]).splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


# the Llama-style block every tiny decoder below starts from: 2 layers, 4 query heads over 2
# key/value heads (grouped-query attention), hidden 32, MLP 64
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=0, eos_token_id=0)
_LOCAL_GLOBAL = ["sliding_attention", "full_attention"]


def _configs(vocab: int) -> dict:
    """``family: (config class, kwargs)``, each with the features its family is known for switched on."""
    d = dict(_DECODER, vocab_size=vocab)
    return {
        "llama": (LlamaConfig, dict(d, tie_word_embeddings=True)),
        "gpt2": (GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=1024, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        # q/k/v biases; one sliding-window layer (layers from max_window_layers on slide)
        "qwen2": (tf.Qwen2Config, dict(d, use_sliding_window=True, sliding_window=8, max_window_layers=1)),
        # QK-norm and a head_dim other than hidden / heads
        "qwen3": (tf.Qwen3Config, dict(d, head_dim=16)),
        "mistral": (tf.MistralConfig, dict(d, sliding_window=8)),
        # GELU-tanh gated MLP, (1 + w) RMSNorm, scaled embeddings, head_dim 16
        "gemma": (tf.GemmaConfig, dict(d, head_dim=16)),
        # local/global layers, sandwich norms, softcaps that matter on a random model (weights
        # 2.5x the usual init, so attention scores are large enough for the cap to bend them)
        "gemma2": (tf.Gemma2Config, dict(d, head_dim=16, sliding_window=8, layer_types=_LOCAL_GLOBAL,
                                         attn_logit_softcapping=0.5, final_logit_softcapping=1.0,
                                         query_pre_attn_scalar=16, initializer_range=0.05)),
        # QK-norm, local/global layers with their own rotary bases
        "gemma3": (tf.Gemma3TextConfig, dict(d, head_dim=16, sliding_window=8, layer_types=_LOCAL_GLOBAL,
                                             query_pre_attn_scalar=16, rope_local_base_freq=100.0)),
        # fused qkv_proj and gate_up_proj, partial rotary
        "phi3": (tf.Phi3Config, dict(d, pad_token_id=0, partial_rotary_factor=0.5)),
        # fused query_key_value, parallel residual, partial rotary, no key/value grouping
        "gpt_neox": (tf.GPTNeoXConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=vocab, max_position_embeddings=1024,
                                            rotary_pct=0.25, use_parallel_residual=True, bos_token_id=0,
                                            eos_token_id=0)),
        # learned positions (offset 2, from the mask), ReLU fc1/fc2, pre-scaled q
        "opt": (tf.OPTConfig, dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                   vocab_size=vocab, word_embed_proj_dim=32, max_position_embeddings=1024,
                                   dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=1)),
    }


FAMILIES = tuple(_configs(VOCAB))


def tiny_config(arch: str, vocab: int = VOCAB, **overrides):
    """The tiny config of family ``arch`` (one of :data:`FAMILIES`), with ``overrides`` applied."""
    configs = _configs(vocab)
    if arch not in configs:
        raise ValueError(f"no tiny {arch!r}; families: {', '.join(configs)}")
    cls, kwargs = configs[arch]
    return cls(**{**kwargs, **overrides})


def tiny_model(arch: str, vocab: int = VOCAB, seed: int = 0, **overrides):
    """A tiny random causal LM of family ``arch`` (one of :data:`FAMILIES`), float32, eval mode."""
    cfg = tiny_config(arch, vocab, **overrides)
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(cfg).eval()
    if arch == "gpt2":
        return GPT2LMHeadModel(cfg).eval()
    return AutoModelForCausalLM.from_config(cfg).eval()


def save_tiny(directory: Path, arch: str) -> Path:
    """A tiny ``arch`` model and its tokenizer, saved with ``save_pretrained`` into ``directory``."""
    tok = tiny_tokenizer()
    model = tiny_model(arch, len(tok))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
