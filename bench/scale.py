"""Scaling benchmark: how conversion time and memory grow with model size, 360M to 8B parameters.

For each model asked, writes a random-weight model at the published size (``bench.scale_models``:
SmolLM2-360M, SmolLM2-1.7B, Llama-3.2-3B, Llama-3.1-8B, sharded bf16, the SmolLM2 tokenizer) under
``--workdir`` (an existing folder of the same recipe is reused), then converts it with
``run_conversion.py`` in a child process: the default options plus ``--verify``, ``--device cpu``,
``--calib_tokens N --eval_tokens N`` and, unless ``--whole_model``, ``--layerwise --max_memory
cpu=XGiB``. Each child's own peak resident memory comes from ``os.wait4``; a row records it with
the wall seconds, seconds per layer, the child's step seconds, disk of the source and the output,
and what ``report.json`` says (random weights say nothing about quality). Then a linear fit of the
seconds against the parameters, each model's relative deviation from it (target: all within 20%),
a JSON (``--out``) and a plot (``--plot``). A failed conversion is recorded (return code, last 40
lines of stderr) and the next model runs.

    python -m bench.scale                                              # all four, layerwise
    python -m bench.scale --whole_model --models smollm2-360m --out /tmp/scale.json --plot /tmp/scale.png
    python -m bench.scale --dry_run --models smollm2-1.7b                # write the model, print the commands
    python -m bench.scale --device cuda --gpu_budget 20 --out docs/results/scale_gpu.json --plot docs/results/scale_gpu.png
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.scale_models import DEFAULT_SHARD_BYTES, MODELS, disk_bytes
from stac_common.io import check_output_free, write_json

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
TARGET_DEVIATION = 0.20  # every model's seconds within 20% of the linear fit
DEFAULT_TOKENS = 512
CONVERT_DEFAULT_TOKENS = {"calib_tokens": 8192, "eval_tokens": 4096}  # full mode's defaults (run_conversion.py --help)
STDERR_TAIL = 40
STEP_LINE = re.compile(r"^\s*done (.+) in ([0-9.]+) s\s*$")
WEIGHTS_NOTE = ("random weights: report.json's quality figures (perplexity ratio, checks) say nothing about "
                "conversion quality; a failed check (exit 3) is expected and the timing still counts")


def parse_models(text: str) -> list[str]:
    """Model names from a comma-separated list, in the order given.

    Raises:
        ValueError: an unknown or repeated name, or none at all; the message lists the known ones.
    """
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"--models {text!r}: unknown, repeated or no model name(s) {unknown}; "
                         f"known: {', '.join(MODELS)}")
    return names


def budget_gib(parameters: int, small: float, large: float, large_from: float) -> float:
    """The memory budget of a model: ``small`` GiB below ``large_from`` parameters, else ``large``."""
    return small if parameters < large_from else large


def max_memory(gib: float, gpu_gib: float | None = None) -> str:
    """The ``--max_memory`` value: the CPU's budget, and GPU 0's before it when given."""
    return (f"0={gpu_gib:g}GiB," if gpu_gib is not None else "") + f"cpu={gib:g}GiB"


def conversion_command(model_dir: Path, out_dir: Path, calib_tokens: int, eval_tokens: int,
                       budget: float | None, device: str = "cpu", gpu_gib: float | None = None) -> list[str]:
    """``run_conversion.py`` for one model; ``budget`` None leaves out ``--layerwise --max_memory``.
    ``device`` cuda computes on GPU 0, within ``gpu_gib`` GiB of it when given."""
    cmd = [sys.executable, str(REPO / "run_conversion.py"), "--model_name_or_path", str(model_dir),
           "--output_dir", str(out_dir), "--overwrite", "--verify", "--calib_tokens", str(calib_tokens),
           "--eval_tokens", str(eval_tokens), "--device", device]
    if budget is not None:
        cmd += ["--layerwise", "--max_memory", max_memory(budget, gpu_gib)]
    return cmd


def writer_command(name: str, model_dir: Path, seed: int, max_shard_bytes: int) -> list[str]:
    return [sys.executable, "-m", "bench.scale_models", "--model", name, "--dir", str(model_dir), "--seed",
            str(seed), "--max_shard_bytes", str(max_shard_bytes), "--overwrite"]


def run_measured(cmd: list[str], stdout: Path, stderr: Path) -> dict:
    """Run ``cmd`` from the checkout with its output in two files; its own wall seconds and peak
    resident bytes (``os.wait4``: this child and the children it waited for, not earlier runs).

    Linux counts in a child's ``ru_maxrss`` the peak of the process that started it (the memory it
    ran in until exec), so this process keeps small: torch and transformers are imported only after
    the last child; ``spawn_floor_bytes`` records that floor (this process's own peak at the start).
    """
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    stdout.parent.mkdir(parents=True, exist_ok=True)
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "seconds": round(seconds, 2),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "spawn_floor_bytes": floor}  # ru_maxrss is KiB on Linux


def tail(path: Path, n: int = STDERR_TAIL) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:] if path.is_file() else []


def logged_step_seconds(path: Path) -> dict[str, float]:
    """Seconds per step from a conversion's stderr (the ``done NAME in S s`` lines of
    ``stac_common.runtime.StepTimer``): the steps that finished, also when the run failed later."""
    seconds: dict[str, float] = {}
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    for line in lines:
        m = STEP_LINE.match(line)
        if m:
            seconds[m[1]] = seconds.get(m[1], 0.0) + float(m[2])
    return seconds


def write_model(name: str, args, model_dir: Path, logs: Path) -> dict:
    """Write (or reuse) one random model in a child process, measured; with what the writer says of
    the model (``counts``: total, embedding and decoder parameters; ``layers``; ``hidden_size``).

    Raises:
        RuntimeError: the writer failed; the message holds its stderr's last lines.
    """
    run = run_measured(writer_command(name, model_dir, args.seed, args.max_shard_bytes),
                       logs / f"{name}.write.stdout", logs / f"{name}.write.stderr")
    if run["returncode"] != 0:
        raise RuntimeError(f"writing {name} to {model_dir} failed (exit {run['returncode']}):\n"
                           + "\n".join(tail(logs / f"{name}.write.stderr")))
    info = json.loads(tail(logs / f"{name}.write.stdout", 1)[0])
    return {"reused": info["reused"], "seconds": run["seconds"], "peak_rss_bytes": run["peak_rss_bytes"],
            "peak_rss_gib": round(run["peak_rss_bytes"] / GIB, 3), "spawn_floor_bytes": run["spawn_floor_bytes"],
            "shards": info["shards"], "counts": info["counts"], "layers": info["layers"],
            "hidden_size": info["hidden_size"]}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def convert_model(name: str, args, written: dict, model_dir: Path, out_dir: Path, logs: Path) -> dict:
    """Convert one written model (``written``: :func:`write_model`'s answer) in a child process and
    measure it: one row of the results."""
    counts, layers = written["counts"], written["layers"]
    budget = budget_gib(counts["total"], args.budget_small, args.budget_large, args.large_from)
    cmd = conversion_command(model_dir, out_dir, args.calib_tokens, args.eval_tokens,
                             None if args.whole_model else budget, args.device, args.gpu_budget)
    if out_dir.exists():  # a failed run must not leave an earlier run's results to be read as its own
        shutil.rmtree(out_dir)
    print(f"[{name}] converting: {' '.join(cmd)}", flush=True)
    run = run_measured(cmd, logs / f"{name}.convert.stdout", logs / f"{name}.convert.stderr")
    conversion = _read_json(out_dir / "stac_conversion.json")
    report = _read_json(out_dir / "report.json")
    row = {
        "model": name, "config_source": MODELS[name].source, "parameters": counts["total"],
        "embedding_parameters": counts["embedding"], "decoder_parameters": counts["decoder"], "layers": layers,
        "params_per_layer": (counts["decoder"] - written["hidden_size"]) // layers,  # less the final norm
        "source_dir": str(model_dir), "source_disk_bytes": disk_bytes(model_dir),
        "budget_gib": budget, "budget_passed": not args.whole_model, "command": cmd,
        "returncode": run["returncode"], "exit_ok": run["returncode"] == 0,
        "completed": conversion is not None and run["returncode"] in (0, 3),
        "total_seconds": run["seconds"], "seconds_per_layer": round(run["seconds"] / layers, 3),
        "peak_rss_bytes": run["peak_rss_bytes"], "peak_rss_gib": round(run["peak_rss_bytes"] / GIB, 3),
        "spawn_floor_bytes": run["spawn_floor_bytes"],
        "within_budget": run["peak_rss_bytes"] <= budget * GIB,
        "output_dir": str(out_dir), "output_disk_bytes": disk_bytes(out_dir),
        "logs": {"stdout": str(logs / f"{name}.convert.stdout"), "stderr": str(logs / f"{name}.convert.stderr")},
    }
    if conversion is not None:
        row["conversion_seconds"] = conversion.get("conversion_seconds")
        row["step_seconds"] = conversion.get("step_seconds")
    if report is not None:
        row["report"] = {"all_checks_passed": report.get("all_checks_passed"), "ppl_ratio": report.get("ppl_ratio"),
                         "memory": report.get("memory"), "note": WEIGHTS_NOTE}
        cuda = (report.get("memory") or {}).get("peak_cuda_bytes")
        if cuda is not None:  # the CUDA allocator's peak in the child, as its report measured it
            row["peak_cuda_gib"] = round(cuda / GIB, 3)
            row["within_gpu_budget"] = None if args.gpu_budget is None else cuda <= args.gpu_budget * GIB
    row["step_seconds_logged"] = logged_step_seconds(logs / f"{name}.convert.stderr")
    if run["returncode"] != 0:
        row["stderr_tail"] = tail(logs / f"{name}.convert.stderr")
    print(f"[{name}] exit {run['returncode']}, {run['seconds']:.0f} s ({row['seconds_per_layer']:.1f} s/layer), "
          f"peak RSS {row['peak_rss_gib']:.2f} GiB (budget {budget:g} GiB)", flush=True)
    return row


def linear_fit(xs: list[float], ys: list[float], target: float = TARGET_DEVIATION) -> dict:
    """Least-squares line ``y = intercept + slope * x`` and each point's relative deviation from it,
    ``(y - fit) / fit``; ``within_target``: every |deviation| <= ``target``. With two points the line
    passes through both (deviations 0): a third is needed to test linearity.

    Raises:
        ValueError: fewer than two points, lengths that differ, or all x equal.
    """
    if len(xs) != len(ys):
        raise ValueError(f"linear_fit: {len(xs)} x values but {len(ys)} y values")
    if len(xs) < 2:
        raise ValueError(f"linear_fit: needs at least two points, got {len(xs)}")
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("linear_fit: all x values are equal; a line through them is undefined")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    fitted = [intercept + slope * x for x in xs]
    dev = [(y - f) / f if f != 0 else float("inf") for y, f in zip(ys, fitted)]
    worst = max(abs(d) for d in dev)
    return {"slope": slope, "intercept": intercept, "fitted": fitted, "relative_deviation": dev,
            "max_abs_relative_deviation": worst, "target": target, "within_target": worst <= target,
            "points": n}


def fits(rows: list[dict]) -> dict:
    """The linear fits over the rows whose conversion completed (see :func:`linear_fit`)."""
    done = [r for r in rows if r["completed"]]
    result: dict = {"models": [r["model"] for r in done]}
    if len(done) < 2:
        result["note"] = f"{len(done)} completed conversion(s): a fit needs two, linearity three or more"
        return result
    for key, x, y in (("seconds_vs_parameters", "parameters", "total_seconds"),
                      ("seconds_vs_decoder_parameters", "decoder_parameters", "total_seconds"),
                      ("peak_rss_vs_parameters", "parameters", "peak_rss_bytes")):
        result[key] = linear_fit([r[x] for r in done], [r[y] for r in done])
    if len(done) == 2:
        result["note"] = "two points: each line passes through both, so the deviations say nothing yet"
    return result


def write_results(path: str | Path, results: dict, overwrite: bool) -> Path:
    """Write the results JSON atomically (temporary file, then rename); refuse an existing file
    unless ``overwrite``.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is off.
    """
    path = check_output_free(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, results)
    return path


def plot(rows: list[dict], fit: dict, path: str | Path, whole_model: bool, large_from: float) -> None:
    """Peak memory (GiB) and total seconds against parameters, with the budget lines and the fit,
    to a PNG (through a temporary file and a rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (ax_mem, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    params = [r["parameters"] / 1e9 for r in rows]
    ax_mem.scatter(params, [r["peak_rss_gib"] for r in rows], color="tab:blue", zorder=3, label="peak RSS")
    for budget in sorted({r["budget_gib"] for r in rows}):
        small = all(r["parameters"] < large_from for r in rows if r["budget_gib"] == budget)
        ax_mem.axhline(budget, color="tab:red", ls="--", lw=1)
        ax_mem.annotate(f"budget {budget:g} GiB ({'under' if small else 'from'} {large_from / 1e9:g}B parameters)"
                        + (", not passed: --whole_model" if whole_model else ""), (0, budget),
                        textcoords="offset points", xytext=(4, 4), fontsize=8, color="tab:red")
    ok = [r for r in rows if r["completed"]]
    if ok:
        ax_t.scatter([r["parameters"] / 1e9 for r in ok], [r["total_seconds"] for r in ok], color="tab:green",
                     zorder=3, label="conversion")
    failed = [r for r in rows if not r["completed"]]
    if failed:
        ax_t.scatter([r["parameters"] / 1e9 for r in failed], [r["total_seconds"] for r in failed], color="k",
                     marker="x", zorder=3, label="failed")
    line = fit.get("seconds_vs_parameters")
    if line:
        xs = [0.0, max(params) * 1.05]
        ax_t.plot(xs, [line["intercept"] + line["slope"] * x * 1e9 for x in xs], color="tab:green", lw=1,
                  label=f"linear fit (max dev {line['max_abs_relative_deviation']:.0%})")
    for ax, key in ((ax_mem, "peak_rss_gib"), (ax_t, "total_seconds")):
        for p, r in zip(params, rows):
            ax.annotate(r["model"], (p, r[key]), textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.set_xlabel("parameters (billions)")
        ax.set_xlim(0, max(params) * 1.3)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    ax_mem.set_ylabel("peak resident memory of the conversion (GiB)")
    ax_t.set_ylabel("conversion wall time (s)")
    fig.suptitle("STAC conversion against model size (random weights, "
                 + ("whole model" if whole_model else "layerwise") + ")", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def earlier_rows(paths: list[str], names: list[str]) -> list[dict]:
    """Rows of models not measured in this run, from the JSONs of earlier runs (``--rows_from``), each
    marked with the file it came from; a model in two files is an error."""
    rows, seen = [], set(names)
    for path in paths or []:
        for row in json.loads(Path(path).read_text())["rows"]:
            if row["model"] in seen:
                raise ValueError(f"--rows_from {path}: {row['model']} is measured twice; leave it out of --models "
                                 "or of the earlier file")
            seen.add(row["model"])
            rows.append(dict(row, measured_in=row.get("measured_in", str(path))))  # where it was first measured
    return rows


def summary(rows: list[dict], args, load_before, machine: dict | None = None) -> dict:
    """The JSON of the rows measured so far: machine (None between models: reading it imports torch
    here, see :func:`run_measured`), options, tokens, rows and fits."""
    fit = fits(rows)
    results = {
        "what": "conversion time and memory against model size, random-weight models at published sizes",
        "machine": machine,
        "load_average_1_5_15min": {"before": [round(x, 2) for x in load_before],
                                   "after": [round(x, 2) for x in os.getloadavg()]},
        "options": {k: v for k, v in vars(args).items() if k not in ("out", "plot", "overwrite", "dry_run")},
        "mode": "whole_model" if args.whole_model else "layerwise",
        "tokens": {"calib_tokens": args.calib_tokens, "eval_tokens": args.eval_tokens,
                   "run_conversion_defaults": CONVERT_DEFAULT_TOKENS,
                   "note": f"cut from the defaults to {args.calib_tokens} calibration and {args.eval_tokens} "
                           "evaluation tokens for every model, so the big models convert in CPU time"},
        "tokenizer": "SmolLM2-135M-Instruct's (the embedded model's), for every model: there is no hub; its ids "
                     "are < 49152, inside every vocabulary here",
        "weights_note": WEIGHTS_NOTE,
        "rows": rows,
        "fits": fit,
        "target": {"max_abs_relative_deviation": TARGET_DEVIATION,
                   "met": fit["seconds_vs_parameters"]["within_target"] if "seconds_vs_parameters" in fit
                   else None},
    }
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)} "
                                                                "(default: all)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "stac_scale"),
                   help="where the random models, the converted outputs and the logs go (default: "
                        "%(default)s); a model written there before is reused")
    p.add_argument("--calib_tokens", type=int, default=DEFAULT_TOKENS)
    p.add_argument("--eval_tokens", type=int, default=DEFAULT_TOKENS, help="evaluation tokens, >= 512")
    p.add_argument("--whole_model", action="store_true",
                   help="leave out --layerwise and --max_memory (the whole model in memory)")
    p.add_argument("--budget_small", type=float, default=4.0, metavar="GIB",
                   help="--max_memory budget of models under --large_from parameters (default 4)")
    p.add_argument("--budget_large", type=float, default=8.0, metavar="GIB",
                   help="--max_memory budget of the larger models (default 8)")
    p.add_argument("--large_from", type=float, default=2e9, metavar="PARAMS", help="(default 2e9)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the conversions compute (cuda: GPU 0, the layers' weights streamed from CPU memory "
                        "and disk; default cpu)")
    p.add_argument("--gpu_budget", type=float, default=None, metavar="GIB",
                   help="with --device cuda: GPU 0's share of --max_memory (0=GIB), checked against the CUDA "
                        "allocator's peak")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--max_shard_bytes", type=int, default=DEFAULT_SHARD_BYTES)
    p.add_argument("--out", default="docs/results/scale.json")
    p.add_argument("--plot", default="docs/results/scale.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --plot")
    p.add_argument("--dry_run", action="store_true", help="only write the models and print the commands")
    p.add_argument("--rows_from", action="append", metavar="JSON",
                   help="include the rows of an earlier run's JSON (models not measured here) in the fit, the plot "
                        "and the JSON, marked with where they came from (repeatable)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        names = parse_models(args.models)
        if args.calib_tokens < 1 or args.eval_tokens < 512:
            raise ValueError(f"--calib_tokens must be >= 1 and --eval_tokens >= 512, got {args.calib_tokens} "
                             f"and {args.eval_tokens}")
        if min(args.budget_small, args.budget_large) <= 0:
            raise ValueError("--budget_small and --budget_large must be positive (GiB)")
        if args.gpu_budget is not None and (args.device != "cuda" or args.gpu_budget <= 0 or args.whole_model):
            raise ValueError("--gpu_budget is GPU 0's budget of a layer-by-layer conversion: give a positive size, "
                             "with --device cuda and without --whole_model")
        if not args.dry_run:
            check_output_free(args.out, args.overwrite)
            check_output_free(args.plot, args.overwrite)
    except ValueError as e:
        p.error(str(e))
    work = Path(args.workdir).resolve()
    logs = work / "logs"
    load_before = os.getloadavg()
    writes: dict[str, dict] = {}
    rows: list[dict] = []
    earlier = earlier_rows(args.rows_from, names)
    for name in names:
        model_dir, out_dir = work / "models" / name, work / "snn" / name
        print(f"[{name}] writing the random model to {model_dir} ...", flush=True)
        writes[name] = write_model(name, args, model_dir, logs)
        w = writes[name]
        print(f"[{name}] {'reused' if w['reused'] else 'written'} in {w['seconds']:.0f} s, writer peak RSS "
              f"{w['peak_rss_gib']:.2f} GiB, {disk_bytes(model_dir) / 1e9:.2f} GB on disk", flush=True)
        if args.dry_run:
            budget = budget_gib(w["counts"]["total"], args.budget_small, args.budget_large, args.large_from)
            cmd = conversion_command(model_dir, out_dir, args.calib_tokens, args.eval_tokens,
                                     None if args.whole_model else budget, args.device, args.gpu_budget)
            print(" ".join(cmd), flush=True)
            continue
        row = convert_model(name, args, w, model_dir, out_dir, logs)
        row["write"] = w
        rows.append(row)
        if len(rows) < len(names):  # what is measured so far, in case a later model does not finish
            write_results(f"{args.out}.partial.json", summary(earlier + rows, args, load_before), True)
    if args.dry_run:
        return
    rows = earlier + rows
    import torch  # only now: see run_measured

    from stac_common.runtime import machine_info

    results = summary(rows, args, load_before, machine_info(torch.device(args.device)))
    out = write_results(args.out, results, args.overwrite)
    plot(rows, results["fits"], args.plot, args.whole_model, args.large_from)
    print(f"wrote {out} and {args.plot}", flush=True)


if __name__ == "__main__":
    main()
