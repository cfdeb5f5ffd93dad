"""Parallel-mode latency of saved SNNs against their ANN: one 512-token forward of each, interleaved,
median of ``--repeats`` (``bench/timing.py``), on the first 512 tokens of the model's own evaluation text;
with the spike statistics that reports need, and without them (``set_spike_counting``, as deployed).

    python -m bench.latency --model_dir out/demo_smollm2 --out docs/bench_latency.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.timing import model_latency
from spike_modules.site import set_spike_counting
from stac_common.io import check_output_free, write_json
from stac_lm.convert.pipeline import load_checked_source
from stac_lm.io.saving import load_snn
from stac_lm.convert.texts import EVAL_PLAYS, read_text, tokenize
from stac_common.runtime import machine_info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", action="append", required=True)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--out", default="docs/bench_latency.json")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    check_output_free(args.out, args.overwrite)
    rows = []
    for d in args.model_dir:
        snn, tok, config = load_snn(d, "cpu")
        ann = load_checked_source(config)
        saved = config["options"]
        text, src, _ = read_text(saved["eval_text"], EVAL_PLAYS)
        ids = tokenize(tok, text, args.tokens, "eval", src, ()).ids[: args.tokens][None]
        with torch.inference_mode():
            counted = model_latency(ann, snn, ids, repeats=args.repeats)
            set_spike_counting(snn, False)
            deployed = model_latency(ann, snn, ids, repeats=args.repeats)
        rows.append({"model_dir": d, "coding": config["conversion_config"].get("coding", "rate"),
                     "T": config["timesteps"], "with_spike_statistics": counted, "without_spike_statistics": deployed})
        print(f"{d}: SNN/ANN latency {counted['ratio']:.2f}x with spike statistics, {deployed['ratio']:.2f}x without "
              f"(ANN {deployed['ann_seconds']:.3f} s, SNN {deployed['snn_seconds']:.3f} s)")
    write_json(Path(args.out), {"benchmark": "bench/latency.py", "results": rows, "machine": machine_info(torch.device("cpu"))})


if __name__ == "__main__":
    main()
