"""Distillation text made of the ANN's own replies.

Perplexity-style distillation reads prose; a chat model is judged on what it writes. With
``--finetune_text replies`` the thresholds and shifts are distilled on the ANN's greedy replies
(in the chat template, KV-cached, up to :data:`REPLY_TOKENS` tokens) to chit-chat openings taken
from the end of the embedded conversations, the part calibration reads: never the openings that
``bench/generation.py`` and the validator score (``stac_lm.eval.prompts.chitchat_openings``).
"""

from __future__ import annotations

import torch
from torch import nn

from stac_lm.eval.fidelity import chat_ids, left_padded, stop_ids
from stac_lm.eval.prompts import chitchat_openings, opening_turns
from stac_common.runtime import input_device

REPLY_TOKENS = 48  # as many new tokens as the generation benchmark lets a reply have
REPLY_BATCH = 16  # prompts decoded together


def reply_openings(n: int) -> list[str]:
    """``n`` distinct first user turns of the embedded conversations, read from the last sorted id
    backwards, none of them a scored opening; ``ValueError`` if the data has fewer."""
    if n < 1:
        raise ValueError(f"need at least one opening, got {n}")
    scored = set(chitchat_openings())
    out: list[str] = []
    for text in opening_turns(from_last=True):
        if text not in scored and text not in out:
            out.append(text)
            if len(out) == n:
                return out
    raise ValueError(f"the embedded chit-chat data has {len(out)} usable openings, fewer than the {n} asked")


@torch.no_grad()
def ann_reply_windows(ann: nn.Module, tokenizer, n: int, new_tokens: int = REPLY_TOKENS,
                      batch_size: int = REPLY_BATCH) -> tuple[list[torch.Tensor], int]:
    """``n`` windows ``[1, S]``: an opening in the chat template followed by the ANN's greedy reply.

    The replies are decoded ``batch_size`` prompts at a time (left-padded, transformers'
    ``generate``, greedy), each cut at its first end-of-turn token.
    Returns ``(windows on the ANN's device, tokens in all)``.
    """
    device = input_device(ann)
    stop = stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop)
    prompts = [chat_ids(tokenizer, text)[0] for text in reply_openings(n)]
    windows = []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b: b + batch_size]
        ids, mask = left_padded(chunk, pad)
        width = ids.shape[1]
        out = ann.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=pad, eos_token_id=sorted(stop))[:, width:].cpu()
        for p, row in zip(chunk, out.tolist()):
            reply = next((row[:k] for k, t in enumerate(row) if t in stop), row)
            windows.append(torch.cat([p, torch.tensor(reply, dtype=p.dtype)])[None].to(device))
    return windows, sum(w.shape[1] for w in windows)
