"""Where a saved SNN's replies leave its ANN's: site groups and token classes.

Teacher-forced on the ANN's own greedy replies to the generation benchmark's prompts
(``stac_lm/eval/prompts.py``), this benchmark answers two questions:

* **Which sites?** Each group of spiking sites (by role: the inputs of q/k/v, the attention's
  q, k and v, the input of o_proj, of gate/up, of down_proj, the LM head's; and by depth) is put in
  ``ann`` mode (its input passes as a float, the 8-bit weights stay) while every other site
  spikes. The gain in top-1 agreement and in the share of replies whose first 16 tokens are all
  predicted tells that group's share of the flips. ``all`` in ``ann`` mode is the 8-bit weights
  alone.
* **Which tokens?** With every site spiking, the flips by token class: the reply's first token,
  tokens after punctuation, the rest; and by the ANN's own margin (top-1 minus top-2 log
  probability), which shows whether the SNN flips near-ties or confident choices.

    python -m bench.fidelity_sites --model_dir out/demo_smollm2 --out docs/fidelity_sites.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from spike_modules import iter_sites, set_mode
from spike_modules.site import set_spike_counting
from stac_common.io import check_output_free, write_json
from stac_lm.eval.fidelity import FIRST_N, ann_replies, chat_ids, forced_predictions, reply_logits
from stac_lm.convert.pipeline import load_checked_source
from stac_lm.eval.prompts import prompts
from stac_lm.io.saving import load_snn
from stac_common.runtime import machine_info, resolve_device

ROLES = {  # group name -> pattern on the site's qualified name
    "qkv_input": r"self_attn\.(q_proj|c_attn)\.site$", "q": r"\.q_site$", "k": r"\.k_site$", "v": r"\.v_site$",
    "o_input": r"self_attn\.(o_proj|c_proj)\.site$", "mlp_input": r"mlp\.(gate_proj|up_proj|c_fc|fc1)\.site$",
    "down_input": r"mlp\.(down_proj|c_proj|fc2)\.site$", "lm_head": r"^lm_head\.site$"}
MARGINS = (0.0, 0.1, 0.5, 1.0, 2.0, float("inf"))  # ANN top-1 minus top-2 log probability, bucket edges
PUNCT = re.compile(r"[.,;:!?)\]\"']\s*$")


def layer_of(name: str) -> int | None:
    m = re.search(r"\.(?:layers|h)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def groups(names: list[str]) -> dict[str, list[str]]:
    """Site groups by role and by thirds of the depth; ``all`` is every site."""
    out = {g: [n for n in names if re.search(p, n)] for g, p in ROLES.items()}
    layers = sorted({layer_of(n) for n in names if layer_of(n) is not None})
    thirds = [layers[i * len(layers) // 3: (i + 1) * len(layers) // 3] for i in range(3)]
    for part in thirds:
        if part:
            out[f"layers_{part[0]}-{part[-1]}"] = [n for n in names if layer_of(n) in part]
    out["all"] = list(names)
    return {g: v for g, v in out.items() if v}


def forced(snn, items: list[tuple[torch.Tensor, list[int]]]) -> dict:
    hits = [forced_predictions(snn, prompt, reply) for prompt, reply in items]
    return {"forced_top1": sum(map(sum, hits)) / sum(map(len, hits)),
            f"forced_first_{FIRST_N}": sum(all(h[:FIRST_N]) for h in hits) / len(hits)}


def token_classes(ann, snn, tok, items) -> dict:
    """Flip rates of the all-spiking SNN by token class and by the ANN's margin."""
    cls = {k: [0, 0] for k in ("first", "after_punctuation", "other")}
    buckets = [[0, 0] for _ in MARGINS[:-1]]
    for prompt, reply in items:
        a, s = reply_logits(ann, prompt, reply), reply_logits(snn, prompt, reply)
        top2 = a.log_softmax(-1).topk(2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1]).tolist()
        flips = (s.argmax(-1) != a.argmax(-1)).tolist()
        for i, (f, m) in enumerate(zip(flips, margin)):
            before = tok.decode(reply[:i]) if i else ""
            c = "first" if i == 0 else ("after_punctuation" if PUNCT.search(before) else "other")
            cls[c][0] += f
            cls[c][1] += 1
            b = next(j for j in range(len(MARGINS) - 1) if m < MARGINS[j + 1])
            buckets[b][0] += f
            buckets[b][1] += 1
    return {"by_class": {k: {"flips": f, "tokens": n, "flip_rate": f / n if n else None} for k, (f, n) in cls.items()},
            "by_ann_margin": [{"margin_from": MARGINS[j], "margin_to": MARGINS[j + 1], "flips": f, "tokens": n,
                               "flip_rate": f / n if n else None} for j, (f, n) in enumerate(buckets)]}


def run(args) -> dict:
    torch.manual_seed(0)
    device = resolve_device(args.device)
    snn, tok, config = load_snn(args.model_dir, device)
    set_spike_counting(snn, False)
    ann = load_checked_source(config).to(device).eval()
    t0 = time.perf_counter()
    rows = prompts(tuple(args.kinds.split(",")))
    replies = ann_replies(ann, tok, rows, args.new_tokens, args.ann_replies, key=config["source"])
    items = [(chat_ids(tok, p["text"]), r.ids) for p, r in zip(rows, replies) if r.ids]
    print(f"{len(items)} ANN replies in {time.perf_counter() - t0:.0f} s", flush=True)
    sites = dict(iter_sites(snn))
    set_mode(snn, "parallel")
    base = forced(snn, items)
    print(f"all spiking: {base}", flush=True)
    found = []
    for g, members in groups(list(sites)).items():
        for n in members:
            sites[n].mode = "ann"
        r = forced(snn, items)
        set_mode(snn, "parallel")
        found.append({"group": g, "sites": len(members), **r,
                     "gain_top1": r["forced_top1"] - base["forced_top1"],
                     f"gain_first_{FIRST_N}": r[f"forced_first_{FIRST_N}"] - base[f"forced_first_{FIRST_N}"]})
        print(f"{g} ({len(members)} sites) as floats: {r}", flush=True)
    return {"benchmark": "bench/fidelity_sites.py", "model_dir": str(args.model_dir), "T": int(config["timesteps"]),
            "replies": len(items), "reply_tokens": sum(len(r) for _, r in items), "new_tokens": args.new_tokens,
            "all_spiking": base, "groups_as_floats": found, "tokens": token_classes(ann, snn, tok, items),
            "seconds": time.perf_counter() - t0, "machine": machine_info(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="a saved SNN directory")
    p.add_argument("--new_tokens", type=int, default=48)
    p.add_argument("--kinds", default="question,instruction,chitchat", help="prompt kinds to run")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--ann_replies", metavar="JSON", help="cache of the ANN's replies (bench/generation.py's option)")
    p.add_argument("--out", default="docs/fidelity_sites.json")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    check_output_free(args.out, args.overwrite)
    result = run(args)
    write_json(Path(args.out), result)
    print(json.dumps(result["tokens"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
