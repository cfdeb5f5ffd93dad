"""The int8 LM head and input embedding (calibration.int8_embedding, quantize_weights_(head=True)):
one int8 table shared by a tied head and embedding, lookups equal to the head's dequantized rows,
errors within int8 rounding, the save/load round trip (bit-identical logits, same generate()
tokens, the table stored once), directories saved with a float head, and option validation.

Rounding bound: symmetric int8 per row moves each weight by at most ``scale / 2``, so a looked-up
row by at most ``scale[id] / 2`` per element and a head logit ``v`` by at most
``||h||_1 * scale[v] / 2`` for hidden state ``h``.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model, tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

import run_conversion
from calibration import CalibrationConfig, calibrate
from calibration.int8 import Int8Linear, quantize_weights_
from calibration.int8_embedding import Int8Embedding, int8_head_info, quantize_head_
from smollm2_converter import ConversionConfig, convert
from spike_modules import set_mode
from spike_modules.layers import SpikeLinear
from spike_modules.linear import linear_shape
from stac_lm import SpikingCausalLM, from_pretrained
from stac_lm.convert.options import ConvertOptions

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
# arch: (head path, embedding path) of the tiny tied models
PATHS = {"llama": ("lm_head", "model.embed_tokens"), "gpt2": ("lm_head", "transformer.wte")}


def ids(vocab=VOCAB, seed=1):
    return torch.randint(1, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", list(PATHS))
def test_tied_head_and_embedding_share_one_int8_table(arch):
    model = tiny_model(arch, VOCAB)
    float_table = model.get_input_embeddings().weight.detach().clone()
    summary = quantize_weights_(model, "own", progress=False, head=True)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, Int8Linear) and isinstance(emb, Int8Embedding) and emb.tied
    assert emb.weight_int8 is head.weight_int8 and emb.scale is head.scale
    assert head.weight_int8.shape == float_table.shape and head.scale.shape == (VOCAB,)
    info = summary["int8_head"]
    assert (info["head"], info["embedding"], info["tied"]) == (*PATHS[arch], True)
    assert info["head"] not in summary["paths"] and int8_head_info(model) == {k: info[k] for k in ("head", "embedding",
                                                                                                  "tied")}
    # stored once: only the head's int8 table and scale, no float embedding left anywhere
    state = model.state_dict()
    assert [k for k in state if k.startswith(PATHS[arch][1])] == []
    assert f"{PATHS[arch][0]}.weight_int8" in state and not any(v.dtype == torch.float32 and v.shape == float_table.shape
                                                                for v in state.values())
    assert info["bytes_before"] == float_table.nbytes and info["bytes_after"] == VOCAB * float_table.shape[1] + 4 * VOCAB
    assert 1e-4 < info["rel_error"] == info["embedding_rel_error"] < 0.02


@pytest.mark.parametrize("arch", list(PATHS))
def test_lookups_are_the_heads_dequantized_rows_within_the_rounding_bound(arch):
    model = tiny_model(arch, VOCAB)
    w = model.get_input_embeddings().weight.detach().clone()
    float_head = copy.deepcopy(model.get_output_embeddings())
    quantize_weights_(model, "own", progress=False, head=True)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    x = ids()
    rows = emb(x)
    assert torch.equal(rows, head.dequantize()[x])  # bit for bit: the same products
    assert torch.equal(emb.weight, head.dequantize())
    assert ((rows - w[x]).abs() <= head.scale[x].unsqueeze(-1) / 2 * (1 + 1e-6)).all()
    h = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = (head(h) - float_head(h)).abs()
    assert (err <= h.abs().sum(-1, keepdim=True) * head.scale / 2 * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("arch", list(PATHS))
def test_logits_move_by_int8_rounding_only(arch):
    ann = tiny_model(arch, VOCAB)
    blocks, both = copy.deepcopy(ann), copy.deepcopy(ann)
    quantize_weights_(blocks, "own", progress=False)
    quantize_weights_(both, "own", progress=False, head=True)
    x = ids()
    ref = logits(ann, x)
    assert 1e-3 < rel(logits(both, x), ref) < 0.02  # the Gaussian-row figure of tests/test_int8.py
    assert not torch.equal(logits(both, x), logits(blocks, x))  # the head really changed


def test_an_untied_embedding_gets_its_own_table():
    model = tiny_model("llama", VOCAB, tie_word_embeddings=False)
    w = model.get_input_embeddings().weight.detach().clone()
    info = quantize_weights_(model, "own", progress=False, head=True)["int8_head"]
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert not info["tied"] and not emb.tied and emb.weight_int8 is not head.weight_int8
    assert {"model.embed_tokens.weight_int8", "model.embed_tokens.scale"} <= set(model.state_dict())
    x = ids()
    assert torch.equal(emb(x), emb.dequantize()[x])
    assert ((emb(x) - w[x]).abs() <= emb.scale[x].unsqueeze(-1) / 2 * (1 + 1e-6)).all()
    assert info["bytes_before"] == 2 * w.nbytes


def test_gemmas_scaled_embedding_keeps_its_scale():
    ann = tiny_model("gemma", VOCAB)
    model = copy.deepcopy(ann)
    quantize_weights_(model, "own", progress=False, head=True)
    emb = model.get_input_embeddings()
    x = ids()
    assert emb.tied and torch.equal(emb(x), emb.dequantize()[x] * emb.embed_scale)
    assert rel(logits(model, x), logits(ann, x)) < 0.02


def test_a_spiking_head_is_quantized_inside_its_spike_linear_and_deepcopies_tied():
    snn = convert(tiny_model("llama", VOCAB), ConversionConfig(T=7, mode="full", coding="weighted", spike_head=True))
    info = quantize_weights_(snn, "own", progress=False, head=True)["int8_head"]
    assert info["head"] == "lm_head.linear" and info["tied"]
    assert isinstance(snn.lm_head, SpikeLinear) and isinstance(snn.lm_head.linear, Int8Linear)
    assert snn.model.embed_tokens.weight_int8 is snn.lm_head.linear.weight_int8
    copied = copy.deepcopy(snn)
    assert copied.model.embed_tokens.weight_int8 is copied.lm_head.linear.weight_int8
    assert copied.lm_head.linear.weight_int8 is not snn.lm_head.linear.weight_int8
    # the energy model: the embedding is no linear layer; the head is one, priced at 1 byte a weight
    assert linear_shape(snn.model.embed_tokens) is None and linear_shape(snn.lm_head.linear) == (32, VOCAB)


def test_refusals_leave_the_model_unchanged():
    model = tiny_model("llama", VOCAB)
    with pytest.raises(ValueError, match="'own' backend only.*--no-int8_head"):
        quantize_weights_(model, "bnb", progress=False, head=True)
    with pytest.raises(ValueError, match="output head.*leave it out of paths"):
        quantize_weights_(model, "own", paths=["lm_head", "model.layers.0.mlp.up_proj"], progress=False, head=True)
    assert not any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())
    assert quantize_weights_(model, "none", progress=False, head=True)["int8_head"] is None


# -- save / load -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    t.pad_token, t.padding_side = t.eos_token, "left"
    return t


def make_spiking(arch, tok, head=True):
    cfg = ConversionConfig(T=7, mode="full", coding="weighted", spike_head=arch == "llama")
    snn = convert(tiny_model(arch, len(tok), initializer_range=0.3), cfg)
    summary = quantize_weights_(snn, "own", progress=False, head=head)
    data = torch.randint(1, len(tok), (4, 48), generator=torch.Generator().manual_seed(1))
    calib = calibrate(snn, data.split(2), CalibrationConfig(T=cfg.T, coding=cfg.coding), progress=False)
    calib.apply_to(snn)
    set_mode(snn, "parallel")
    return SpikingCausalLM.from_converted_(snn, calib, tok, quantization=summary)


def reply(model, x):
    out = model.generate(x, max_new_tokens=10, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    return out[0, x.shape[1]:].tolist()


@pytest.mark.parametrize("arch", list(PATHS))
def test_save_load_gives_identical_logits_and_tokens_with_the_table_stored_once(arch, tok, tmp_path):
    model = make_spiking(arch, tok)
    head_path = "lm_head.linear" if arch == "llama" else "lm_head"
    saved = model.save_pretrained(tmp_path / "snn")
    tensors = load_file(saved / "snn_model.safetensors")
    assert f"{head_path}.weight_int8" in tensors and not any(k.startswith(PATHS[arch][1]) for k in tensors)
    conversion = json.loads((saved / "stac_conversion.json").read_text())
    assert conversion["quantization"]["summary"]["int8_head"]["head"] == head_path
    assert head_path not in conversion["quantization"]["quantized_paths"]

    loaded = from_pretrained(saved)
    emb, head = loaded.get_input_embeddings(), loaded.get_submodule(head_path)
    assert isinstance(emb, Int8Embedding) and emb.weight_int8 is head.weight_int8
    x = tok("To be, or not to be", return_tensors="pt").input_ids
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert reply(loaded, x) == reply(model, x)
    again = loaded.save_pretrained(tmp_path / "again")
    assert load_file(again / "snn_model.safetensors").keys() == tensors.keys()
    assert all(torch.equal(v, load_file(again / "snn_model.safetensors")[k]) for k, v in tensors.items())

    loaded.tie_weights()  # what transformers calls: must not put a float weight over the int8 table
    assert loaded.get_input_embeddings() is emb and emb.weight_int8 is head.weight_int8
    assert torch.equal(logits(loaded, x), logits(model, x))
    with pytest.raises(ValueError, match="cannot be resized.*--no-int8_head"):
        loaded.resize_token_embeddings(len(tok) + 8)
    assert loaded.get_input_embeddings().weight.dtype == torch.float32


def test_a_directory_saved_with_a_float_head_still_loads(tok, tmp_path):
    model = make_spiking("llama", tok, head=False)
    saved = model.save_pretrained(tmp_path / "old")
    path = saved / "stac_conversion.json"
    conversion = json.loads(path.read_text())
    del conversion["quantization"]["summary"]["int8_head"]  # as written before the int8 head existed
    path.write_text(json.dumps(conversion))
    loaded = from_pretrained(saved)
    assert type(loaded.get_input_embeddings()) is torch.nn.Embedding
    assert loaded.get_input_embeddings().weight is loaded.lm_head.linear.weight  # tied float, as saved
    x = tok("The king", return_tensors="pt").input_ids
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_a_head_made_int8_after_from_converted_is_saved_as_such(tok, tmp_path):
    """What bench/int8_head.py does to a loaded float-head SNN: the record follows the model."""
    model = make_spiking("llama", tok, head=False)
    quantize_head_(model)
    loaded = from_pretrained(model.save_pretrained(tmp_path / "late"))
    assert isinstance(loaded.get_input_embeddings(), Int8Embedding)
    x = tok("The king", return_tensors="pt").input_ids
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_from_converted_finds_an_int8_head_without_a_summary(tok):
    model = make_spiking("gpt2", tok)
    bare = SpikingCausalLM.from_converted_(model, model.stac_calibration, tok)  # the summary found by type
    q = bare.stac_conversion["quantization"]
    assert q["summary"]["int8_head"] == {"head": "lm_head", "embedding": "transformer.wte", "tied": True}
    assert q["backend"] == "own" and "lm_head" not in q["quantized_paths"]


# -- options and flag --------------------------------------------------------------------------------

def test_int8_head_option_defaults_and_refusals():
    assert ConvertOptions().int8_head is True
    assert ConvertOptions(simplified=True).int8_head is False
    assert ConvertOptions(quant_backend="bnb").int8_head is False
    assert ConvertOptions(int8_head=False).int8_head is False
    with pytest.raises(ValueError, match="--int8_head needs --quant_backend own .--simplified"):
        ConvertOptions(simplified=True, int8_head=True)
    with pytest.raises(ValueError, match="--int8_head needs --quant_backend own .--quant_backend torchao"):
        ConvertOptions(quant_backend="torchao", int8_head=True)
    with pytest.raises(ValueError, match="int8_head must be true or false"):
        ConvertOptions(int8_head="yes")
    old = ConvertOptions().to_dict()
    del old["int8_head"]  # options saved before the flag: those runs kept the head float
    assert ConvertOptions.from_dict(old).int8_head is False
    assert ConvertOptions.from_json(ConvertOptions().to_json()).int8_head is True


@pytest.mark.parametrize("argv, value", [(["--int8_head"], True), (["--int8-head"], True),
                                         (["--no-int8_head"], False), (["--no-int8-head"], False), ([], None)])
def test_the_flag_takes_both_spellings_and_stays_unset_when_not_given(argv, value):
    args = vars(run_conversion.build_parser().parse_args(argv))
    assert args.get("int8_head") == value
