"""A saved SNN split over a GPU, CPU memory and disk (or, with ``--device cpu``, over CPU memory and
disk): the same logits and replies as the model whole, and what each split costs in memory and
decoding speed.

Each placement loads the directory with a ``max_memory`` budget (``stac_lm.io.offload.plan_layers``):
the embeddings, head, norms and sites on GPU 0 with room to load one layer, then as many decoder
layers as the GPU's share holds; with ``cpu=SIZE`` the next layers keep their weights in CPU memory;
the rest read from the saved files; each streamed layer is loaded onto the GPU for its forward
(accelerate's hooks). Per placement: the plan (layers per place), the CUDA allocator's peak while
loading and decoding, the largest difference of the prompt's logits from the whole model's, whether
the greedy tokens of ``generate()`` and of ``TemporalSpikeProcessor`` are the whole model's, and
tokens/s of each (one run each after a warm-up of a few tokens; the first placement is the model whole).

    python -m bench.devices --model_dir out/demo_smollm2 --out /tmp/devices.json
    python -m bench.devices --device cpu --model_dir out/demo_smollm2 --out /tmp/devices_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from stac_common.io import check_output_free, write_json
from stac_common.runtime import machine_info, resolve_device

GIB = 1 << 30


def budgets(resident: int, heavy: list[int], gpu: bool = True) -> dict[str, dict[str, str] | None]:
    """The placements measured: the model whole (None), and on a GPU budgets that keep half of the
    layers on the GPU and half in CPU memory, a quarter on each of GPU and CPU and the rest on disk,
    and every layer on disk; on the CPU, half of the layers and every layer on disk."""
    room = resident + max(heavy)
    half, quarter = sum(heavy[:len(heavy) // 2]), sum(heavy[:len(heavy) // 4])
    rest = sum(heavy) - half
    if not gpu:
        return {"whole": None, "half on disk": {"cpu": str(room + half)}, "all on disk": {"cpu": str(room)}}
    return {"whole on the GPU": None,
            "GPU + CPU": {"0": str(room + half), "cpu": str(rest)},
            "GPU + CPU + disk": {"0": str(room + quarter), "cpu": str(max(quarter, 1))},
            "GPU + disk": {"0": str(room)}}


def measure(model_dir: str, budget: dict | None, ids: torch.Tensor, new_tokens: int,
            device: torch.device) -> tuple[dict, torch.Tensor]:
    """Load with ``budget`` on ``device``, run the prompt and decode ``new_tokens`` both ways: the row
    and the prompt's logits."""
    from stac_lm.convert.layerwise import decoder_layers
    from stac_lm.generate.processor import TemporalSpikeProcessor
    from stac_lm.io.offload import plan_layers
    from stac_lm.io.saving import load_snn

    cuda = device.type == "cuda"  # the CPU runs it in the tests, without the GPU's figures
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model, tok, config = load_snn(model_dir, device, budget)
    load_s = time.perf_counter() - t0
    whole = "0" if cuda else "cpu"
    plan = plan_layers(model, budget, decoder_layers(model)) if budget else [whole] * len(decoder_layers(model)[1])
    ids = ids.to(device)
    with torch.no_grad():
        logits = model(ids).logits.float().cpu()
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        _sync(device)
        gen_s = time.perf_counter() - t0
    proc = TemporalSpikeProcessor(model, int(config["timesteps"]), max_context_length=ids.shape[1] + new_tokens + 8)
    proc.generate(ids[0].cpu(), max_new_tokens=2, conversation_id="warm-up")
    reply = proc.generate(ids[0].cpu(), max_new_tokens=new_tokens)
    row = {"max_memory": budget, "layers": {p: plan.count(p) for p in dict.fromkeys(plan)}, "load_seconds": load_s,
           "peak_cuda_gib": torch.cuda.max_memory_allocated(device) / GIB if cuda else None,
           "resident_gib_after": _resident() / GIB,  # the process's resident memory with this model loaded, after decoding
           "generate_tokens": out[0, ids.shape[1]:].tolist(), "generate_tokens_per_second": new_tokens / gen_s,
           "processor_tokens": reply.tokens, "processor_tokens_per_second": reply.tokens_per_second}
    del model, proc
    gc.collect()
    return row, logits


def _resident() -> int:
    """The process's resident memory now (Linux's /proc), in bytes."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.devices", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="a saved SNN directory")
    p.add_argument("--device", default="cuda", help="cuda (default): splits over the GPU, CPU memory and disk; "
                                                   "cpu: over CPU memory and disk")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--prompt_tokens", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
        check_output_free(args.out, args.overwrite)
    except ValueError as e:
        p.error(str(e))
    from stac_lm.convert.layerwise import layer_list
    from stac_lm.io.offload import layer_bytes
    from stac_lm.io.saving import load_snn

    model, tok, _ = load_snn(args.model_dir)
    resident, heavy = layer_bytes(model, layer_list(model))
    del model
    ids = torch.randint(3, min(len(tok), 49152), (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    rows, ref = {}, None
    if args.threads:
        torch.set_num_threads(args.threads)
    for name, budget in budgets(resident, heavy, device.type == "cuda").items():
        print(f"[{name}] max_memory {budget}", flush=True)
        row, logits = measure(args.model_dir, budget, ids, args.new_tokens, device)
        if ref is None:
            ref, whole = logits, row
        row["max_abs_logit_difference"] = float((logits - ref).abs().max())
        row["generate_same_tokens"] = row["generate_tokens"] == whole["generate_tokens"]
        row["processor_same_tokens"] = row["processor_tokens"] == whole["processor_tokens"]
        rows[name] = row
        memory = f"peak CUDA {row['peak_cuda_gib']:.2f} GiB" if row["peak_cuda_gib"] is not None else \
            f"resident {row['resident_gib_after']:.2f} GiB"
        print(f"[{name}] {row['layers']}, {memory}, "
              f"generate {row['generate_tokens_per_second']:.1f} tok/s, processor "
              f"{row['processor_tokens_per_second']:.1f} tok/s, max |logit diff| {row['max_abs_logit_difference']:.3g}, "
              f"same tokens {row['generate_same_tokens']}/{row['processor_same_tokens']}", flush=True)
    result = {"what": "a saved SNN split over devices, against the model whole on the same device",
              "model_dir": str(Path(args.model_dir).resolve()), "resident_bytes": resident, "layer_bytes": heavy,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "prompt": "random token ids (seed 0): the placements are compared with each other, not judged",
              "machine": machine_info(device), "placements": rows}
    write_json(check_output_free(args.out, args.overwrite), result)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
