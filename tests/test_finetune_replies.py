"""Distillation on the ANN's own replies (``--finetune_text replies``, stac_lm.convert.replies)."""

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from stac_lm.eval.fidelity import chat_ids, greedy_reply, stop_ids
from stac_lm.convert.options import ConvertOptions
from stac_lm.eval.prompts import chitchat_openings
from stac_lm.convert.replies import ann_reply_windows, reply_openings

pytestmark = pytest.mark.usefixtures("one_thread")


def test_openings_are_distinct_and_never_the_scored_ones():
    got = reply_openings(40)
    assert len(got) == 40 == len(set(got))
    assert not set(got) & set(chitchat_openings())


def test_windows_are_prompt_then_the_anns_greedy_reply():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    ann = tiny_model("llama", len(tok)).eval()
    windows, tokens = ann_reply_windows(ann, tok, 3, new_tokens=5, batch_size=2)  # one padded batch
    assert len(windows) == 3 and tokens == sum(w.shape[1] for w in windows)
    for w, text in zip(windows, reply_openings(3)):
        prompt = chat_ids(tok, text)
        assert torch.equal(w[:, : prompt.shape[1]], prompt) and w.shape[1] > prompt.shape[1]
        # the continuation is the ANN's own greedy reply, as one prompt alone gets it
        assert w[0, prompt.shape[1]:].tolist() == greedy_reply(ann, prompt, 5, stop_ids(tok))


def test_replies_without_steps_is_refused():
    with pytest.raises(ValueError, match="--finetune_steps is 0"):
        ConvertOptions(finetune_text="replies")
    with pytest.raises(ValueError, match="finetune_text must be one of"):
        ConvertOptions(finetune_text="tempest", finetune_steps=3)


def test_a_conversion_distils_on_replies_and_records_it(tmp_path):
    from tiny_models import save_tiny

    from stac_lm.convert.pipeline import run

    opts = ConvertOptions(model_name=str(save_tiny(tmp_path / "model", "llama")), output_dir=str(tmp_path / "snn"),
                          calib_tokens=256, eval_tokens=512, verify=False, timesteps=5, coding="weighted",
                          finetune_steps=3, finetune_text="replies")
    out = run(opts, progress=False)
    assert out.finetune["steps"] == 3 and out.finetune["tokens"] > 0
    assert out.finetune["loss_first"] >= 0
