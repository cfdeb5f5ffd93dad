"""Free-running generation fidelity: greedy replies of the SNN beside its ANN's, prompt by prompt.

Perplexity and teacher-forced agreement score the SNN on the ANN's own text; in free generation
one different token sends a reply down another path. This module writes both models' greedy
replies to the same chat prompts (KV-cached decoding, the chat template of the tokenizer, stop
at its end-of-turn token) and compares them: identity of the first ``n`` tokens, length of the
common prefix, whole-reply identity, and for questions with known answers whether each reply
answers correctly. It also scores the SNN teacher-forced on the ANN's replies (top-1 agreement
on the reply tokens), which ties the two views together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from stac_common.runtime import input_device

FIRST_N = 16


@dataclass
class Reply:
    ids: list[int]
    text: str


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    """``[1, S]`` prompt ids: the user turn in the chat template with the assistant's turn opened,
    or the plain text for a tokenizer without a template."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        return ids
    return tokenizer(text, return_tensors="pt").input_ids


def left_padded(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` of different lengths as left-padded ``ids [B, S]`` and ``mask [B, S]``."""
    S = max(int(r.numel()) for r in rows)
    ids = torch.full((len(rows), S), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, S - r.numel():], mask[i, S - r.numel():] = r, 1
    return ids, mask


def stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        i = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.add(i)
    return {i for i in ids if i is not None}


@torch.no_grad()
def greedy_reply(model: nn.Module, prompt: torch.Tensor, new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy continuation of ``prompt [1, S]`` with the KV cache, up to ``new_tokens`` or a stop token
    (not included)."""
    device = input_device(model)
    out = model(prompt.to(device), use_cache=True, logits_to_keep=1)
    reply: list[int] = []
    for _ in range(new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        if nxt in stop:
            break
        reply.append(nxt)
        out = model(torch.tensor([[nxt]], device=device), past_key_values=out.past_key_values, use_cache=True,
                    logits_to_keep=1)
    return reply


@torch.no_grad()
def reply_logits(model: nn.Module, prompt: torch.Tensor, reply: list[int]) -> torch.Tensor:
    """``[len(reply), vocab]`` logits (float32, on the CPU) of ``model`` for each of ``reply``'s tokens,
    teacher-forced: one full pass over prompt and reply; the reply's first token is predicted from
    the prompt."""
    device = input_device(model)
    ids = torch.cat([prompt, torch.tensor([reply])], dim=1).to(device)
    return model(ids).logits[0, prompt.shape[1] - 1: -1].float().cpu()


def forced_predictions(snn: nn.Module, prompt: torch.Tensor, reply: list[int]) -> list[bool]:
    """Per reply token, whether the SNN's top-1 teacher-forced on the ANN's reply is that token."""
    if not reply:
        return []
    preds = reply_logits(snn, prompt, reply).argmax(-1).tolist()
    return [p == t for p, t in zip(preds, reply)]


def decode_ann_replies(ann: nn.Module, tokenizer, prompts: list[dict], new_tokens: int) -> list[Reply]:
    """The ANN's greedy reply to each prompt (chat template, KV cache, up to ``new_tokens``)."""
    stop = stop_ids(tokenizer)
    replies = []
    for p in prompts:
        ids = greedy_reply(ann, chat_ids(tokenizer, p["text"]), new_tokens, stop)
        replies.append(Reply(ids, tokenizer.decode(ids, skip_special_tokens=True)))
    return replies


def ann_replies(ann: nn.Module, tokenizer, prompts: list[dict], new_tokens: int, cache: str | Path | None = None,
                key: dict | None = None) -> list[Reply]:
    """The ANN's greedy replies to ``prompts``. With ``cache`` (a JSON file), replies saved there for
    the same ``key`` (say the source model's hashes), prompts and ``new_tokens`` are read instead of
    decoded; otherwise they are decoded and the file is (re)written."""
    ident = {"key": key, "new_tokens": new_tokens, "prompts": [p["text"] for p in prompts]}
    if cache is not None and Path(cache).is_file():
        saved = json.loads(Path(cache).read_text())
        if {k: saved.get(k) for k in ident} == ident:
            return [Reply(ids, tokenizer.decode(ids, skip_special_tokens=True)) for ids in saved["replies"]]
        print(f"{cache} holds replies of another model, prompt set or length: decoding again")
    replies = decode_ann_replies(ann, tokenizer, prompts, new_tokens)
    if cache is not None:
        from stac_common.io import write_json

        write_json(Path(cache), ident | {"replies": [r.ids for r in replies]})
    return replies


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(ann: nn.Module, snn: nn.Module, tokenizer, prompts: list[dict], new_tokens: int = 48,
            ann_replies: list[Reply] | None = None, correct=None, progress=None, free_running: bool = True) -> dict:
    """Greedy replies of both models to every prompt (``{"kind", "text", "answers"}``) and the
    fidelity figures. ``ann_replies`` (same order) skips the ANN's decoding; ``correct(reply,
    answers)`` scores questions. ``free_running=False`` scores the SNN teacher-forced only (minutes
    faster; the free-running figures are then absent). Returns ``{"summary": {...}, "rows": [...],
    "ann_replies": [...]}``."""
    stop = stop_ids(tokenizer)
    replies = decode_ann_replies(ann, tokenizer, prompts, new_tokens) if ann_replies is None else list(ann_replies)
    rows = []
    agree = scored = 0
    for i, p in enumerate(prompts):
        prompt = chat_ids(tokenizer, p["text"])
        a = replies[i]
        hits = forced_predictions(snn, prompt, a.ids)
        agree, scored = agree + sum(hits), scored + len(hits)
        row = {"kind": p["kind"], "prompt": p["text"], "ann": a.text,
               "forced_agreement": sum(hits) / len(hits) if hits else None,
               "forced_first_n": all(hits[:FIRST_N])}
        if free_running:
            s_ids = greedy_reply(snn, prompt, new_tokens, stop)
            s = Reply(s_ids, tokenizer.decode(s_ids, skip_special_tokens=True))
            row.update(snn=s.text, common_prefix=common_prefix(a.ids, s.ids),
                       first_n_equal=a.ids[:FIRST_N] == s.ids[:FIRST_N], exact=a.ids == s.ids)
        if p.get("answers") and correct is not None:
            row["ann_correct"] = bool(correct(a.text, tuple(p["answers"])))
            if free_running:
                row["snn_correct"] = bool(correct(s.text, tuple(p["answers"])))
        rows.append(row)
        if progress is not None:
            progress(i + 1, len(prompts), row)
    return {"summary": summarize(rows, agree, scored), "rows": rows, "ann_replies": replies}


def summarize(rows: list[dict], agree: int, scored: int) -> dict:
    """The figures of :func:`compare`'s rows; the free-running ones are None where it ran teacher-forced only."""
    n = len(rows)
    q = [r for r in rows if "ann_correct" in r]
    forced = {"prompts": n, "forced_top1_agreement_on_ann_replies": agree / scored if scored else float("nan"),
              f"forced_first_{FIRST_N}": sum(r["forced_first_n"] for r in rows) / n, "questions": len(q),
              "ann_correct": sum(r["ann_correct"] for r in q) / len(q) if q else None}
    if rows and "snn" not in rows[0]:
        return forced | {f"first_{FIRST_N}_identity": None, "mean_common_prefix": None, "exact_match": None,
                         "snn_correct": None, "snn_keeps_ann_correct": None, "by_kind": None}
    ann_right = [r for r in q if r["ann_correct"]]
    return forced | {
        f"first_{FIRST_N}_identity": sum(r["first_n_equal"] for r in rows) / n,
        "mean_common_prefix": sum(r["common_prefix"] for r in rows) / n,
        "exact_match": sum(r["exact"] for r in rows) / n,
        "snn_correct": sum(r["snn_correct"] for r in q) / len(q) if q else None,
        "snn_keeps_ann_correct": (sum(r["snn_correct"] for r in ann_right) / len(ann_right)) if ann_right else None,
        "by_kind": {k: sum(r["first_n_equal"] for r in rows if r["kind"] == k) / max(1, sum(r["kind"] == k for r in rows))
                    for k in sorted({r["kind"] for r in rows})},
    }
