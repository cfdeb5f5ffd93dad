"""run_conversion.py refuses a model it cannot convert from its config alone, before any weights or
tokenizer load, and names the families it converts (``stac_lm.convert.pipeline.check_architecture``)."""

import json

import pytest
import transformers
from tiny_models import tiny_config

import run_conversion
from stac_lm.convert.pipeline import causal_families, check_architecture


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load weights or a tokenizer fails the test."""
    def boom(*args, **kwargs):
        raise AssertionError("weights or tokenizer loaded before the architecture was checked")
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", boom)


def _saved(tmp_path, config):
    config.save_pretrained(tmp_path / "model")  # a config alone: no weights, no tokenizer
    return str(tmp_path / "model")


CONFIGS = {  # name: (config, what the one-line error must say)
    "falcon": (lambda: transformers.FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                 vocab_size=320), "unsupported architecture 'falcon'"),
    "mamba": (lambda: transformers.MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=320),
              "unsupported architecture 'mamba'"),
    "bert-encoder": (lambda: transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=320),
        "unsupported architecture 'bert'"),
    "gpt2-cross-attention": (lambda: tiny_config("gpt2", add_cross_attention=True), "cross-attention"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cli_refuses_from_the_config_before_loading(tmp_path, capsys, no_loading, name):
    config, message = CONFIGS[name]
    model = _saved(tmp_path, config())
    with pytest.raises(SystemExit) as stop:
        run_conversion.main(["--model_name", model, "--output_dir", str(tmp_path / "out"), "--simplified"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    if "unsupported architecture" in message:
        assert "STAC converts: " in err and "llama (llama)" in err and "gpt2 (gpt2)" in err
        assert "bert" not in err.split("STAC converts: ")[1], "an encoder listed as a causal LM family"
    assert not (tmp_path / "out").exists()


def test_a_type_transformers_does_not_know_gets_the_same_message(tmp_path, no_loading):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "brand_new_lm"}))
    with pytest.raises(ValueError, match=r"unsupported architecture 'brand_new_lm'; STAC converts: .*llama"):
        check_architecture(str(tmp_path / "model"))


def test_supported_configs_pass_and_the_embedded_model_needs_no_config(tmp_path, no_loading):
    for arch in ("llama", "gpt2", "qwen2"):
        check_architecture(_saved(tmp_path / arch, tiny_config(arch)))
    check_architecture("embedded")
    assert "qwen3 (qwen3)" in causal_families() and "bert" not in causal_families()
