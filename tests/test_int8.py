"""8-bit weights: Int8Linear (nn.Linear and transposed GPT-2 Conv1D), quantize_weights_ on plain and
converted tiny models, the safetensors round trip, and the bitsandbytes / torchao backends.

Error bounds: symmetric int8 per output channel rounds each weight by at most scale/2, an RMS
error of scale/sqrt(12); for Gaussian rows of 64-256 weights (absmax about 3 sigma) that is a
relative weight error near 0.6%, and the logits of a 2-layer model move by about as much. 2% on
the logits leaves room for bitsandbytes' int8 activations, and a change above 0.1% proves the
weights really are quantized.
"""

import sys

import pytest
import torch
from safetensors.torch import load_file, load_model, save_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from calibration import int8_backends, keep_float_weights
from calibration.int8 import (BACKENDS, BackendUnavailableError, Int8Linear, find_linears, prepare_int8_,
                              quantize_rows, quantize_weights_)
from smollm2_converter import ConversionConfig, convert
from spike_modules import DAQCFSSite, iter_sites
from spike_modules.layers import SharedInput, SpikeLinear

VOCAB = 64
CLOSE, CHANGED = 0.02, 1e-3


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0,
                     eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": (tiny_llama, 7 * 2), "gpt2": (tiny_gpt2, 4 * 2)}  # block linears: q,k,v,o,gate,up,down | c_attn,c_proj,c_fc,c_proj


