"""Language-model evaluation with one fixed protocol.

Perplexity over non-overlapping windows of ``window`` tokens (default 512): each
window is scored on its own (no context carried over), every token after the
first of a window counts once. Top-1 agreement: the share of those positions
where a model's most likely next token equals the reference model's.
"""

from __future__ import annotations

import math

import torch
from rich.progress import Progress
from torch import nn

PROTOCOL = "non-overlapping {window}-token windows, each scored alone; perplexity = exp(mean NLL of tokens 2..window)"


def windows(ids: torch.Tensor, window: int = 512) -> torch.Tensor:
    """``[n, window]`` non-overlapping windows of a 1-D token tensor (the remainder is dropped)."""
    if ids.dim() != 1:
        raise ValueError(f"expected a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one {window}-token window")
    return ids[: n * window].view(n, window)


@torch.inference_mode()
def evaluate_lm(models: dict[str, nn.Module], ids: torch.Tensor, window: int = 512, batch_size: int = 4,
                reference: str | None = None, progress: bool = True) -> dict:
    """Perplexity of every model, and top-1 agreement with ``reference`` (default: the first).

    Returns ``{"protocol", "windows", "tokens", "ppl": {name: float}, "top1_agreement": {name: float}}``.
    """
    reference = reference or next(iter(models))
    chunks = windows(ids, window)
    nll = {name: 0.0 for name in models}
    agree = {name: 0 for name in models}
    counted = 0
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("evaluating", total=len(chunks))
        for batch in chunks.split(batch_size):
            targets = batch[:, 1:]
            preds = {}
            for name, model in models.items():
                logits = model(batch).logits[:, :-1].float()
                nll[name] += float(nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
                preds[name] = logits.argmax(-1)
            for name in models:
                agree[name] += int((preds[name] == preds[reference]).sum())
            counted += targets.numel()
            bar.advance(task, len(batch))
    return {"protocol": PROTOCOL.format(window=window), "windows": len(chunks), "tokens": counted,
            "ppl": {n: math.exp(v / counted) for n, v in nll.items()},
            "top1_agreement": {n: a / counted for n, a in agree.items()}}
