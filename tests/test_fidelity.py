"""Free-running generation fidelity (stac_lm.eval.fidelity): identical models agree everywhere, a different
network does not, and the figures are what the rows say."""

import torch
from tiny_models import VOCAB, tiny_model, tiny_tokenizer

from stac_lm.eval.prompts import correct
from stac_lm.eval.fidelity import FIRST_N, common_prefix, compare, greedy_reply, stop_ids

PROMPTS = [{"kind": "question", "text": "Who is the king?", "answers": ["king"]},
           {"kind": "instruction", "text": "Speak of the ghost.", "answers": None},
           {"kind": "chitchat", "text": "To be, or not to be", "answers": None}]


def test_a_model_against_itself_is_identical_everywhere():
    tok, ann = tiny_tokenizer(), tiny_model("llama", VOCAB)
    out = compare(ann, ann, tok, PROMPTS, new_tokens=FIRST_N + 4, correct=correct)
    s = out["summary"]
    assert s[f"first_{FIRST_N}_identity"] == 1.0 and s["exact_match"] == 1.0
    assert s["forced_top1_agreement_on_ann_replies"] == 1.0
    assert s["mean_common_prefix"] == sum(len(r.ids) for r in out["ann_replies"]) / len(PROMPTS) > 0


def test_a_different_network_is_caught():
    tok = tiny_tokenizer()
    # a random tiny model with the default init repeats one token whatever the prompt; a wider init does not
    ann, other = (tiny_model("llama", VOCAB, seed=s, initializer_range=0.3) for s in (0, 1))
    s = compare(ann, other, tok, PROMPTS, new_tokens=FIRST_N + 4, correct=correct)["summary"]
    assert s[f"first_{FIRST_N}_identity"] < 1.0 and s["exact_match"] < 1.0
    assert s["forced_top1_agreement_on_ann_replies"] < 0.5


def test_greedy_reply_uses_the_cache_as_a_full_pass_would():
    tok, ann = tiny_tokenizer(), tiny_model("llama", VOCAB)
    prompt = tok("To be, or not", return_tensors="pt").input_ids
    reply = greedy_reply(ann, prompt, 12, stop=set())
    ids = prompt
    for _ in range(12):
        with torch.no_grad():
            nxt = ann(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert reply == ids[0, prompt.shape[1]:].tolist()


def test_helpers():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0
    assert correct("The capital of France is Paris.", ("Paris",)) and not correct("Parisian food", ("Paris",))
    tok = tiny_tokenizer()
    assert tok.eos_token_id in stop_ids(tok)


def test_forced_only_reports_the_teacher_forced_figures_alone():
    tok = tiny_tokenizer()
    ann, other = (tiny_model("llama", VOCAB, seed=s, initializer_range=0.3) for s in (0, 1))
    same = compare(ann, ann, tok, PROMPTS, new_tokens=FIRST_N + 4, correct=correct, free_running=False)["summary"]
    assert same[f"forced_first_{FIRST_N}"] == 1.0 and same["forced_top1_agreement_on_ann_replies"] == 1.0
    assert same[f"first_{FIRST_N}_identity"] is None and same["snn_keeps_ann_correct"] is None
    diff = compare(ann, other, tok, PROMPTS, new_tokens=FIRST_N + 4, correct=correct, free_running=False)["summary"]
    assert diff[f"forced_first_{FIRST_N}"] < 1.0


def test_site_groups_cover_roles_and_depth():
    from bench.fidelity_sites import groups

    names = [f"model.layers.{i}.{s}" for i in range(6) for s in
             ("self_attn.q_proj.site", "self_attn.k_site", "self_attn.o_proj.site", "mlp.gate_proj.site",
              "mlp.down_proj.site")] + ["lm_head.site"]
    g = groups(names)
    assert len(g["qkv_input"]) == len(g["k"]) == len(g["o_input"]) == len(g["mlp_input"]) == 6
    assert g["lm_head"] == ["lm_head.site"] and len(g["all"]) == len(names)
    assert [k for k in g if k.startswith("layers_")] == ["layers_0-1", "layers_2-3", "layers_4-5"]
    assert "q" not in g  # a role no site has is left out


def test_ann_replies_are_read_back_from_their_cache_only_for_the_same_model(tmp_path, monkeypatch):
    import stac_lm.eval.fidelity as fidelity

    tok, ann = tiny_tokenizer(), tiny_model("llama", VOCAB)
    cache = tmp_path / "replies.json"
    first = fidelity.ann_replies(ann, tok, PROMPTS, 6, cache, key={"sha": "a"})
    assert cache.is_file()
    calls = []
    monkeypatch.setattr(fidelity, "greedy_reply", lambda *a: calls.append(1) or [5])
    again = fidelity.ann_replies(ann, tok, PROMPTS, 6, cache, key={"sha": "a"})
    assert [r.ids for r in again] == [r.ids for r in first] and not calls
    other = fidelity.ann_replies(ann, tok, PROMPTS, 6, cache, key={"sha": "b"})  # another model: decoded again
    assert len(calls) == len(PROMPTS) and [r.ids for r in other] == [[5]] * len(PROMPTS)
