"""TemporalSpikeProcessor on tiny converted Llama and GPT-2 models: the cache contract, positions,
turns dropped at the context limit, batching, sampling, interruption and bad input."""

import pytest
import torch
from test_converter import MODELS, converted

from spike_modules.kv_cache import SpikeKVCache
from spike_modules.site import iter_sites, set_mode
from spike_modules.energy import count_ops, counting
from stac_lm.generate.processor import TemporalSpikeProcessor

T = 16
TOL = 1e-5  # same values, other summation order: float32 rounding only


@pytest.fixture(scope="module", params=list(MODELS))
def snn(request):
    return converted(MODELS[request.param], T, mode="simplified")[1]


def turns(*lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 64, (n,), generator=g) for n in lengths]


def recorded_positions(model):
    """Position ids of every forward of ``model`` (a pre-hook), as a list of tensors."""
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"].clone()),
                                             with_kwargs=True)
    return seen, handle


def test_cached_turns_equal_full_recompute(snn):
    cached, ref = TemporalSpikeProcessor(snn, T), TemporalSpikeProcessor(snn, T)
    for t in turns(10, 7, 5):
        a, b = cached(t).logits, ref(t, use_cache=False).logits
        assert a.shape == b.shape == (1, t.numel(), 64)
        assert torch.allclose(a, b, atol=TOL, rtol=0), float((a - b).abs().max())
    assert cached.cache_length() == 22 and torch.equal(cached.history(), ref.history())


def test_kept_float_weights_decode_the_same_tokens_and_logits(snn):
    """An 8-bit copy of the model decodes with and without kept float weights bit for bit alike."""
    import copy

    from calibration import quantize_weights_

    model = copy.deepcopy(snn)
    quantize_weights_(model, "own", progress=False)
    plain = TemporalSpikeProcessor(model, T)
    prompt = turns(9)[0]
    ref_logits, ref = plain(prompt).logits, plain.generate(turns(3)[0], max_new_tokens=6).tokens
    kept = TemporalSpikeProcessor(model, T, float_weights=True)
    assert kept.float_weight_bytes > 0 and plain.float_weight_bytes == 0
    assert torch.equal(kept(prompt).logits, ref_logits)
    assert kept.generate(turns(3)[0], max_new_tokens=6).tokens == ref


def test_a_dropped_cache_would_be_caught(snn):
    """The contract test above can fail: without the history the logits change."""
    full = TemporalSpikeProcessor(snn, T)
    t1, t2 = turns(10, 6)
    full(t1)
    alone = TemporalSpikeProcessor(snn, T)
    assert not torch.allclose(full(t2).logits, alone(t2).logits, atol=1e-3)


def test_positions_continue_across_turns_and_the_reply(snn):
    p = TemporalSpikeProcessor(snn, T)
    seen, handle = recorded_positions(snn)
    try:
        p(turns(6)[0])
        p.generate(turns(4, seed=1)[0], 5)
        p(turns(3, seed=2)[0])
    finally:
        handle.remove()
    # 6 + 4 fed, 5 replied (the last one fed with the next turn), 3 more: positions 0..17 once each
    assert torch.equal(torch.cat([s.flatten() for s in seen]), torch.arange(18))
    assert p.cache_length() == p.history().numel() == 18


def test_each_token_passes_its_kv_sites_once(snn):
    p = TemporalSpikeProcessor(snn, T)
    for _, site in iter_sites(snn):
        site.parallel.reset_stats()
    for t in turns(5, 4, 3):
        p(t)
    k_site = next(site for name, site in iter_sites(snn) if name.endswith("k_site"))
    assert k_site.parallel.neuron_steps_total == 12 * k_site.num_channels * T


def test_context_limit_drops_oldest_turns_and_says_so(snn):
    p = TemporalSpikeProcessor(snn, T, max_context_length=24)
    t1, t2, t3, t4 = turns(10, 7, 5, 9)
    for t in (t1, t2, t3):
        assert p(t).dropped_turns == {"default": 0}
    out = p(t4)
    assert out.dropped_turns == {"default": 1}
    assert torch.equal(p.history(), torch.cat([t2, t3, t4]))
    # the kept turns are re-encoded from position 0: exactly a fresh pass over them
    fresh = TemporalSpikeProcessor(snn, T)
    fresh(torch.cat([t2, t3]))
    assert torch.allclose(out.logits, fresh(t4).logits, atol=TOL, rtol=0)
    gen = p.generate(turns(3, seed=5)[0], 10)
    assert gen.dropped_turns == 2 and p.history().numel() <= 24


def test_input_longer_than_the_context_is_refused(snn):
    p = TemporalSpikeProcessor(snn, T, max_context_length=16)
    with pytest.raises(ValueError, match="context limit of 16"):
        p(turns(17)[0])
    with pytest.raises(ValueError, match="context limit"):
        p.generate(turns(10)[0], max_new_tokens=10)


