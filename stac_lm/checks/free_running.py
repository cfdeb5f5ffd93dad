"""The validator's free-running fidelity gate: does the SNN, chatting through the processor, write
what its ANN writes?

Teacher-forced agreement scores the SNN on the ANN's own text; in free generation one different
token sends a reply down another path. Here both models reply greedily to the same held-out
prompts (``stac_lm.eval.prompts``: factual questions with answers, chit-chat openings calibration never
reads): the ANN with its own KV cache, the SNN through :class:`TemporalSpikeProcessor` as the chat
runs it (batched, spiking KV cache). Measured: the share of replies whose first ``FIRST_N`` tokens
equal the ANN's (bar: ``IDENTITY_MIN``), and the share of the ANN's right answers the SNN keeps
(bar: ``KEEP_MIN``).
"""

from __future__ import annotations

from torch import nn

from stac_lm.checks.conversation import check, info
from stac_lm.eval.fidelity import FIRST_N, chat_ids, common_prefix, greedy_reply, stop_ids
from stac_lm.generate.processor import TemporalSpikeProcessor
from stac_lm.eval.prompts import correct, prompts

# Regression floors, below what the default conversion measures (docs/generation.json, the make demo model:
# first-16 identity 0.45, 17 of the ANN's 19 right answers kept); the project's targets, 0.80 and 0.90, are
# not met yet and are reported by bench/generation.py, not hidden in these bars. A broken model measures ~0.
IDENTITY_MIN = 0.35  # share of prompts whose first FIRST_N reply tokens equal the ANN's
KEEP_MIN = 0.8       # share of the ANN's right answers the SNN also gets right
NEW_TOKENS = 24      # enough for the short answers the questions want
BATCH = 10           # prompts the processor decodes together


def free_running(proc: TemporalSpikeProcessor, ann: nn.Module, tokenizer, rows: list[dict] | None = None,
                 new_tokens: int = NEW_TOKENS, progress=None) -> tuple[list[dict], dict]:
    """Greedy replies of ANN and SNN to ``rows`` (default: the questions and chit-chat openings of
    :func:`stac_lm.eval.prompts.prompts`); returns the gate's rows and the measurements (replies included)."""
    rows = prompts(("question", "chitchat")) if rows is None else rows
    if not rows:
        raise ValueError("the fidelity gate needs at least one prompt")
    stop = stop_ids(tokenizer)
    ids = [chat_ids(tokenizer, r["text"])[0] for r in rows]
    ann_replies = [greedy_reply(ann, i[None], new_tokens, stop) for i in ids]
    snn_replies: list[list[int]] = []
    for start in range(0, len(ids), BATCH):
        chunk = {f"fidelity/{k}": ids[k] for k in range(start, min(start + BATCH, len(ids)))}
        gens = proc.generate_batch(chunk, new_tokens, stop_tokens=sorted(stop))
        for cid in chunk:
            snn_replies.append([t for t in gens[cid].tokens if t not in stop])
            proc.reset(cid)
        if progress is not None:
            progress(len(snn_replies), len(ids))
    per_prompt = []
    for r, a, s in zip(rows, ann_replies, snn_replies):
        entry = {"kind": r["kind"], "prompt": r["text"], "ann": tokenizer.decode(a, skip_special_tokens=True),
                 "snn": tokenizer.decode(s, skip_special_tokens=True), "common_prefix": common_prefix(a, s),
                 "first_n_equal": a[:FIRST_N] == s[:FIRST_N]}
        if r.get("answers"):
            entry["ann_correct"] = correct(entry["ann"], tuple(r["answers"]))
            entry["snn_correct"] = correct(entry["snn"], tuple(r["answers"]))
        per_prompt.append(entry)
    identity = sum(e["first_n_equal"] for e in per_prompt) / len(per_prompt)
    right = [e for e in per_prompt if e.get("ann_correct")]
    kept = sum(e["snn_correct"] for e in right) / len(right) if right else float("nan")
    prefix = sum(e["common_prefix"] for e in per_prompt) / len(per_prompt)
    out = [check("fidelity", f"free-running replies: first {FIRST_N} tokens equal the ANN's", identity, ">=",
                 IDENTITY_MIN, f"{len(per_prompt)} prompts, greedy, {new_tokens} new tokens; mean common prefix "
                 f"{prefix:.1f} tokens")]
    if right:
        out.append(check("fidelity", "free-running answers: share of the ANN's right answers the SNN keeps", kept,
                         ">=", KEEP_MIN, f"the ANN answers {len(right)} of "
                         f"{sum('ann_correct' in e for e in per_prompt)} questions right"))
    else:
        out.append(info("fidelity", "free-running answers: the ANN answers no question right", 0.0,
                        "nothing to keep"))
    return out, {"first_n": FIRST_N, "identity": identity, "kept_ann_correct": kept, "mean_common_prefix": prefix,
                 "new_tokens": new_tokens, "prompts": per_prompt}

