"""Total energy per token (spike_modules.energy_total): every term worked out by hand on a tiny profile,
with a table of round prices, so a changed price or a dropped term fails."""

from __future__ import annotations

import json

import pytest
import torch

from spike_modules.energy_table import DEFAULT_TABLE, EnergyTable
from dataclasses import replace

from spike_modules.energy_total import (AttentionUse, LinearUse, TokenProfile, crossing_context, energy_total, price,
                                        scenario_table, token_actions)

OPS = {"add_int8": 0.03, "add_int32": 0.1, "add_int64": 0.2, "add_fp16": 0.4, "add_fp32": 0.9, "mult_int8": 0.2,
       "mult_fp16": 1.1, "mult_fp32": 3.7, "shift_int32": 0.1, "shift_int64": 0.2}
TABLE = EnergyTable("round", "test", OPS, {"dram": 100.0, "sram_small": 1.0, "sram_large": 10.0}, {})


def profile(folded=False, weighted=True, prefill=512, accumulator_bits=32):
    lin = LinearUse("l", 4, 3, weight_bytes=1.0, scale_bytes=4, active_rows=2.0, spikes=3.0, folded=folded,
                    weighted=weighted, accumulator_bits=accumulator_bits)
    att = AttentionUse(layers=1, heads=2, kv_heads=1, head_dim=2, context=5.0, snn_kv_bytes=1.0, q_active=0.5,
                       v_active=0.25)
    return TokenProfile((lin,), att, hidden=4, embedding_bytes=1.0, embedding_scale_bytes=4, site_elements=10.0,
                        neuron_steps=70.0, spikes=6.0, prefill_tokens=prefill)


def total(model, scenario="decode_dram", **kw):
    return price(token_actions(profile(**kw), model, scenario), TABLE)


def test_snn_decode_by_hand():
    p = total("snn")
    # linear: 2 fired rows x 3 outputs, each a MAC of the int8 weight with the float value (4.6), and a rescale
    # per output (4.6); attention: 20 pairs per matmul, q half fired, v a quarter (4.6 each); 10 site encodings
    assert p["arithmetic"] == pytest.approx(6 * 4.6 + 3 * 4.6 + 10 * 4.6 + 5 * 4.6 + 10 * 4.6)
    # weights: 2 rows x 3 bytes + 3 scales x 4 bytes, and the embedding row (4 bytes + its scale), DRAM 100/B
    assert p["weights"] == pytest.approx((2 * 3 + 12 + 4 + 4) * 100)
    # KV: 4 elements per token (k and v of one 2-dim head), 1 byte, read for 5 keys and written once
    assert p["kv_cache"] == pytest.approx(4 * 1 * 6 * 100)
    # on chip: 3 outputs x 4 bytes, membranes 8 B per neuron-step, spike events 8 B each (1 pJ/B)
    assert p["on_chip"] == pytest.approx(12 + 8 * 70 + 8 * 6)
    assert p["total"] == pytest.approx(156.4 + 2600 + 2400 + 620)


def test_folded_spikes_are_adds_and_shifts():
    """Where steps fold into the weights a weighted spike is an int32 add and a shift per output; dropping
    the shift changes the total."""
    with_shift = total("snn", folded=True)["arithmetic"]
    without = total("snn", folded=True, weighted=False)["arithmetic"]
    assert with_shift - without == pytest.approx(3 * 3 * 0.1)
    assert without == pytest.approx(3 * 3 * 0.1 + 3 * 4.6 + 15 * 4.6 + 10 * 4.6)


def test_folded_spikes_into_a_wide_accumulator_cost_64_bit_adds_and_shifts():
    narrow = total("snn", folded=True)["arithmetic"]
    wide = total("snn", folded=True, accumulator_bits=33)["arithmetic"]
    assert wide - narrow == pytest.approx(3 * 3 * (0.2 - 0.1) * 2)  # 9 adds and 9 shifts, each 0.1 pJ dearer


