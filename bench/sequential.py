"""Parallel mode against the time-stepped simulation of a saved SNN, and the float-rounding noise floor.

For each window of ``--tokens`` evaluation tokens (The Tempest, as in the report), the
verification's own comparison (``stac_lm.checks.sequential``): per-site spike counts against the
parallel counts, the two modes' top-1 agreement, and each mode's agreement with the ANN. Beside
it the noise floor of parallel mode alone: the same tokens with the input embeddings multiplied
by ``1 + eps * N(0, 1)`` (relative perturbations of float-rounding size), and the top-1 agreement
of the perturbed parallel model with the unperturbed one. Where that floor is as low as the two
modes' agreement, their difference is rounding at level boundaries cascading through the
quantizers, not the neurons' time dynamics.

    python -m bench.sequential --model_dir out/demo_smollm2_T16 out/demo_smollm2 --out docs/bench_sequential.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from spike_modules import iter_sites
from stac_common.io import check_output_free, write_json
from stac_common.runtime import machine_info
from stac_lm.checks.sequential import SEQUENTIAL_TOKENS, sequential_section
from stac_lm.convert.pipeline import load_checked_source
from stac_lm.convert.texts import EVAL_PLAYS, read_text, tokenize
from stac_lm.io.saving import load_snn


@torch.no_grad()
def noise_floor(snn, ids: torch.Tensor, eps: float, seeds: int) -> list[float]:
    """Top-1 agreement of parallel mode with itself under relative input perturbations of size ``eps``."""
    emb = snn.get_input_embeddings()(ids)
    ref = snn(inputs_embeds=emb).logits.argmax(-1)
    out = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        noisy = emb * (1 + eps * torch.randn(emb.shape, generator=g))
        out.append(float((snn(inputs_embeds=noisy).logits.argmax(-1) == ref).float().mean()))
    return out


def run_one(model_dir: str, args) -> dict:
    torch.manual_seed(0)
    snn, tok, config = load_snn(model_dir)
    ann = load_checked_source(config).eval()
    T = int(config["timesteps"])
    text, src, files = read_text(None, EVAL_PLAYS)
    ids = tokenize(tok, text, args.tokens * args.windows, "eval", src, files).ids
    eps = [float(e) for e in args.eps.split(",")]
    t0 = time.perf_counter()
    rows = []
    for w in range(args.windows):
        window = ids[w * args.tokens:(w + 1) * args.tokens][None]
        seq = sequential_section(snn, window, T, False, ann=ann)
        seq.pop("note")
        floor = {str(e): noise_floor(snn, window, e, args.seeds) for e in eps}
        rows.append({"window": w, **seq, "noise_floor_top1": floor})
        print(f"window {w}: modes agree {seq['top1_agreement']:.3f}, with the ANN parallel "
              f"{seq['ann_agreement']['parallel']:.3f} / time-stepped {seq['ann_agreement']['sequential']:.3f}, "
              f"site counts off {seq['sites']['off_share']:.2g}; noise floor {floor}", flush=True)
    mean = lambda key: sum(key(r) for r in rows) / len(rows)  # noqa: E731
    return {"model_dir": str(model_dir), "T": T,
            "coding": sorted({getattr(s, "coding", "rate") for _, s in iter_sites(snn)}),
            "tokens_per_window": args.tokens, "windows": rows,
            "mean": {"modes_top1": mean(lambda r: r["top1_agreement"]),
                     "ann_parallel": mean(lambda r: r["ann_agreement"]["parallel"]),
                     "ann_sequential": mean(lambda r: r["ann_agreement"]["sequential"]),
                     "noise_floor_top1": {str(e): mean(lambda r, e=e: sum(r["noise_floor_top1"][str(e)]) / args.seeds)
                                          for e in eps}},
            "seconds": time.perf_counter() - t0}


def run(args) -> dict:
    return {"benchmark": "bench/sequential.py", "models": [run_one(d, args) for d in args.model_dir],
            "machine": machine_info(torch.device("cpu"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, nargs="+", help="saved SNN directories")
    p.add_argument("--tokens", type=int, default=SEQUENTIAL_TOKENS, help="tokens per window (the report's length)")
    p.add_argument("--windows", type=int, default=3, help="consecutive windows of the evaluation text")
    p.add_argument("--eps", default="1e-6,1e-5", help="relative input perturbations of the noise floor")
    p.add_argument("--seeds", type=int, default=3, help="perturbations per eps and window")
    p.add_argument("--out", default="docs/bench_sequential.json")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    check_output_free(args.out, args.overwrite)
    result = run(args)
    write_json(Path(args.out), result)
    print(json.dumps({m["model_dir"]: m["mean"] for m in result["models"]}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
