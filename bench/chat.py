"""Chat benchmark: cached multi-turn decoding of a converted model, side by side in one run.

Measures, on one converted model (default: the embedded SmolLM2-135M-Instruct converted as `make chat`
does: full mode, T=16, calibrated on chit-chat):

1. cost per generated token at turns 1..5 of a conversation (median gap between streamed
   tokens, greedy, fixed reply length), and the turn-5 / turn-1 ratio (target <= 1.2: no
   recompute of the history), taken within each conversation and the median over repeats;
2. one cached decoding step against recomputing the whole context, at a 400-token history
   (target: cached at least 5x faster);
3. SNN (parallel, TemporalSpikeProcessor) tokens per second against the ANN's (transformers'
   own ``generate`` with its KV cache), same prompt and reply length (target >= 0.6); the SNN
   both as saved (8-bit weights converted on every step) and with ``float_weights=True``
   (a float copy of the 8-bit weights kept, the ANN's weight memory; copied once, before timing,
   as a chat session does).

User turns are real chit-chat messages (the embedded chitchat-dataset, first conversation
with enough turns in sorted-id order) in the tokenizer's chat template.

    python -m bench.chat --out docs/bench_chat.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.timing import side_by_side
from stac_common.assets import chitchat_json
from stac_common.io import check_output_free, write_json
from stac_lm import ConvertOptions, TemporalSpikeProcessor, load_snn, run
from stac_lm.convert.options import CHITCHAT
from stac_lm.convert.pipeline import load_source


def user_messages(n: int, min_turns: int = 12) -> list[str]:
    """The first speaker's turns of the first chit-chat conversation (sorted ids) with enough turns."""
    data = json.loads(Path(chitchat_json()).read_text())
    for cid in sorted(data):
        turns = [" ".join(m["text"] for m in turn) for turn in data[cid]["messages"]]
        if len(turns) >= min_turns:
            return turns[0::2][:n]
    raise ValueError(f"no chit-chat conversation has {min_turns} turns")


def turn_ids(tok, text: str, first: bool) -> torch.Tensor:
    """Token ids of one user turn with the generation prompt (the system block on the first turn)."""
    msgs = [{"role": "user", "content": text}]
    if getattr(tok, "chat_template", None):
        full = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        if not first:  # the system block is part of the first turn only
            full = full[full.index("<|im_start|>user"):] if "<|im_start|>user" in full else full
        return torch.tensor(tok(full, add_special_tokens=False)["input_ids"])
    return torch.tensor(tok(f"User: {text}\nAssistant:", add_special_tokens=False)["input_ids"])


def per_turn_token_cost(snn, tok, T: int, messages: list[str], reply: int, repeats: int) -> dict:
    """Median seconds between streamed tokens at each turn (the first token of a turn, which
    includes the prefill of the user's message, is left out)."""
    gaps: list[list[float]] = [[] for _ in messages]
    starts, ratios = [], []
    for _ in range(repeats):
        p = TemporalSpikeProcessor(snn, T, max_context_length=2048)
        starts, this = [], []
        for i, text in enumerate(messages):
            starts.append(int(p.history().numel()))
            stamps: list[float] = []
            p.generate(turn_ids(tok, text, i == 0), reply, on_token=lambda c, t: stamps.append(time.perf_counter()))
            this.append([b - a for a, b in zip(stamps, stamps[1:])])
            gaps[i] += this[-1]
        # last turn over first within one conversation (seconds apart), so a machine whose speed
        # drifts over minutes does not bias the ratio; the median over repeats is reported
        ratios.append(statistics.median(this[-1]) / statistics.median(this[0]))
    med = [statistics.median(g) for g in gaps]
    return {"reply_tokens": reply, "repeats": repeats, "seconds_per_token": med,
            "history_tokens_at_turn_start": starts, "last_over_first_per_repeat": ratios,
            "turn5_over_turn1": statistics.median(ratios)}


def cached_vs_recompute(snn, tok, T: int, messages: list[str], history: int, repeats: int) -> dict:
    """One cached decoding step against one full pass over the context, at ``history`` tokens."""
    ids = torch.cat([turn_ids(tok, m, i == 0) for i, m in enumerate(messages * 20)])[:history]
    if ids.numel() < history:
        raise ValueError(f"the chit-chat text gives only {ids.numel()} tokens, fewer than {history}")
    p = TemporalSpikeProcessor(snn, T, max_context_length=4 * history)
    p(ids)
    step = torch.tensor([ids[-1].item()])
    context = torch.cat([ids, step])[None]
    med = side_by_side({"cached": lambda: p(step, new_turn=False),
                        "recompute": lambda: snn(input_ids=context, use_cache=False)}, repeats)
    return {"history_tokens": history, "repeats": repeats, "cached_seconds": med["cached"],
            "recompute_seconds": med["recompute"], "speedup": med["recompute"] / med["cached"]}