def test_accumulator_width_of_power_of_two_sites():
    from spike_modules.energy_profile import accumulator_bits
    from spike_modules.site import DAQCFSSite

    site = DAQCFSSite(3, 7, signed=True, coding="weighted")  # 127 levels: 7 bits
    site.set_params(theta=torch.tensor([4.0, 1.0, 0.5]), burst=torch.tensor([1.0, 2.0, 1.0]))
    # 8 (int8 weight) + 8 (counts up to 254) + 3 (shifts 4 / 0.5) + 10 (1024 inputs) + 1 (sign)
    assert accumulator_bits(site, 1.0, 1024) == 30


def test_int8_ann_by_hand():
    p = total("ann_int8")
    # W8A8: 12 int8 MACs (0.2 + 0.1), 3 rescales (4.6), 4 input quantisations (3.7); attention 40 bf16 MACs (2.0)
    assert p["arithmetic"] == pytest.approx(12 * 0.3 + 3 * 4.6 + 4 * 3.7 + 40 * 2.0)
    assert p["weights"] == pytest.approx((12 + 12 + 4 + 4) * 100)
    # int8 KV with an fp16 scale per token and head: 1 + 2/2 bytes per element
    assert p["kv_cache"] == pytest.approx(4 * 2 * 6 * 100)
    assert p["on_chip"] == pytest.approx(4 * 1 + 3 * 2)


def test_float_anns_by_hand():
    fp32, bf16 = total("ann_fp32"), total("ann_bf16")
    assert fp32["total"] == pytest.approx(12 * 4.6 + 40 * 4.6 + (48 + 16) * 100 + 4 * 4 * 6 * 100 + 7 * 4)
    assert bf16["total"] == pytest.approx(12 * 2.0 + 40 * 2.0 + (24 + 8) * 100 + 4 * 2 * 6 * 100 + 7 * 2)


def test_prefill_reuses_weights_and_reads_every_row():
    p = total("snn", scenario="prefill_dram", prefill=2)
    # every row read (3 x 4 bytes + scales) over 2 tokens; the embedding row is not shared
    assert p["weights"] == pytest.approx(((4 * 3 + 12) / 2 + 8) * 100)
    # KV written once to DRAM, the 5 keys read on chip (large SRAM, 10/B)
    assert p["kv_cache"] == pytest.approx(4 * 100 + 4 * 5 * 10)


def test_sram_scenario_prices_weights_and_cache_on_chip():
    p = total("snn", scenario="decode_sram")
    assert p["weights"] == pytest.approx(26 * 10) and p["kv_cache"] == pytest.approx(24 * 10)


def test_ratios_and_report_keys():
    t = energy_total(profile(), TABLE)
    assert t["scenario"] == "decode_dram" and "DRAM" in t["convention"]
    assert t["snn_over_ann_int8"] == pytest.approx(5776.4 / (112.2 + 3200 + 4800 + 10))
    assert t["snn_over_ann_fp32"] == pytest.approx(5776.4 / 16267.2)
    assert set(scenario_table(profile(), TABLE)) == {"decode_dram", "prefill_dram", "decode_sram"}


