"""Seed spread of text_cls: SNN minus float ANN per T over several seeds, grouped by data and options.

One run's accuracy difference moves by a point or more with the seed (the seed draws the split, the
samples, the new head and the batches), so one run cannot say whether an option helps. This gathers
``python -m text_cls`` run directories, groups them by data set and by the options that differ from
the defaults (the seed and bookkeeping aside), and reports for each group and T the mean, least and
largest difference from the float ANN, the agreement with it, and on how many seeds the target held
(T=8 within 0.5 point, T=4 within 2).

    # gather runs made before (their results.json record options, data and machine)
    python -m bench.text_cls_seeds --runs runs/* --out docs/bench_text_cls_seeds.json --markdown docs/text_cls_seeds.md
    # or make them: every variant on every seed, two runs at a time
    python -m bench.text_cls_seeds --seeds 0,1,2,3 --variant "" --variant "--distill_samples 4000" \\
        --workdir /tmp/seeds --jobs 2 --out /tmp/seeds.json -- --train_file a.csv --test_file b.csv
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.text_cls import ACCURACY_TARGETS
from stac_common.io import check_output_free, write_json
from text_cls.options import TextClsOptions

# options that say where and how a run ran, not what it did
BOOKKEEPING = {"savedir", "seed", "overwrite", "progress", "threads", "device", "train_file", "test_file", "datadir",
               "dataset", "max_len", "sequential_samples", "encoding", "text_column", "label_column"}


def data_name(results: dict) -> str:
    source = results["data"]["source"]
    if source.get("train_file"):
        path = Path(source["train_file"])
        return path.parent.name if path.stem == "train" else path.stem
    return str(source.get("dataset", results["options"].get("dataset")))


def variant(options: dict) -> str:
    """The flags that differ from the defaults, as ``--name value`` (empty: every default). Defaults that
    follow the coding (``trainsnn_epochs``) are those of the run's coding; runs saved before ``coding``
    was an option used rate coding."""
    coding = options.get("coding", "rate")
    defaults = TextClsOptions(progress=False, coding=coding).to_dict()
    flags = [] if coding == TextClsOptions.coding else [f"--coding {coding}"]
    for key in sorted(options):
        if key in BOOKKEEPING or key == "coding" or key not in defaults or options[key] == defaults[key]:
            continue
        value = options[key]
        value = ",".join(map(str, value)) if isinstance(value, list) else value
        flags.append(f"--{key} {value}")
    return " ".join(flags)


def run_row(results: dict, where: str) -> dict:
    row = {"run": where, "data": data_name(results), "variant": variant(results["options"]),
           "seed": results["options"]["seed"], "acc_ann": results["acc_ann"], "samples": results["samples"],
           "device": results["machine"].get("cuda_device", results["machine"]["device"]),
           "seconds_total": results["seconds_total"], "per_T": {}}
    for p in results["per_T"]:
        row["per_T"][str(p["T"])] = {"snn_minus_ann_points": 100 * (p["acc_snn_parallel"] - results["acc_ann"]),
                                     "agreement_with_ann": p["agreement_with_ann"]}
    return row


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["data"], row["variant"]), []).append(row)
    out = []
    for (data, var), members in sorted(groups.items()):
        members.sort(key=lambda r: r["seed"])
        group = {"data": data, "variant": var or "(defaults)", "seeds": [r["seed"] for r in members],
                 "acc_ann_mean": sum(r["acc_ann"] for r in members) / len(members),
                 "devices": sorted({r["device"] for r in members}), "per_T": {}}
        for T in sorted({T for r in members for T in r["per_T"]}, key=int):
            d = [r["per_T"][T]["snn_minus_ann_points"] for r in members if T in r["per_T"]]
            a = [r["per_T"][T]["agreement_with_ann"] for r in members if T in r["per_T"]]
            stats = {"mean": sum(d) / len(d), "min": min(d), "max": max(d), "each": d,
                     "agreement_mean": sum(a) / len(a)}
            if int(T) in ACCURACY_TARGETS:
                stats["target_met"] = sum(x >= -ACCURACY_TARGETS[int(T)] for x in d)
            group["per_T"][T] = stats
        out.append(group)
    return out


def markdown(groups: list[dict]) -> str:
    Ts = sorted({T for g in groups for T in g["per_T"]}, key=int)
    head = "| data | options | seeds | float ANN | " + " | ".join(f"T={T}: mean [min, max]" for T in Ts) + \
           " | agreement T=8 | T=8 target met |"
    lines = [head, "|" + "---|" * (6 + len(Ts))]
    for g in groups:
        cells = []
        for T in Ts:
            s = g["per_T"].get(T)
            cells.append(f"{s['mean']:+.2f} [{s['min']:+.2f}, {s['max']:+.2f}]" if s else "")
        t8 = g["per_T"].get("8", {})
        lines.append(f"| {g['data']} | {g['variant']} | {len(g['seeds'])} | {100 * g['acc_ann_mean']:.2f}% | "
                     + " | ".join(cells) + f" | {t8.get('agreement_mean', float('nan')):.4f} | "
                     f"{t8.get('target_met', '-')}/{len(g['seeds'])} |")
    return "\n".join(lines) + "\n"


def make_runs(seeds: list[int], variants: list[str], workdir: Path, jobs: int, extra: list[str]) -> list[Path]:
    dirs, commands = [], []
    for vi, var in enumerate(variants):
        for seed in seeds:
            d = workdir / f"v{vi}_s{seed}"
            dirs.append(d)
            commands.append([sys.executable, "-m", "text_cls", "--no-progress", "--seed", str(seed),
                             "--output_dir", str(d), *shlex.split(var), *extra])

    def one(cmd):
        log = Path(cmd[cmd.index("--output_dir") + 1] + ".log")
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc:
            raise RuntimeError(f"{shlex.join(cmd)} exited {rc}; see {log}")

    workdir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, commands))
    return dirs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", default=[], help="run directories made before (each holds results.json)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds to run (with --workdir)")
    p.add_argument("--variant", action="append", default=None,
                   help="text_cls flags of one variant, quoted ('' for the defaults); repeat for more")
    p.add_argument("--workdir", default=None, help="where the new runs go")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--out", required=True)
    p.add_argument("--markdown", default=None)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    out = check_output_free(args.out, args.overwrite)
    dirs = [Path(d) for d in args.runs]
    if args.seeds:
        if not args.workdir:
            p.error("--seeds needs --workdir")
        dirs += make_runs([int(s) for s in args.seeds.split(",")], args.variant or [""], Path(args.workdir),
                          args.jobs, extra)
    missing = [str(d) for d in dirs if not (d / "results.json").is_file()]
    if not dirs or missing:
        p.error(f"no results.json in {', '.join(missing) or 'any run'}; give run directories with --runs or "
                "runs to make with --seeds")
    rows = [run_row(json.loads((d / "results.json").read_text()), str(d)) for d in dirs]
    groups = summarise(rows)
    write_json(out, {"groups": groups, "runs": rows,
                     "command": " ".join(["python -m bench.text_cls_seeds", *sys.argv[1:]])})
    if args.markdown:
        Path(args.markdown).write_text(markdown(groups))
    print(markdown(groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
