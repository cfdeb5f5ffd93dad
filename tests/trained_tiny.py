"""A tiny causal LM trained for a few seconds on Hamlet, so its blocks matter to its predictions.

A tiny *random* model predicts almost only from its residual stream (the embedding of the current
token): a silent SNN of it agrees with its ANN on top-1 nearly everywhere, so quality checks cannot
be seen to fail on it. This one learns enough (perplexity 130 on The Tempest against ~320 at
random initialisation) that breaking its SNN shows: converted in full mode at T=8 (LM-head input
spiking), measured ratio 0.98 / agreement 0.82 healthy, 1.85 / 0.15 with thresholds x10, 2.46 / 0.0
with x1000.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import tiny_model, tiny_tokenizer

from stac_common.assets import shakespeare_text

STEPS, BATCH, SEQ, LR = 300, 16, 128, 3e-3  # ~16 s on one core


def train_tiny(arch: str = "llama", seed: int = 0, steps: int = STEPS):
    """``(model, tokenizer)``: a tiny ``arch`` model trained ``steps`` AdamW steps on Hamlet (seeded)."""
    tok = tiny_tokenizer()
    ids = torch.tensor(tok(shakespeare_text(["hamlet_gut"])[:120_000]).input_ids)
    model = tiny_model(arch, len(tok), seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - SEQ - 1, (BATCH,), generator=g)
        batch = torch.stack([ids[i:i + SEQ] for i in starts])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


def save_trained(directory: Path, arch: str = "llama", seed: int = 0) -> Path:
    model, tok = train_tiny(arch, seed)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
