"""Random-weight Llama-family models at published sizes, for the scaling benchmark (``bench.scale``).

Holds the published architectures (:data:`MODELS`, :func:`build_config`), the sharded writer
(:func:`write_random_model`) that writes a Hugging Face model folder of random bf16 weights one
tensor at a time, so that memory stays about one shard whatever the model's size, the check that
an existing folder is such a model already (:func:`is_written`), and size figures
(:func:`parameter_count`, :func:`disk_bytes`).

A written folder holds ``config.json``, ``model-0000i-of-0000n.safetensors`` shards with
``model.safetensors.index.json`` (the Hugging Face layout), the embedded SmolLM2's tokenizer (no
hub here; its ids are < 49152, inside every vocabulary below) and ``stac_random_model.json``, which
records the recipe (model, seed, shard size) and is written last: a folder without it is incomplete.
Weights are normal(0, initializer_range) for matrices, ones for norm weights, zeros for biases,
each tensor from its own generator seeded by (seed, tensor name), so a tensor is reproducible alone.
The architecture is the published one; the special-token ids follow the SmolLM2 tokenizer that
ships in the folder (a Llama 3 eos id of 128001 would name no token of it).

    python -m bench.scale_models --model smollm2-1.7b --dir /tmp/stac_scale/models/smollm2-1.7b
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from stac_common.io import atomic_dir, write_json

if TYPE_CHECKING:  # torch and transformers load on first use: bench.scale imports this module and stays small,
    import torch   # since a child's ru_maxrss counts the memory of the process that started it
    from transformers import LlamaConfig

INDEX_FILE = "model.safetensors.index.json"
STAMP_FILE = "stac_random_model.json"
STAMP_FORMAT = 1
DEFAULT_SHARD_BYTES = 2 * 10**9  # shards of at most 2 GB, as transformers' save_pretrained writes by default
DTYPE_NAME = "bfloat16"
DTYPE_BYTES = 2
TOKENIZER = "SmolLM2-135M-Instruct (embedded, stac_common.assets)"

_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)


@dataclass(frozen=True)
class ModelSpec:
    """A published architecture: where its numbers come from and the LlamaConfig arguments."""
    source: str   # the hub repository whose config.json the numbers are copied from
    config: dict  # LlamaConfig keyword arguments (transformers 5 spelling: rope_parameters)


# Values of each repository's config.json on the Hugging Face hub (transformers 5 folds rope_theta and
# rope_scaling into rope_parameters). All four: hidden_act silu, no attention/MLP bias,
# initializer_range 0.02, rms_norm_eps 1e-5, published torch_dtype bfloat16.
MODELS: dict[str, ModelSpec] = {
    # HuggingFaceTB/SmolLM2-360M: 960 hidden, 2560 MLP, 32 layers, 15 heads over 5 kv heads (head_dim 64),
    # vocab 49152, tied, rope_theta 100000, 8192 positions
    "smollm2-360m": ModelSpec("HuggingFaceTB/SmolLM2-360M", dict(
        hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
        num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
        rope_parameters=dict(rope_type="default", rope_theta=100000.0))),
    # HuggingFaceTB/SmolLM2-1.7B: 2048 hidden, 8192 MLP, 24 layers, 32 heads = 32 kv heads, vocab 49152,
    # tied, rope_theta 130000, 8192 positions
    "smollm2-1.7b": ModelSpec("HuggingFaceTB/SmolLM2-1.7B", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
        rope_parameters=dict(rope_type="default", rope_theta=130000.0))),
    # meta-llama/Llama-3.2-3B: 3072 hidden, 8192 MLP, 28 layers, 24 heads over 8 kv heads, head_dim 128,
    # vocab 128256, tied, rope_theta 500000 with llama3 scaling factor 32, 131072 positions
    "llama-3.2-3b": ModelSpec("meta-llama/Llama-3.2-3B", dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
        max_position_embeddings=131072, rope_parameters=dict(_LLAMA3_ROPE, factor=32.0))),
    # meta-llama/Llama-3.1-8B: 4096 hidden, 14336 MLP, 32 layers, 32 heads over 8 kv heads, vocab 128256,
    # NOT tied, rope_theta 500000 with llama3 scaling factor 8, 131072 positions
    "llama-3.1-8b": ModelSpec("meta-llama/Llama-3.1-8B", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=131072, rope_parameters=dict(_LLAMA3_ROPE, factor=8.0))),
}
_COMMON = dict(hidden_act="silu", attention_bias=False, mlp_bias=False, initializer_range=0.02, rms_norm_eps=1e-5,
               architectures=["LlamaForCausalLM"], dtype="bfloat16")
# the SmolLM2 tokenizer's ids (<|endoftext|> 0, <|im_start|> 1, <|im_end|> 2), as the embedded model's config
_TOKEN_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)


def build_config(name: str) -> LlamaConfig:
    """The LlamaConfig of a published model in :data:`MODELS`.

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    from transformers import LlamaConfig

    return LlamaConfig(**_COMMON, **_TOKEN_IDS, **MODELS[name].config)


