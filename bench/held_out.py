"""A saved SNN's headline figures on several held-out texts: how far they move with the text.

The report of a conversion measures one evaluation text (The Tempest by default). This bench
verifies a copy of the saved SNN (``stac_lm.convert.pipeline.verify_saved``, the saved directory
itself is not touched) on each of several other texts, none of them calibration text, and puts
side by side, per text: the perplexity ratio and top-1 agreement against the float ANN, the total
energy per decoded token against the int8, bf16 and float32 ANNs (``energy_total``, batch-1 DRAM
decode), the operation energy against the float ANN, the silent share of each group of sites, and whether every gate passed. A summary gives each figure's smallest, median and largest
value, and on how many texts each target of the default conversion holds.

Texts: an embedded play by name (``as_you_like_it_gut``), ``chitchat`` (the embedded chit-chat
conversations in the model's chat template: another genre than the plays), or a UTF-8 file.

    python -m bench.held_out --model_dir out/demo_smollm2 --out docs/results/held_out_demo.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from stac_common.assets import shakespeare_dir
from stac_common.io import check_output_free, write_json
from stac_common.runtime import machine_info
from stac_lm.convert.pipeline import verify_saved
from stac_lm.convert.texts import CHITCHAT, chitchat_text
from stac_lm.io.saving import CONVERSION_FILE

# a comedy, a history, a late romance, a tragedy, the sonnets (verse, no dialogue) and chit-chat
TEXTS = ("as_you_like_it_gut", "henry_v_gut", "winters_tale_gut", "lear_gut", "sonnets_gut", CHITCHAT)
# the default conversion's targets: total energy against the int8 ANN, quality against the float ANN
TARGETS = {"energy_int8": 0.90, "top1": 0.90, "ppl_ratio": 1.05, "op_energy": 0.50}


def text_path(name: str, calibration_source: str, tokenizer_dir: Path, scratch: Path) -> str:
    """A file to verify on for ``name``; ``ValueError`` for a calibration play or a missing text."""
    if name == CHITCHAT:
        from transformers import AutoTokenizer

        text, _, _ = chitchat_text(AutoTokenizer.from_pretrained(tokenizer_dir))
        path = scratch / "chitchat.txt"
        path.write_text(text, encoding="utf-8")
        return str(path)
    if Path(name).is_file():
        return name
    play = shakespeare_dir() / f"{name}.txt"
    if not play.is_file():
        raise ValueError(f"{name!r} is neither a file nor an embedded play (see {shakespeare_dir()})")
    if calibration_source.startswith("embedded Shakespeare") and name in calibration_source:
        raise ValueError(f"{name} is calibration text of this SNN ({calibration_source}); give held-out texts")
    return str(play)


def row(report: dict) -> dict:
    et = report["energy_total"]
    return {"ppl_ratio": report["ppl_ratio"], "top1": report["top1_agreement"],
            "energy_int8": et["snn_over_ann_int8"], "energy_bf16": et["snn_over_ann_bf16"],
            "energy_fp32": et["snn_over_ann_fp32"], "op_energy": report["energy_ratio"],
            "silent_share_per_group": {g: v["silent_share"] for g, v in et["silence"]["per_group"].items()},
            "all_checks_passed": report["all_checks_passed"],
            "failed_checks": {c["name"]: c["detail"] for c in report["checks"] if not c["passed"]},
            "eval_tokens": report["eval_tokens"], "text": report["texts"]["evaluation"]["source"]}


def summary(rows: dict) -> dict:
    out = {}
    for key in ("ppl_ratio", "top1", "energy_int8", "energy_bf16", "energy_fp32", "op_energy"):
        vals = [r[key] for r in rows.values()]
        out[key] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}
    holds = {"energy_int8": lambda r: r["energy_int8"] <= TARGETS["energy_int8"],
             "top1": lambda r: r["top1"] >= TARGETS["top1"],
             "ppl_ratio": lambda r: r["ppl_ratio"] <= TARGETS["ppl_ratio"],
             "op_energy": lambda r: r["op_energy"] <= TARGETS["op_energy"]}
    out["targets"] = TARGETS
    out["texts_meeting"] = {k: sum(map(f, rows.values())) for k, f in holds.items()}
    out["texts_meeting_all"] = sum(all(f(r) for f in holds.values()) for r in rows.values())
    out["texts"] = len(rows)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--texts", nargs="+", default=list(TEXTS),
                   help="embedded play names, 'chitchat' or UTF-8 files (default: %(default)s)")
    p.add_argument("--eval_tokens", type=int, default=None, help="tokens per text (default: the saved run's)")
    args = p.parse_args(argv)
    out = check_output_free(args.out, args.overwrite)
    src = Path(args.model_dir)
    config = json.loads((src / CONVERSION_FILE).read_text(encoding="utf-8"))
    calibration_source = config["texts"]["calibration"]["source"]
    rows, seconds = {}, {}
    with tempfile.TemporaryDirectory(prefix="stac_held_out_") as tmp:
        work, scratch = Path(tmp) / "snn", Path(tmp)
        shutil.copytree(src, work)  # verify_saved rewrites report.json: never in the user's directory
        paths = {name: text_path(name, calibration_source, work, scratch) for name in args.texts}
        for name, path in paths.items():
            start = time.perf_counter()
            report = verify_saved(work, path, args.eval_tokens, "cpu", progress=False)
            seconds[name] = time.perf_counter() - start
            rows[name] = row(report)
            r = rows[name]
            print(f"{name:22s} ppl ratio {r['ppl_ratio']:.4f}  top-1 {r['top1']:.4f}  energy/int8 "
                  f"{r['energy_int8']:.4f}  op energy {r['op_energy']:.4f}  checks "
                  f"{'pass' if r['all_checks_passed'] else 'FAIL ' + ', '.join(r['failed_checks'])}", flush=True)
    result = {"benchmark": "bench/held_out.py",
              "command": " ".join(["python -m bench.held_out", *(argv if argv is not None else sys.argv[1:])]),
              "model_dir": args.model_dir, "calibration": calibration_source,
              "saved_evaluation": config["texts"].get("evaluation", {}).get("source"),
              "rows": rows, "summary": summary(rows), "seconds": seconds,
              "machine": machine_info(torch.device("cpu"))}
    write_json(Path(out), result)
    s = result["summary"]
    print(f"texts meeting every target: {s['texts_meeting_all']} of {s['texts']}; per target {s['texts_meeting']}; "
          f"written {out}")
    return result


if __name__ == "__main__":
    main()
