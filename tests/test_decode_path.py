"""The decoding path's shortcuts give the numbers of the plain path: the cache's buffers with room
to grow, frozen sites, counts straight from the sites, one-call attention, and the row kernel's runs
for a single token."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

import spike_modules.row_sparse as row_sparse
from calibration.int8 import Int8Linear
from spike_modules import iter_sites
from spike_modules.kv_cache import SpikeKVCache
from spike_modules.kv_layer import GrowingLayer
from spike_modules.row_sparse import row_linear
from spike_modules.layers import SpikeLinear
from spike_modules.site import DAQCFSSite, frozen, set_spike_counting
from tests.test_row_sparse import int_linear, sparse_ints
from tests.test_silence import tiny_snn  # noqa: F401  (fixture)


def _pieces(seed: int, sizes: list[int], dtype=torch.int8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-100, 100, (2, 3, n, 4), generator=g).to(dtype) for n in sizes]


def test_growing_layer_holds_what_concatenation_holds():
    grown, plain = GrowingLayer(), DynamicLayer()
    handed = []
    for k in _pieces(0, [5, 1, 1, 200, 1, 3]):
        got, ref = grown.update(k, -k), plain.update(k, -k)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        handed.append((got[0], got[0].clone()))
    grown.crop(-4)  # a crop, then appends: what was handed out before never changes
    plain.crop(-4)
    for k in _pieces(1, [1, 2]):
        got, ref = grown.update(k, -k), plain.update(k, -k)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert all(torch.equal(t, copy) for t, copy in handed)
    assert grown.get_seq_length() == plain.get_seq_length() == 210


def test_growing_layer_appends_in_place_until_full():
    layer = GrowingLayer()
    first = layer.update(*_pieces(2, [10, 10]))[0]
    second = layer.update(*_pieces(3, [1, 1]))[0]
    assert second.data_ptr() == first.data_ptr()  # the same buffer: only the new token was copied
    layer.update(*_pieces(4, [1000, 1000]))
    assert layer.keys.data_ptr() != first.data_ptr() and layer.get_seq_length() == 1011


def test_frozen_sites_keep_their_parameters_until_the_block_ends():
    site = DAQCFSSite(4, 3, signed=True, mode="parallel")
    site.set_params(theta=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.linspace(-3, 3, 8).view(2, 4)
    before = site(x)
    with frozen(site):
        site.theta.data.mul_(2)  # an edit no version counter sees
        assert torch.equal(site(x), before)
        with frozen(site):
            assert torch.equal(site(x), before)
    assert not torch.equal(site(x), before)
    assert "_frozen" not in site.__dict__


@pytest.mark.parametrize("mode", ["parallel", "quant"])
def test_site_counts_decode_to_the_forward_bit_for_bit(mode):
    site = DAQCFSSite(4, 3, signed=True, mode=mode, coding="weighted")
    site.set_params(theta=torch.tensor([1.0, 2.0, 3.0, 4.0]), burst=torch.tensor([1.0, 3.0, 1.0, 1.0]),
                    dead=torch.tensor([0.0, 2.0, 0.0, 1.5]))
    x = torch.randn(3, 5, 4) * 4
    with torch.no_grad():
        c, step = site.counts(x)
        assert torch.equal(c * step, site(x)) and torch.equal(c, c.round())
    site.mode = "ann"
    with pytest.raises(ValueError, match="parallel and quant"):
        site.counts(x)


def test_cached_decoding_takes_the_shortcuts_and_keeps_the_logits(tiny_snn):  # noqa: F811
    snn, batches = tiny_snn
    ids = batches[0][:1]
    with torch.no_grad(), frozen(snn):
        full = snn(ids).logits
        cache = SpikeKVCache(snn)
        steps = [snn(ids[:, :20], past_key_values=cache, use_cache=True).logits]
        steps += [snn(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits for i in range(20, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    assert all(not layer.keys.is_floating_point() for layer in cache.layers)  # counts, not floats


def test_one_token_split_into_runs_gives_the_whole_tables_numbers(monkeypatch):
    layer = Int8Linear.from_linear(int_linear(24, 10, True))
    for seed in range(4):
        x = sparse_ints((1, 1, 24), 0.5, seed=seed)
        if seed % 2:
            x[..., :13] = 0  # the first run has no input that fired
        with torch.no_grad():
            whole = row_linear(layer, x)
            with monkeypatch.context() as m:
                m.setattr(row_sparse, "SPLIT_BYTES", 1)
                m.setattr(torch, "get_num_threads", lambda: 2)
                runs, every = row_linear(layer, x), row_linear(layer, x, all_rows=True)
        assert torch.equal(runs, whole)  # each output is still one bag over every row, in the same order
        assert torch.equal(runs, every)


@pytest.mark.parametrize("threads,group_size", [(1, 0), (2, 0), (3, 0), (2, 8)])
def test_generation_reads_rows_as_planned_with_the_plain_paths_bits(tiny_snn, monkeypatch, threads,  # noqa: F811
                                                                    group_size):
    # within frozen, spiking layers read their rows as planned once per block (tables cut into runs of outputs,
    # padded where the outputs do not divide; per-group scales read in runs of rows); outside, every call works
    # it out: the same bits either way
    import copy

    snn, batches = tiny_snn
    snn = copy.deepcopy(snn)
    set_spike_counting(snn, False)
    if group_size:
        for m in snn.modules():
            if isinstance(m, SpikeLinear):
                float_layer = torch.nn.Linear(m.linear.in_features, m.linear.out_features, bias=False)
                float_layer.weight.data.copy_(m.linear.dequantize())
                m.linear = Int8Linear.from_linear(float_layer, group_size=group_size)
    monkeypatch.setattr(row_sparse, "SPLIT_BYTES", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    ids = batches[0][:1, :12]

    def decode():
        cache = SpikeKVCache(snn)
        snn(ids[:, :8], past_key_values=cache, use_cache=True)
        return torch.cat([snn(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits for i in range(8, 12)], 1)

    with torch.no_grad():
        plain = decode()
        with frozen(snn):
            planned = decode()
            assert all(m._shared.rows._plan is not None for m in snn.modules() if isinstance(m, SpikeLinear))
        assert torch.equal(planned, plain)
        layer = next(m for m in snn.modules() if isinstance(m, SpikeLinear)).linear
        layer.weight_int8.mul_(-1)  # edited between blocks: the next block plans again and reads the new weight
        changed = decode()
        with frozen(snn):
            assert torch.equal(decode(), changed)
        assert not torch.equal(changed, plain)


def test_every_site_of_a_model_is_frozen_within_the_block(tiny_snn):  # noqa: F811
    snn, _ = tiny_snn
    with frozen(snn):
        assert all("_frozen" in site.__dict__ for _, site in iter_sites(snn))
    assert not any("_frozen" in site.__dict__ for _, site in iter_sites(snn))


def test_counts_past_int8_are_escapes_that_decode_exactly(tiny_snn):  # noqa: F811
    import copy

    snn, batches = tiny_snn
    snn = copy.deepcopy(snn)
    for module in snn.modules():
        site = getattr(module, "k_site", None)
        if isinstance(site, DAQCFSSite):  # a fine step and room for bursts: counts past 127
            site.set_params(site.theta / 40, site.psi, site.phi, torch.full_like(site.burst, 64.0), site.dead)
    ids = batches[0][:1]
    with torch.no_grad():
        full = snn(ids).logits
        cache = SpikeKVCache(snn)
        parts = [snn(ids[:, :20], past_key_values=cache, use_cache=True).logits,
                 snn(ids[:, 20:], past_key_values=cache, use_cache=True).logits]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)
    escapes = sum(layer.escape_count() for layer in cache.layers)
    elements = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
    assert escapes > 0 and all(layer.keys.dtype == torch.int8 for layer in cache.layers)
    assert cache.stored_bytes_per_element() == pytest.approx(1 + 8 * escapes / elements)
    rebuilt = SpikeKVCache(snn, cache.layer_tensors())  # from decoded values: the same counts and escapes
    for (k0, v0), (k1, v1) in zip(cache.layer_tensors(), rebuilt.layer_tensors()):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


def test_escapes_follow_beam_reordering_and_crops():
    layer = GrowingLayer()
    c = torch.zeros(3, 1, 4, 2, dtype=torch.int8)
    layer.update(c, c)
    pos = torch.tensor([[0, 0, 1, 0], [2, 0, 3, 1]])
    step = torch.ones(1, 1, 1, 2)
    layer.add_escapes(0, (pos, torch.tensor([500, -900], dtype=torch.int32)), None, (step, step))
    layer.reorder_cache(torch.tensor([2, 2, 0]))
    got = layer.escaped("keys", layer.keys * step)
    assert got[0, 0, 3, 1] == got[1, 0, 3, 1] == -900 and got[2, 0, 1, 0] == 500 and layer.escape_count() == 3
    layer.crop(-1)  # the slot of -900 is cut: its escapes no longer count, and a new token there is plain
    assert layer.escape_count() == 1
    layer.update(c[:, :, :1], c[:, :, :1])
    layer.add_escapes(3, None, None, (step, step))
    assert float(layer.escaped("keys", layer.keys * step)[0, 0, 3, 1]) == 0.0


@pytest.mark.parametrize("v_dead", [0.0, 1.5])
def test_lean_appends_store_and_return_what_the_general_path_does(tiny_snn, monkeypatch, v_dead):  # noqa: F811
    # generation counts a token's k and v in one pass over both sites' channels and appends the counts and
    # decoded values in place (GrowingLayer.lean_append); the general path (no working copy, sites not frozen)
    # counts them site by site and decodes the whole cache at each call: the same bits, with escapes on decoded
    # tokens, a dead zone at one of the two sites, a crop and a beam reordering on the way
    import copy

    snn, batches = tiny_snn
    snn = copy.deepcopy(snn)
    set_spike_counting(snn, False)
    for module in snn.modules():
        site = getattr(module, "k_site", None)
        if isinstance(site, DAQCFSSite):  # a fine step and room for bursts: counts past 127
            site.set_params(site.theta / 40, site.psi, site.phi, torch.full_like(site.burst, 64.0), site.dead)
            v = module.v_site
            v.set_params(v.theta, v.psi, v.phi, v.burst, torch.full_like(v.dead, v_dead))
    ids = batches[0][:2, :20]
    seen = {"lean": 0, "escapes": 0}
    append = GrowingLayer.lean_append

    def counted(self, counts, slots, escapes, steps):
        got = append(self, counts, slots, escapes, steps)
        seen["lean"] += got is not None
        seen["escapes"] += got is not None and escapes[0] is not None
        return got

    monkeypatch.setattr(GrowingLayer, "lean_append", counted)

    def run(cache):
        logits = [snn(ids[:, :8], past_key_values=cache, use_cache=True).logits]
        for i in range(8, 20):
            if i == 14:
                cache.crop(-2)  # back to 12 tokens
            if i == 17:
                cache.reorder_cache(torch.tensor([1, 0]))
            logits.append(snn(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits)
        slots = [(layer.keys, layer.values, layer.escape_count()) for layer in cache.layers]
        return logits, cache.layer_tensors(), slots

    with torch.no_grad():
        plain = run(SpikeKVCache(snn, float_copy=False))
        assert seen["lean"] == 0
        with frozen(snn):
            lean = run(SpikeKVCache(snn))
    layers = len(lean[2])
    assert seen["lean"] >= 9 * layers and seen["escapes"] > 0  # the crop and the reordering each cost one whole decode
    assert all(torch.equal(a, b) for a, b in zip(plain[0], lean[0]))
    for (k0, v0), (k1, v1) in zip(plain[1], lean[1]):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    for (k0, v0, e0), (k1, v1, e1) in zip(plain[2], lean[2]):
        assert k1.dtype == torch.int8 and torch.equal(k0, k1) and torch.equal(v0, v1) and e0 == e1


def test_a_working_copy_is_dropped_by_batch_operations_and_rebuilt_whole():
    layer = GrowingLayer()
    c = torch.arange(24, dtype=torch.int8).view(2, 1, 3, 4)
    step = torch.full((1, 1, 1, 4), 0.5)
    layer.update(c, -c)
    first = layer.decoded_copy(0, (step, step), torch.float32)
    assert torch.equal(first[0], c * step) and torch.equal(first[1], -c * step)
    layer.batch_select_indices(torch.tensor([1]))
    assert "_copy" not in layer.__dict__
    layer.update(c[:1, :, :1], c[:1, :, :1])
    keys, values = layer.decoded_copy(3, (step, step), torch.float32)
    assert torch.equal(keys, layer.keys * step) and torch.equal(values, layer.values * step)
    assert torch.equal(first[0], c * step)  # handed out earlier: unchanged
