"""Multi-turn quality of a converted model, measured against the ANN it came from on the same inputs.

Chit-chat: the first ``n`` conversations of the embedded chit-chat data (ids sorted, at least
``2 * EXCHANGES`` turns, the first speaker as user, the second as assistant, each turn's messages
joined by newlines, conversations longer than the context limit skipped), cut to ``EXCHANGES``
user/assistant exchanges. The human replies are teacher-forced: the SNN reads the conversation
turn by turn through the processor's cache, the ANN in one pass; on the reply tokens (end-of-turn
token included) we score both perplexities and the SNN's top-1 agreement with the ANN, per reply.
The SNN is also scored in one pass without the cache: in float32 the cached path flips a few
quantization levels on rounding (see ``conversation``), and this shows what that costs.

Recall: ``FACTS`` probes, each stating a name, a city and a colour in turn 1, chatting in turn 2,
asking for one of them in turn 3. Scored for ANN and SNN alike: does the greedy reply contain
the fact, is the fact's first token the top-1 prediction after a teacher-forced answer prefix,
and the fact tokens' log-probability.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stac_lm.chat.segments import Segment, segments
from stac_lm.checks.conversation import check, feed, info, one_pass
from stac_lm.generate.processor import TemporalSpikeProcessor
from stac_lm.convert.texts import as_chat, chitchat_data, turn_texts
from stac_common.runtime import input_device

EXCHANGES = 4              # user/assistant pairs per chit-chat conversation
# the converter issue's full-mode targets on Shakespeare (perplexity ratio SNN/ANN, top-1 agreement)
TARGETS = {8: {"ppl_ratio": 1.30}, 16: {"ppl_ratio": 1.10, "agreement": 0.85}, 32: {"ppl_ratio": 1.05}}
RECALL_TOLERANCE = 0.2     # SNN recall may trail the ANN's by two probes of ten
RECALL_NEW_TOKENS = 24
FACTS = [("Alice", "Lisbon", "green"), ("Bruno", "Oslo", "purple"), ("Chloe", "Nairobi", "orange"),
         ("Daniel", "Toronto", "yellow"), ("Elena", "Madrid", "blue"), ("Farid", "Cairo", "red"),
         ("Grace", "Dublin", "pink"), ("Hiro", "Osaka", "black"), ("Ingrid", "Vienna", "white"),
         ("Jonas", "Berlin", "brown")]
QUESTIONS = {"colour": ("What is my favourite colour?", "Your favourite colour is {}."),
             "name": ("What is my name?", "Your name is {}."),
             "city": ("Which city do I live in?", "You live in {}.")}
SMALL_TALK = [("user", "Can you suggest something fun to do this weekend?"),
              ("assistant", "You could go for a walk in a park, visit a museum or try a new recipe.")]


def _ids(segs: list[Segment]) -> torch.Tensor:
    return torch.cat([s.ids for s in segs])


@torch.no_grad()
def ann_logits(ann: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    dev = input_device(ann)
    return ann(input_ids=ids.to(dev)[None], use_cache=False).logits[0].float().cpu()


# -- chit-chat -----------------------------------------------------------------------------------

def chitchat(tokenizer, n: int, max_tokens: int) -> tuple[list[dict], dict]:
    """The first ``n`` usable conversations as ``{"id", "segments"}``, and how the selection went."""
    _, data = chitchat_data()
    chosen, too_short, too_long = [], 0, 0
    for cid in sorted(data):
        texts = turn_texts(data[cid])[:2 * EXCHANGES]
        if len(texts) < 2 * EXCHANGES or not all(texts):
            too_short += 1
            continue
        segs = segments(tokenizer, as_chat(texts))
        if sum(int(s.ids.numel()) for s in segs) > max_tokens:
            too_long += 1
            continue
        chosen.append({"id": cid, "segments": segs})
        if len(chosen) == n:
            break
    selection = {"order": "conversation ids sorted", "exchanges": EXCHANGES, "skipped_short_or_empty": too_short,
                 "skipped_over_context_limit": too_long, "available": len(data)}
    return chosen, selection


KEYS = ("nll_snn", "nll_ann", "nll_one_pass", "agree", "agree_one_pass", "tokens")


def _reply_scores(segs: list[Segment], snn: torch.Tensor, one_pass: torch.Tensor, ann: torch.Tensor) -> list[dict]:
    """Per reply: summed NLL of the cached SNN, the ANN and the SNN in one pass, their top-1 agreement
    counts with the ANN, and the token count (logits ``[N, V]`` over all ids)."""
    ids, out, pos = _ids(segs), [], 0
    for s in segs:
        a, b = pos, pos + int(s.ids.numel())
        pos = b
        if not s.reply:
            continue
        pred = slice(a - 1, b - 1)  # the logits at position t predict token t + 1
        target, top = ids[a:b], ann[pred].argmax(-1)
        nll = {k: float(nn.functional.cross_entropy(x[pred], target, reduction="sum"))
               for k, x in (("nll_snn", snn), ("nll_ann", ann), ("nll_one_pass", one_pass))}
        out.append({**nll, "agree": int((snn[pred].argmax(-1) == top).sum()),
                    "agree_one_pass": int((one_pass[pred].argmax(-1) == top).sum()), "tokens": b - a})
    return out


def _score(proc: TemporalSpikeProcessor, ann: nn.Module, convs: list[dict], progress) -> list[dict]:
    """Scores summed per reply index over ``convs``: the SNN reads each conversation turn by turn through
    the processor's cache (as in a chat), and, as a diagnostic, in one pass without it."""
    per_reply: list[dict] = []
    for k, conv in enumerate(convs):
        cid, ids = f"quality/{k}", _ids(conv["segments"])
        snn = torch.cat(feed(proc, conv["segments"], cid, decode=False)).float().cpu()
        proc.reset(cid)
        whole = one_pass(proc.model, ids).float().cpu()
        for j, s in enumerate(_reply_scores(conv["segments"], snn, whole, ann_logits(ann, ids))):
            if j == len(per_reply):
                per_reply.append(dict.fromkeys(KEYS, 0))
            for key, v in s.items():
                per_reply[j][key] += v
        if progress is not None:
            progress(k + 1, len(convs))
    return per_reply


