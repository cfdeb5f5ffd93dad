"""Quality-energy frontier: perplexity ratio, top-1 agreement and energy ratio of one converted
SmolLM2 per (coding, T, threshold percentile), against its ANN, on one plot.

One calibration pass observes every site (the observations do not depend on T or coding); each
point then fits its thresholds (DA-QCFS, per channel, burst budget 64), runs the evaluation text
through ANN and SNN once, and reads perplexity, agreement and the operation counts of that same
pass (``spike_modules.energy``: MAC 4.6 pJ, accumulate 0.9 pJ, a weighted spike's shift 0.1 pJ). The
baseline point is the conversion before this benchmark existed (rate coding, T=16, 95th
percentile, LM head dense); the peer line is SpikingJelly's Qwen2SNNRecipe from
``docs/bench_convert_peer.json`` (perplexity only: it reports no operation counts).

    python -m bench.frontier --out docs/frontier.json --plot docs/frontier.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from calibration import CalibrationConfig
from calibration.calibrate import fit_calibration, observe_sites
from calibration.int8 import quantize_weights_
from smollm2_converter import ConversionConfig, convert
from spike_modules import iter_sites, max_exact_burst, set_mode
from spike_modules.site import reset_spike_stats
from stac_lm.eval.perplexity import evaluate_lm
from stac_common.io import check_output_free, write_json
from spike_modules.energy import counting, energy_summary
from stac_lm.convert.pipeline import CALIB_SEQ, load_source
from stac_lm.convert.texts import calibration_batches, load_streams
from stac_common.runtime import machine_info, resolve_device

BASELINE = "rate:16:95:nohead"
DEFAULT_POINTS = ("rate:16:95:nohead,rate:16:95,rate:32:95,weighted:4:99,weighted:5:99,weighted:5:99.9,"
                  "weighted:6:99.9,weighted:7:99.9,weighted:8:99.9")
PEER_FILE = Path("docs/bench_convert_peer.json")
DEFAULT_POINT = ("weighted", 7, 99.9, True, True)  # stac_lm.convert.options: full mode's coding, T, percentile, head, int8


def parse_point(spec: str) -> dict:
    """``coding:T:percentile[:nohead][:float]`` -> a point's settings (``nohead``: LM head dense;
    ``float``: float weights instead of 8-bit); ``ValueError`` on a bad spec."""
    parts = spec.split(":")
    flags = set(parts[3:])
    if len(parts) < 3 or flags - {"nohead", "float"}:
        raise ValueError(f"point {spec!r}: expected coding:T:percentile[:nohead][:float], e.g. weighted:6:99.9")
    return {"spec": spec, "coding": parts[0], "T": int(parts[1]), "percentile": float(parts[2]),
            "spike_head": "nohead" not in flags, "int8_weights": "float" not in flags}


def measure(ann, snn, eval_ids: torch.Tensor) -> dict:
    """Perplexity, agreement and energy of one pass of ``eval_ids`` through both models."""
    reset_spike_stats(snn)
    with counting(ann) as a, counting(snn) as s, torch.no_grad():
        lm = evaluate_lm({"ann": ann, "snn": snn}, eval_ids, progress=False)
    energy = energy_summary(a, s, snn)
    return {"ppl_ann": lm["ppl"]["ann"], "ppl_snn": lm["ppl"]["snn"], "ppl_ratio": lm["ppl"]["snn"] / lm["ppl"]["ann"],
            "top1_agreement": lm["top1_agreement"]["snn"], "energy_ratio": energy["energy_ratio"],
            "coverage": energy["coverage"], "per_group": energy["per_group"]}


def run(args) -> dict:
    torch.manual_seed(0)
    points = [parse_point(s) for s in args.points.split(",")]
    device = resolve_device(args.device)
    ann, tok = load_source("embedded")
    ann = ann.to(device)
    calib, evals = load_streams(tok, None, args.calib_tokens, None, args.eval_tokens)
    batches = [b.to(device) for b in calibration_batches(calib.ids, min(CALIB_SEQ, args.calib_tokens))]
    # one pass observes every site (a model with a head site has them all); observations depend on
    # neither T nor coding, so every point fits its thresholds from them
    probe = convert(ann, ConversionConfig(T=4, mode="full", spike_head=True)).to(device)  # new sites start on the CPU
    quantize_weights_(probe, "own", progress=False)
    observers, n = observe_sites(probe, batches, CalibrationConfig(T=4), progress=False)
    del probe
    models, rows = {}, []
    t_start = time.perf_counter()
    for pt in points:
        key = (pt["coding"], pt["spike_head"], pt["int8_weights"])
        if key not in models:
            cfg = ConversionConfig(T=pt["T"], mode="full", coding=pt["coding"], spike_head=pt["spike_head"])
            models[key] = convert(ann, cfg).to(device)
            if pt["int8_weights"]:
                quantize_weights_(models[key], "own", progress=False)
        snn = models[key]
        names = {name for name, _ in iter_sites(snn)}
        obs = {k: v for k, v in observers.items() if k in names}
        t0 = time.perf_counter()
        ccfg = CalibrationConfig(T=pt["T"], coding=pt["coding"], rule="percentile", percentile=pt["percentile"],
                                 max_burst=max_exact_burst(pt["T"], pt["coding"]), burst_budget=64, n_samples=n)
        fit_calibration(obs, ccfg).apply_to(snn)
        set_mode(snn, "parallel")
        row = {**pt, **measure(ann, snn, evals.ids.to(device)), "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{pt['spec']:22s} ratio {row['ppl_ratio']:.3f} top1 {row['top1_agreement']:.3f} "
              f"energy {row['energy_ratio']:.3f} coverage {row['coverage']:.3f} ({row['seconds']:.0f} s)", flush=True)
    peer = json.loads(PEER_FILE.read_text()) if PEER_FILE.is_file() else None
    return {"benchmark": "bench/frontier.py", "points": rows, "baseline": BASELINE, "ann": {"ppl_ratio": 1.0, "top1_agreement": 1.0, "energy_ratio": 1.0},
            "peer": _peer_rows(peer), "calib_tokens": args.calib_tokens, "eval_tokens": args.eval_tokens,
            "calibration": calib.describe(), "evaluation": evals.describe(),
            "machine": machine_info(device), "seconds": time.perf_counter() - t_start}


def _peer_rows(peer: dict | None) -> list[dict]:
    """SpikingJelly's recipe rows of the peer bench: T and perplexity ratio (it has no op counts)."""
    if not peer:
        return []
    return [{"T": r["T"], "ppl_ratio": r["ratio"], "levels": r["levels"]}
            for r in peer["peer_spikingjelly"]["results"]]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "ppl_ratio", "perplexity ratio SNN/ANN"),
                           (axes[1], "top1_agreement", "top-1 agreement with the ANN")):
        for coding, marker in (("rate", "o"), ("weighted", "s")):
            pts = [p for p in result["points"] if p["coding"] == coding and p["spec"] != result["baseline"]
                   and p["int8_weights"]]
            ax.scatter([p["energy_ratio"] for p in pts], [p[key] for p in pts], marker=marker, label=f"{coding} coding")
            for p in pts:
                ax.annotate(f"T={p['T']} p{p['percentile']:g}", (p["energy_ratio"], p[key]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        floats = [p for p in result["points"] if not p["int8_weights"]]
        ax.scatter([p["energy_ratio"] for p in floats], [p[key] for p in floats], marker="^", facecolors="none",
                   edgecolors="purple", label="float weights")
        base = [p for p in result["points"] if p["spec"] == result["baseline"]]
        if base:
            ax.scatter([base[0]["energy_ratio"]], [base[0][key]], marker="x", color="k", label="before (rate T=16, head dense)")
        default = [p for p in result["points"] if (p["coding"], p["T"], p["percentile"], p["spike_head"],
                                                   p["int8_weights"]) == DEFAULT_POINT]
        if default:
            ax.scatter([default[0]["energy_ratio"]], [default[0][key]], s=260, facecolors="none", edgecolors="red",
                       label="default (make demo)")
        ax.scatter([1.0], [1.0], marker="*", s=120, color="gold", edgecolor="k", label="ANN")
        for r in result["peer"]:
            if r.get(key) is not None:
                ax.axhline(r[key], ls=":", color="gray", lw=1)
                ax.annotate(f"SpikingJelly recipe T={r['T']}", (0.02, r[key]), fontsize=7, color="gray",
                            xycoords=("axes fraction", "data"))
        ax.axvline(0.5, ls="--", color="red", lw=0.8)
        ax.set_xlabel("energy ratio SNN/ANN (45 nm op counts)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M, full mode, 8-bit weights: quality against energy (bench/frontier.py)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", default=DEFAULT_POINTS, help="comma-separated coding:T:percentile[:nohead]")
    p.add_argument("--calib_tokens", type=int, default=8192)
    p.add_argument("--eval_tokens", type=int, default=4096)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--out", default="docs/frontier.json")
    p.add_argument("--plot", default="docs/frontier.png")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--replot", metavar="JSON", help="only draw --plot from an existing result file")
    args = p.parse_args()
    if args.replot:
        check_output_free(args.plot, args.overwrite)
        plot(json.loads(Path(args.replot).read_text()), Path(args.plot))
        print(f"wrote {args.plot}")
        return
    for path in (args.out, args.plot):
        check_output_free(path, args.overwrite)
    result = run(args)
    write_json(Path(args.out), result)
    plot(result, Path(args.plot))
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
