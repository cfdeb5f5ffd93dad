"""What an int8 LM head and input embedding cost in quality, on a saved float-head SNN.

The saved SNN (int8 blocks, float32 tied head/embedding) is loaded, copied, and the copy's head and
embedding are made int8 in place (``calibration.int8_embedding.quantize_head_``: one int8 table and
a float32 scale per token, shared by the tied pair). The sites keep the thresholds calibrated on the
float-head network: a conversion with ``--int8_head`` calibrates after quantizing, so this is the
cheaper, slightly pessimistic measurement. The ANN, the float-head SNN and the int8-head SNN then
run the report's protocol (``stac_lm.eval.perplexity.evaluate_lm``: non-overlapping 512-token
windows of the evaluation text, The Tempest); the int8-head SNN is also compared with the
float-head SNN token by token. Last, the int8-head copy is saved and reloaded, and its logits on
the first window are checked bit for bit.

    python -m bench.int8_head --model_dir out/demo_smollm2 --out docs/int8_head_check.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from calibration.int8_embedding import quantize_head_
from stac_common.io import check_output_free, write_json
from stac_common.runtime import machine_info
from stac_lm.convert.pipeline import load_checked_source
from stac_lm.convert.texts import EVAL_PLAYS, read_text, tokenize
from stac_lm.eval.perplexity import evaluate_lm
from stac_lm.io.hf_native import from_pretrained
from stac_lm.io.saving import load_snn

WINDOW = 512


def _state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the state dict with shared tensors counted once (what the safetensors file holds)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total


def run(args) -> dict:
    torch.manual_seed(0)
    snn, tok, config = load_snn(args.model_dir)
    if (config["quantization"].get("summary") or {}).get("int8_head"):
        raise ValueError(f"{args.model_dir} already has an int8 head; give a directory converted with a float head")
    ann = load_checked_source(config).eval()
    int8 = copy.deepcopy(snn)
    head = quantize_head_(int8)
    text, src, files = read_text(None, EVAL_PLAYS)
    ids = tokenize(tok, text, args.tokens, "eval", src, files).ids

    preds: dict[str, list[torch.Tensor]] = {"snn_float_head": [], "snn_int8_head": []}
    hooks = [m.register_forward_hook(lambda mod, a, out, k=k: preds[k].append(out.logits[:, :-1].argmax(-1)))
             for k, m in (("snn_float_head", snn), ("snn_int8_head", int8))]
    t0 = time.perf_counter()
    lm = evaluate_lm({"ann": ann, "snn_float_head": snn, "snn_int8_head": int8}, ids, window=WINDOW, progress=False)
    seconds = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    same = sum(int((a == b).sum()) for a, b in zip(preds["snn_float_head"], preds["snn_int8_head"]))

    with tempfile.TemporaryDirectory() as tmp:  # the round trip on the real model
        int8.save_pretrained(Path(tmp) / "snn")
        file_bytes = (Path(tmp) / "snn" / "snn_model.safetensors").stat().st_size
        loaded = from_pretrained(Path(tmp) / "snn")
        first = ids[:WINDOW][None]
        with torch.no_grad():
            identical = bool(torch.equal(loaded(first).logits, int8(first).logits))

    ppl = lm["ppl"]
    return {
        "benchmark": "bench/int8_head.py", "model_dir": str(args.model_dir),
        "source": config["source"].get("model_id"), "timesteps": config["timesteps"],
        "coding": config["conversion_config"].get("coding"), "spike_head": config["options"].get("spike_head"),
        "note": "int8 head/embedding put on the saved float-head SNN; site thresholds kept from its calibration",
        "protocol": lm["protocol"], "eval_text": src, "windows": lm["windows"], "scored_tokens": lm["tokens"],
        "ppl": ppl,
        "ppl_ratio_vs_ann": {k: ppl[k] / ppl["ann"] for k in ("snn_float_head", "snn_int8_head")},
        "ppl_ratio_int8_over_float_head": ppl["snn_int8_head"] / ppl["snn_float_head"],
        "top1_agreement_with_ann": {k: lm["top1_agreement"][k] for k in ("snn_float_head", "snn_int8_head")},
        "top1_agreement_int8_vs_float_head": same / lm["tokens"],
        "int8_head": head,
        "state_bytes": {"float_head": _state_bytes(snn), "int8_head": _state_bytes(int8)},
        "saved_weights_file_bytes_int8_head": file_bytes,
        "reloaded_logits_bit_identical": identical,
        "eval_seconds": seconds, "threads": torch.get_num_threads(),
        "machine": machine_info(torch.device("cpu")),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default="out/demo_smollm2", help="a saved SNN with a float head")
    p.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (the report's 4096)")
    p.add_argument("--out", default="docs/int8_head_check.json")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    check_output_free(args.out, args.overwrite)
    result = run(args)
    write_json(Path(args.out), result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "int8_head")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
