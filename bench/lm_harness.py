"""lm-eval-harness table: the embedded SmolLM2 (ANN) beside its SNNs, on the local Tempest tasks.

Converts the embedded SmolLM2-135M-Instruct at each point asked (``mode:T``; the coding is the
mode's own: rate in simplified mode, weighted in full mode), with each mode's default calibration
(Hamlet, Macbeth, Othello), then scores the ANN and every SNN with lm-eval's ``HFLM`` on the
tasks of ``stac_lm/lm_eval_tasks`` (``stac_lm.harness.evaluate``). The Tempest is never
calibration text.

    python -m bench.lm_harness --points simplified:8,simplified:16,simplified:32,full:7 --limit 100 \\
        --out docs/lm_eval.json --markdown docs/lm_eval.md --overwrite
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from stac_io import check_output_free, write_json, write_text_atomic
from stac_lm import ConvertOptions, run
from stac_lm.harness import DEFAULT_TASKS, evaluate, markdown_table


def parse_points(text: str) -> list[tuple[str, int]]:
    points = []
    for part in text.split(","):
        mode, _, T = part.strip().partition(":")
        if mode not in ("full", "simplified") or not T.isdigit():
            raise SystemExit(f"--points: expected mode:T with mode full or simplified, got {part!r}")
        points.append((mode, int(T)))
    return points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", default="simplified:8,simplified:16,simplified:32")
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--out", default="docs/lm_eval.json")
    p.add_argument("--markdown", default="docs/lm_eval.md")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    out = check_output_free(args.out, args.overwrite)
    md = check_output_free(args.markdown, args.overwrite)
    points, tasks = parse_points(args.points), args.tasks.split(",")
    t0 = time.time()
    results, conversions = {}, {}
    with tempfile.TemporaryDirectory(prefix="stac_lm_eval_") as tmp:
        for mode, T in points:
            opts = ConvertOptions(simplified=mode == "simplified", timesteps=T, verify=False, device="cpu",
                                  output_dir=str(Path(tmp) / f"{mode}_T{T}"), overwrite=True)
            t1 = time.time()
            conv = run(opts, progress=False)
            name = f"SNN {mode} {opts.coding} T={T}"
            conversions[name] = {"options": opts.to_dict(), "conversion_seconds": round(time.time() - t1, 1)}
            models = {name: conv.snn} if results else {"ANN": conv.ann, name: conv.snn}
            t1 = time.time()
            results.update(evaluate(models, conv.tokenizer, tasks, args.limit, args.batch_size))
            conversions[name]["eval_seconds_with_ann" if len(models) == 2 else "eval_seconds"] = round(time.time() - t1, 1)
            print(markdown_table(results, tasks), flush=True)
            del conv, models
    table = markdown_table(results, tasks)
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "load_average_1_5_15min_at_end": list(os.getloadavg())}
    command = " ".join(["python -m bench.lm_harness", *sys.argv[1:]])
    write_json(out, {"benchmark": "bench/lm_harness.py", "command": command,
                     "model": "SmolLM2-135M-Instruct (embedded GGUF, float32)", "tasks": tasks, "limit": args.limit,
                     "machine": machine, "seconds": round(time.time() - t0, 1), "conversions": conversions,
                     "results": results})
    write_text_atomic(md, f"{table}\n`{command}` ({machine['cpu_count']}-CPU {machine['platform']}, "
                          f"{time.time() - t0:.0f} s)\n")
    print(f"written {out} and {md}")


if __name__ == "__main__":
    main()
