"""The scaling benchmark's pieces without a conversion: published sizes, the sharded random-model
writer (tiny configs, small shards), the linear fit and the results writer."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from bench import scale
from bench.scale_models import (INDEX_FILE, STAMP_FILE, build_config, disk_bytes, is_written,
                                parameter_count, random_tensor, write_random_model)
from stac_common.io import OutputExistsError

SMALL_SHARDS = 20_000  # bytes: the tiny models below (about 106 kB) split into several shards


def tiny_config(tied: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                       max_position_embeddings=128, bos_token_id=1, eos_token_id=2)


def shard_tensors(directory) -> dict[str, dict[str, torch.Tensor]]:
    weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
    return {f: load_file(str(directory / f)) for f in sorted(set(weight_map.values()))}


@pytest.mark.parametrize("name, billions", [("smollm2-360m", 0.362), ("smollm2-1.7b", 1.71),
                                            ("llama-3.2-3b", 3.21), ("llama-3.1-8b", 8.03)])
def test_published_sizes(name, billions):
    counts = parameter_count(build_config(name))
    assert counts["total"] / 1e9 == pytest.approx(billions, rel=0.005)
    assert counts["embedding"] + counts["decoder"] == counts["total"]


def test_published_configs():
    c = build_config("llama-3.2-3b")
    assert (c.head_dim, c.num_key_value_heads, c.tie_word_embeddings) == (128, 8, True)
    assert c.rope_parameters["rope_type"] == "llama3" and c.rope_parameters["factor"] == 32.0
    assert c.rope_parameters["rope_theta"] == 500000.0
    c = build_config("llama-3.1-8b")
    assert not c.tie_word_embeddings and c.rope_parameters["factor"] == 8.0
    assert build_config("smollm2-1.7b").rope_parameters["rope_theta"] == 130000.0
    with pytest.raises(ValueError, match="known: smollm2-360m"):
        build_config("llama-70b")


@pytest.mark.parametrize("tied", [True, False])
def test_sharded_writer_loads(tmp_path, tied):
    config = tiny_config(tied)
    d = tmp_path / "m"
    info = write_random_model(config, d, seed=3, max_shard_bytes=SMALL_SHARDS, tokenizer=False)
    shards = shard_tensors(d)
    assert info["shards"] == len(shards) >= 3
    assert all(sum(t.numel() * 2 for t in ts.values()) <= SMALL_SHARDS or len(ts) == 1 for ts in shards.values())
    written = {n: t for ts in shards.values() for n, t in ts.items()}
    assert ("lm_head.weight" in written) is not tied
    assert all(t.dtype == torch.bfloat16 for t in written.values())

    # the index lists every tensor once, in the shard that holds it, and the total size
    index = json.loads((d / INDEX_FILE).read_text())
    assert sorted(index["weight_map"]) == sorted(written)
    assert sum(len(ts) for ts in shards.values()) == len(written)
    assert all(n in shards[f] for n, f in index["weight_map"].items())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in written.values())

    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16)
    state = model.state_dict()
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name
    if tied:
        assert torch.equal(state["lm_head.weight"], written["model.embed_tokens.weight"])
    assert info["parameters"] == sum(p.numel() for p in model.parameters())


def test_writer_values_reproducible(tmp_path):
    config = tiny_config(True)
    d = tmp_path / "m"
    write_random_model(config, d, seed=5, max_shard_bytes=SMALL_SHARDS, tokenizer=False)
    written = {n: t for ts in shard_tensors(d).values() for n, t in ts.items()}
    q = written["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(q, random_tensor("model.layers.1.self_attn.q_proj.weight", (32, 32), 0.02, 5))
    assert not torch.equal(q, random_tensor("model.layers.1.self_attn.q_proj.weight", (32, 32), 0.02, 6))
    assert abs(q.float().std().item() - 0.02) < 0.004
    assert torch.equal(written["model.norm.weight"], torch.ones(32, dtype=torch.bfloat16))


def test_reuse_and_overwrite_guard(tmp_path):
    config = tiny_config(True)
    d = tmp_path / "m"
    assert not is_written(d, config, 0, SMALL_SHARDS)
    write_random_model(config, d, max_shard_bytes=SMALL_SHARDS, tokenizer=False)
    assert (d / STAMP_FILE).is_file() and disk_bytes(d) > 0
    assert is_written(d, config, 0, SMALL_SHARDS)
    assert not is_written(d, config, 1, SMALL_SHARDS)  # another seed
    assert not is_written(d, tiny_config(False), 0, SMALL_SHARDS)  # another config
    with pytest.raises(ValueError, match="already exists"):
        write_random_model(config, d, max_shard_bytes=SMALL_SHARDS, tokenizer=False)
    write_random_model(config, d, seed=1, max_shard_bytes=SMALL_SHARDS, tokenizer=False, overwrite=True)
    assert is_written(d, config, 1, SMALL_SHARDS)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a model written by"):
        write_random_model(config, foreign, tokenizer=False, overwrite=True)
    assert (foreign / "notes.txt").is_file()


def test_linear_fit():
    fit = scale.linear_fit([1.0, 2.0, 3.0], [12.0, 16.0, 32.0])  # residuals (2, -4, 2) about y = 0 + 10 x
    assert fit["slope"] == pytest.approx(10.0) and fit["intercept"] == pytest.approx(0.0, abs=1e-9)
    assert fit["relative_deviation"] == pytest.approx([0.2, -0.2, 2 / 30])
    assert fit["max_abs_relative_deviation"] == pytest.approx(0.2)
    assert scale.linear_fit([1, 2, 3], [10, 20, 30])["within_target"]
    assert not scale.linear_fit([1, 2, 3, 4], [10, 40, 30, 40])["within_target"]
    with pytest.raises(ValueError, match="at least two"):
        scale.linear_fit([1.0], [2.0])
    with pytest.raises(ValueError, match="all x values are equal"):
        scale.linear_fit([1.0, 1.0], [2.0, 3.0])
    with pytest.raises(ValueError, match="x values but"):
        scale.linear_fit([1.0, 2.0], [2.0])


def test_fits_use_completed_rows():
    rows = [dict(model=m, parameters=p, decoder_parameters=p // 2, total_seconds=s, peak_rss_bytes=p * 4,
                 completed=c) for m, p, s, c in (("a", 1, 10.0, True), ("b", 2, 20.0, True), ("c", 3, 5.0, False),
                                                   ("d", 4, 40.0, True))]
    f = scale.fits(rows)
    assert f["models"] == ["a", "b", "d"] and f["seconds_vs_parameters"]["within_target"]
    assert "note" in scale.fits(rows[:1])


def test_results_writer_refuses_overwrite(tmp_path):
    out = tmp_path / "r" / "scale.json"
    scale.write_results(out, {"a": 1}, overwrite=False)
    assert json.loads(out.read_text()) == {"a": 1}
    with pytest.raises(OutputExistsError):
        scale.write_results(out, {"a": 2}, overwrite=False)
    assert json.loads(out.read_text()) == {"a": 1}
    scale.write_results(out, {"a": 2}, overwrite=True)
    assert json.loads(out.read_text()) == {"a": 2}
    assert [p.name for p in out.parent.iterdir()] == ["scale.json"]  # no temporary file left


def test_models_and_commands():
    assert scale.parse_models("SmolLM2-360M, llama-3.1-8b") == ["smollm2-360m", "llama-3.1-8b"]
    for bad in ("gpt2", "", "smollm2-360m,smollm2-360m"):
        with pytest.raises(ValueError, match="known: smollm2-360m, smollm2-1.7b, llama-3.2-3b, llama-3.1-8b"):
            scale.parse_models(bad)
    assert scale.budget_gib(int(1.7e9), 4, 8, 2e9) == 4 and scale.budget_gib(int(3.2e9), 4, 8, 2e9) == 8
    cmd = scale.conversion_command(scale.Path("/m"), scale.Path("/o"), 512, 512, 8.0)
    assert cmd[-3:] == ["--layerwise", "--max_memory", "cpu=8GiB"] and "--verify" in cmd
    assert "--layerwise" not in scale.conversion_command(scale.Path("/m"), scale.Path("/o"), 512, 512, None)
    cmd = scale.conversion_command(scale.Path("/m"), scale.Path("/o"), 512, 512, 4.0, "cuda", 20.0)
    assert cmd[-3:] == ["--layerwise", "--max_memory", "0=20GiB,cpu=4GiB"] and cmd[cmd.index("--device") + 1] == "cuda"
    for bad in (["--gpu_budget", "8"], ["--device", "cuda", "--gpu_budget", "0"],
                ["--device", "cuda", "--gpu_budget", "8", "--whole_model"]):
        with pytest.raises(SystemExit):
            scale.main(["--dry_run", *bad])


def test_writer_saves_smollm2_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    d = tmp_path / "m"
    write_random_model(tiny_config(True), d, max_shard_bytes=SMALL_SHARDS, tokenizer=True)  # make sets up the asset
    tok = AutoTokenizer.from_pretrained(str(d))
    assert len(tok) <= 49152 and tok("Hello")["input_ids"]
    assert json.loads((d / STAMP_FILE).read_text())["tokenizer"].startswith("SmolLM2-135M-Instruct")


def test_plot(tmp_path):
    rows = [dict(model=m, parameters=p, total_seconds=s, peak_rss_gib=g, budget_gib=b, completed=c)
            for m, p, s, g, b, c in (("a", 3.6e8, 100.0, 3.0, 4.0, True), ("b", 1.7e9, 400.0, 3.5, 4.0, True),
                                     ("c", 3.2e9, 800.0, 7.0, 8.0, True), ("d", 8.0e9, 900.0, 9.0, 8.0, False))]
    fit = scale.fits([dict(r, decoder_parameters=r["parameters"], peak_rss_bytes=r["peak_rss_gib"]) for r in rows])
    out = tmp_path / "scale.png"
    scale.plot(rows, fit, out, whole_model=False, large_from=2e9)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["scale.png"]