def multi_turn_quality(proc: TemporalSpikeProcessor, ann: nn.Module, tokenizer, n: int, mode: str,
                       progress=None) -> tuple[list[dict], dict]:
    """Perplexities and agreement on the replies of ``n`` chit-chat conversations, reply by reply."""
    convs, selection = chitchat(tokenizer, n, proc.max_context_length)
    per_reply = _score(proc, ann, convs, progress)
    turns = [_summary(r) for r in per_reply]
    total = _summary({key: sum(r[key] for r in per_reply) for key in KEYS})
    target = TARGETS.get(proc.T, {}) if mode == "full" else {}
    rows = []
    for j, t in enumerate(turns, 1):
        detail = f"{t['tokens']} reply tokens"
        name = f"chit-chat reply {j}: top-1 agreement with the ANN"
        rows.append(check("multi_turn", name, t["agreement"], ">=", target["agreement"], detail)
                    if "agreement" in target else info("multi_turn", name, t["agreement"], detail))
        rows.append(info("multi_turn", f"chit-chat reply {j}: perplexity SNN/ANN", t["ppl_ratio"],
                         f"SNN {t['ppl_snn']:.4g}, ANN {t['ppl_ann']:.4g}"))
    name = f"chit-chat all replies: perplexity SNN/ANN ({len(convs)} conversations)"
    detail = f"SNN {total['ppl_snn']:.4g}, ANN {total['ppl_ann']:.4g}, agreement {total['agreement']:.3f}"
    rows.append(check("multi_turn", name, total["ppl_ratio"], "<=", target["ppl_ratio"], detail)
                if "ppl_ratio" in target else info("multi_turn", name, total["ppl_ratio"], detail))
    rows.append(info("multi_turn", "chit-chat all replies, SNN in one pass without the cache: top-1 agreement",
                     total["agreement_one_pass"], f"diagnostic; perplexity SNN/ANN {total['ppl_ratio_one_pass']:.4g}"))
    rows.append(check("multi_turn", "chit-chat conversations scored", len(convs), "==", n,
                      f"skipped: {selection['skipped_short_or_empty']} too short, "
                      f"{selection['skipped_over_context_limit']} over the context limit"))
    return rows, {"selection": selection, "conversation_ids": [c["id"] for c in convs], "per_reply": turns,
                  "all_replies": total, "targets": target or "none named for this mode and T"}


def _summary(s: dict) -> dict:
    n = max(s["tokens"], 1)
    ppl = {k: math.exp(s[f"nll_{k}"] / n) for k in ("snn", "ann", "one_pass")}
    return {"tokens": s["tokens"], "ppl_snn": ppl["snn"], "ppl_ann": ppl["ann"], "ppl_ratio": ppl["snn"] / ppl["ann"],
            "agreement": s["agree"] / n, "ppl_ratio_one_pass": ppl["one_pass"] / ppl["ann"],
            "agreement_one_pass": s["agree_one_pass"] / n}


# -- recall --------------------------------------------------------------------------------------

