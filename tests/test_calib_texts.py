"""--calib_text chitchat: the embedded chit-chat conversations in the chat template, never the scored ones."""

import subprocess
import sys
from pathlib import Path

import pytest
from test_chat import smollm2_tokenizer
from tiny_models import save_tiny
from transformers import AutoTokenizer

from stac_lm.checks.quality import chitchat
from stac_lm.convert.options import ConvertOptions
from stac_lm.convert.texts import CHITCHAT_CONVERSATIONS, chitchat_data, chitchat_text, load_streams, read_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def test_chitchat_calibration_is_templated_and_apart_from_the_scored_conversations(tok):
    text, source, files = chitchat_text(tok)
    assert text.count("<|im_start|>system") == CHITCHAT_CONVERSATIONS and "<|im_start|>assistant" in text
    assert files[0].endswith(".json") and "read from the last" in source
    scored, _ = chitchat(tok, 50, 512)
    first = int(source.split("positions ")[1].split("..")[0])
    ids = sorted(chitchat_data()[1])
    assert max(ids.index(s["id"]) for s in scored) < first, "calibration would see a scored conversation"
    calib, evals = load_streams(tok, "chitchat", 8192, None, 4096)
    assert calib.ids.numel() == 8192 and calib.source == source and evals.source.endswith("tempest_gut")


def test_chitchat_without_a_chat_template_falls_back_to_the_plain_format(tmp_path):
    plain = AutoTokenizer.from_pretrained(str(save_tiny(tmp_path / "m", "llama")))
    assert not getattr(plain, "chat_template", None)
    text, source, _ = read_text("chitchat", (), plain)
    assert text.startswith("User: ") and "\nAssistant:" in text and "no chat template" in source
    with pytest.raises(ValueError, match="not a file"):
        read_text("chitchat", ())


def test_the_keyword_passes_the_option_checks_and_only_for_calibration():
    assert ConvertOptions(calib_text="chitchat").calib_text == "chitchat"  # checked in __post_init__
    with pytest.raises(ValueError, match="no such file"):
        ConvertOptions(eval_text="chitchat")
    out = subprocess.run([sys.executable, str(ROOT / "run_conversion.py"), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert "'chitchat'" in out.stdout
