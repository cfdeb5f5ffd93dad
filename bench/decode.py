"""Batch-1 greedy decoding speed of a saved SNN (parallel mode, spike counting off, as deployed) against
the float32 ANN it came from and an int8 ANN, all through transformers' ``model.generate``.

A ``--prompt_tokens`` prompt from the model's own evaluation text (as ``bench/latency.py`` reads it)
is followed by exactly ``--new_tokens`` greedy tokens (``min_new_tokens = max_new_tokens``). Candidates:

- ``snn_row_sparse``: the SNN with its spiking linear layers reading only the weight rows of the
  channels that fired (``spike_modules.row_sparse``, the default);
- ``snn_dense``: the same SNN with ``set_row_sparse(False)`` (dense products), to show the gain;
- ``snn_slots_only``: the row-reading SNN with a KV cache that keeps no decoded float copy
  (``SpikeKVCache(model, float_copy=False)``: the int8 slots only, decoded whole at every call), to show
  what the copy buys in speed (it costs 4 bytes per cached element in float32);
- ``ann_fp32``: the source model (``load_checked_source``), with transformers' default cache (which
  concatenates the whole cache at every token): the headline baseline;
- ``ann_fp32_static``: the same model with transformers' static cache (``cache_implementation="static"``,
  preallocated, written in place, as the SNN's cache appends): reported beside the headline
  (``snn_over_ann_fp32_static``), so the part of the ratio that is the cache shows;
- ``ann_int8_own``: the source model with every block linear layer as STAC's ``Int8Linear`` (the head
  too where the SNN's is, ``int8_head``), run through the same row kernel with every row
  (``RowReadLinear``), the layers that read one tensor joined as the SNN's are (``group_readers_``);
- ``ann_int8_torchao``: torchao's int8 weight-only layers on the same block layers, where torchao runs.

Each repeat runs every candidate once, interleaved (``bench/timing.py``), and the medians are kept.
Every candidate is also timed with a single new token (the prefill and one step), interleaved the
same way, so that decode-only tokens/s, ``(new_tokens - 1) / (full - prefill)``, are reported next
to the whole ``generate`` call's.

    python -m bench.decode --model_dir out/demo_smollm2 --out docs/bench_decode.json --overwrite
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from bench.timing import side_by_side
from calibration.int8 import Int8Linear, quantize_weights_
from spike_modules.kv_cache import SpikeKVCache
from spike_modules.layers import set_row_sparse
from spike_modules.row_groups import group_readers_
from spike_modules.row_sparse import read_by_rows_
from spike_modules.site import set_spike_counting
from stac_common.io import check_output_free, write_json
from stac_common.runtime import machine_info
from stac_lm.convert.pipeline import load_checked_source
from stac_lm.convert.texts import EVAL_PLAYS, read_text, tokenize
from stac_lm.io.saving import load_snn


def prompt_ids(tok, config: dict, n: int) -> torch.Tensor:
    """The first ``n`` tokens of the model's evaluation text, ``[1, n]``."""
    text, src, _ = read_text(config["options"]["eval_text"], EVAL_PLAYS)
    ids = tokenize(tok, text, n, "eval", src, ()).ids[:n]
    if ids.numel() < n:
        raise ValueError(f"the evaluation text gives {ids.numel()} tokens, fewer than --prompt_tokens {n}")
    return ids[None]


def int8_own(ann: torch.nn.Module, head: bool = False, sample: torch.Tensor | None = None) -> torch.nn.Module:
    """A copy of ``ann`` with STAC's own int8 block layers (and head, with ``head``: as the SNN was
    converted, so that both read the same bytes), each read by the row kernel (all rows). With
    ``sample`` (token ids), the layers that read the same tensor in a pass over it are read together
    where the SNN's are (``spike_modules.row_groups``: q, k and v in one call)."""
    model = copy.deepcopy(ann)
    quantize_weights_(model, "own", progress=False, head=head)
    read_by_rows_(model, Int8Linear)
    if sample is not None:
        group_readers_(model, sample)
    return model


