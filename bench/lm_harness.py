"""lm-eval-harness table: the embedded SmolLM2 (ANN) beside its SNNs, on the local Tempest tasks.

Converts the embedded SmolLM2-135M-Instruct at each point asked (``mode:T``; the coding is the
mode's own: rate in simplified mode, weighted in full mode), with each mode's default calibration
(Hamlet, Macbeth, Othello), then scores the ANN and every SNN with lm-eval's ``HFLM`` on the
tasks of ``stac_lm/eval/lm_eval_tasks`` (``stac_lm.eval.harness.evaluate``). The Tempest is never
calibration text.

    python -m bench.lm_harness --points simplified:8,simplified:16,simplified:32 --limit 40 \\
        --out docs/lm_eval.json --markdown docs/lm_eval.md --overwrite
    python -m bench.lm_harness --from_json docs/lm_eval.json --markdown docs/lm_eval.md --overwrite  # the page only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from stac_common.io import check_output_free, write_json, write_text_atomic
from stac_lm import ConvertOptions, run
from stac_lm.eval.harness import DEFAULT_TASKS, evaluate, markdown_table


def parse_points(text: str) -> list[tuple[str, int]]:
    points = []
    for part in text.split(","):
        mode, _, T = part.strip().partition(":")
        if mode not in ("full", "simplified") or not T.isdigit():
            raise SystemExit(f"--points: expected mode:T with mode full or simplified, got {part!r}")
        points.append((mode, int(T)))
    return points


PAGE = """# lm-eval-harness: the ANN beside its SNNs

Zero-shot tasks scored by [lm-eval-harness](https://github.com/EleutherAI/lm-evaluation-harness)
itself: the SNN is a transformers model, so lm-eval's `HFLM` wrapper scores it exactly as it scores
the ANN (`stac_lm/eval/harness.py`). The tasks are local and need no download (`stac_lm/eval/lm_eval_tasks/`),
built from The Tempest, the held-out text of every perplexity figure (never calibration text):

- `tempest_lastword`: LAMBADA-style. A speech (its last {lines} lines at most), its last word taken
  away; `acc` is the share of speeches whose greedy continuation is that word, `perplexity` the
  perplexity of the word (over all its tokens). `acc` counts exact hits only; where it is 0 for
  every model, the word's perplexity is what tells them apart.
- `tempest_cloze`: the lines of a speech before its last, then four candidate last lines (the true
  one and three lines of other speeches, seeded); `acc` picks the most likely, `acc_norm` the most
  likely per byte.

Model: {model}. Each SNN is converted with its mode's defaults (simplified
mode: rate spikes, float weights, per-channel percentile thresholds on 2,048 tokens of Hamlet,
Macbeth and Othello) and runs in parallel mode; the JSON beside this page holds each one's options.
Documents per task: {limit}. The ± is lm-eval's standard error (bootstrap for perplexity); with
this few documents, differences inside it say nothing.

{table}
Command: `{command}`. Machine: {machine}; {seconds:.0f} s in all (conversions included).

Run any task on a saved SNN beside its ANN:

```bash
stac-lm-eval --model_dir out/demo_smollm2 --tasks tempest_lastword,tempest_cloze --limit 100
```
"""


def page(result: dict) -> str:
    from stac_lm.eval.lm_eval_tasks.tempest import MAX_CONTEXT_LINES

    m = result["machine"]
    machine = (f"{m['cpu_count']}-CPU {m['platform']}, torch {m['torch']} with {m['threads']} thread{'s' if m['threads'] != 1 else ''}, shared "
               f"(load average {m['load_average_1_5_15min_at_end'][0]:.1f} at the end)")
    # the JSON's keys are sorted: the ANN first, then the SNNs by mode and T
    order = sorted(result["results"], key=lambda k: (k != "ANN", k.split(" T=")[0], int(k.split("T=")[-1] or 0)
                                                     if "T=" in k else 0))
    rows = {k: result["results"][k] for k in order}
    return PAGE.format(lines=MAX_CONTEXT_LINES, model=result["model"], limit=result["limit"] or "all",
                       table=markdown_table(rows, result["tasks"]), command=result["command"],
                       machine=machine, seconds=result["seconds"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", default="simplified:8,simplified:16,simplified:32")
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--out", default="docs/lm_eval.json")
    p.add_argument("--markdown", default="docs/lm_eval.md")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--from_json", default=None, help="write --markdown from this result file only (no runs)")
    args = p.parse_args()
    md = check_output_free(args.markdown, args.overwrite)
    if args.from_json:
        write_text_atomic(md, page(json.loads(Path(args.from_json).read_text())))
        print(f"written {md}")
        return
    out = check_output_free(args.out, args.overwrite)
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
            key = "eval_seconds_with_ann" if len(models) == 2 else "eval_seconds"
            conversions[name][key] = round(time.time() - t1, 1)
            print(markdown_table(results, tasks), flush=True)
            del conv, models
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "load_average_1_5_15min_at_end": list(os.getloadavg())}
    command = " ".join(["python -m bench.lm_harness", *sys.argv[1:]])
    result = {"benchmark": "bench/lm_harness.py", "command": command,
              "model": "SmolLM2-135M-Instruct (embedded GGUF, float32)", "tasks": tasks, "limit": args.limit,
              "machine": machine, "seconds": round(time.time() - t0, 1), "conversions": conversions,
              "results": results}
    write_json(out, result)
    write_text_atomic(md, page(result))
    print(f"written {out} and {md}")


if __name__ == "__main__":
    main()
