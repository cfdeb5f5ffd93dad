"""Tiny random causal LMs saved as Hugging Face folders, with a tokenizer built in code (offline)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from stac_assets import shakespeare_text

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


def tiny_model(arch: str, vocab: int = VOCAB, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=1024,
                          tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
        return LlamaForCausalLM(cfg).eval()
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=1024, bos_token_id=0,
                         eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(cfg).eval()
    raise ValueError(arch)


def save_tiny(directory: Path, arch: str) -> Path:
    """A tiny ``arch`` model and its tokenizer, saved with ``save_pretrained`` into ``directory``."""
    tok = tiny_tokenizer()
    model = tiny_model(arch, len(tok))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
