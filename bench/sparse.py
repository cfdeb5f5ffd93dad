"""When does event-driven accumulation (``--use_sparse``) pay off? Dense against sparse, side by side.

Two measurements, in one run on one machine:

1. Layer sweep: every SmolLM2-135M linear shape (q/o 576->576, k/v 576->192, gate/up 576->1536,
   down 1536->576) fed ``rows`` time-folded spike rows (theta * s, s in {-1, 0, 1}) at spike
   rates from 0.1% to 50%; the dense layer against ``spike_modules.sparse.event_linear``,
   interleaved, medians. The break-even rate of a shape is the highest measured rate at which the
   sparse product is still faster (None if it never is).
2. Whole model: the embedded SmolLM2 converted as ``run_conversion.py --simplified`` does (or a
   saved ``--model_dir``), the time-stepped simulation on ``--tokens`` tokens run dense and
   sparse, side by side, with the model's measured spike rates and the logits' agreement.

    python -m bench.sparse --out docs/bench_sparse.json
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
from torch import nn

from bench.timing import side_by_side
from spike_modules.sparse import event_linear
from stac_common.io import check_output_free, write_json

SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (576, 192), "gate_proj/up_proj": (576, 1536),
          "down_proj": (1536, 576)}
RATES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.5)


def spikes(rows: int, width: int, rate: float, gen: torch.Generator) -> torch.Tensor:
    theta = torch.rand(width, generator=gen) + 0.1
    sign = torch.randint(0, 2, (rows, width), generator=gen).float().mul_(2).sub_(1)
    return sign * (torch.rand(rows, width, generator=gen) < rate) * theta


def layer_sweep(rows: int, repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for name, (i, o) in SHAPES.items():
        layer = nn.Linear(i, o)
        points = []
        for rate in RATES:
            x = spikes(rows, i, rate, gen)
            med = side_by_side({"dense": lambda: layer(x), "sparse": lambda: event_linear(layer, x)}, repeats)
            points.append({"rate": rate, "measured_rate": float((x != 0).float().mean()),
                           "dense_ms": med["dense"] * 1e3, "sparse_ms": med["sparse"] * 1e3,
                           "sparse_over_dense": med["sparse"] / med["dense"]})
        faster = [p["rate"] for p in points if p["sparse_over_dense"] < 1]
        out.append({"layer": name, "in": i, "out": o, "rows": rows, "points": points,
                    "break_even_rate": max(faster) if faster else None})
        print(f"{name:18s} " + " ".join(f"{p['rate']:.3f}:{p['sparse_over_dense']:.2f}" for p in points), flush=True)
    return out


def load_model(model_dir: str | None, T: int, workdir: Path):
    from stac_lm import ConvertOptions, run
    from stac_lm.io.saving import load_snn

    if model_dir:
        snn, tok, config = load_snn(model_dir, "cpu")
        return snn, tok, {"model_dir": model_dir, "mode": config["mode"], "timesteps": config["timesteps"]}
    opts = ConvertOptions(simplified=True, timesteps=T, verify=False, output_dir=str(workdir / "snn"), overwrite=True,
                          device="cpu")
    out = run(opts, progress=False)
    return out.snn, out.tokenizer, {"converted": "run_conversion.py --simplified --no-verify", "mode": "simplified",
                                    "timesteps": T, "conversion_seconds": out.conversion_seconds}


def whole_model(model_dir: str | None, T: int, tokens: int, repeats: int) -> dict:
    from smollm2_converter import run_sequential
    from spike_modules import iter_sites
    from spike_modules.energy import site_neurons
    from stac_lm.convert.texts import EVAL_PLAYS, read_text, tokenize

    with tempfile.TemporaryDirectory(prefix="stac_sparse_") as tmp:
        snn, tok, source = load_model(model_dir, T, Path(tmp))
    T = source["timesteps"]
    text, source_text, files = read_text(None, EVAL_PLAYS)
    ids = tokenize(tok, text, tokens, "eval", source_text, files).ids[None]
    sites = [site for _, site in iter_sites(snn)]
    for site in sites:
        site.reset_stats()
    with torch.no_grad():
        dense = run_sequential(snn, ids, T)
        sparse = run_sequential(snn, ids, T, sparse=True)
    # spikes per neuron per step of the simulation's own (sequential) neurons, both runs
    stats = [n for site in sites for n in site_neurons(site) if n.neuron_steps_total]
    spikes, steps = sum(n.spikes_total for n in stats), sum(n.neuron_steps_total for n in stats)
    med = side_by_side({"dense": lambda: run_sequential(snn, ids, T),
                        "sparse": lambda: run_sequential(snn, ids, T, sparse=True)}, repeats, warmup=0)
    return {**source, "tokens": tokens, "repeats": repeats,
            "mean_spike_rate": spikes / steps,
            "dense_seconds": med["dense"], "sparse_seconds": med["sparse"],
            "sparse_over_dense": med["sparse"] / med["dense"],
            "relative_logit_diff": float((sparse - dense).norm() / dense.norm()),
            "top1_equal": float((sparse.argmax(-1) == dense.argmax(-1)).float().mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16 * 64, help="time-folded rows per layer call (T x tokens)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--model_dir", default=None, help="a saved SNN (default: convert the embedded model, simplified)")
    p.add_argument("--timesteps", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--model_repeats", type=int, default=3)
    p.add_argument("--skip_model", action="store_true")
    p.add_argument("--out", default="docs/bench_sparse.json")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    out = check_output_free(args.out, args.overwrite)
    t0 = time.time()
    layers = layer_sweep(args.rows, args.repeats)
    model = None if args.skip_model else whole_model(args.model_dir, args.timesteps, args.tokens, args.model_repeats)
    if model:
        print(f"whole model T={model['timesteps']} rate {model['mean_spike_rate']:.3f}: sparse/dense "
              f"{model['sparse_over_dense']:.2f} (dense {model['dense_seconds']:.2f} s)", flush=True)
    result = {"benchmark": "bench/sparse.py", "command": " ".join(["python -m bench.sparse", *sys.argv[1:]]),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "sparse_product": "torch.sparse.mm(CSR spikes, dense weight [in, out])",
              "seconds": time.time() - t0, "layers": layers, "whole_model": model}
    write_json(out, result)
    print(f"written {out}")


if __name__ == "__main__":
    main()