def ids(seed=1):
    return torch.randint(2, VOCAB, (3, 20), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def available(backend):
    """The backend's module. Both libraries are pinned in requirements-nodeps.txt, so a missing or
    broken one is a failed set-up, not a reason to skip."""
    try:
        return int8_backends.require(backend)
    except BackendUnavailableError as e:
        pytest.fail(f"{e} (pinned in requirements-nodeps.txt: run `make setup`)")


# --- Int8Linear ---------------------------------------------------------------------------------

def test_quantize_rows_is_symmetric_absmax_per_row_and_rounds_within_half_a_step():
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    w[2] *= 100  # rows on very different scales keep their own step
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (6,)
    assert torch.equal(q.abs().amax(1), torch.full((6,), 127, dtype=torch.int8))
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()


def test_all_zero_row_gets_a_positive_scale_and_decodes_to_zero():
    linear = nn.Linear(8, 4)
    with torch.no_grad():
        linear.weight[1] = 0
    q = Int8Linear.from_linear(linear)
    assert (q.scale > 0).all() and torch.isfinite(q.scale).all()
    assert torch.equal(q.dequantize()[1], torch.zeros(8))
    out = q(torch.randn(5, 8))
    assert torch.equal(out[:, 1], linear.bias.detach()[1].expand(5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused(bad):
    w = torch.randn(3, 4)
    w[0, 0] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_rows(w)


def test_int8_linear_matches_its_decoded_weight_and_not_the_float_one():
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(96, 48)
    x = torch.randn(2, 7, 96, generator=g)
    q = Int8Linear.from_linear(linear)
    assert (q.in_features, q.out_features) == (96, 48) and q.bias is linear.bias
    assert q.weight_int8.shape == (48, 96) and q.weight_int8.dtype == torch.int8
    with torch.no_grad():
        out, ref = q(x), linear(x)
        torch.testing.assert_close(out, nn.functional.linear(x, q.dequantize(), linear.bias))
    assert CHANGED < rel(out, ref) < CLOSE


def test_conv1d_weight_is_transposed_explicitly():
    """Conv1D(nf=out, nx=in) stores [in, out]; its Int8Linear must equal that of the nn.Linear
    holding the transposed weight, and reproduce the Conv1D's output."""
    conv = Conv1D(24, 40)  # nf=24 outputs, nx=40 inputs
    nn.init.normal_(conv.weight, std=0.1)
    nn.init.normal_(conv.bias, std=0.1)
    linear = nn.Linear(40, 24)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    qc, ql = Int8Linear.from_linear(conv), Int8Linear.from_linear(linear)
    assert (qc.in_features, qc.out_features) == (40, 24)
    assert torch.equal(qc.weight_int8, ql.weight_int8) and torch.equal(qc.scale, ql.scale)
    x = torch.randn(5, 40)
    with torch.no_grad():
        assert CHANGED < rel(qc(x), conv(x)) < CLOSE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(dtype):
    """Tiny weights (absmax 1e-3) times large inputs: x @ q.T reaches ~1e6 before scaling, past
    float16's 65504, so float16 must scale the weight first; bfloat16 has float32's range."""
    linear = nn.Linear(256, 32)
    with torch.no_grad():
        linear.weight.uniform_(-1e-3, 1e-3)
        linear.bias.zero_()
    q = Int8Linear.from_linear(linear)
    x = torch.full((4, 256), 100.0) * torch.randn(4, 256).sign()
    with torch.no_grad():
        ref = q(x)
        assert not torch.isfinite(nn.functional.linear(x.half(), q.weight_int8.half())).all(), "the case must overflow"
        q.bias.data = q.bias.data.to(dtype)
        out = q(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel(out, ref) < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_int8_linear_on_cuda_matches_cpu():
    linear = nn.Linear(64, 32)
    x = torch.randn(4, 64)
    q = Int8Linear.from_linear(linear)
    qc = Int8Linear.from_linear(linear.cuda())
    assert torch.equal(qc.weight_int8.cpu(), q.weight_int8)
    with torch.no_grad():
        torch.testing.assert_close(qc(x.cuda()).cpu(), q(x), rtol=1e-4, atol=1e-5)


# --- quantize_weights_ (own) --------------------------------------------------------------------

def expected_rel_error(weight, scale):
    """RMS rounding error of a uniform step: scale/sqrt(12) per weight."""
    return float(((scale[:, None] ** 2 / 12).expand_as(weight).sum() / weight.float().pow(2).sum()).sqrt())


@pytest.mark.parametrize("arch", MODELS)
def test_own_backend_on_a_plain_model(arch):
    make, n_linears = MODELS[arch]
    model, x = make(), ids()
    ref = logits(model, x)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    s = quantize_weights_(model, "own", progress=False)
    assert s["backend"] == "own" and s["layers"] == len(s["paths"]) == n_linears
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert sorted(quantized) == sorted(s["paths"])
    assert model.get_output_embeddings() is head and isinstance(head, nn.Linear), "the tied head stays float"
    assert head.weight is emb.weight and emb.weight.dtype == torch.float32
    assert not any(isinstance(m, (nn.Linear, Conv1D)) for n, m in model.named_modules() if m is not head)
    # about 4x smaller: int8 weights plus a float32 scale and the float bias per output
    assert 0.24 < s["bytes_after"] / s["bytes_before"] < 0.3
    predicted = [expected_rel_error(m.dequantize(), m.scale) for m in quantized.values()]
    assert 0.8 < s["mean_rel_error"] / (sum(predicted) / len(predicted)) < 1.2
    assert s["mean_rel_error"] <= s["max_rel_error"] < 0.01
    assert CHANGED < rel(logits(model, x), ref) < CLOSE
    state = model.state_dict()
    some = s["paths"][0]
    assert state[f"{some}.weight_int8"].dtype == torch.int8 and state[f"{some}.scale"].dtype == torch.float32


def test_kept_float_weights_give_the_same_logits_bit_for_bit_and_are_dropped(monkeypatch):
    model, x = tiny_llama(), ids()
    quantize_weights_(model, "own", progress=False)
    ref = logits(model, x)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    nbytes = keep_float_weights(model)
    assert nbytes == 4 * sum(m.weight_int8.numel() for m in layers)
    calls, to = [], torch.Tensor.to  # a kept weight is not converted again: no int8 -> float .to()

    def spy(self, *a, **kw):
        calls.append(self.dtype)
        return to(self, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "to", spy)
        kept = logits(model, x)
    assert torch.equal(kept, ref) and torch.int8 not in calls
    assert keep_float_weights(model, keep=False) == 0 and not any("_float_weight" in m.__dict__ for m in layers)
    assert torch.equal(logits(model, x), ref)


@pytest.mark.parametrize("arch", MODELS)
def test_own_backend_on_a_converted_model_replaces_the_wrapped_linears(arch):
    make, n_linears = MODELS[arch]
    snn, x = convert(make(), ConversionConfig(T=8)), ids()
    ref = logits(snn, x)  # sites in ann mode: the float network
    n_sites = len(list(iter_sites(snn)))
    s = quantize_weights_(snn, "own", progress=False)
    assert s["layers"] == n_linears and all(p.endswith(".linear") for p in s["paths"])
    spiking = [m for m in snn.modules() if isinstance(m, SpikeLinear)]
    assert len(spiking) == n_linears and all(isinstance(m.linear, Int8Linear) for m in spiking)
    assert len(list(iter_sites(snn))) == n_sites
    assert CHANGED < rel(logits(snn, x), ref) < CLOSE


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("wrap_head", [False, True])
def test_the_output_head_stays_float_tied_or_not_wrapped_or_not(tied, wrap_head):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                         tie_word_embeddings=tied)).eval()
    head = model.lm_head
    if wrap_head:  # a head site, as STAC may add
        model.lm_head = SpikeLinear(head, SharedInput(DAQCFSSite(32, 8, signed=True, name="head"), 1), owner=True)
    s = quantize_weights_(model, "own", progress=False)
    assert s["layers"] == 7 and not any(p.startswith("lm_head") for p in s["paths"])
    assert (model.lm_head.linear if wrap_head else model.lm_head) is head and head.weight.dtype == torch.float32


def test_paths_select_layers_and_a_spike_linear_path_means_its_linear():
    snn = convert(tiny_llama(), ConversionConfig(T=8))
    s = quantize_weights_(snn, "own", paths=["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj.linear"],
                          progress=False)
    assert s["paths"] == ["model.layers.0.mlp.down_proj.linear", "model.layers.1.self_attn.q_proj.linear"]
    assert sum(isinstance(m, Int8Linear) for m in snn.modules()) == 2


@pytest.mark.parametrize("paths, match", [
    (["model.layers.0.mlp.nope"], "no module at"),
    (["model.layers.0.mlp.act_fn"], "8-bit weights apply to"),
    (["model.norm"], "8-bit weights apply to"),
    ([], "no linear layers"),
])
def test_bad_paths(paths, match):
    with pytest.raises(ValueError, match=match):
        quantize_weights_(tiny_llama(), "own", paths=paths, progress=False)


def test_unknown_backend_lists_the_allowed_ones_and_quantizing_twice_is_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="own, bnb, torchao, none"):
        quantize_weights_(model, "int4", progress=False)
    quantize_weights_(model, "own", progress=False)
    with pytest.raises(ValueError, match="already has 8-bit layers"):
        quantize_weights_(model, "own", progress=False)


def test_none_backend_changes_nothing():
    model, x = tiny_gpt2(), ids()
    ref = logits(model, x)
    s = quantize_weights_(model, "none", progress=False)
    assert s["layers"] == 0 and s["paths"] == []
    assert torch.equal(logits(model, x), ref)


def test_a_model_without_embeddings_quantizes_every_linear():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    assert list(find_linears(model)) == ["0", "2"]


# --- saving and loading -------------------------------------------------------------------------

STORED_INT8 = {"own": "weight_int8", "bnb": "weight", "torchao": "weight_qdata"}  # int8 tensor of a saved layer


@pytest.mark.parametrize("backend", ["own", "bnb", "torchao"])
@pytest.mark.parametrize("arch, converted", [("llama", False), ("gpt2", False), ("llama", True), ("gpt2", True)])
def test_safetensors_round_trip_is_exact(tmp_path, arch, converted, backend):
    """save_model drops the tied head's duplicate and writes plain tensors (torchao's weight subclass
    through its state-dict hooks); a fresh float model (other random weights) + prepare_int8_ +
    load_model gives bit-identical logits, for every backend."""
    if backend != "own":
        available(backend)
    make, _ = MODELS[arch]
    model = make(seed=0)
    if converted:
        model = convert(model, ConversionConfig(T=8))
    s = quantize_weights_(model, backend, progress=False)
    path = tmp_path / "model.safetensors"
    save_model(model, str(path))
    stored = load_file(str(path))
    assert all(stored[f"{p}.{STORED_INT8[backend]}"].dtype == torch.int8 for p in s["paths"])

    fresh = make(seed=123)
    if converted:
        fresh = convert(fresh, ConversionConfig(T=8))
    x = ids()
    assert not torch.equal(logits(fresh, x), logits(model, x)), "the fresh model must start different"
    prepare_int8_(fresh, s["paths"], backend)
    missing, unexpected = load_model(fresh, str(path))
    assert not missing and not unexpected
    assert fresh.get_output_embeddings().weight is fresh.get_input_embeddings().weight, "still tied"
    assert torch.equal(logits(fresh, x), logits(model, x))


def test_prepare_refuses_an_unknown_backend():
    with pytest.raises(ValueError, match="choose one of own, bnb, torchao"):
        prepare_int8_(tiny_llama(), ["model.layers.0.mlp.up_proj"], "int4")


@pytest.mark.parametrize("backend", ["bnb", "torchao"])
def test_a_converted_run_with_a_library_backend_saves_and_reloads_identical_logits(tmp_path, backend):
    """--quant_backend bnb / torchao: the pipeline converts, saves, and load_snn rebuilds the same model."""
    from tiny_models import save_tiny

    from stac_lm.convert.options import ConvertOptions
    from stac_lm.convert.pipeline import run
    from stac_lm.io.saving import load_snn

    available(backend)
    opts = ConvertOptions(model_name=str(save_tiny(tmp_path / "model", "llama")), output_dir=str(tmp_path / "snn"),
                          timesteps=8, calib_tokens=256, eval_tokens=512, verify=False, quant_backend=backend)
    out = run(opts, progress=False)
    assert out.quantization["backend"] == backend and out.quantization["layers"] > 0
    model, _, config = load_snn(opts.output_dir)
    assert config["quantization"]["backend"] == backend
    x = out.eval_stream.ids[:96][None]
    assert torch.equal(logits(model, x), logits(out.snn, x))


def test_prepare_refuses_paths_that_are_not_linears():
    with pytest.raises(ValueError, match="8-bit weights apply to"):
        prepare_int8_(tiny_llama(), ["model.layers.0.input_layernorm"])


# --- library backends ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["bnb", "torchao"])
@pytest.mark.parametrize("arch", MODELS)
def test_library_backend_is_close_to_float_and_not_a_no_op(backend, arch):
    available(backend)
    make, n_linears = MODELS[arch]
    model, x = make(), ids()
    ref = logits(model, x)
    s = quantize_weights_(model, backend, progress=False)
    assert s["layers"] == n_linears and s["backend"] == backend
    assert not any(isinstance(m, (Conv1D, Int8Linear)) for m in model.modules()), "Conv1D became nn.Linear"
    for p in s["paths"]:
        weight = model.get_submodule(p).weight
        assert weight.dtype == torch.int8 if backend == "bnb" else type(weight).__name__ == "Int8Tensor"
    assert 0.24 < s["bytes_after"] / s["bytes_before"] < 0.3
    assert 0 < s["mean_rel_error"] <= s["max_rel_error"] < 0.01
    out = logits(model, x)
    assert out.dtype == torch.float32
    assert CHANGED < rel(out, ref) < CLOSE


@pytest.mark.parametrize("backend", ["bnb", "torchao"])
def test_library_backend_on_a_converted_model(backend):
    available(backend)
    snn, x = convert(tiny_gpt2(), ConversionConfig(T=8)), ids()
    ref = logits(snn, x)
    s = quantize_weights_(snn, backend, progress=False)
    assert all(p.endswith(".linear") for p in s["paths"])
    assert CHANGED < rel(logits(snn, x), ref) < CLOSE


@pytest.mark.parametrize("backend, module", [("bnb", "bitsandbytes"), ("torchao", "torchao")])
def test_missing_library_is_a_clear_error_and_changes_nothing(monkeypatch, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    model, x = tiny_llama(), ids()
    ref = logits(model, x)
    with pytest.raises(BackendUnavailableError, match=rf"--no-deps {module}=="):
        quantize_weights_(model, backend, progress=False)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert torch.equal(logits(model, x), ref)


def test_a_backend_that_cannot_run_here_is_an_error_not_a_fallback(monkeypatch):
    available("bnb")

    def broken(weight, bias):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(int8_backends, "_PROBED", set())
    monkeypatch.setattr(int8_backends, "bnb_linear", broken)
    with pytest.raises(BackendUnavailableError, match="cannot run int8 on cpu: RuntimeError: no kernel"):
        quantize_weights_(tiny_llama(), "bnb", progress=False)


@pytest.mark.parametrize("backend", ["own", "bnb", "torchao"])
def test_new_layers_keep_the_model_mode(backend):
    """bitsandbytes computes differently in training mode, and a new module starts in it."""
    if backend != "own":
        available(backend)
    for training in (False, True):
        model = tiny_gpt2().train(training)
        s = quantize_weights_(model, backend, progress=False)
        assert all(model.get_submodule(p).training is training for p in s["paths"])
    shell = tiny_gpt2().eval()
    prepare_int8_(shell, s["paths"])
    assert not any(m.training for m in shell.modules())
