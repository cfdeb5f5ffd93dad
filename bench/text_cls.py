"""Text-classification benchmark: the default ``python -m text_cls`` run, then latency side by side.

Runs the pipeline (embedded tweets, MiniLM-L6, ``--spike_sites all``, T in 4,8,16 unless told
otherwise), reloads the saved SNN, rebuilds its float network (the same architecture and cost as
the run's "ANN (float)", which is a separate float fine-tune by default), and times ANN, parallel SNN and
sequential SNN on the same test batch, interleaved (``bench.timing.side_by_side``, medians).
Checks the issue's targets and writes ``docs/bench_text_cls.json`` plus copies of the run's
``results.md`` and ``accuracy_vs_T.png`` into ``docs/``.

    python -m bench.text_cls --out docs/bench_text_cls.json --overwrite
    python -m bench.text_cls --max_train_samples 300 --max_eval_samples 100 --time_steps 4,8 --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from bench.timing import side_by_side
from stac_common.io import check_output_free, write_json
from text_cls import TextClsOptions, load_text_snn, run, run_sequential
from text_cls.batching import encode, eval_batches, model_inputs
from text_cls.cli import samples_or_auto
from text_cls.data import read_rows
from text_cls.model import float_copy, set_sequential_schedule
from spike_modules.site import set_spike_counting
from text_cls.options import DEFAULT_SWEEP, DEFAULT_T

TIME_LIMIT_S = 20 * 60
ACCURACY_TARGETS = {8: 0.5, 4: 2.0}  # T -> points the SNN (parallel) may lose against the float ANN


def float_template(config: dict):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    hf = dict(config["hf_config"])
    return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf),
                                                          dtype=torch.float32).eval()


def split_batches(savedir: Path, tok, config: dict, batch_size: int, split: str = "test") -> list[dict]:
    """The run's own ``split`` (test or validation), encoded and batched as the run evaluated it."""
    classes = config["classes"]
    rows = [(t, classes.index(y)) for t, y in read_rows(savedir / "data" / f"{split}.jsonl", "text", "label")]
    return eval_batches(encode(tok, rows, config["max_len"]), batch_size)