def test_batched_conversations_give_what_each_gives_alone(snn):
    histories = {"a": turns(9)[0], "b": turns(4, seed=1)[0], "c": turns(13, seed=2)[0]}
    new = {"a": turns(3, seed=3)[0], "b": turns(6, seed=4)[0], "c": turns(1, seed=5)[0]}
    batched, alone = TemporalSpikeProcessor(snn, T), TemporalSpikeProcessor(snn, T)
    ids = torch.zeros(3, 13, dtype=torch.long)
    mask = torch.zeros(3, 13, dtype=torch.long)
    for i, h in enumerate(histories.values()):
        ids[i, 13 - h.numel():], mask[i, 13 - h.numel():] = h, 1
    logits = batched(ids, attention_mask=mask, conversation_id=list(histories)).logits
    for i, (c, h) in enumerate(histories.items()):
        single = alone(h, conversation_id=c).logits[0]
        assert torch.allclose(logits[i, 13 - h.numel():], single, atol=TOL, rtol=0)
    kw = dict(do_sample=True, temperature=1.5, seed=7)
    together = batched.generate_batch(new, 8, **kw)
    for c, ids in new.items():
        assert together[c].tokens == alone.generate(ids, 8, conversation_id=c, **kw).tokens
        assert torch.equal(batched.history(c), alone.history(c))


def test_sampling_is_seeded_and_top_k_1_is_greedy(snn):
    prompt = turns(5)[0]

    def reply(**kw):
        p = TemporalSpikeProcessor(snn, T)
        return p.generate(prompt, 12, **kw).tokens

    hot = dict(do_sample=True, temperature=3.0)
    assert reply(seed=1, **hot) == reply(seed=1, **hot)
    assert reply(seed=1, **hot) != reply(seed=2, **hot)
    assert reply(do_sample=True, top_k=1, seed=3) == reply()
    with pytest.raises(ValueError, match="top_p"):
        reply(do_sample=True, top_p=0.0)


def test_stop_tokens_end_the_reply_and_stay_in_the_history(snn):
    p = TemporalSpikeProcessor(snn, T)
    first = p.generate(turns(5)[0], 6).tokens
    q = TemporalSpikeProcessor(snn, T)
    gen = q.generate(turns(5)[0], 6, stop_tokens=[first[2]])
    stop_at = first.index(first[2])
    assert gen.tokens == first[:stop_at + 1] and gen.stop_reason == "stop_token"
    assert q.history()[-1].item() == first[2]


def test_ctrl_c_keeps_a_consistent_conversation(snn):
    p, ref = TemporalSpikeProcessor(snn, T), TemporalSpikeProcessor(snn, T)
    prompt, follow = turns(5, 4)
    got = []

    def stop_after_three(cid, tok):
        got.append(tok)
        if len(got) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        p.generate(prompt, 50, on_token=stop_after_three)
    assert torch.equal(p.history(), torch.cat([prompt, torch.tensor(got)]))
    ref(p.history())
    assert torch.allclose(p(follow).logits, ref(follow).logits, atol=TOL, rtol=0)


def test_interrupted_forward_is_undone(snn, monkeypatch):
    p, ref = TemporalSpikeProcessor(snn, T), TemporalSpikeProcessor(snn, T)
    t1, t2 = turns(6, 4)
    p(t1)
    ref(t1)
    layers = [m for m in snn.modules() if hasattr(m, "stac_sim_T")]
    original = type(layers[-1]).forward

    def boom(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(layers[-1]), "forward", boom)
    with pytest.raises(KeyboardInterrupt):
        p(t2)  # the first layer's cache grew before the last layer failed
    monkeypatch.setattr(type(layers[-1]), "forward", original)
    assert p.cache_length() == 6 and torch.equal(p.history(), t1)
    assert torch.allclose(p(t2).logits, ref(t2).logits, atol=TOL, rtol=0)


def test_reset_deletes_the_conversation(snn):
    p = TemporalSpikeProcessor(snn, T)
    p(turns(5)[0], conversation_id="x")
    p(turns(5)[0], conversation_id="y")
    p.reset("x")
    assert "x" not in p.conversations and p.cache_length("x") == 0 and p.history("x").numel() == 0
    assert p.cache_length("y") == 5
    p.reset()
    assert not p.conversations


def test_timesteps_change_the_output(snn):
    p = TemporalSpikeProcessor(snn, T)
    a = p(turns(8)[0], use_cache=False).logits
    p.set_timesteps(2)
    b = p(turns(8)[0], conversation_id="other", use_cache=False).logits
    p.set_timesteps(T)
    assert not torch.allclose(a, b, atol=1e-3)


def test_cached_attention_ops_count_the_cached_keys(snn):
    ids = turns(12)[0][None]
    full = count_ops(snn, ids)
    p = TemporalSpikeProcessor(snn, T)
    with counting(snn) as cached:
        p(ids[:, :8])
        p(ids[:, 8:])
    assert cached.attention_macs == full.attention_macs and cached.dense_macs == full.dense_macs


def test_bad_input_is_refused(snn):
    ann = MODELS["llama"]()
    with pytest.raises(ValueError, match="convert"):
        TemporalSpikeProcessor(ann, T)
    with pytest.raises(ValueError, match="max_context_length"):
        TemporalSpikeProcessor(snn, T, max_context_length=1)
    with pytest.raises(ValueError, match="T must be|timesteps"):
        TemporalSpikeProcessor(snn, 0)
    p = TemporalSpikeProcessor(snn, T)
    with pytest.raises(ValueError, match="integer token ids"):
        p(torch.rand(1, 4))
    with pytest.raises(ValueError, match="left-padded"):
        p(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="conversation ids"):
        p(torch.ones(2, 4, dtype=torch.long), conversation_id=["a"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        p.generate(torch.ones(4, dtype=torch.long), 0)
    set_mode(snn, "sequential")
    try:
        with pytest.raises(ValueError, match="parallel"):
            SpikeKVCache(snn).update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)
    finally:
        set_mode(snn, "parallel")
