"""Parallel neuron vs sequential SpikingJelly neuron, side by side in one run.

Each (variant, T) runs in a fresh child process so its peak memory is its own:
the child resets the RSS high-water mark (/proc/self/clear_refs) after building
the input, runs the neuron, and reports VmHWM minus the RSS before the run.

    python -m bench.neurons --out docs/bench_neurons.json --overwrite
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status; this benchmark measures memory on Linux only")


def child(variant: str, T: int, shape: tuple[int, ...], reps: int, seed: int) -> dict:
    import torch
    from spikingjelly.activation_based import functional

    from spike_modules import IFNeuron, ParaInfNeuron

    torch.manual_seed(seed)
    H = shape[-1]
    th = torch.rand(H) + 0.5
    x = torch.randn(*shape) * th * 0.6  # about half the inputs positive, a few clipped
    if variant == "parallel":
        neuron = ParaInfNeuron(T, th)
        run = lambda: neuron(x)  # noqa: E731
    else:
        neuron = IFNeuron(T, th)
        currents = x.expand(T, *shape)  # constant input current, a view: no copy

        def run():
            functional.reset_net(neuron)
            return neuron(currents)
    times = []
    with torch.inference_mode():
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
        before = _proc_kb("VmRSS")
        for _ in range(reps + 1):  # the first run is warm-up
            t0 = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t0)
            del out
        peak = _proc_kb("VmHWM")
    return {"variant": variant, "T": T, "median_s": statistics.median(times[1:]), "min_s": min(times[1:]),
            "peak_mem_mb": (peak - before) / 1024, "spike_rate": neuron.spike_rate}


def run_child(variant: str, T: int, args) -> dict:
    cmd = [sys.executable, "-m", "bench.neurons", "--child", variant, "--T", str(T), "--shape", args.shape,
           "--reps", str(args.reps), "--seed", str(args.seed)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if res.returncode != 0:
        raise SystemExit(f"benchmark child {variant} T={T} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def check_agreement(shape: tuple[int, ...], T: int) -> bool:
    """The two neurons emit the same counts on (a slice of) the benchmark input."""
    import torch

    from spike_modules import IFNeuron, ParaInfNeuron

    torch.manual_seed(0)
    th = torch.rand(shape[-1]) + 0.5
    x = torch.randn(2, 16, shape[-1]) * th * 0.6
    para = ParaInfNeuron(T, th)
    para(x)
    seq = IFNeuron(T, th)(x.expand(T, *x.shape)) / th
    return bool((seq.sum(0).round() == para.last_counts.float()).float().mean() > 0.9999)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="32,128,1536", help="input shape B,S,H (default: 32,128,1536)")
    p.add_argument("--timesteps", default="4,8,16,32", help="comma-separated T values")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions after one warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/bench_neurons.json", help="report JSON path")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--child", choices=["parallel", "sequential"], help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    if args.child:
        print(json.dumps(child(args.child, args.T, shape, args.reps, args.seed)))
        return

    from rich.console import Console
    from rich.table import Table

    from stac_common.io import check_output_free, write_json

    out = check_output_free(args.out, args.overwrite)
    Ts = [int(t) for t in args.timesteps.split(",")]
    import torch
    rows = []
    console = Console()
    with console.status("benchmarking neurons") as status:
        for T in Ts:
            status.update(f"T={T}: parallel, then sequential (fresh process each)")
            par, seq = run_child("parallel", T, args), run_child("sequential", T, args)
            speedup = seq["median_s"] / par["median_s"]
            rows.append({"T": T, "parallel": par, "sequential": seq, "speedup": speedup,
                         "speedup_target": 0.8 * T, "speedup_met": speedup >= 0.8 * T,
                         "memory_met": par["peak_mem_mb"] <= seq["peak_mem_mb"],
                         "counts_agree": check_agreement(shape, T)})
    report = {
        "benchmark": "bench/neurons.py", "shape": list(shape), "reps": args.reps,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "target": "parallel >= 0.8*T times faster than sequential at T >= 8; parallel peak memory <= sequential",
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    table = Table(title=f"ParaInfNeuron vs SpikingJelly IFNeuron on {list(shape)}")
    for col in ("T", "parallel ms", "sequential ms", "speedup", "target 0.8T", "par MB", "seq MB", "agree"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["T"]), f"{r['parallel']['median_s'] * 1e3:.1f}", f"{r['sequential']['median_s'] * 1e3:.1f}",
                      f"{r['speedup']:.1f}x", f"{r['speedup_target']:.1f}x", f"{r['parallel']['peak_mem_mb']:.0f}",
                      f"{r['sequential']['peak_mem_mb']:.0f}", "yes" if r["counts_agree"] else "NO")
    console.print(table)
    console.print(f"report written to {out}")


if __name__ == "__main__":
    main()
