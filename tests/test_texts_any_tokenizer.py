"""Calibration and evaluation texts for any tokenizer: with or without a BOS added per call, an EOS
added per call, no EOS at all, a chat template that writes its own BOS, or no chat template.

The tokenizers are byte-level (one token per byte, no merges) and built in code, so every case
is exact and offline.
"""

import io

import pytest
from rich.console import Console
from stac_common.assets import shakespeare_text
from tiny_models import tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from stac_lm.convert.options import ConvertOptions
from stac_lm.convert.pipeline import run
from stac_lm.convert.texts import (CHITCHAT_CONVERSATIONS, calibration_batches, chitchat_text, encode, finetune_windows,
                           join_documents, load_streams, special_ends)

pytestmark = pytest.mark.usefixtures("one_thread")

BOS, EOS = "<s>", "</s>"
# a Llama-3-like template: the BOS written at the start of every conversation, each turn closed by EOS
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def byte_tokenizer(per_call: str = "", eos: bool = True, template: str | None = None) -> PreTrainedTokenizerFast:
    """One token per byte; ``per_call`` is what one call adds: ``""``, ``"bos"`` or ``"bos+eos"``."""
    specials = [BOS, EOS]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    if per_call:
        single = f"{BOS} $A" + (f" {EOS}" if per_call == "bos+eos" else "")
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(BOS, 0), (EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS if eos else None,
                                   chat_template=template)


CASES = {  # name: (per call, eos, template, the start ids the stream must begin with)
    "no bos (gpt2-like)": ("", True, None, []),
    "bos per call (llama-like)": ("bos", True, None, [0]),
    "bos and eos per call": ("bos+eos", True, None, [0]),
    "bos per call, template writes bos": ("bos", True, BOS_TEMPLATE, [0]),
    "no bos, no eos": ("", False, None, []),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request):
    per_call, eos, template, start = CASES[request.param]
    return byte_tokenizer(per_call, eos, template), start


def test_special_ends_says_what_one_call_adds():
    assert special_ends(byte_tokenizer()) == ([], [])
    assert special_ends(byte_tokenizer("bos")) == ([0], [])
    assert special_ends(byte_tokenizer("bos+eos")) == ([0], [1])


def test_a_stream_has_its_start_tokens_once_and_no_other_special_token(case):
    tok, start = case
    calib, evals = load_streams(tok, None, 2048, None, 1024)
    for stream in (calib, evals):
        ids = stream.ids.tolist()
        assert ids[:len(start)] == start and list(stream.start_ids) == start
        body = ids[len(start):]
        assert 0 not in body and 1 not in body, "a special token in the middle of the stream"
        assert len(ids) == stream.describe()["tokens_used"]
    plain = tok(shakespeare_text(["hamlet_gut"])[:200], add_special_tokens=False)["input_ids"]
    assert calib.ids.tolist()[len(start):len(start) + len(plain)] == plain  # the text itself, untouched


def test_encode_does_not_double_a_bos_the_text_already_has():
    tok = byte_tokenizer("bos")
    start, ids = encode(tok, BOS + "ab")
    assert start == [0] and ids == [0] + tok("ab", add_special_tokens=False)["input_ids"]


def test_calibration_windows_and_finetune_windows_work_for_every_tokenizer(case):
    tok, start = case
    calib, _ = load_streams(tok, None, 1024, None, 512)
    batches = calibration_batches(calib.ids, 256)
    assert sum(b.shape[0] for b in batches) == 4 and batches[0][0, :len(start)].tolist() == start
    windows, used = finetune_windows(tok, None, 3, 64)
    assert used == 3 * 64 and windows[0][0, :len(start)].tolist() == start
    assert all(0 not in w[0, len(start):].tolist() for w in windows)


def test_chitchat_in_the_template_has_one_bos_and_an_eos_after_every_turn():
    tok = byte_tokenizer("bos", template=BOS_TEMPLATE)
    text, source, _ = chitchat_text(tok)
    assert text.startswith(BOS) and text.count(BOS) == 1, "a BOS in the middle of the calibration stream"
    assert "in the chat template" in source and EOS + EOS not in text
    stream, _ = load_streams(tok, "chitchat", 4096, None, 512)
    assert stream.ids.tolist().count(0) == 1 and stream.ids[0] == 0


@pytest.mark.parametrize("eos", [True, False], ids=["eos", "no-eos"])
def test_chitchat_without_a_template_uses_the_plain_format(eos):
    tok = byte_tokenizer("bos", eos=eos)
    assert not tok.chat_template
    text, source, _ = chitchat_text(tok)
    assert text.startswith("User: ") and "\nAssistant:" in text and "plain User:/Assistant: format" in source
    separator = EOS + "\nUser: " if eos else "\n\nUser: "
    assert text.count(separator) == CHITCHAT_CONVERSATIONS - 1
    stream, _ = load_streams(tok, "chitchat", 2048, None, 512)
    assert stream.ids[0] == 0 and 0 not in stream.ids[1:].tolist()


def test_join_documents_adds_an_eos_only_where_a_document_lacks_one():
    tok = byte_tokenizer("bos")
    assert join_documents(tok, ["a", "b" + EOS + "\n", BOS + "c"]) == f"a{EOS}\nb{EOS}\n\nc{EOS}"
    assert join_documents(byte_tokenizer(eos=False), ["a", "b"]) == "a\n\nb\n"


def test_a_model_with_a_bos_tokenizer_and_no_template_converts_on_chitchat(tmp_path):
    """End to end: a tiny Llama whose tokenizer adds BOS per call and has no chat template,
    calibrated on the chit-chat text in the plain format (simplified mode, no verification)."""
    tok = byte_tokenizer("bos")
    model = tiny_model("llama", len(tok))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    opts = ConvertOptions(model_name=str(tmp_path / "m"), simplified=True, timesteps=8, calib_text="chitchat",
                          calib_tokens=512, output_dir=str(tmp_path / "out"), verify=False)
    out = run(opts, progress=False, console=Console(file=io.StringIO()))
    assert out.calib_stream.ids[0] == 0 and 0 not in out.calib_stream.ids[1:].tolist()
    assert "plain User:/Assistant: format" in out.calib_stream.source and (tmp_path / "out").is_dir()
