"""Free-running generation fidelity of saved SNNs against their ANN (``stac_lm.eval.fidelity``).

Greedy replies (chat template, KV cache, up to ``--new_tokens``) of the ANN and of each saved SNN
to a fixed set of prompts (``stac_lm/eval/prompts.py``: 30 factual questions with answers,
10 instructions, 20 chit-chat openings calibration never reads). Per model and T: share of
replies whose first 16 tokens equal the ANN's, mean common prefix, exact match, correct answers
of both, the share of the ANN's right answers the SNN keeps, and the SNN's teacher-forced top-1
agreement on the ANN's replies; beside them the model's report figures (Tempest perplexity ratio,
top-1 agreement, energy ratio). Writes JSON and a markdown table with replies side by side.

``--site_modes parallel,ann`` also runs each model with its spiking sites passing their inputs
through (the 8-bit weights alone, no spikes): the row that tells the weights' share of the
disagreement from the spikes'. ``--forced_only`` skips free-running decoding of the SNN and
reports the teacher-forced figures alone (top-1, and the share of replies whose first 16 tokens
are all predicted), a quick sweep before the full run.

    python -m bench.generation --model_dir out/demo_smollm2_T16 --out docs/generation.json \\
        --markdown docs/generation.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stac_lm.eval.prompts import correct, prompts
from spike_modules import set_mode, set_timesteps
from spike_modules.site import set_spike_counting
from stac_common.io import write_text_atomic, check_output_free, write_json
from stac_lm.eval import fidelity
from stac_lm.eval.fidelity import FIRST_N, compare
from stac_lm.convert.pipeline import load_checked_source
from stac_lm.io.saving import REPORT_FILE, load_snn
from stac_common.runtime import machine_info, resolve_device

REPORT_KEYS = ("ppl_ratio", "top1_agreement", "energy_ratio", "coverage", "mean_spike_rate")


def report_figures(model_dir: Path) -> dict:
    path = model_dir / REPORT_FILE
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    return {k: report.get(k) for k in REPORT_KEYS}


def run(args) -> dict:
    torch.manual_seed(0)
    rows = prompts(tuple(args.kinds.split(",")))
    device = resolve_device(args.device)
    results, ann_cache = [], {}
    t0 = time.perf_counter()
    for d in args.model_dir:
        snn, tok, config = load_snn(d, device)
        source = json.dumps(config["source"], sort_keys=True)
        if source not in ann_cache:
            ann_cache[source] = [load_checked_source(config).to(device), None]
        ann, ann_replies = ann_cache[source]
        if ann_replies is None and args.ann_replies:
            ann_replies = ann_cache[source][1] = fidelity.ann_replies(ann, tok, rows, args.new_tokens, args.ann_replies,
                                                                      key=config["source"])
        set_spike_counting(snn, False)  # no spike statistics: the report's figures are read from the saved report
        Ts = [int(t) for t in args.timesteps.split(",")] if args.timesteps else [int(config["timesteps"])]
        options = config["options"]
        for mode in args.site_modes.split(","):
            set_mode(snn, mode)
            for T in Ts:
                set_timesteps(snn, T)
                t1 = time.perf_counter()
                out = compare(ann, snn, tok, rows, args.new_tokens, ann_replies, correct, free_running=not args.forced_only,
                              progress=lambda i, n, r: print(f"  {i}/{n} {r['kind']}: prefix {r.get('common_prefix')}",
                                                             flush=True) if args.verbose else None)
                ann_replies = ann_cache[source][1] = out["ann_replies"]
                entry = {"model_dir": str(d), "T": T, "saved_T": int(config["timesteps"]), "site_mode": mode,
                         "coding": config["conversion_config"].get("coding", "rate"),
                         "int8": {k: options.get(k) for k in ("quant_backend", "int8_rounding", "int8_group_size")},
                         "finetune": {k: options.get(k) for k in ("finetune_steps", "finetune_text")},
                         "calib_text": options.get("calib_text"), "summary": out["summary"],
                         "report": report_figures(Path(d)) if T == int(config["timesteps"]) and mode == "parallel" else {},
                         "rows": out["rows"], "seconds": time.perf_counter() - t1}
                print(f"{d} T={T} sites {mode}: {summary_line(entry['summary'])}", flush=True)
                results.append(entry)
    return {"benchmark": "bench/generation.py", "new_tokens": args.new_tokens, "first_n": FIRST_N, "kinds": args.kinds,
            "prompts": len(rows), "results": results, "seconds": time.perf_counter() - t0,
            "machine": machine_info(device)}


def fmt(v, f: str = "{:.3f}") -> str:
    """``v`` in format ``f``, or "-" for a figure the run did not measure."""
    return "-" if v is None else f.format(v)


def summary_line(s: dict) -> str:
    two = "{:.2f}"
    return (f"first-{FIRST_N} identity {fmt(s[f'first_{FIRST_N}_identity'], two)}, prefix "
            f"{fmt(s['mean_common_prefix'], '{:.1f}')}, exact {fmt(s['exact_match'], two)}, ANN correct "
            f"{fmt(s['ann_correct'], two)}, SNN correct {fmt(s['snn_correct'], two)}, kept {fmt(s['snn_keeps_ann_correct'], two)}, "
            f"forced top-1 {fmt(s['forced_top1_agreement_on_ann_replies'])}, forced first-{FIRST_N} "
            f"{fmt(s[f'forced_first_{FIRST_N}'], two)}")


def label(e: dict) -> str:
    """What the row measured: the model, and "8-bit weights only" where its sites passed floats."""
    i8 = e.get("int8") or {}
    group = i8.get("int8_group_size")
    scales = f"groups of {group}" if group else "per row"
    weights = "float weights" if i8.get("quant_backend") == "none" else f"int8 {i8.get('int8_rounding') or 'nearest'}, {scales}"
    sites = "" if e.get("site_mode", "parallel") == "parallel" else f", sites {e['site_mode']} (no spikes)"
    return f"`{e['model_dir']}` ({weights}{sites})"


def markdown(result: dict, examples: int) -> str:
    lines = ["# Free-running generation: SNN replies beside the ANN's", "",
             f"`bench/generation.py`, greedy, up to {result['new_tokens']} new tokens, {result['prompts']} prompts "
             f"({result['kinds']}: 30 questions, 10 instructions, 20 chit-chat openings never used in calibration).", "",
             f"| model | coding | T | first-{FIRST_N} identity | mean common prefix | exact | ANN correct | SNN correct | "
             f"ANN-correct kept | forced top-1 on ANN replies | forced first-{FIRST_N} | Tempest ppl ratio | Tempest top-1 | "
             "energy ratio |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in result["results"]:
        s, r = e["summary"], e["report"]
        lines.append(f"| {label(e)} | {e['coding']} | {e['T']} | {fmt(s[f'first_{FIRST_N}_identity'], '{:.2f}')} | "
                     f"{fmt(s['mean_common_prefix'], '{:.1f}')} | {fmt(s['exact_match'], '{:.2f}')} | "
                     f"{fmt(s['ann_correct'], '{:.2f}')} | {fmt(s['snn_correct'], '{:.2f}')} | "
                     f"{fmt(s['snn_keeps_ann_correct'], '{:.2f}')} | {fmt(s['forced_top1_agreement_on_ann_replies'])} | "
                     f"{fmt(s.get(f'forced_first_{FIRST_N}'), '{:.2f}')} | {fmt(r.get('ppl_ratio'))} | "
                     f"{fmt(r.get('top1_agreement'))} | {fmt(r.get('energy_ratio'))} |")
    for e in result["results"]:
        if not e["rows"] or "snn" not in e["rows"][0] or e.get("site_mode", "parallel") != "parallel":
            continue
        lines += ["", f"## `{e['model_dir']}`, T={e['T']}: replies side by side", "",
                  "| prompt | ANN | SNN |", "|---|---|---|"]
        for row in e["rows"][:examples]:
            cell = lambda t: t.replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines.append(f"| {cell(row['prompt'])} | {cell(row['ann'])} | {cell(row['snn'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", action="append", required=True, help="a saved SNN directory (repeat for more)")
    p.add_argument("--timesteps", default=None, help="comma-separated T to run each model at (default: its own)")
    p.add_argument("--new_tokens", type=int, default=48)
    p.add_argument("--examples", type=int, default=12, help="replies shown side by side per model in the markdown")
    p.add_argument("--out", default="docs/generation.json")
    p.add_argument("--markdown", default="docs/generation.md")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--kinds", default="question,instruction,chitchat", help="prompt kinds to run")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--site_modes", default="parallel",
                   help="comma-separated site modes to run each model in: parallel (spikes), ann (8-bit weights only)")
    p.add_argument("--ann_replies", metavar="JSON", help="read the ANN's replies from this file when it holds them "
                   "for the same source model, prompts and length; else decode them and write it")
    p.add_argument("--forced_only", action="store_true",
                   help="teacher-forced figures only (no free-running decoding of the SNN): a quick sweep")
    args = p.parse_args()
    for mode in args.site_modes.split(","):
        if mode not in ("parallel", "ann", "sequential"):
            p.error(f"--site_modes: unknown mode {mode!r}; use parallel, ann or sequential")
    for path in (args.out, args.markdown):
        check_output_free(path, args.overwrite)
    result = run(args)
    write_json(Path(args.out), result)
    write_text_atomic(Path(args.markdown), markdown(result, args.examples))
    print(f"wrote {args.out} and {args.markdown}")


if __name__ == "__main__":
    main()
