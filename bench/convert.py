"""Conversion benchmark: perplexity, agreement, spikes, energy and latency against T, both modes.

Runs ``run_conversion``'s pipeline (``stac_lm.run``) on the embedded SmolLM2-135M-Instruct for
every mode and T asked, with the same calibration text (Hamlet, Macbeth, Othello) and the
same held-out evaluation text (The Tempest), and collects from each report: perplexity ratio,
top-1 agreement, mean spike rate, coverage, energy ratio, conversion seconds, and the
parallel-SNN forward latency against the ANN's, timed side by side (interleaved, median).
Optionally runs SpikingJelly's own Qwen2SNNRecipe on the same model and texts
(``bench/peer_spikingjelly.py``) for the peer comparison of docs/benchmarks.md.
``--activation``, ``--percentile`` and ``--spike_probs`` override a mode's default (the ReLU
swap, another threshold, spiked attention probabilities) for ablations. Each row records the machine's load average before and after
its run: the 2-core development machine is shared, and a loaded one stretches every time.

    python -m bench.convert --timesteps 4,8,16,32 --modes full,simplified --out docs/bench_convert.json
    python -m bench.convert --modes simplified --coding rate --timesteps 16,32 --out docs/bench_convert_simplified.json
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

from bench.timing import model_latency
from stac_common.io import check_output_free, write_json
from stac_lm import ConvertOptions, run

FIELDS = ("ppl_ann", "ppl_snn", "ppl_ratio", "top1_agreement", "mean_spike_rate", "coverage", "energy_ratio",
          "conversion_seconds")


def one_run(mode: str, T: int, args, workdir: Path) -> dict:
    opts = ConvertOptions(simplified=mode == "simplified", timesteps=T, coding=args.coding, calib_tokens=args.calib_tokens,
                          eval_tokens=args.eval_tokens, finetune_steps=args.finetune_steps,
                          activation=args.activation, percentile=args.percentile, spike_probs=args.spike_probs,
                          output_dir=str(workdir / f"{mode}_T{T}"), overwrite=True, device="cpu")
    load_before = os.getloadavg()
    out = run(opts, progress=False)
    report = out.report
    row = {"mode": mode, "T": T, **{k: report[k] for k in FIELDS}}
    row["options"] = opts.to_dict()
    row["sequential"] = report.get("sequential")
    row["spike_checks"] = [c for c in report.get("checks", [])]
    row["peak_spikes_per_token"] = report["spikes"]["peak_spikes_per_token"]
    row["latency"] = model_latency(out.ann, out.snn, out.eval_stream.ids[:512][None])
    row["load_average_1_5_15min"] = {"before": [round(x, 2) for x in load_before],
                                     "after": [round(x, 2) for x in os.getloadavg()]}
    print(f"{mode:10s} T={T:3d} ratio {row['ppl_ratio']:.3f} agree {row['top1_agreement']:.3f} "
          f"rate {row['mean_spike_rate']:.3f} energy {row['energy_ratio']:.3f} "
          f"latency x{row['latency']['ratio']:.2f} convert {row['conversion_seconds']:.0f}s", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timesteps", default="4,8,16,32")
    p.add_argument("--modes", default="full,simplified")
    p.add_argument("--calib_tokens", type=int, default=None,
                   help="calibration tokens (default: each mode's own, 8192 full, 2048 simplified)")
    p.add_argument("--eval_tokens", type=int, default=4096)
    p.add_argument("--coding", default=None, choices=("rate", "weighted"),
                   help="spike coding (default: each mode's own: weighted in full mode, rate in simplified)")
    p.add_argument("--finetune_steps", type=int, default=0)
    p.add_argument("--activation", default=None, choices=("keep", "relu"),
                   help="keep the model's activation or swap it for ReLU (default: the mode's own, keep)")
    p.add_argument("--percentile", type=float, default=None, help="threshold percentile (default: the mode's own)")
    p.add_argument("--spike_probs", action="store_true", default=None,
                   help="spike the attention probabilities too (default: off, rate domain)")
    p.add_argument("--peer", action="store_true", help="also run SpikingJelly's Qwen2SNNRecipe at T >= 16")
    p.add_argument("--out", default="docs/bench_convert.json")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    out = check_output_free(args.out, args.overwrite)
    Ts = [int(t) for t in args.timesteps.split(",")]
    modes = args.modes.split(",")
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="stac_bench_") as tmp:
        for mode in modes:
            for T in Ts:
                rows.append(one_run(mode, T, args, Path(tmp)))
    peer = None
    if args.peer:
        from bench.peer_spikingjelly import run_peer_on_embedded

        peer = run_peer_on_embedded([T for T in Ts if T >= 16], args.calib_tokens or 8192, args.eval_tokens)
    result = {
        "benchmark": "bench/convert.py", "command": " ".join(["python -m bench.convert", *sys.argv[1:]]),
        "model": "SmolLM2-135M-Instruct (embedded GGUF, float32)",
        "calibration_text": "Shakespeare: hamlet, macbeth, othello", "eval_text": "Shakespeare: tempest",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "seconds": time.time() - t0, "results": rows, "peer_spikingjelly": peer,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"written {out}")


if __name__ == "__main__":
    main()
