"""Converted LMs as Hugging Face models (stac_lm.io.hf_native): save_pretrained / from_pretrained round
trips that transformers can read, directories of the first layout, and transformers' generate()
with the spiking KV cache giving the tokens TemporalSpikeProcessor gives (greedy, seeded sampling,
left-padded batches, streaming). Tiny random Llama (full mode, weighted spikes, own 8-bit weights)
and GPT-2 (simplified mode, rate spikes), converted and calibrated in code."""

import copy
import json
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_model
from tiny_models import save_tiny, tiny_model, tiny_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, GPT2Config, LlamaConfig
from transformers.generation.streamers import BaseStreamer, TextIteratorStreamer, TextStreamer

import stac_lm
from calibration import CalibrationConfig, calibrate, quantize_weights_
from smollm2_converter import ConversionConfig, convert
from spike_modules import iter_sites, set_mode
from spike_modules.kv_cache import SpikeKVCache
from stac_common.io import OutputExistsError, sha256_file, write_json
from stac_lm import SpikingCausalLM, TemporalSpikeProcessor, from_pretrained, load_snn
from spike_modules.energy import site_spikes
from stac_lm.io.hf_native import calibration_from_model, conversion_record

pytestmark = pytest.mark.usefixtures("one_thread")

# arch: (conversion config, 8-bit weights, source config class)
CASES = {"llama": (ConversionConfig(T=7, mode="full", coding="weighted"), True, LlamaConfig),
         "gpt2": (ConversionConfig(T=8, mode="simplified", coding="rate"), False, GPT2Config)}
NEW = 12  # tokens generated per reply
PROMPTS = ["To be, or not to be", "The king", "O, that this too too solid flesh would melt"]


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    t.pad_token, t.padding_side = t.eos_token, "left"
    return t


def make_spiking(arch, tok):
    cfg, int8, _ = CASES[arch]
    # weights 15x the usual init: a tiny model's replies then vary instead of repeating one token
    snn = convert(tiny_model(arch, len(tok), initializer_range=0.3), cfg)
    if int8:
        quantize_weights_(snn, "own", progress=False)
    data = torch.randint(1, len(tok), (4, 48), generator=torch.Generator().manual_seed(1))
    calib = calibrate(snn, data.split(2), CalibrationConfig(T=cfg.T, coding=cfg.coding, fit_affine=cfg.mode == "full"),
                      progress=False)
    calib.apply_to(snn)
    set_mode(snn, "parallel")
    return SpikingCausalLM.from_converted_(snn, calib, tok)


@pytest.fixture(scope="module", params=list(CASES))
def model(request, tok):
    return make_spiking(request.param, tok)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return model.save_pretrained(tmp_path_factory.mktemp("hf_native") / "snn")


def prompt_ids(tok, text=PROMPTS[0]):
    return tok(text, return_tensors="pt").input_ids


def logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


# -- save_pretrained / from_pretrained -------------------------------------------------------------

def test_round_trip_is_a_transformers_directory_with_identical_logits(model, saved, tok):
    arch = model.config.model_type
    hf = AutoConfig.from_pretrained(saved)
    assert type(hf) is CASES[arch][2] and hf.vocab_size == model.config.vocab_size
    assert hf.architectures == [model.stac_base_class.__name__]
    assert AutoTokenizer.from_pretrained(saved)(PROMPTS[2]).input_ids == tok(PROMPTS[2]).input_ids
    conversion = json.loads((saved / "stac_conversion.json").read_text())
    assert conversion["format"] == "stac-snn" and conversion["timesteps"] == CASES[arch][0].T
    assert conversion["conversion_config"]["coding"] == CASES[arch][0].coding
    assert (conversion["quantization"]["backend"] == "own") == CASES[arch][1]
    assert set(conversion["files"]) == {"snn_model.safetensors", "calibration.safetensors"}

    loaded = from_pretrained(saved)
    assert isinstance(loaded, SpikingCausalLM) and isinstance(loaded, model.stac_base_class)
    assert not loaded.training and loaded.tokenizer(PROMPTS[1]).input_ids == tok(PROMPTS[1]).input_ids
    ids = prompt_ids(tok, PROMPTS[2])
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id