def int8_torchao(ann: torch.nn.Module) -> tuple[torch.nn.Module | None, str]:
    """A copy of ``ann`` with torchao's int8 weight-only layers on the same layers as :func:`int8_own`
    (the head stays float), or ``(None, why)`` where torchao is missing or refuses."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        return None, f"torchao not importable: {e}"
    model = copy.deepcopy(ann)
    head = model.get_output_embeddings()
    try:
        quantize_(model, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, _: isinstance(m, torch.nn.Linear) and m is not head)
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
        return None, f"torchao quantize_ failed: {type(e).__name__}: {e}"
    return model, "torchao Int8WeightOnlyConfig on every block nn.Linear, head float"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--prompt_tokens", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no_torchao", action="store_true", help="leave out torchao's int8 ANN")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.prompt_tokens < 1:
        raise ValueError("--new_tokens must be >= 2 (decode-only speed needs a step after the first) and "
                         "--prompt_tokens >= 1")
    out = check_output_free(args.out, args.overwrite)

    snn, tok, config = load_snn(args.model_dir, "cpu")
    set_spike_counting(snn, False)
    ann = load_checked_source(config)
    ids = prompt_ids(tok, config, args.prompt_tokens)
    mask = torch.ones_like(ids)
    int8_head = bool(config["options"].get("int8_head", False))
    models = {"snn_row_sparse": (snn, True), "snn_dense": (snn, False), "snn_slots_only": (snn, True),
              "ann_fp32": (ann, None), "ann_fp32_static": (ann, None),
              "ann_int8_own": (int8_own(ann, int8_head, ids[:, :8]), None)}
    torchao_model, torchao_note = (None, "left out (--no_torchao)") if args.no_torchao else int8_torchao(ann)
    if torchao_model is not None:
        models["ann_int8_torchao"] = (torchao_model, None)
    tokens: dict[str, torch.Tensor] = {}

    def runner(name: str, new: int):
        model, rows = models[name]

        def run():
            if rows is not None:
                set_row_sparse(model, rows)
            cache = ({"past_key_values": SpikeKVCache(model, float_copy=False)} if name == "snn_slots_only" else
                     {"cache_implementation": "static"} if name == "ann_fp32_static" else {})
            got = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=tok.eos_token_id, **cache)
            if new == args.new_tokens:
                tokens[name] = got[0, ids.shape[1]:]
        return run

    runs = {f"{name}/{kind}": runner(name, new) for name in models
            for kind, new in (("generate", args.new_tokens), ("prefill", 1))}
    med = side_by_side(runs, repeats=args.repeats, warmup=1)
    set_row_sparse(snn, True)

    rows = {}
    for name in models:
        full, pre = med[f"{name}/generate"], med[f"{name}/prefill"]
        made = int(tokens[name].numel())
        if made != args.new_tokens:
            raise RuntimeError(f"{name} generated {made} tokens, not {args.new_tokens}")
        rows[name] = {"seconds": full, "tokens_per_second": args.new_tokens / full, "prefill_seconds": pre,
                      "decode_tokens_per_second": (args.new_tokens - 1) / (full - pre) if full > pre else None}
    tps = {k: v["tokens_per_second"] for k, v in rows.items()}
    dec = {k: v["decode_tokens_per_second"] for k, v in rows.items()}
    int8_name = max((k for k in rows if k.startswith("ann_int8")), key=lambda k: tps[k])
    if not torch.equal(tokens["snn_row_sparse"], tokens["snn_slots_only"]):  # the copy holds the slots' decode
        raise RuntimeError("the SNN gave other tokens with its KV cache's float copy than without it: a bug, "
                           "please report it with this model")
    equal = (tokens["snn_row_sparse"] == tokens["snn_dense"]).float().mean().item()
    first_diff = (tokens["snn_row_sparse"] != tokens["snn_dense"]).nonzero()
    result = {
        "benchmark": "bench/decode.py", "command": " ".join(["python -m bench.decode", *(argv or sys.argv[1:])]),
        "model_dir": args.model_dir, "model": config["source"].get("model_id", config["source"].get("model_name")),
        "coding": config["conversion_config"].get("coding", "rate"), "timesteps": config["timesteps"],
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "results": rows,
        "snn_over_ann_fp32": tps["snn_row_sparse"] / tps["ann_fp32"],
        "snn_over_ann_fp32_static": tps["snn_row_sparse"] / tps["ann_fp32_static"],
        "snn_over_ann_int8": tps["snn_row_sparse"] / tps[int8_name], "ann_int8_reference": int8_name,
        "row_sparse_gain": tps["snn_row_sparse"] / tps["snn_dense"],
        "float_copy_gain": tps["snn_row_sparse"] / tps["snn_slots_only"],
        "decode_only": {"snn_over_ann_fp32": _ratio(dec, "snn_row_sparse", "ann_fp32"),
                        "snn_over_ann_fp32_static": _ratio(dec, "snn_row_sparse", "ann_fp32_static"),
                        "snn_over_ann_int8": _ratio(dec, "snn_row_sparse", int8_name),
                        "row_sparse_gain": _ratio(dec, "snn_row_sparse", "snn_dense"),
                        "float_copy_gain": _ratio(dec, "snn_row_sparse", "snn_slots_only")},
        "row_sparse_tokens_equal_dense_share": equal,
        "row_sparse_first_differing_token": int(first_diff[0, 0]) if first_diff.numel() else None,
        "torchao": torchao_note, "int8_head": int8_head,
        "machine": machine_info(torch.device("cpu")),
    }
    write_json(Path(out), result)
    for name, r in rows.items():
        print(f"{name:18s} {r['tokens_per_second']:6.2f} tokens/s (decode only "
              f"{r['decode_tokens_per_second'] or float('nan'):6.2f})")
    print(f"SNN / fp32 ANN {result['snn_over_ann_fp32']:.2f}x (static cache "
          f"{result['snn_over_ann_fp32_static']:.2f}x), SNN / int8 ANN ({int8_name}) "
          f"{result['snn_over_ann_int8']:.2f}x, row-sparse gain {result['row_sparse_gain']:.2f}x; "
          f"row-sparse tokens equal to dense: {equal:.1%}; written {out}")
    return result


def _ratio(d: dict, a: str, b: str) -> float | None:
    return d[a] / d[b] if d[a] is not None and d[b] is not None else None


if __name__ == "__main__":
    main()
