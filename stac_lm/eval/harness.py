"""lm-eval-harness on converted models: any lm-eval task on the ANN and its SNN side by side, offline.

    stac-lm-eval --model_dir out/demo_smollm2 --tasks tempest_lastword,tempest_cloze --limit 100
    python -m stac_lm.eval.harness --model_dir out/demo_smollm2 --out out/lm_eval.json

Each ``--model_dir`` is loaded with ``from_pretrained`` (a ``SpikingCausalLM``, still a transformers
model), and the source model it was converted from is loaded too (its checksum checked against the
saved one, so the ANN column is the model the SNN came from). Both go through lm-eval's own
``HFLM`` wrapper and ``simple_evaluate``: the SNN is scored exactly as lm-eval scores any Hugging
Face model. The SNN runs in parallel mode (the closed form of its time steps, ``docs/design.md``
section 2), spike counting off.

Tasks: the local Tempest tasks (``stac_lm/eval/lm_eval_tasks``: ``tempest_lastword``,
``tempest_cloze``), or any task lm-eval knows by name. The local tasks need no download; a task
of lm-eval's registry reads its dataset from the hub cache, and offline it fails with
``datasets``' own error, which this command shows as it is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import stac_common.cli as stac_cli

PROG = "stac-lm-eval"
DEFAULT_TASKS = "tempest_lastword,tempest_cloze"


def evaluate(models: dict, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
             seed: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """``{model name: {task: {metric: value}}}`` of lm-eval's ``simple_evaluate`` on each model.

    Args:
        models: name -> a transformers causal LM (an ANN or a ``SpikingCausalLM``), on its device.
        tokenizer: the tokenizer the models share.
        tasks: lm-eval task names (the local ones of ``stac_lm.eval.lm_eval_tasks`` are always found).
        limit: the first ``limit`` documents of each task (all when None).
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing is downloaded; a task that needs it fails
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from spike_modules.site import set_spike_counting

    from stac_lm.eval.lm_eval_tasks import TASKS_DIR

    # lm-eval's own task index (thousands of YAML files) is read only when a task needs it
    local_only = set(tasks) <= set(_local_tasks())
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not local_only)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}; local ones: {', '.join(sorted(_local_tasks()))}")
    out = {}
    for name, model in models.items():
        set_spike_counting(model, False)  # an ANN has no sites: nothing changes
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed)
        out[name] = {task: {k.split(",")[0]: float(v) for k, v in metrics.items()
                            if k not in ("alias", "sample_len") and isinstance(v, (int, float))}
                     for task, metrics in res["results"].items()}
        out[name]["n_documents"] = {task: int(n["effective"]) for task, n in res["n-samples"].items()}
    return out


def _local_tasks() -> tuple[str, ...]:
    from stac_lm.eval.lm_eval_tasks import TASKS

    return TASKS


def markdown_table(results: dict[str, dict], tasks: list[str]) -> str:
    """One row per model, one column per task metric (value ± standard error)."""
    cols = []
    for task in tasks:
        metrics = next(iter(results.values()))[task]
        cols += [(task, m) for m in sorted(metrics) if not m.endswith("_stderr")]
    head = "| model | " + " | ".join(f"{t} {m}" for t, m in cols) + " |"
    rule = "|---|" + "---|" * len(cols)
    rows = []
    for name, res in results.items():
        cells = []
        for task, m in cols:
            v, se = res[task][m], res[task].get(f"{m}_stderr")
            cells.append(f"{v:.3f}" + (f" ± {se:.3f}" if se is not None and se == se else ""))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows]) + "\n"


def load_snn(model_dir: str):
    """``(snn, conversion)`` of a saved SNN directory, on the CPU."""
    from stac_lm.io.hf_native import _load

    snn, conversion, _ = _load(Path(model_dir), "cpu")
    return snn, conversion


def same_source(first: tuple[str, dict], other: tuple[str, dict]) -> None:
    """Both ``(directory, conversion)`` pairs were converted from the same source model.

    Raises:
        ValueError: the source model's name or weights differ (the one ANN column would not be
            theirs).
    """
    (d0, c0), (d1, c1) = first, other
    s0, s1 = c0["source"], c1["source"]
    if (s0.get("model_name"), s0.get("sha256")) != (s1.get("model_name"), s1.get("sha256")):
        raise ValueError(f"{d1} was converted from {s1.get('model_name')!r} (sha256 {str(s1.get('sha256'))[:12]}), "
                         f"{d0} from {s0.get('model_name')!r} (sha256 {str(s0.get('sha256'))[:12]}): the ANN column is "
                         "the first directory's source, so give one stac-lm-eval run per source model")


def build_parser() -> stac_cli.Parser:
    p = stac_cli.Parser(PROG, __doc__)
    stac_cli.model_dir_flag(p, "a saved SNN directory; repeat for several of one source model (the ANN of the "
                               "first is scored once, beside them; a directory of another source is refused)",
                            action="append", required=True)
    p.add_argument("--tasks", default=DEFAULT_TASKS,
                   help=f"comma-separated lm-eval task names (default {DEFAULT_TASKS}: the local Tempest tasks)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    stac_cli.batch_size_flag(p, "requests per forward pass (default 8)", default=8)
    stac_cli.device_flag(p, default="auto")
    stac_cli.seed_flag(p, "lm-eval's seeds (default 0)", default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    if args.limit is not None and args.limit < 1:
        stac_cli.fail(PROG, f"--limit must be >= 1, got {args.limit}")
    from stac_common.io import check_output_free, write_json

    try:
        out = check_output_free(args.out, args.overwrite) if args.out else None
        from stac_common.runtime import place, resolve_device
        from stac_lm.convert.pipeline import load_checked_source

        dev = resolve_device(args.device)
        results, first = {}, None
        for d in args.model_dir:
            snn, conversion = load_snn(d)
            if first is None:
                first, models = (d, conversion), {"ANN": place(load_checked_source(conversion), dev)}
            else:  # the ANN column is the first directory's source: each further one must share it
                same_source(first, (d, conversion))
                models = {}
            models[f"SNN {d}"] = place(snn, dev)
            results.update(evaluate(models, snn.tokenizer, tasks, args.limit, args.batch_size, args.seed))
    except (ValueError, FileNotFoundError) as e:
        stac_cli.fail(PROG, e)
    print(markdown_table(results, tasks))
    if out is not None:
        write_json(out, {"tasks": tasks, "limit": args.limit, "results": results})
        print(f"written {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
