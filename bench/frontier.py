"""Quality-energy frontier: perplexity ratio, top-1 agreement and energy of one converted SmolLM2 per
(coding, T, threshold percentile, dead-zone budget), against its ANN, on one plot.

The plot's energy is the total per decoded token (arithmetic + bytes moved, batch 1, weights and KV
cache from DRAM: ``spike_modules.energy_total``) over an int8 (W8A8) ANN's, the ANN a user would
deploy instead; every point also records it against bf16 and float32 ANNs and the field's
op-count ratio against the float32 ANN.

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
from calibration.gptq import input_hessians
from calibration.int8 import find_linears, quantize_weights_
from calibration.silence import SilenceConfig, calibrate_silence_
from stac_lm.checks.verify import PROBE_TOKENS, total_energy_section
from stac_lm.convert.options import (DEFAULT_KV_LEVELS, DEFAULT_SILENCE_BUDGET, DEFAULT_SILENCE_WEIGHTING,
                                     DEFAULT_STEP_ROUNDING)
from smollm2_converter import ConversionConfig, convert
from spike_modules import iter_sites, max_exact_burst, set_mode
from spike_modules.site import reset_spike_stats
from stac_lm.eval.perplexity import evaluate_lm
from stac_common.io import check_output_free, write_json
from spike_modules.energy import counting, energy_summary
from stac_lm.convert.layerwise import layer_list
from stac_lm.convert.pipeline import CALIB_SEQ, load_source
from stac_lm.convert.texts import calibration_batches, load_streams
from stac_common.runtime import machine_info, resolve_device

BASELINE = "rate:16:95:nohead"
DEFAULT_POINTS = ("rate:16:95,weighted:7:99.9:s0,weighted:7:99.9:p2:s0,weighted:7:99.9:p2:cols:s0.015,"
                  "weighted:7:99.9:p2:s0.015,weighted:7:99.9:p2:s0.018,weighted:7:99.9:p2:s0.025,weighted:8:99.9:p2:s0.018,"
                  "weighted:7:99.9:p2:gptq:s0,weighted:7:99.9:p2:gptq:s0.018,weighted:7:99.9:p2:gptq:s0.02,"
                  "weighted:7:99.9:p2:gptq:s0.022,weighted:8:99.9:p2:gptq:s0.014,weighted:8:99.9:p2:gptq:s0:kv127,"
                  "weighted:8:99.9:p2:gptq:s0.014:kv127,weighted:8:99.9:p2:gptq:s0.012:kv127,"
                  "weighted:8:99.9:p2:gptq:s0.01:kv127,weighted:8:99.9:p2:s0.012:kv127,weighted:8:99.9:p2:s0.01:kv127")
PEER_FILE = Path("docs/bench_convert_peer.json")
DEFAULT_POINT = ("weighted", 8, 99.9, True, "gptq", True, DEFAULT_STEP_ROUNDING, DEFAULT_SILENCE_BUDGET,
                 DEFAULT_SILENCE_WEIGHTING, DEFAULT_KV_LEVELS or None)  # full mode's defaults (stac_lm.convert.options)


def parse_point(spec: str) -> dict:
    """``coding:T:percentile[:nohead][:float|gptq][:p2|p2n][:cols][:sBUDGET][:kvN]`` -> a point's settings (``nohead``:
    LM head dense; ``float``: float weights instead of 8-bit; ``gptq``: 8-bit block weights rounded with
    GPTQ's error compensation on the calibration text, as the conversion's default; ``p2``: power-of-two steps rounded up, ``p2n``:
    to the nearest; ``cols``: dead zones weighted by weight-column norms instead of Fisher information;
    ``sBUDGET``: dead zones within that KL budget, default none; ``kvN``: k and v sites at most N levels per
    sign, default every level); ``ValueError`` on a bad spec."""
    parts = spec.split(":")
    budgets = [p for p in parts[3:] if p.startswith("s")]
    caps = [p for p in parts[3:] if p.startswith("kv") and p[2:].isdigit() and int(p[2:]) > 0]
    flags = set(parts[3:]) - set(budgets) - set(caps)
    if (len(parts) < 3 or flags - {"nohead", "float", "p2", "p2n", "cols", "gptq"} or len(budgets) > 1
            or len(caps) > 1 or {"p2", "p2n"} <= flags or {"float", "gptq"} <= flags):
        raise ValueError(f"point {spec!r}: expected coding:T:percentile[:nohead][:float|gptq][:p2|p2n][:cols][:sBUDGET]"
                         "[:kvN], e.g. weighted:8:99.9:s0.015:kv127")
    return {"spec": spec, "coding": parts[0], "T": int(parts[1]), "percentile": float(parts[2]),
            "spike_head": "nohead" not in flags, "int8_weights": "float" not in flags,
            "int8_rounding": "gptq" if "gptq" in flags else "nearest",
            "power_of_two_steps": bool(flags & {"p2", "p2n"}), "step_rounding": "nearest" if "p2n" in flags else "up",
            "silence_budget": float(budgets[0][1:]) if budgets else 0.0,
            "silence_weighting": "columns" if "cols" in flags else "fisher",
            "kv_levels": int(caps[0][2:]) if caps else None}


def _quantize(model, rounding: str, batches: list, head: bool) -> None:
    """8-bit weights as the conversion gives them: GPTQ's on the float model's inputs, or to nearest."""
    hessians = input_hessians(model, find_linears(model), batches) if rounding == "gptq" else None
    quantize_weights_(model, "own", progress=False, head=head, hessians=hessians)


def measure(ann, snn, eval_ids: torch.Tensor) -> dict:
    """Perplexity, agreement, operation energy and total energy of one pass of ``eval_ids`` through both models."""
    reset_spike_stats(snn)
    with counting(ann) as a, counting(snn) as s, torch.no_grad():
        lm = evaluate_lm({"ann": ann, "snn": snn}, eval_ids, progress=False)
    energy = energy_summary(a, s, snn)
    total = total_energy_section(snn, s, eval_ids[:PROBE_TOKENS][None])
    return {"ppl_ann": lm["ppl"]["ann"], "ppl_snn": lm["ppl"]["snn"], "ppl_ratio": lm["ppl"]["snn"] / lm["ppl"]["ann"],
            "top1_agreement": lm["top1_agreement"]["snn"], "energy_ratio": energy["energy_ratio"],
            "coverage": energy["coverage"], "per_group": energy["per_group"],
            **{k: total[k] for k in ("snn_over_ann_int8", "snn_over_ann_bf16", "snn_over_ann_fp32")},
            "total_scenarios": {sc: {k: v for k, v in d.items() if k.startswith("snn_over")}
                                for sc, d in total["scenarios"].items()},
            "silence": total["silence"], "kv_bytes_per_element": total["profile"]["attention"]["snn_kv_bytes"]}


def run(args) -> dict:
    torch.manual_seed(0)
    points = [parse_point(s) for s in args.points.split(",")]
    device = resolve_device(args.device)
    ann, tok = load_source("embedded")
    ann = ann.to(device)
    calib, evals = load_streams(tok, None, args.calib_tokens, None, args.eval_tokens)
    batches = [b.to(device) for b in calibration_batches(calib.ids, min(CALIB_SEQ, args.calib_tokens))]
    # one pass per weight rounding observes every site (a model with a head site has them all);
    # observations depend on neither T nor coding, so every point of that rounding fits its thresholds from them
    observations = {}
    models, rows = {}, []
    t_start = time.perf_counter()
    for pt in points:
        key = (pt["coding"], pt["spike_head"], pt["int8_weights"], pt["int8_rounding"], pt["kv_levels"])
        if key not in models:
            cfg = ConversionConfig(T=pt["T"], mode="full", coding=pt["coding"], spike_head=pt["spike_head"],
                                   kv_levels=pt["kv_levels"])
            models[key] = convert(ann, cfg).to(device)
            if pt["int8_weights"]:
                _quantize(models[key], pt["int8_rounding"], batches, head=pt["spike_head"])
        if pt["int8_rounding"] not in observations:
            probe = convert(ann, ConversionConfig(T=4, mode="full", spike_head=True)).to(device)  # sites start on the CPU
            _quantize(probe, pt["int8_rounding"], batches, head=False)
            observations[pt["int8_rounding"]] = observe_sites(probe, batches, CalibrationConfig(T=4), progress=False)
            del probe
        observers, n = observations[pt["int8_rounding"]]
        snn = models[key]
        names = {name for name, _ in iter_sites(snn)}
        obs = {k: v for k, v in observers.items() if k in names}
        t0 = time.perf_counter()
        ccfg = CalibrationConfig(T=pt["T"], coding=pt["coding"], rule="percentile", percentile=pt["percentile"],
                                 max_burst=max_exact_burst(pt["T"], pt["coding"]), burst_budget=64, n_samples=n,
                                 power_of_two_steps=pt["power_of_two_steps"], step_rounding=pt["step_rounding"],
                                 kv_levels=pt["kv_levels"])
        fit_calibration(obs, ccfg).apply_to(snn)  # dead zones of an earlier point are cleared here
        set_mode(snn, "parallel")
        silence = None
        if pt["silence_budget"]:
            silence = calibrate_silence_(snn, batches, SilenceConfig(budget=pt["silence_budget"],
                                                                     weighting=pt["silence_weighting"]),
                                         layers=layer_list(snn))  # as the conversion does (the same weights)
        row = {**pt, **measure(ann, snn, evals.ids.to(device)), "seconds": time.perf_counter() - t0,
               "silence_calibration": silence and {k: silence[k] for k in ("kl", "top1_vs_dense", "bytes_share_silenced",
                                                                            "silent_share_per_group", "seconds")}}
        rows.append(row)
        print(f"{pt['spec']:24s} ratio {row['ppl_ratio']:.3f} top1 {row['top1_agreement']:.3f} total energy / int8 "
              f"ANN {row['snn_over_ann_int8']:.3f} (bf16 {row['snn_over_ann_bf16']:.3f}, fp32 "
              f"{row['snn_over_ann_fp32']:.3f}) op energy / fp32 {row['energy_ratio']:.3f} "
              f"({row['seconds']:.0f} s)", flush=True)
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


def merged(result: dict, others: list[dict]) -> dict:
    """``result`` with the points of ``others`` added: runs of the same calibration and evaluation text
    (``ValueError`` naming what differs otherwise); a point already in ``result`` is not drawn twice."""
    keys = ("calibration", "evaluation", "calib_tokens", "eval_tokens")
    points = list(result["points"])
    for other in others:
        differ = [k for k in keys if other.get(k) != result.get(k)]
        if differ:
            raise ValueError(f"a result file to add was measured on other texts ({', '.join(differ)} differ); "
                             "draw only runs of the same texts together")
        seen = {p["spec"] for p in points}
        points += [p for p in other["points"] if p["spec"] not in seen]
    return dict(result, points=points)


_P2_LABEL = {"up": " p2", "nearest": " p2n"}


def _x(p: dict) -> float:
    """A point's plotted energy: total per decoded token over the int8 ANN's (older result files: op energy)."""
    return p.get("snn_over_ann_int8", p["energy_ratio"])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "ppl_ratio", "perplexity ratio SNN/ANN"),
                           (axes[1], "top1_agreement", "top-1 agreement with the ANN")):
        kinds = (("rate", False, "o", "rate coding"), ("weighted", False, "s", "weighted coding"),
                 ("weighted", True, "D", "weighted, k and v at kvN levels"))
        for coding, capped, marker, legend in kinds:
            pts = [p for p in result["points"]
                   if p["coding"] == coding and p["int8_weights"] and bool(p.get("kv_levels")) == capped]
            if pts:
                ax.scatter([_x(p) for p in pts], [p[key] for p in pts], marker=marker, label=legend)
            for p in pts:
                budget = p.get("silence_budget", 0.0)
                name = f"T={p['T']}" + (_P2_LABEL[p.get("step_rounding", "up")] if p.get("power_of_two_steps") else "")
                name += " GPTQ" if p.get("int8_rounding") == "gptq" else ""
                name += f" kv{p['kv_levels']}" if p.get("kv_levels") else ""
                cols = " cols" if budget and p.get("silence_weighting", "columns") == "columns" else ""
                ax.annotate(name + (f" KL{budget:g}{cols}" if budget else " dense"), (_x(p), p[key]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
        default = [p for p in result["points"] if (p["coding"], p["T"], p["percentile"], p["spike_head"],
                                                   p["int8_weights"] and p.get("int8_rounding", "nearest"),
                                                   p.get("power_of_two_steps", False),
                                                   p.get("step_rounding", "up"), p.get("silence_budget", 0.0),
                                                   p.get("silence_weighting", "columns"),
                                                   p.get("kv_levels")) == DEFAULT_POINT]
        if default:
            ax.scatter([_x(default[0])], [default[0][key]], s=260, facecolors="none", edgecolors="red",
                       label="default (make demo)")
        ax.axvline(1.0, ls="-", color="k", lw=0.8)
        ax.annotate("int8 (W8A8) ANN", (1.0, 0.02), xycoords=("data", "axes fraction"), fontsize=7, rotation=90)
        ax.axvline(0.9, ls="--", color="red", lw=0.8)
        ax.set_xlabel("total energy per decoded token, SNN / int8 ANN\n(batch 1, weights and KV from DRAM, 45 nm)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M, full mode, 8-bit weights and head: quality against total energy (bench/frontier.py)",
                 fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", default=DEFAULT_POINTS,
                   help="comma-separated coding:T:percentile[:nohead][:float|gptq][:p2|p2n][:cols][:sBUDGET][:kvN]")
    p.add_argument("--calib_tokens", type=int, default=8192)
    p.add_argument("--eval_tokens", type=int, default=4096)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--out", default="docs/frontier.json")
    p.add_argument("--plot", default="docs/frontier.png")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--replot", metavar="JSON", help="only draw --plot from an existing result file")
    p.add_argument("--add", metavar="JSON", action="append", default=[],
                   help="with --replot: draw the points of another result file too (a run of the same texts)")
    args = p.parse_args()
    if args.add and not args.replot:
        p.error("--add draws the points of another result file beside --replot's; give --replot JSON")
    if args.replot:
        check_output_free(args.plot, args.overwrite)
        plot(merged(json.loads(Path(args.replot).read_text()),
                    [json.loads(Path(f).read_text()) for f in args.add]), Path(args.plot))
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