def timing_batch(savedir: Path, tok, config: dict, batch_size: int) -> dict:
    """The test batch of median width (the run's own test split and batching)."""
    every = split_batches(savedir, tok, config, batch_size)
    batches = [b for b in every if len(b["labels"]) == batch_size] or every
    batches.sort(key=lambda b: b["input_ids"].shape[1])
    return model_inputs(batches[len(batches) // 2])


# timed as inference runs: with gradients on, every mode would build an autograd graph and the sites take their
# gradient path
@torch.inference_mode()
def side_by_side_latency(savedir: Path, sweep: list[int], batch_size: int, repeats: int) -> dict:
    """ANN, parallel SNN (with the spike statistics reports need, and without them as deployed:
    ``set_spike_counting(False)``) and sequential SNN on the same batch, interleaved, medians."""
    out = {}
    for T in sweep:
        snn, tok, config = load_text_snn(savedir / "model", T=T)
        deployed = load_text_snn(savedir / "model", T=T)[0]
        set_spike_counting(deployed, False)
        ann = float_copy(snn, float_template(config))
        x = timing_batch(savedir, tok, config, batch_size)
        med = side_by_side({"ann": lambda: ann(**x), "parallel": lambda: snn(**x),
                            "parallel_deployed": lambda: deployed(**x),
                            "sequential": lambda: run_sequential(snn, x["input_ids"], x["attention_mask"], T)},
                           repeats=repeats)
        out[T] = {"batch": list(x["input_ids"].shape), "seconds": med,
                  "parallel_over_ann": med["parallel"] / med["ann"],
                  "parallel_deployed_over_ann": med["parallel_deployed"] / med["ann"],
                  "sequential_over_parallel": med["sequential"] / med["parallel"]}
    return out


@torch.no_grad()
def simulations(savedir: Path, T: int, variants: list[tuple[str, str | None]], batch_size: int) -> list[dict]:
    """Sequential against parallel at ``T`` on the whole test set, once per ``(norm schedule,
    sequential neuron)`` in ``variants`` (neuron None: the saved one); parallel mode depends on
    neither, so it runs once."""
    snn, tok, config = load_text_snn(savedir / "model", T=T)
    saved_neuron = snn.stac_site_spec.sequential
    batches = [(model_inputs(b), b["labels"]) for b in split_batches(savedir, tok, config, batch_size)]
    y = torch.cat([labels for _, labels in batches])
    P = torch.cat([snn(**x).logits for x, _ in batches])
    out = []
    for schedule, neuron in variants:
        neuron = neuron or saved_neuron
        set_sequential_schedule(snn, schedule, neuron)
        S = torch.cat([run_sequential(snn, x["input_ids"], x["attention_mask"], T) for x, _ in batches])
        out.append({"T": T, "norm_schedule": schedule, "sequential_neuron": neuron, "samples": int(y.numel()),
                    "agreement": float((P.argmax(-1) == S.argmax(-1)).float().mean()),
                    "acc_snn_parallel": float((P.argmax(-1) == y).float().mean()),
                    "acc_snn_sequential": float((S.argmax(-1) == y).float().mean()),
                    "relative_logit_gap": float((S - P).norm() / P.norm())})
    return out


def norms_of_run(savedir: Path, out: Path, argv: list[str] | None) -> int:
    """``--norms_of_run``: both LayerNorm schedules (with the saved sequential neurons) on an existing
    run's saved model and test split."""
    config = json.loads((savedir / "model" / "config.json").read_text())
    T, batch = max(config["timesteps"]), config["options"]["eval_batchsize"]
    report = {"run": str(savedir), "schedules": simulations(savedir, T, [("causal", None), ("held", None)], batch),
              "command": " ".join(["python -m bench.text_cls", *(argv if argv is not None else sys.argv[1:])])}
    write_json(out, report)
    for r in report["schedules"]:
        print(f"T={r['T']} {r['norm_schedule']:6s} norms, {r['sequential_neuron']} neurons: agreement "
              f"{r['agreement']:.4f}, relative logit gap {r['relative_logit_gap']:.4f}, accuracy parallel {r['acc_snn_parallel']:.4f} sequential "
              f"{r['acc_snn_sequential']:.4f} ({r['samples']} samples)")
    return 0


def noise_bound(row: dict, samples: int) -> float:
    """1.96 standard errors of a paired accuracy difference: sqrt(discordant predictions) / N."""
    discordant = (1 - row["agreement_with_ann"]) * samples
    return 1.96 * math.sqrt(max(discordant, 1.0)) / samples


def targets(results: dict, latency: dict) -> list[dict]:
    by_T = {row["T"]: row for row in results["per_T"]}
    checks = []

    def check(name, T, value, bound, passed):
        checks.append({"name": name, "T": T, "value": value, "bound": bound, "passed": bool(passed)})

    for T, pts in ACCURACY_TARGETS.items():
        if T in by_T:
            gap = 100 * (results["acc_ann"] - by_T[T]["acc_snn_parallel"])
            check(f"SNN (parallel) within {pts} points of the float ANN", T, gap, pts, gap <= pts)
    if 16 in by_T:
        diff = abs(results["acc_ann"] - by_T[16]["acc_snn_parallel"])
        bound = noise_bound(by_T[16], results["samples"])
        check("SNN (parallel) indistinguishable from the float ANN (paired 95% bound)", 16, diff, bound, diff <= bound)
        o = results["options"]
        check(f"sequential ({o['norm_schedule']} norms, {o['sequential_neuron']} neurons) agrees with "
              "parallel on >= 99% of predictions", 16, by_T[16]["agreement"], 0.99, by_T[16]["agreement"] >= 0.99)
    if 8 in latency:
        s = latency[8]["sequential_over_parallel"]
        check("parallel at least 0.8*T times faster than sequential (side by side)", 8, s, 6.4, s >= 6.4)
        r = latency[8]["parallel_deployed_over_ann"]
        check("parallel (deployed: no spike statistics) no more than 1.5x slower than the float ANN (side by side)",
              8, r, 1.5, r <= 1.5)
    check("whole run within 20 minutes", None, results["seconds_total"], TIME_LIMIT_S,
          results["seconds_total"] <= TIME_LIMIT_S)
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/bench_text_cls.json", help="report JSON")
    p.add_argument("--docs", default=None, help="folder for results.md / png copies (default: the --out folder)")
    p.add_argument("--docs_name", default="text_cls",
                   help="copies are named <docs_name>_results.md and <docs_name>_accuracy_vs_T.png (default text_cls)")
    p.add_argument("--savedir", default=None, help="run directory (default: a temporary one, removed after)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (median)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--time_steps", default=",".join(map(str, DEFAULT_SWEEP)))
    p.add_argument("--spike_sites", default="all", choices=("ffn", "all"))
    p.add_argument("--model_name", default=None, help="another BERT-family checkpoint (default: embedded MiniLM-L6)")
    p.add_argument("--train_file", default=None, help="local data instead of the embedded tweets")
    p.add_argument("--test_file", default=None, help="local test data (default: a split of --train_file)")
    p.add_argument("--text_column", default=None)
    p.add_argument("--label_column", default=None)
    p.add_argument("--sequential_samples", default=argparse.SUPPRESS, type=samples_or_auto,
                   help="test samples of the sequential simulation, 'all' or 'auto' (default: the run's, auto)")
    p.add_argument("--latency_timesteps", default=str(DEFAULT_T),
                   help="the T's timed side by side after the run, comma-separated (default 8)")
    p.add_argument("--max_len", type=int, default=None)
    p.add_argument("--float_loss", type=float, default=None,
                   help="weight of the float network's cross-entropy in the DA-QCFS fine-tune (default: the run's, 0; "
                        "needs --ann_epochs 0)")
    p.add_argument("--distill", type=float, default=None,
                   help="weight of the distillation term of the DA-QCFS fine-tune (default: the run's, 1.0)")
    p.add_argument("--ann_epochs", type=int, default=None,
                   help="epochs of the float fine-tune, the teacher (default: the run's, 1; 0 with --float_loss)")
    p.add_argument("--coding", default=None, choices=("weighted", "rate"),
                   help="the run's spike coding (default: the run's, weighted)")
    p.add_argument("--trainsnn_epochs", type=int, default=None,
                   help="DA-QCFS fine-tune epochs (default: the run's, 0 with weighted coding and 1 with rate)")
    p.add_argument("--norm_schedule", default="causal", choices=("causal", "held"),
                   help="the run's LayerNorm schedule in the sequential simulation")
    p.add_argument("--sequential_neuron", default="catch_up", choices=("catch_up", "if"),
                   help="the run's neurons in the sequential simulation")
    p.add_argument("--compare_simulations", action="store_true",
                   help="also run the sequential simulation at the largest T with the other LayerNorm schedule, "
                        "and with the other sequential neuron (rate coding only; for comparison, not targets)")
    p.add_argument("--norms_of_run", default=None, metavar="DIR",
                   help="only measure sequential-vs-parallel agreement with held and causal LayerNorms at the "
                        "largest saved T of an existing run directory (no training)")
    args = p.parse_args(argv)
    out = check_output_free(args.out, args.overwrite)
    if args.norms_of_run:
        return norms_of_run(Path(args.norms_of_run), out, argv)
    docs = Path(args.docs) if args.docs else out.parent
    sweep = tuple(int(t) for t in args.time_steps.split(","))
    tmp = None if args.savedir else tempfile.mkdtemp(prefix="bench_text_cls_")
    savedir = Path(args.savedir or Path(tmp) / "run")
    given = {k: getattr(args, k) for k in ("max_train_samples", "max_eval_samples", "threads", "model_name", "train_file",
                                      "test_file", "text_column", "label_column", "max_len")
             if getattr(args, k)}
    if args.distill is not None:
        given["distill"] = args.distill
    if args.float_loss is not None:
        given["float_loss"] = args.float_loss
    for key in ("ann_epochs", "coding", "trainsnn_epochs"):
        if getattr(args, key) is not None:
            given[key] = getattr(args, key)
    if hasattr(args, "sequential_samples"):
        given["sequential_samples"] = args.sequential_samples
    try:
        opts = TextClsOptions(savedir=str(savedir), overwrite=args.overwrite, time_steps=sweep,
                              spike_sites=args.spike_sites, norm_schedule=args.norm_schedule,
                              sequential_neuron=args.sequential_neuron, **given)
        results = run(opts)
        latency = side_by_side_latency(savedir, [int(t) for t in args.latency_timesteps.split(",")],
                                       opts.eval_batchsize, args.repeats)
        other = []
        if args.compare_simulations:
            schedule = "held" if args.norm_schedule == "causal" else "causal"
            neuron = "if" if args.sequential_neuron == "catch_up" else "catch_up"
            variants = [(schedule, None)]
            if opts.coding == "rate":  # weighted neurons have one sequential form
                variants.insert(0, (args.norm_schedule, neuron))
            other = simulations(savedir, max(opts.time_steps), variants, opts.eval_batchsize)
        report = {"results": results, "side_by_side_latency": latency, "other_simulations": other,
                  "targets": targets(results, latency),
                  "command": " ".join(["python -m bench.text_cls", *(argv if argv is not None else sys.argv[1:])])}
        docs.mkdir(parents=True, exist_ok=True)
        write_json(out, report)
        shutil.copyfile(savedir / "results.md", docs / f"{args.docs_name}_results.md")
        shutil.copyfile(savedir / "accuracy_vs_T.png", docs / f"{args.docs_name}_accuracy_vs_T.png")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print("seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in results["step_seconds"].items())
          + f"; total {results['seconds_total']:.0f}")
    for c in report["targets"]:
        print(f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']} (T={c['T']}): {c['value']:.4g} vs {c['bound']:.4g}")
    for r in other:
        print(f"for comparison: sequential with {r['norm_schedule']} norms and {r['sequential_neuron']} neurons at "
              f"T={r['T']} agrees with parallel on {r['agreement']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
