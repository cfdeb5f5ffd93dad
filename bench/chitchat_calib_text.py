"""Chat-formatted calibration text from the embedded chit-chat data, for a chat-calibrated conversion.

Renders whole conversations with the SmolLM2 chat template, taken from the end of the
conversation ids in sorted order (``test_conversational_snn.py`` scores the first ones, so the
two never meet), until about ``--tokens`` tokens. Used as

    python bench/chitchat_calib_text.py --out out/chitchat_calib.txt
    python run_conversion.py --calib_text out/chitchat_calib.txt --output_dir out/conv_chatcal_T16
    python test_conversational_snn.py --test_multi_turn --model_dir out/conv_chatcal_T16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stac_assets import chitchat_json, load_smollm2  # noqa: E402
from stac_io import atomic_write_text, check_output_free  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the text file to write")
    p.add_argument("--tokens", type=int, default=12000, help="stop once the text holds this many tokens")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    out = check_output_free(args.out, args.overwrite)
    _, tok = load_smollm2()
    data = json.loads(chitchat_json().read_text(encoding="utf-8"))
    ids = sorted(data)
    parts, n_tokens, first = [], 0, None
    for i in range(len(ids) - 1, -1, -1):
        texts = ["\n".join(m["text"].strip() for m in turn).strip() for turn in data[ids[i]].get("messages", [])]
        texts = [t for t in texts if t]
        if len(texts) < 2:
            continue
        msgs = [{"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(texts)]
        parts.append(tok.apply_chat_template(msgs, tokenize=False))
        n_tokens += len(tok(parts[-1])["input_ids"])
        first = i
        if n_tokens >= args.tokens:
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(parts))
    print(f"{len(parts)} conversations (sorted positions {first}..{len(ids) - 1} of {len(ids)}), "
          f"{n_tokens} tokens -> {out}")


if __name__ == "__main__":
    main()