def tensor_plan(config: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor a checkpoint of ``config`` stores, in module order, built on
    the meta device (no memory). A tied LM head is left out: it is the embedding table."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    plan = [(n, tuple(p.shape)) for n, p in model.named_parameters()]  # shared (tied) tensors once
    if config.tie_word_embeddings:
        plan = [(n, s) for n, s in plan if n != "lm_head.weight"]
    return plan


def parameter_count(config: LlamaConfig) -> dict[str, int]:
    """Parameters of ``config``: ``total`` (a tied table once), ``embedding`` (input table plus an
    untied head) and ``decoder`` (the rest: layers x params-per-layer plus the final norm)."""
    plan = tensor_plan(config)
    total = sum(_numel(s) for _, s in plan)
    embedding = sum(_numel(s) for n, s in plan if n in ("model.embed_tokens.weight", "lm_head.weight"))
    return {"total": total, "embedding": embedding, "decoder": total - embedding}


def disk_bytes(path: str | Path) -> int:
    """Bytes of the files under ``path`` (apparent sizes, links not followed); 0 if it does not exist."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of one tensor: stable across runs, processes and tensor order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def random_tensor(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """One bf16 tensor of the random model: ones for a norm weight, zeros for a bias, else
    normal(0, std) drawn in place in bf16 (no float32 copy; the same values as drawing in float32 and
    rounding, whatever the thread count)."""
    import torch

    dtype = getattr(torch, DTYPE_NAME)
    if len(shape) == 1:
        return (torch.ones if "norm" in name else torch.zeros)(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=gen)


def plan_shards(plan: list[tuple[str, tuple[int, ...]]], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order: a shard takes tensors while it stays within ``max_shard_bytes``
    (a single larger tensor gets a shard of its own)."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    shards: list[list[str]] = []
    size = 0
    for name, shape in plan:
        nbytes = _numel(shape) * DTYPE_BYTES
        if not shards or size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _recipe(config: LlamaConfig, seed: int, max_shard_bytes: int, model: str | None) -> dict:
    hf = config.to_dict()
    hf.pop("transformers_version", None)
    return {"format": STAMP_FORMAT, "model": model, "seed": seed, "max_shard_bytes": max_shard_bytes,
            "dtype": DTYPE_NAME, "config": hf}


def is_written(directory: str | Path, config: LlamaConfig, seed: int = 0,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES, model: str | None = None) -> bool:
    """Whether ``directory`` already holds this random model complete: same recipe (stamp file), an
    index naming exactly the planned tensors, and every shard holding its tensors at their shapes
    (read from the shard headers only)."""
    from safetensors import safe_open

    directory = Path(directory)
    stamp_file, index_file = directory / STAMP_FILE, directory / INDEX_FILE
    if not (stamp_file.is_file() and index_file.is_file() and (directory / "config.json").is_file()):
        return False
    stamp = json.loads(stamp_file.read_text(encoding="utf-8"))
    if stamp.get("recipe") != json.loads(json.dumps(_recipe(config, seed, max_shard_bytes, model))):
        return False
    plan = dict(tensor_plan(config))
    weight_map = json.loads(index_file.read_text(encoding="utf-8")).get("weight_map", {})
    if set(weight_map) != set(plan):
        return False
    for shard in set(weight_map.values()):
        if not (directory / shard).is_file():
            return False
        with safe_open(str(directory / shard), framework="pt") as f:
            names = [n for n, s in weight_map.items() if s == shard]
            if set(f.keys()) != set(names):
                return False
            if any(tuple(f.get_slice(n).get_shape()) != plan[n] for n in names):
                return False
    return True


def smollm2_tokenizer():
    """The embedded SmolLM2-135M-Instruct's tokenizer, offline (its cached copy; the first call builds
    that cache from the GGUF file, see :func:`stac_common.assets.load_smollm2`)."""
    from transformers import AutoTokenizer

    from stac_common.assets import load_smollm2, smollm2_cache

    if not (smollm2_cache() / "config.json").is_file():
        return load_smollm2()[1]
    return AutoTokenizer.from_pretrained(str(smollm2_cache()))


def write_random_model(config: LlamaConfig, directory: str | Path, seed: int = 0,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer: bool = True,
                       overwrite: bool = False, model: str | None = None) -> dict:
    """Write a random-weight model folder for ``config`` to ``directory`` (module docstring), shard by
    shard: only the current shard's tensors are in memory. Atomic: the folder appears complete or not
    at all. Returns what was written: parameters, shards, bytes, seconds.

    ``overwrite`` replaces an existing folder only if it is one of these models (it has the stamp
    file) or is empty; it is removed before writing, so the disk never holds two copies.

    Raises:
        ValueError: ``directory`` exists and ``overwrite`` is off, or it is not a folder this writer made.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists():
        if not overwrite:
            raise ValueError(f"{directory} already exists; pass overwrite=True (--overwrite) to replace it")
        if not directory.is_dir() or not ((directory / STAMP_FILE).is_file() or not any(directory.iterdir())):
            raise ValueError(f"{directory} exists and is not a model written by bench.scale_models "
                             f"(no {STAMP_FILE}); remove it yourself or choose another directory")
        shutil.rmtree(directory)
    t0 = time.perf_counter()
    plan = tensor_plan(config)
    shapes = dict(plan)
    shards = plan_shards(plan, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total_size = 0
    with atomic_dir(directory) as tmp:
        config.save_pretrained(tmp)
        for i, names in enumerate(shards):
            file = shard_name(i, len(shards))
            tensors = {n: random_tensor(n, shapes[n], config.initializer_range, seed) for n in names}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            total_size += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(names, file))
            del tensors
        write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map})
        if tokenizer:
            smollm2_tokenizer().save_pretrained(tmp)
        params = sum(_numel(s) for s in shapes.values())
        write_json(tmp / STAMP_FILE, {"recipe": _recipe(config, seed, max_shard_bytes, model),
                                      "tokenizer": TOKENIZER if tokenizer else None, "parameters": params})
    return {"directory": str(directory), "parameters": params, "shards": len(shards), "tensor_bytes": total_size,
            "disk_bytes": disk_bytes(directory), "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"one of: {', '.join(MODELS)}")
    p.add_argument("--dir", required=True, help="the model folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_shard_bytes", type=int, default=DEFAULT_SHARD_BYTES)
    p.add_argument("--overwrite", action="store_true", help="replace a folder this writer made before")
    args = p.parse_args(argv)
    try:
        config = build_config(args.model)
        if is_written(args.dir, config, args.seed, args.max_shard_bytes, args.model):
            index = json.loads((Path(args.dir) / INDEX_FILE).read_text(encoding="utf-8"))
            info = {"directory": args.dir, "reused": True, "shards": len(set(index["weight_map"].values())),
                    "disk_bytes": disk_bytes(args.dir)}
        else:
            info = write_random_model(config, args.dir, args.seed, args.max_shard_bytes,
                                      overwrite=args.overwrite, model=args.model) | {"reused": False}
    except ValueError as e:
        sys.exit(f"bench.scale_models: {e}")
    info |= {"counts": parameter_count(config), "layers": config.num_hidden_layers, "hidden_size": config.hidden_size}
    print(json.dumps(info, sort_keys=True))  # the last line of stdout: what bench.scale reads


if __name__ == "__main__":
    main()