def probe(i: int) -> tuple[list[dict], str, str]:
    """Probe ``i``: the messages up to the question, the teacher-forced answer, and the fact asked for."""
    name, city, colour = FACTS[i]
    kind = ("colour", "name", "city")[i % 3]
    fact = {"colour": colour, "name": name, "city": city}[kind]
    question, answer = QUESTIONS[kind]
    msgs = [("user", f"Hi! My name is {name}, I live in {city} and my favourite colour is {colour}."),
            ("assistant", "Nice to meet you! How can I help you today?"), *SMALL_TALK, ("user", question)]
    return [{"role": r, "content": c} for r, c in msgs], answer.format(fact), fact


def fact_span(tokenizer, msgs: list[dict], answer: str, fact: str) -> tuple[list[Segment], slice]:
    """Segments of the conversation with ``answer`` as the last reply, and the fact's token range in it."""
    full = segments(tokenizer, msgs + [{"role": "assistant", "content": answer}])
    cut = segments(tokenizer, msgs + [{"role": "assistant", "content": answer[:answer.index(fact)].rstrip()}])
    a, b = full[-1].ids, cut[-1].ids
    start = next(i for i in range(len(a)) if i >= len(b) or a[i] != b[i])
    end = next(e for e in range(start + 1, len(a) + 1) if fact in tokenizer.decode(a[start:e]))
    offset = int(_ids(full[:-1]).numel())
    return full, slice(offset + start, offset + end)


def _fact_scores(logits: torch.Tensor, ids: torch.Tensor, span: slice) -> tuple[bool, float]:
    pred = logits[span.start - 1:span.stop - 1].float().log_softmax(-1)
    target = ids[span]
    first_top1 = bool(pred[0].argmax() == target[0])
    return first_top1, float(pred.gather(-1, target[:, None]).sum())


@torch.no_grad()
def ann_greedy(ann: nn.Module, ids: torch.Tensor, new_tokens: int, stop: set[int]) -> list[int]:
    dev = input_device(ann)
    out = ann(input_ids=ids.to(dev)[None], use_cache=True)
    toks: list[int] = []
    while True:
        toks.append(int(out.logits[0, -1].argmax()))
        if toks[-1] in stop or len(toks) == new_tokens:
            return toks
        out = ann(input_ids=torch.tensor([[toks[-1]]], device=dev), past_key_values=out.past_key_values,
                  use_cache=True)


def recall(proc: TemporalSpikeProcessor, ann: nn.Module, tokenizer) -> tuple[list[dict], dict]:
    """Each probe for ANN and SNN: greedy reply contains the fact; teacher-forced fact top-1 and log-prob."""
    stop = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    results = []
    for i in range(len(FACTS)):
        msgs, answer, fact = probe(i)
        segs, span = fact_span(tokenizer, msgs, answer, fact)
        ids = _ids(segs)
        snn_tf = torch.cat(feed(proc, segs, "recall/tf", decode=False)).float().cpu()
        proc.reset("recall/tf")
        feed(proc, segs[:-2], "recall/gen", decode=False)
        snn_gen = proc.generate(segs[-2].ids, RECALL_NEW_TOKENS, conversation_id="recall/gen", stop_tokens=sorted(stop))
        proc.reset("recall/gen")
        ann_gen = ann_greedy(ann, _ids(segs[:-1]), RECALL_NEW_TOKENS, stop)
        row = {"fact": fact, "question": msgs[-1]["content"]}
        for who, logits, gen in (("ann", ann_logits(ann, ids), ann_gen), ("snn", snn_tf, snn_gen.tokens)):
            text = tokenizer.decode(gen, skip_special_tokens=True)
            top1, logp = _fact_scores(logits, ids, span)
            row[who] = {"reply": text, "recalled": fact.lower() in text.lower(), "fact_top1": top1,
                        "fact_logprob": logp}
        results.append(row)
    rate = {w: sum(r[w]["recalled"] for r in results) / len(results) for w in ("ann", "snn")}
    top1 = {w: sum(r[w]["fact_top1"] for r in results) / len(results) for w in ("ann", "snn")}
    logp = {w: sum(r[w]["fact_logprob"] for r in results) / len(results) for w in ("ann", "snn")}
    rows = [check("multi_turn", f"recall turn 1 -> 3, greedy reply names the fact: SNN (ANN {rate['ann']:.2f})",
                  rate["snn"], ">=", round(rate["ann"] - RECALL_TOLERANCE, 9),  # rates are multiples of 1/probes
                  f"{len(results)} probes; bar: ANN rate - {RECALL_TOLERANCE}"),
            info("multi_turn", f"recall, teacher-forced fact top-1: SNN (ANN {top1['ann']:.2f})", top1["snn"],
                 f"mean fact log-prob SNN {logp['snn']:.3f}, ANN {logp['ann']:.3f}")]
    return rows, {"probes": results, "recall_rate": rate, "fact_top1_rate": top1, "mean_fact_logprob": logp,
                  "tolerance": RECALL_TOLERANCE}
