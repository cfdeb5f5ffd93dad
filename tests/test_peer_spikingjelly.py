"""bench/peer_spikingjelly.py: the Llama -> Qwen2 copy is exact; SpikingJelly's recipe converts and measures."""

import re

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import bench.peer_spikingjelly as peer

WINDOW = 64


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def qwen(llama):
    return peer.llama_to_qwen2(llama)


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (8 * WINDOW,), generator=g), torch.randint(0, VOCAB, (2 * WINDOW,), generator=g)


def converted(qwen, calib_ids, T, levels=None):
    cfg = peer.peer_config(T, levels)
    return peer.convert_peer(qwen, peer.calibrate_peer(qwen, calib_ids, cfg, window=WINDOW), cfg)


def test_qwen2_copy_gives_identical_logits(llama, qwen, ids):
    assert type(qwen).__name__ == "Qwen2ForCausalLM" and qwen.config.model_type == "qwen2"
    biases = [layer.self_attn.q_proj.bias for layer in qwen.model.layers]
    assert all(b is not None and not b.any() for b in biases)
    assert qwen.lm_head.weight is qwen.model.embed_tokens.weight  # tied, like SmolLM2
    batch = ids[1].view(2, WINDOW)
    with torch.inference_mode():
        assert torch.equal(llama(batch).logits, qwen(batch).logits)


def test_copy_refuses_what_qwen2_cannot_hold():
    with pytest.raises(ValueError, match="model_type 'llama'"):
        peer.llama_to_qwen2(tiny_model("gpt2"))
    biased = tiny_model("llama")
    biased.config.attention_bias = True
    with pytest.raises(ValueError, match="o_proj or MLP biases"):
        peer.llama_to_qwen2(biased)


@pytest.mark.parametrize("kwargs, message", [
    ({"T": 0}, "T must be a positive integer"),
    ({"T": 16, "levels": 32}, r"levels must lie in \[1, T\]"),
    ({"T": 16, "quantile": 0.0}, r"quantile must lie in \(0, 1\]"),
    ({"T": 16, "quantile": 1.5}, r"quantile must lie in \(0, 1\]"),
])
def test_bad_config_is_a_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peer.peer_config(**kwargs)


def test_recipe_spikes_and_tracks_the_ann_closer_with_more_steps(qwen, ids):
    calib, evals = ids
    batch = evals.view(2, WINDOW)
    with torch.inference_mode():
        ann = qwen(batch).logits
        errors = {}
        for T in (4, 32):
            model = converted(qwen, calib, T)
            logits = model(batch).logits
            errors[T] = float((logits - ann).norm() / ann.norm())
            corr = torch.corrcoef(torch.stack([logits.flatten(), ann.flatten()]))[0, 1]
            assert corr > 0.9, (T, float(corr))
            rates = model.spike_summary()
            assert set(rates) == set(peer.SITE_KINDS)
            assert all(0 < r["spike_rate"] < 0.95 for r in rates.values()), rates  # fires, does not saturate
    assert errors[32] > 0  # it is a spiking approximation, not the ANN itself
    assert errors[32] < 0.5 * errors[4], errors


def test_every_call_starts_from_reset_state(qwen, ids):
    calib, evals = ids
    model = converted(qwen, calib, 8)
    batch = evals[:WINDOW][None]
    with torch.inference_mode():
        first, second = model(batch).logits, model(batch).logits
        assert torch.equal(first, second)
        # the reason for the reset: SpikingJelly's TD operators carry cumulative state across calls
        model.snn(batch)
        assert not torch.equal(model.snn(batch).logits, first)


def test_run_peer_reports_the_stac_protocol(llama, ids):
    calib, evals = ids
    r = peer.run_peer(llama, calib, evals, T=8, window=WINDOW, timing_repeats=1, progress=False)
    assert (r["T"], r["levels"], r["quantile"]) == (8, 8, 1.0)
    assert r["ratio"] == pytest.approx(r["ppl_peer"] / r["ppl_ann"])
    assert r["ppl_peer"] != r["ppl_ann"] and 0 < r["top1_agreement"] <= 1
    assert r["eval"]["windows"] == 2 and r["eval"]["tokens"] == 2 * (WINDOW - 1)
    assert r["calibration_tokens"] == calib.numel()
    assert r["sj_config"]["time_steps"] == 8 and r["sj_config"]["encoding_mode"] == "signed_if"
    assert r["structure"]["signed_if_encoder_count"] == 1 + 4 * llama.config.num_hidden_layers
    assert r["latency_ratio"] > 0 and 0 < r["spike_driven_mac_share"]["blocks"] < 1


@pytest.mark.slow
def test_smollm2_copy_is_exact():
    from stac_common.assets import load_smollm2

    model, tok = load_smollm2()
    ids = tok("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
              return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, peer.llama_to_qwen2(model)(ids).logits)


@pytest.mark.parametrize("argv, message", [
    (["--timesteps", "16,x"], "comma-separated integers"),
    (["--timesteps", "16", "--levels", "32"], r"levels must lie in \[1, T\]"),
    (["--eval_tokens", "100"], "must be >= 512"),
])
def test_cli_rejects_bad_input_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        peer.main([*argv, "--out", str(tmp_path / "report.json")])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "report.json").exists()
