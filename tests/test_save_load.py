"""save_snn / load_snn: a directory that rebuilds the same model, and refuses to load when damaged.

The directory's Hugging Face side (AutoConfig, save_pretrained / from_pretrained, generate) is
tests/test_hf_native.py."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny

import stac_lm.io.hf_native as hf_native
from calibration import Calibration
from spike_modules import iter_sites
from spike_modules.quantizer import coding_levels
from stac_common.io import OutputExistsError, write_json
from stac_lm.convert.options import ConvertOptions
from stac_lm.convert.pipeline import run
from stac_lm.io.saving import load_snn, save_snn

# full mode with own int8; simplified; simplified with a short distillation fine-tune
RUNS = {"llama": {"simplified": False}, "gpt2": {"simplified": True},
        "llama_ft": {"simplified": True, "finetune_steps": 2, "surrogate_function": "ATan"},
        "llama_weighted": {"simplified": False, "coding": "weighted", "timesteps": 5}}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One tiny conversion per architecture (not verified: test_cli covers the report)."""
    out = {}
    for arch, kw in RUNS.items():
        base = tmp_path_factory.mktemp(arch)
        opts = ConvertOptions(model_name=str(save_tiny(base / "model", arch.split("_")[0])), output_dir=str(base / "snn"),
                              calib_tokens=256, eval_tokens=512, verify=False, **{"timesteps": 8, **kw})
        out[arch] = run(opts, progress=False)
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", RUNS)
def test_load_snn_rebuilds_identical_logits(converted, arch):
    out = converted[arch]
    model, tok, config = load_snn(out.options.output_dir)
    ids = out.eval_stream.ids[:96][None]
    assert torch.equal(logits(out.snn, ids), logits(model, ids))
    assert {s.mode.value for _, s in iter_sites(model)} == {"parallel"} and not model.training
    assert tok(" To be, or not to be").input_ids == out.tokenizer(" To be, or not to be").input_ids
    assert config["timesteps"] == out.options.timesteps and config["mode"] == out.options.mode
    assert {s.coding for _, s in iter_sites(model)} == {out.options.coding}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    head = head.linear if hasattr(head, "linear") else head
    a, b = (emb.weight_int8, head.weight_int8) if hasattr(emb, "weight_int8") else (emb.weight, head.weight)
    assert a.data_ptr() == b.data_ptr(), "the tied head must stay tied after loading"


def test_directory_holds_what_rebuilding_needs(converted):
    out = converted["llama"]
    d = Path(out.options.output_dir)
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "generation_config.json", "stac_conversion.json", "snn_model.safetensors",
            "calibration.safetensors", "calibration.json", "tokenizer_config.json", "tokenizer.json",
            "conversion_log.txt"} <= names and "report.json" not in names  # verify=False: no report
    config = json.loads((d / "stac_conversion.json").read_text())
    assert config["source"]["sha256"] and json.loads((d / "config.json").read_text())["model_type"] == "llama"
    assert config["architecture"] == "LlamaForCausalLM" and "hf_config" not in config
    assert config["options"] == out.options.to_dict()
    assert config["conversion_config"]["T"] == 8 and config["calibration_config"]["rule"] == "percentile" \
        and config["calibration_config"]["max_burst"] == 2**24 // coding_levels(8, out.options.coding)
    paths = config["quantization"]["quantized_paths"]
    assert config["quantization"]["backend"] == "own" and len(paths) == 14  # 7 linears x 2 layers, head stays float
    assert {"torch", "transformers", "spikingjelly"} <= set(config["versions"])
    log = (d / "conversion_log.txt").read_text()
    assert "model.layers.0.self_attn.q_proj: Linear -> SpikeLinear" in log
    assert "model.layers.1.mlp.down_proj.site" in log and "8-bit weights: own" in log