def test_loaded_model_saves_again_the_same_tensors(saved, tmp_path):
    again = SpikingCausalLM.from_pretrained(saved).save_pretrained(tmp_path / "again")
    for name in ("snn_model.safetensors", "calibration.safetensors"):
        a, b = load_file(str(saved / name)), load_file(str(again / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (again / "config.json").read_text() == (saved / "config.json").read_text()
    first, second = (json.loads((d / "stac_conversion.json").read_text()) for d in (saved, again))
    assert {k: v for k, v in first.items() if k != "files"} == {k: v for k, v in second.items() if k != "files"}


def test_load_snn_keeps_its_tuple(saved, model):
    m, t, config = load_snn(saved)
    assert t is m.tokenizer and isinstance(m, SpikingCausalLM)
    assert config["hf_config"]["model_type"] == model.config.model_type and config["timesteps"] == m.stac_calibration.config.T


def test_transformers_refuses_the_spiking_weights_as_a_float_model(saved):
    """The weights are not model.safetensors: a float model must not load them half-matched."""
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_no_overwrite_without_permission(model, saved):
    with pytest.raises(OutputExistsError, match="already exists"):
        model.save_pretrained(saved)
    model.save_pretrained(saved, overwrite=True)
    assert torch.equal(logits(from_pretrained(saved), prompt_ids(model.tokenizer)), logits(model, prompt_ids(model.tokenizer)))


def test_bad_input_is_a_clear_value_error(model, tok, tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="missing snn_model.safetensors"):
        from_pretrained(save_tiny(tmp_path / "plain", "gpt2"))  # a plain transformers model
    ann = tiny_model(model.config.model_type, len(tok))
    with pytest.raises(ValueError, match="was not converted by STAC"):
        SpikingCausalLM.from_converted_(ann, model.stac_calibration, tok)
    other = convert(ann, ConversionConfig(T=8, mode="full" if model.config.model_type == "gpt2" else "simplified"))
    with pytest.raises(ValueError, match="does not match this model"):
        SpikingCausalLM.from_converted_(other, model.stac_calibration, tok)
    bare = copy.deepcopy(model)
    bare.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        bare.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -- directories of the first layout ---------------------------------------------------------------

def save_first_layout(model, d):
    """What save_snn wrote before stac_conversion.json: one STAC config.json (format_version 1)
    holding the transformers config under hf_config, the tokenizer in tokenizer/."""
    d.mkdir()
    save_model(model, str(d / "snn_model.safetensors"))
    calibration_from_model(model, model.stac_calibration).write_files(d)
    model.tokenizer.save_pretrained(str(d / "tokenizer"))
    files = {n: sha256_file(d / n) for n in ("snn_model.safetensors", "calibration.safetensors")}
    config = {**conversion_record(model, files), "format_version": 1, "hf_config": model.config.to_dict()}
    del config["architecture"]
    write_json(d / "config.json", config)
    return d


def test_first_layout_still_loads_and_resaves_as_a_transformers_directory(model, tmp_path):
    old = save_first_layout(model, tmp_path / "old")
    with pytest.warns(UserWarning, match="re-save it with model.save_pretrained"):
        loaded, tok, config = load_snn(old)
    ids = prompt_ids(tok, PROMPTS[1])
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert config["hf_config"]["model_type"] == model.config.model_type
    new = loaded.save_pretrained(tmp_path / "new")
    assert type(AutoConfig.from_pretrained(new)) is CASES[model.config.model_type][2]
    assert torch.equal(logits(from_pretrained(new), ids), logits(model, ids))


def test_first_layout_of_another_version_says_how_to_resave(model, tmp_path):
    old = save_first_layout(model, tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps(dict(config, format_version=0)))
    with pytest.raises(ValueError, match="format_version 0.*run the conversion again with --overwrite"):
        from_pretrained(old)
    shutil.rmtree(old / "tokenizer")
    with pytest.raises(ValueError, match="missing tokenizer/"):
        from_pretrained(old)


# -- generate() against TemporalSpikeProcessor ------------------------------------------------------

def processor_reply(model, ids, **kw):
    proc = TemporalSpikeProcessor(model, model.stac_calibration.config.T)
    return proc.generate(ids.reshape(-1), NEW, stop_tokens=[model.tokenizer.eos_token_id], **kw).tokens


def hf_reply(model, ids, **kw):
    out = model.generate(ids, max_new_tokens=NEW, pad_token_id=model.tokenizer.pad_token_id, **kw)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("text", PROMPTS[:2])
def test_greedy_generate_gives_the_processors_tokens(model, text):
    ids = prompt_ids(model.tokenizer, text)
    ref = processor_reply(model, ids)
    assert len(set(ref)) > 3, f"a degenerate reply proves little: {ref}"
    assert hf_reply(model, ids, do_sample=False) == ref
    assert hf_reply(model, ids, do_sample=False, use_cache=False) == ref  # recomputing the context each step


def test_generate_decodes_with_the_spiking_cache_and_full_pass_logits(model):
    ids = prompt_ids(model.tokenizer, PROMPTS[2])
    out = model.generate(ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True,
                         pad_token_id=model.tokenizer.pad_token_id)
    assert isinstance(out.past_key_values, SpikeKVCache)
    assert out.past_key_values.get_seq_length() == out.sequences.shape[1] - 1  # the last token is not fed
    full = logits(model, out.sequences[:, :-1])[0, ids.shape[1] - 1:]
    steps = torch.cat(out.logits)
    assert torch.allclose(steps, full, atol=1e-4, rtol=0), float((steps - full).abs().max())


def spikes_of(model, run):
    """Spikes per site while ``run()`` runs."""
    for _, site in iter_sites(model):
        site.reset_stats()
    run()
    return {name: site_spikes(site) for name, site in iter_sites(model)}


def test_generate_spikes_what_the_processor_spikes(model):
    """Each token's keys and values spike once, when fed. transformers' own cache would hold the
    float k/v and the k/v sites would encode the whole context again at every step: the same
    tokens, but spike counts (and so energy) that grow with the context."""
    ids, T = prompt_ids(model.tokenizer, PROMPTS[2]), model.stac_calibration.config.T
    ref = spikes_of(model, lambda: processor_reply(model, ids))
    ours = spikes_of(model, lambda: hf_reply(model, ids, do_sample=False))
    assert ours.keys() == ref.keys() and all(ours[k] == pytest.approx(ref[k], rel=1e-6) for k in ref)
    plain = spikes_of(model, lambda: hf_reply(model, ids, do_sample=False, past_key_values=DynamicCache()))
    kv = [k for k in ref if k.endswith(("k_site", "v_site"))]
    assert kv and all(plain[k] > 2 * ref[k] for k in kv)
    assert all(plain[k] == pytest.approx(ref[k], rel=1e-6) for k in ref if k not in kv)


def test_a_stop_token_ends_both_replies_at_the_same_place(model):
    ids = prompt_ids(model.tokenizer)
    free = processor_reply(model, ids)
    stop = free[len(free) // 2]
    proc = TemporalSpikeProcessor(model, model.stac_calibration.config.T)
    ref = proc.generate(ids[0], NEW, stop_tokens=[stop])
    assert ref.stop_reason == "stop_token" and ref.tokens[-1] == stop and len(ref.tokens) < NEW
    assert hf_reply(model, ids, do_sample=False, eos_token_id=stop) == ref.tokens


@pytest.mark.parametrize("seed", [0, 7])
def test_seeded_sampling_gives_the_processors_tokens(model, seed):
    """transformers samples from torch's global generator; seeded as the processor seeds its own, on
    the CPU, the draws are the same. top_k=0: transformers' default is 50, the processor's is off."""
    ids = prompt_ids(model.tokenizer, PROMPTS[1])
    shape = dict(temperature=0.9, top_p=0.95)
    ref = processor_reply(model, ids, do_sample=True, seed=seed, **shape)
    torch.manual_seed(seed)
    assert hf_reply(model, ids, do_sample=True, top_k=0, **shape) == ref
    assert ref != processor_reply(model, ids), "sampling gave the greedy reply: the test shows nothing"


def test_left_padded_batch_gives_each_prompt_its_own_reply(model):
    tok = model.tokenizer
    batch = tok(PROMPTS, padding=True, return_tensors="pt")
    assert bool((batch.attention_mask == 0).any()), "the prompts must need padding"
    out = model.generate(**batch, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    proc = TemporalSpikeProcessor(model, model.stac_calibration.config.T, pad_token_id=tok.pad_token_id)
    ref = proc.generate_batch({str(i): torch.tensor(tok(p).input_ids) for i, p in enumerate(PROMPTS)}, NEW,
                              stop_tokens=[tok.eos_token_id])
    width = batch.input_ids.shape[1]
    for i, p in enumerate(PROMPTS):
        row = out[i, width:].tolist()
        expected = ref[str(i)].tokens
        assert row[:len(expected)] == expected, p
        assert expected == processor_reply(model, prompt_ids(tok, p)), p  # what the prompt gets alone


# -- streaming ---------------------------------------------------------------------------------------

class Tokens(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


def test_streamers_see_the_processors_tokens_as_they_come(model, capsys):
    tok = model.tokenizer
    ids = prompt_ids(tok, PROMPTS[2])
    streamed = []
    TemporalSpikeProcessor(model, model.stac_calibration.config.T).generate(
        ids[0], NEW, stop_tokens=[tok.eos_token_id], on_token=lambda cid, t: streamed.append(t))
    seen = Tokens()
    hf_reply(model, ids, do_sample=False, streamer=seen)
    assert seen.puts[0] == ids.tolist() and seen.ended  # the prompt first, then one token per step
    assert [t for put in seen.puts[1:] for t in put] == streamed

    capsys.readouterr()
    hf_reply(model, ids, do_sample=False, streamer=TextStreamer(tok, skip_prompt=True))
    assert capsys.readouterr().out == tok.decode(streamed) + "\n"

    it = TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
    worker = threading.Thread(target=hf_reply, args=(model, ids), kwargs=dict(do_sample=False, streamer=it))
    worker.start()
    text = "".join(it)
    worker.join()
    assert text == tok.decode(streamed)


def test_exports(model):
    assert stac_lm.SpikingCausalLM is SpikingCausalLM and stac_lm.from_pretrained is from_pretrained
    assert type(model).__name__ == f"Spiking{model.stac_base_class.__name__}"


def test_deployed_generation_gives_the_same_tokens_and_logits_without_spike_statistics(model):
    # stac_lm.set_spike_counting(model, False): the sites record no spikes and generate() takes the lean decoding
    # path (frozen sites, the KV cache's in-place appends); what it computes does not change
    ids = prompt_ids(model.tokenizer, PROMPTS[2])

    def run():
        return model.generate(ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                              output_logits=True, pad_token_id=model.tokenizer.pad_token_id)

    counted = run()
    stac_lm.set_spike_counting(model, False)
    try:
        silent = spikes_of(model, lambda: None)
        deployed = run()
        assert spikes_of(model, run) == silent  # nothing recorded while deployed
    finally:
        stac_lm.set_spike_counting(model, True)
    assert torch.equal(deployed.sequences, counted.sequences)
    assert all(torch.equal(a, b) for a, b in zip(deployed.logits, counted.logits))