def test_crossing_context_by_hand():
    """The context where the SNN's decode energy meets a baseline's, from the slopes per context token."""
    # as test_snn_decode_by_hand: the SNN cheaper at context 5 (5776.4 against the int8 ANN's 8122.2), its
    # slope 4 elements x 1 byte x 100 + 20 / 5 pairs x 0.75 fired x 4.6 = 413.8 against 4 x (1 + 2 / 2) x 100 +
    # 8 bf16 MACs x 2.0 = 816: cheaper at every longer context, no crossing
    got = crossing_context(profile(), TABLE, "ann_int8")
    assert got["context"] is None and got["snn_cheaper_beyond"]
    assert got["snn_pj_per_context_token"] == pytest.approx(413.8)
    assert got["baseline_pj_per_context_token"] == pytest.approx(816.0)
    # one fired row (weights 2300, arithmetic 13.8 less), q and v dense, 1.95 bytes per cached element:
    # 3177.6 + 2400 x 1.95 = 7857.6 at context 5, slope 780 + 36.8 = 816.8: the int8 ANN's 816 catches up
    # by 0.8 per key over the 264.6 between them, at 5 + 330.75 keys
    p = profile()
    p = replace(p, linears=(replace(p.linears[0], active_rows=1.0),),
                attention=replace(p.attention, snn_kv_bytes=1.95, q_active=None, v_active=None))
    got = crossing_context(p, TABLE, "ann_int8")
    assert got["context"] == pytest.approx(335.75) and not got["snn_cheaper_beyond"]
    at = replace(p, attention=replace(p.attention, context=got["context"]))
    assert price(token_actions(at, "snn"), TABLE)["total"] == pytest.approx(
        price(token_actions(at, "ann_int8"), TABLE)["total"])
    # dearer at context 5 and steeper (3 bytes per element): no crossing, and never cheaper
    got = crossing_context(replace(p, attention=replace(p.attention, snn_kv_bytes=3.0)), TABLE, "ann_int8")
    assert got["context"] is None and not got["snn_cheaper_beyond"]
    assert set(energy_total(profile(), TABLE)["crossing_context"]) == {"ann_fp32", "ann_bf16", "ann_int8"}


def test_default_table_loads_and_bad_tables_are_refused(tmp_path):
    t = EnergyTable.load()
    assert t.price("mac_fp32") == pytest.approx(4.6) and t.price("mac_int8") == pytest.approx(0.3)
    d = json.loads(DEFAULT_TABLE.read_text())
    d["ops_pj"].pop("shift_int32")
    (tmp_path / "t.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="missing"):
        EnergyTable.load(tmp_path / "t.json")
    d = json.loads(DEFAULT_TABLE.read_text())
    d["memory_pj_per_byte"]["dram"] = -1
    (tmp_path / "t.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=">= 0"):
        EnergyTable.load(tmp_path / "t.json")
    with pytest.raises(ValueError, match="no price"):
        t.price("mac_fp8")


def test_profile_of_a_converted_tiny_model():
    """Measured from a counted pass: rows fired never exceed the layer's inputs, silence leaves rows unread,
    and an int8 KV cache is what a prefill stores where counts fit."""
    from tiny_models import VOCAB, tiny_model

    from calibration import CalibrationConfig, calibrate
    from calibration.int8 import quantize_weights_
    from smollm2_converter import ConversionConfig, convert
    from spike_modules import set_mode
    from spike_modules.energy import counting
    from spike_modules.energy_profile import silence_by_group, token_profile
    from spike_modules.kv_cache import SpikeKVCache

    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    snn = convert(tiny_model("llama", VOCAB), ConversionConfig(T=5, coding="weighted", spike_head=True))
    quantize_weights_(snn, "own", progress=False, head=True)
    calibrate(snn, [ids], CalibrationConfig(T=5, coding="weighted", rule="percentile", percentile=99.0,
                                            max_burst=8, fit_affine=False), progress=False).apply_to(snn)
    set_mode(snn, "parallel")
    with counting(snn) as c, torch.no_grad():
        snn(ids)
    cache = SpikeKVCache(snn)
    with torch.no_grad():
        snn(ids, past_key_values=cache, use_cache=True)
    prof = token_profile(snn, c, context=11.5, prefill_tokens=24, kv_bytes=cache.stored_bytes_per_element())
    spiking = [lin for lin in prof.linears if lin.active_rows is not None]
    assert spiking and all(0 < lin.active_rows <= lin.in_features for lin in spiking)
    assert all(lin.weight_bytes == 1.0 and lin.scale_bytes == 4 for lin in prof.linears)
    assert prof.embedding_bytes == 1.0 and prof.attention.snn_kv_bytes in (1.0, 2.0, 4.0)
    groups = silence_by_group(snn)
    assert groups and all(0 <= g["silent_share"] < 1 for g in groups.values())