def snn_vs_ann(snn, ann, tok, T: int, messages: list[str], reply: int, repeats: int) -> dict:
    """Seconds to answer one prompt with ``reply`` tokens: the SNN processor (8-bit weights converted
    on every step, and with kept float weights, copied once before timing) against ANN ``generate``."""
    prompt = turn_ids(tok, messages[0], True)
    # a chat session copies the weights once: the kept-weights processor is built once, on its own
    # copy of the model (the copies live on the model), and only its conversation is reset per run
    kept = TemporalSpikeProcessor(copy.deepcopy(snn), T, float_weights=True)

    def snn_run():
        TemporalSpikeProcessor(snn, T).generate(prompt, reply)

    def snn_float_run():
        kept.reset()
        kept.generate(prompt, reply)

    def ann_run():
        ann.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None], max_new_tokens=reply,
                     min_new_tokens=reply, do_sample=False, pad_token_id=tok.eos_token_id)

    med = side_by_side({"snn": snn_run, "snn_float_weights": snn_float_run, "ann": ann_run}, repeats)
    return {"prompt_tokens": int(prompt.numel()), "reply_tokens": reply, "repeats": repeats,
            "snn_seconds": med["snn"], "snn_float_weights_seconds": med["snn_float_weights"],
            "ann_seconds": med["ann"], "snn_tokens_per_second": reply / med["snn"],
            "snn_float_weights_tokens_per_second": reply / med["snn_float_weights"],
            "ann_tokens_per_second": reply / med["ann"], "ratio": med["ann"] / med["snn"],
            "ratio_float_weights": med["ann"] / med["snn_float_weights"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", "--model-dir", default=None,
                   help="a converted model (default: convert the embedded SmolLM2 as make chat does: full mode, T=16, "
                        "--calib_text chitchat)")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--reply_tokens", type=int, default=24)
    p.add_argument("--history", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="docs/bench_chat.json")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    out = check_output_free(args.out, args.overwrite)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="stac_bench_chat_") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = str(Path(tmp) / "snn")
            run(ConvertOptions(output_dir=model_dir, calib_text=CHITCHAT, verify=False, device="cpu"), progress=False)
        snn, tok, config = load_snn(model_dir)
    ann, _ = load_source(config["options"]["model_name"])
    T = int(config["timesteps"])
    messages = user_messages(args.turns)
    result = {
        "benchmark": "bench/chat.py", "command": " ".join(["python -m bench.chat", *sys.argv[1:]]),
        "model": config["source"].get("model_id"), "mode": config["mode"], "timesteps": T,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "per_turn": per_turn_token_cost(snn, tok, T, messages, args.reply_tokens, args.repeats),
        "cached_vs_recompute": cached_vs_recompute(snn, tok, T, messages, args.history, args.repeats),
        "snn_vs_ann": snn_vs_ann(snn, ann, tok, T, messages, args.reply_tokens, args.repeats),
        "targets": {"turn5_over_turn1_max": 1.2, "cached_speedup_min": 5.0, "snn_over_ann_tokens_per_second_min": 0.6},
    }
    result["seconds"] = time.time() - t0
    pt, cr, sa = result["per_turn"], result["cached_vs_recompute"], result["snn_vs_ann"]
    print(f"per-token cost by turn (ms): {', '.join(f'{s * 1e3:.1f}' for s in pt['seconds_per_token'])}; "
          f"turn {args.turns} / turn 1 = {pt['turn5_over_turn1']:.2f}")
    print(f"cached step {cr['cached_seconds'] * 1e3:.1f} ms vs recompute {cr['recompute_seconds'] * 1e3:.1f} ms "
          f"at {cr['history_tokens']} tokens: x{cr['speedup']:.1f}")
    print(f"SNN {sa['snn_tokens_per_second']:.1f} tok/s (kept float weights "
          f"{sa['snn_float_weights_tokens_per_second']:.1f}) vs ANN {sa['ann_tokens_per_second']:.1f} tok/s: "
          f"ratio {sa['ratio']:.2f} ({sa['ratio_float_weights']:.2f})")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"written {out}")


if __name__ == "__main__":
    main()