def test_fine_tuned_thresholds_are_what_is_saved(converted):
    """The model's sites are the one source of truth: after a fine-tune the saved calibration holds
    the learned thresholds, not the calibrated ones (load_snn checks the two files agree)."""
    out = converted["llama_ft"]
    assert out.finetune["steps"] == 2 and out.finetune["surrogate"] == "ATan" and out.finetune["tokens"] > 0
    saved = Calibration.load(out.options.output_dir)
    moved = [n for n, p in saved.sites.items() if not torch.equal(p.theta, out.calibration.sites[n].theta)]
    assert moved, "the fine-tune changed no threshold, or the calibrated ones were saved"
    for name, site in iter_sites(out.snn):
        assert torch.equal(saved.sites[name].theta, site.theta.detach())
    assert json.loads((Path(out.options.output_dir) / "stac_conversion.json").read_text())["finetune"]["steps"] == 2


@pytest.fixture
def copy_of(converted, tmp_path):
    def make(arch="llama"):
        d = tmp_path / f"copy_{arch}"
        shutil.copytree(converted[arch].options.output_dir, d)
        return d
    return make


def _edit_config(d, change, name="stac_conversion.json"):
    config = json.loads((d / name).read_text())
    change(config)
    (d / name).write_text(json.dumps(config))


def _truncate(d):
    f = d / "snn_model.safetensors"
    f.write_bytes(f.read_bytes()[:-16])


def _widen(d):
    def change(c):
        c["intermediate_size"] += 8
    _edit_config(d, change, "config.json")


def _other_theta(d):
    """Calibration files that disagree with the weights (checksums updated, so only the agreement check can see)."""
    calib = Calibration.load(d)
    name = next(iter(calib.sites))
    calib.sites[name].theta = calib.sites[name].theta * 2
    calib.write_files(d)
    _edit_config(d, lambda c: c["files"].update({"calibration.safetensors":
                                                 hf_native.sha256_file(d / "calibration.safetensors")}))


CORRUPTIONS = [
    ("missing file", lambda d: (d / "calibration.safetensors").unlink(), "missing calibration.safetensors"),
    ("missing conversion", lambda d: (d / "stac_conversion.json").unlink(), "missing stac_conversion.json"),
    ("missing tokenizer", lambda d: (d / "tokenizer_config.json").unlink(), "missing tokenizer_config.json"),
    ("unreadable tokenizer", lambda d: (d / "tokenizer.json").write_text('{"version": '),
     "the tokenizer is unreadable"),
    ("bad JSON", lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    ("bad conversion JSON", lambda d: (d / "stac_conversion.json").write_text("{not"),
     "stac_conversion.json is not valid JSON"),
    ("not a transformers config", lambda d: _edit_config(d, lambda c: c.update(model_type="no-such-model"),
                                                         "config.json"), "does not describe a model"),
    ("other format version", lambda d: _edit_config(d, lambda c: c.update(format_version=99)), "format_version 99"),
    ("truncated weights", _truncate, "snn_model.safetensors does not match its sha256"),
    ("shape mismatch", _widen, "does not fit the model rebuilt from config.json.*size mismatch"),
    ("sites disagree", _other_theta, "theta differs between snn_model.safetensors and calibration.safetensors"),
]


@pytest.mark.parametrize("what,damage,message", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_damaged_directory_is_a_clear_value_error(copy_of, what, damage, message):
    d = copy_of()
    damage(d)
    with pytest.raises(ValueError, match=message):
        load_snn(d)


def test_no_overwrite_without_permission_and_nothing_half_written(converted, tmp_path, monkeypatch):
    out = converted["gpt2"]
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        save_snn(out, out.options.output_dir)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the config is being written
    monkeypatch.setattr(hf_native, "write_json", interrupted)
    target = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        save_snn(out, target)
    assert list(tmp_path.iterdir()) == []  # neither the directory nor its temporary sibling
    monkeypatch.setattr(hf_native, "write_json", write_json)
    save_snn(out, target)
    assert torch.equal(logits(load_snn(target)[0], out.eval_stream.ids[:32][None]),
                       logits(out.snn, out.eval_stream.ids[:32][None]))
