"""The mask check: conversations of different lengths batched (left-padded) against each alone, and the
continuity of the masks and positions the processor passes to the model while they run batched."""

from __future__ import annotations

import torch

from stac_lm.chat.segments import Segment, segments
from . import conversation
from stac_lm.checks.conversation import check, compare, equal_rows, feed, messages, recorded_calls
from stac_lm.eval.fidelity import left_padded
from stac_lm.generate.processor import TemporalSpikeProcessor

GREEDY_TOKENS = 8    # tokens generated batched and alone
# three conversations of different lengths for the batch: the first user message differs
BATCH_OPENERS = ["Hello!", "Good morning. I have a question about my small garden and the tomatoes in it.",
                 "Can you help me write a short poem about the sea?"]


def _ones_last(m: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([torch.zeros(m.numel() - n, dtype=m.dtype), torch.ones(n, dtype=m.dtype)])


def mask_violations(calls: list[dict], final: list[int]) -> int:
    """Calls (of rows that start empty) whose mask or positions break continuity, plus rows whose count of
    attended slots does not end at ``final`` (their cache lengths).

    Per row and call: the mask covers cache + new slots; its cache part is the previous call's row (same
    batch) or left padding then ones for exactly the tokens fed so far (a rebuilt batch); its new part is
    left padding then the new tokens; their positions continue the count by +1.
    """
    seen, prev, bad = [0] * len(final), [None] * len(final), 0
    for c in calls:
        B, S = c["ids"].shape
        mask = c["mask"] if c["mask"] is not None else torch.ones(B, c["past"] + S, dtype=torch.long)
        if mask.shape != (B, c["past"] + S) or B != len(final):
            bad += 1
            continue
        for r in range(B):
            cache, step = mask[r, :c["past"]], mask[r, c["past"]:]
            n = int(step.sum())
            same_batch = prev[r] is not None and torch.equal(cache, prev[r])
            layout = same_batch or torch.equal(cache, _ones_last(cache, seen[r]))
            pos = c["positions"][r, S - n:] if c["positions"] is not None else None
            if not layout or not torch.equal(step, _ones_last(step, n)) or pos is None \
                    or not torch.equal(pos, seen[r] + torch.arange(n)):
                bad += 1
            seen[r] += n
            prev[r] = mask[r]
    return bad + sum(s != f for s, f in zip(seen, final))


def _batch_segments(tokenizer) -> list[list[Segment]]:
    """Three conversations of different lengths: two turns each and a third prompt (for generation); the
    turns after the opener are those of the checks' conversation (read at call time)."""
    rest = conversation.THREE_TURNS[1:5]
    return [segments(tokenizer, messages([("user", opener), *rest])) for opener in BATCH_OPENERS]


def _feed_batch(proc: TemporalSpikeProcessor, convs: list[list[Segment]], cids: list[str]) -> list[torch.Tensor]:
    """Feed the conversations' segments (all but the last prompt) batched; each row's logits ``[n, V]``."""
    out = [[] for _ in cids]
    for k in range(len(convs[0]) - 1):
        rows = [c[k].ids for c in convs]
        if convs[0][k].reply:  # decoding: one token per step for every row (replies are equally long)
            steps = [proc(torch.stack([r[j] for r in rows])[:, None], conversation_id=cids, new_turn=False).logits
                     for j in range(int(rows[0].numel()))]
            logits = torch.cat(steps, 1)
        else:
            ids, mask = left_padded(rows, proc.pad_token_id)
            logits = proc(ids, attention_mask=mask, conversation_id=cids).logits
        for i, r in enumerate(rows):
            out[i].append(logits[i, logits.shape[1] - r.numel():])
    return [torch.cat(o) for o in out]


def masks(proc: TemporalSpikeProcessor, tokenizer) -> tuple[list[dict], dict]:
    """Three conversations of different lengths batched (left-padded) against each alone: logits and greedy
    replies, and the continuity of the masks and positions the batched run passed to the model."""
    convs = _batch_segments(tokenizer)
    if len({int(c[1].ids.numel()) for c in convs}) != 1:
        raise ValueError("the batch conversations' replies must be equally long (they are the same text)")
    cids = [f"check/batch{i}" for i in range(len(convs))]
    with recorded_calls(proc.model) as calls:
        batched = _feed_batch(proc, convs, cids)
        gen = proc.generate_batch({c: conv[-1].ids for c, conv in zip(cids, convs)}, GREEDY_TOKENS)
    bad = mask_violations(calls, [proc.cache_length(c) for c in cids])
    stats, same = [], 0
    for i, conv in enumerate(convs):
        alone = torch.cat(feed(proc, conv[:-1], "check/alone"))
        reply = proc.generate(conv[-1].ids, GREEDY_TOKENS, conversation_id="check/alone")
        proc.reset("check/alone")
        stats.append(compare(batched[i], alone))
        same += reply.tokens == gen[cids[i]].tokens
    for c in cids:
        proc.reset(c)
    rows = equal_rows(proc, "masks", "batched (left-padded) vs alone", stats)
    rows += [check("masks", f"greedy replies equal batched and alone ({GREEDY_TOKENS} tokens)", same / len(convs),
                   "==", 1, f"{same} of {len(convs)}"),
             check("masks", "calls with a mask or position gap", bad, "==", 0,
                   f"{len(calls)} batched calls of {len(convs)} rows")]
    return rows, {"conversations": len(convs), "lengths": [int(sum(s.ids.numel() for s in c)) for c in convs],
                  "per_conversation": stats, "greedy_equal": same, "calls": len(calls), "mask_violations": bad}
