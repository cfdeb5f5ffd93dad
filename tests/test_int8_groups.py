"""Int8 weights with a scale per group of input columns, GPTQ rounding, and what they cost.

Groups: each group of ``G`` columns of a row has its own absmax scale, so a weight is rounded by at
most half its group's step (never worse than per row). GPTQ keeps the stored format and lowers the
layer's output error on inputs like those it was fitted on; on inputs whose channels are
correlated (as in a transformer) the gain is large, which is what the test checks.
"""

import pytest
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from calibration.gptq import gptq_int8, input_hessians
from calibration.int8 import Int8Linear, expand_scale, find_linears, prepare_int8_, quantize_rows, quantize_weights_
from smollm2_converter import ConversionConfig, convert
from spike_modules.energy import count_ops
from tests.test_int8 import ids, logits, rel, tiny_gpt2, tiny_llama


def decoded(q, scale, group):
    return q.float() * expand_scale(scale, q.shape[1], group)


@pytest.mark.parametrize("width,group", [(64, 16), (70, 16), (64, 64), (64, 0)])
def test_groups_round_within_half_their_own_step(width, group):
    torch.manual_seed(0)
    w = torch.randn(8, width)
    w[:, 3] *= 50  # an outlier column: per row it coarsens every weight of the row
    q, scale = quantize_rows(w, group)
    groups = -(-width // group) if 0 < group < width else 0
    assert scale.shape == ((8, groups) if groups else (8,))
    err = (w - decoded(q, scale, group)).abs()
    assert bool((err <= expand_scale(scale, width, group) / 2 + 1e-6).all())
    q_row, s_row = quantize_rows(w, 0)
    assert float(err.norm()) <= float((w - decoded(q_row, s_row, 0)).norm()) + 1e-6
    if groups > 1:  # the outlier's group keeps the coarse step, the others get a finer one
        assert float(err.norm()) < 0.5 * float((w - decoded(q_row, s_row, 0)).norm())


@pytest.mark.parametrize("bad", [-1, 2.5, True, "32"])
def test_a_bad_group_size_is_refused(bad):
    with pytest.raises(ValueError, match="group size"):
        quantize_rows(torch.randn(4, 8), bad)


def test_grouped_layer_computes_with_its_decoded_weight_and_saves_round_trip(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(40, 12)
    layer = Int8Linear.from_linear(lin, group_size=16)
    assert layer.scale.shape == (12, 3) and layer.group_size == 16
    x = torch.randn(5, 40)
    assert torch.allclose(layer(x), x @ layer.dequantize().T + lin.bias, atol=1e-5)
    save_model(layer, str(tmp_path / "w.safetensors"))
    shell = Int8Linear.shell_like(lin, group_size=16)
    load_model(shell, str(tmp_path / "w.safetensors"))
    assert torch.equal(shell(x), layer(x))
    with pytest.raises(RuntimeError):  # a per-row shell cannot take grouped scales
        load_model(Int8Linear.shell_like(lin), str(tmp_path / "w.safetensors"))


def test_gptq_lowers_the_output_error_on_correlated_inputs_and_keeps_the_format():
    torch.manual_seed(0)
    x = torch.randn(2048, 16) @ torch.randn(16, 96) + 0.05 * torch.randn(2048, 96)
    w = torch.randn(32, 96) * 0.1
    H = x.T.double() @ x.double()
    for group in (0, 32):
        q0, s0 = quantize_rows(w, group)
        q1, s1 = gptq_int8(w, H, group)
        assert q1.dtype == torch.int8 and s1.shape == s0.shape
        e0 = float((x @ w.T - x @ decoded(q0, s0, group).T).norm())
        e1 = float((x @ w.T - x @ decoded(q1, s1, group).T).norm())
        assert e1 < 0.5 * e0, (group, e0, e1)


def test_gptq_refuses_a_hessian_of_the_wrong_width():
    with pytest.raises(ValueError, match="Hessian"):
        gptq_int8(torch.randn(4, 8), torch.eye(6))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hessians_are_shared_by_layers_reading_one_input_and_cover_every_layer(arch):
    model = convert((tiny_llama if arch == "llama" else tiny_gpt2)(), ConversionConfig(T=8))
    layers = find_linears(model)
    H = input_hessians(model, layers, [ids(1), ids(2)])
    assert set(H) == set(layers)
    if arch == "llama":
        q, k = H["model.layers.0.self_attn.q_proj.linear"], H["model.layers.0.self_attn.k_proj.linear"]
        assert q[0] is k[0] and q[1] == 2 * 3 * 20
        assert H["model.layers.0.mlp.down_proj.linear"][0].shape == (128, 128)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gptq_groups_on_a_converted_model_save_and_reload_identical_logits(tmp_path, arch):
    model = convert((tiny_llama if arch == "llama" else tiny_gpt2)(), ConversionConfig(T=8))
    float_logits = logits(model, ids())
    H = input_hessians(model, find_linears(model), [ids(1), ids(2)])
    summary = quantize_weights_(model, "own", progress=False, group_size=32, hessians=H)
    assert summary["group_size"] == 32 and summary["settings"]["rounding"].startswith("GPTQ")
    out = logits(model, ids())
    assert 1e-4 < rel(out, float_logits) < 0.02
    save_model(model, str(tmp_path / "m.safetensors"))
    fresh = convert((tiny_llama if arch == "llama" else tiny_gpt2)(seed=5), ConversionConfig(T=8))
    prepare_int8_(fresh, summary["paths"], "own", group_size=32)
    load_model(fresh, str(tmp_path / "m.safetensors"))
    assert torch.equal(logits(fresh, ids()), out)


def test_library_backends_refuse_groups_and_gptq():
    with pytest.raises(ValueError, match="own"):
        quantize_weights_(tiny_llama(), "torchao", progress=False, group_size=32)
    with pytest.raises(ValueError, match="own"):
        quantize_weights_(tiny_llama(), "bnb", progress=False, hessians={})


def test_energy_counts_one_rescale_per_output_and_group_per_token():
    model = convert(tiny_llama(), ConversionConfig(T=8))
    summary = quantize_weights_(model, "own", progress=False, group_size=32)
    x = ids()
    counts = count_ops(model, x)
    expected = 0
    for path in summary["paths"]:
        layer = model.get_submodule(path)
        expected += x.numel() * layer.out_features * -(-layer.in_features // 32)
    assert counts.rescale_macs == expected > 0
    assert counts.per_module[summary["paths"][0]]["rescale_macs"] > 0
    # the ANN has no scales to apply, and the consistency of the MAC equivalents is untouched
    assert count_ops(tiny_llama(), x).rescale_macs == 0
    assert counts.total_macs_equivalent == count_ops(tiny_llama(), x).total_macs_equivalent


def test_gptq_is_the_default_rounding_where_the_whole_model_is_in_memory():
    from stac_lm.convert.options import ConvertOptions

    whole = ConvertOptions()
    assert (whole.int8_rounding, whole.timesteps, whole.silence_budget) == ("gptq", 8, 0.012)
    for layerwise in (ConvertOptions(layerwise=True), ConvertOptions(max_memory="cpu=6GiB")):
        assert (layerwise.int8_rounding, layerwise.timesteps, layerwise.silence_budget) == ("nearest", 8, 0.012)
    asked = ConvertOptions(int8_rounding="nearest", timesteps=7)
    assert asked.silence_budget == 0.018  # rounded to nearest at T=7: that T's own measured budget
    assert ConvertOptions(layerwise=True, int8_rounding="gptq").silence_budget == 0.012
    assert ConvertOptions(timesteps=7).silence_budget == 0.02  # GPTQ at T=7: that T's own measured budget
    assert ConvertOptions(coding="rate").timesteps == 16
    assert ConvertOptions(timesteps=8).max_burst == ConvertOptions().max_burst  # resolved after T
    assert ConvertOptions(quant_backend="bnb").int8_rounding == "nearest"  # GPTQ is built by the own backend
    assert ConvertOptions(simplified=True).int8_rounding == "nearest"
    saved = ConvertOptions().to_dict()
    assert ConvertOptions.from_dict(saved).int8_rounding == "gptq"  # a saved conversion reads back as it ran
