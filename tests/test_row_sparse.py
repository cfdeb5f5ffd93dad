"""Row-reading linear layers (spike_modules.row_sparse): the dense layer's numbers from the weight rows of
the inputs that fired, in SpikeLinear's parallel mode, through generate(), and bench/decode.py end to end."""

import json

import pytest
import torch
from torch import nn
from tiny_models import save_tiny
from transformers.pytorch_utils import Conv1D

import spike_modules.row_sparse as row_sparse
from calibration.int8 import Int8Linear, quantize_weights_
from spike_modules.layers import SpikeLinear, set_row_sparse
from spike_modules.row_sparse import RowReadLinear, drop_row_tables, read_by_rows_, row_linear, row_readable
from spike_modules.site import set_spike_counting
from tests.test_attention import calibrated
from tests.test_converter import data

pytestmark = pytest.mark.usefixtures("one_thread")


def int_linear(i, o, bias, seed=0):
    """An nn.Linear with small whole-number weights and bias: float sums of whole numbers are exact."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(i, o, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-8, 9, (o, i), generator=g).float())
        if bias:
            layer.bias.copy_(torch.randint(-8, 9, (o,), generator=g).float())
    return layer


def int_conv1d(i, o, bias):
    lin = int_linear(i, o, bias)
    conv = Conv1D(o, i)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.t())
        conv.bias.copy_(lin.bias if bias else torch.zeros(o))
    return conv


def sparse_ints(shape, rate, seed=1):
    """Whole numbers in -3..3, nonzero with probability ``rate``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, shape, generator=g).float() * (torch.rand(shape, generator=g) < rate)


LAYERS = {"linear": lambda b: int_linear(24, 10, b), "conv1d": lambda b: int_conv1d(24, 10, b),
          "int8": lambda b: Int8Linear.from_linear(int_linear(24, 10, b)),
          "int8_groups": lambda b: Int8Linear.from_linear(nn.Linear(24, 10, bias=b), group_size=8),
          "int8_ragged_groups": lambda b: Int8Linear.from_linear(nn.Linear(24, 10, bias=b), group_size=10)}


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("rate", [0.0, 0.2, 1.0])
def test_row_linear_equals_the_dense_layer(kind, bias, tokens, rate, monkeypatch):
    monkeypatch.setattr(row_sparse, "FLOAT_MAX_SHARE", 1.0)  # float layers take the row kernel at any density
    layer = LAYERS[kind](bias)
    x = sparse_ints((1, tokens, 24), rate)
    with torch.no_grad():
        got, dense, every = row_linear(layer, x), layer(x), row_linear(layer, x, all_rows=True)
    assert got.shape == dense.shape == (1, tokens, 10)
    if "groups" in kind:  # per-group scales: float products, summed in another order
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    else:  # whole numbers (times one float scale per row for int8): exact
        torch.testing.assert_close(got, dense, rtol=1e-6, atol=0)
    assert torch.equal(every, got)  # leaving out the zeros changes no bit


def test_an_int8_table_over_the_split_size_is_read_in_runs_and_gives_the_same_numbers(monkeypatch):
    layer = Int8Linear.from_linear(int_linear(24, 10, True))
    x = sparse_ints((1, 2, 24), 0.5)
    with torch.no_grad():
        whole = row_linear(layer, x)
        monkeypatch.setattr(row_sparse, "SPLIT_BYTES", 1)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        assert torch.equal(row_linear(layer, x), whole)  # runs of outputs: the same sums in the same order


def test_dense_float_inputs_and_unreadable_layers_run_the_dense_product():
    layer = int_linear(24, 10, True)
    x = sparse_ints((1, 1, 24), 1.0)
    with torch.no_grad():
        assert torch.equal(row_linear(layer, x), layer(x))  # over FLOAT_MAX_SHARE: dense, no table kept
    assert "_row_table" not in layer.__dict__
    assert not row_readable(nn.Conv2d(2, 2, 1))
    many = sparse_ints((1, row_sparse.MAX_ROW_TOKENS + 1, 24), 0.1)
    with torch.no_grad():
        assert torch.equal(row_linear(layer, many), layer(many))  # a prefill: dense


def test_the_table_follows_the_weight_and_stays_out_of_the_state_dict():
    layer = Int8Linear.from_linear(int_linear(24, 10, False))
    x = sparse_ints((1, 1, 24), 0.5)
    with torch.no_grad():
        row_linear(layer, x)
        assert set(layer.state_dict()) == {"weight_int8", "scale"}
        layer.weight_int8.mul_(-1)  # an in-place change moves the version counter: the table is rebuilt
        torch.testing.assert_close(row_linear(layer, x), layer(x), rtol=1e-6, atol=0)
        layer.load_state_dict(Int8Linear.from_linear(int_linear(24, 10, False, seed=3)).state_dict())
        torch.testing.assert_close(row_linear(layer, x), layer(x), rtol=1e-6, atol=0)
    assert drop_row_tables(layer) == 1 and "_row_table" not in layer.__dict__


def test_gradients_take_the_dense_product():
    layer = int_linear(24, 10, True)
    x = sparse_ints((1, 1, 24), 0.1).requires_grad_()
    row_linear(layer, x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_row_read_wrapper_is_the_int8_layer():
    model = nn.Sequential(Int8Linear.from_linear(int_linear(24, 10, True)), nn.ReLU(),
                          Int8Linear.from_linear(int_linear(10, 4, True)))
    x = sparse_ints((2, 24), 1.0)
    with torch.no_grad():
        ref = model(x)
        assert read_by_rows_(model, Int8Linear) == 2 and isinstance(model[0], RowReadLinear)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def snn(request):
    model = calibrated(request.param, 4)
    if request.param == "llama":
        quantize_weights_(model, "own", progress=False)
    set_spike_counting(model, False)
    return model


def test_spike_linear_row_sparse_gives_the_dense_logits_and_tokens(snn, monkeypatch):
    monkeypatch.setattr(row_sparse, "FLOAT_MAX_SHARE", 1.0)  # so GPT-2's float Conv1D layers take rows too
    x = data(n=1, seq=10, seed=3)
    assert all(m.row_sparse for m in snn.modules() if isinstance(m, SpikeLinear))
    calls = []
    monkeypatch.setattr(row_sparse, "row_table", lambda m, w=None, parts=1, f=row_sparse.row_table: calls.append(m) or f(m, w, parts))
    with torch.no_grad():
        pre = snn(x[:, :-1], use_cache=True)
        rows = snn(x[:, -1:], past_key_values=pre.past_key_values, use_cache=True).logits
        assert calls  # the row kernel ran
        set_row_sparse(snn, False)
        pre = snn(x[:, :-1], use_cache=True)
        dense = snn(x[:, -1:], past_key_values=pre.past_key_values, use_cache=True).logits
        kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        dense_tokens = snn.generate(x, **kw)
        set_row_sparse(snn, True)
        row_tokens = snn.generate(x, **kw)
    torch.testing.assert_close(rows, dense, rtol=1e-4, atol=1e-4)
    assert torch.equal(row_tokens, dense_tokens)


def test_spike_statistics_are_recorded_as_with_the_dense_product(snn):
    x = data(n=1, seq=6, seed=4)
    set_spike_counting(snn, True)
    try:
        seen = {}
        for on in (True, False):
            set_row_sparse(snn, on)
            sites = [m.site for m in snn.modules() if isinstance(m, SpikeLinear) and hasattr(m, "site")]
            for s in sites:
                s.reset_stats()
            with torch.no_grad():
                pre = snn(x[:, :-1], use_cache=True)
                snn(x[:, -1:], past_key_values=pre.past_key_values, use_cache=True)
            seen[on] = [s.spike_rate for s in sites]
    finally:
        set_row_sparse(snn, True)
        set_spike_counting(snn, False)
    assert seen[True] == seen[False]


def test_bench_decode_runs_end_to_end(tmp_path):
    from bench import decode
    from stac_lm.convert.options import ConvertOptions
    from stac_lm.convert.pipeline import run

    base = tmp_path / "m"
    run(ConvertOptions(model_name=str(save_tiny(base / "model", "llama")), output_dir=str(base / "snn"),
                       calib_tokens=256, eval_tokens=512, verify=False, timesteps=4), progress=False)
    out = tmp_path / "decode.json"
    result = decode.main(["--model_dir", str(base / "snn"), "--out", str(out), "--prompt_tokens", "12",
                          "--new_tokens", "4", "--repeats", "1", "--no_torchao"])
    saved = json.loads(out.read_text())
    assert saved["new_tokens"] == 4 and set(saved["results"]) == {"snn_row_sparse", "snn_dense", "snn_slots_only",
                                                                   "ann_fp32", "ann_fp32_static", "ann_int8_own"}
    assert saved["snn_over_ann_fp32_static"] > 0
    assert saved["float_copy_gain"] > 0 and saved["decode_only"]["float_copy_gain"] > 0
    assert result["snn_over_ann_fp32"] > 0 and 0 <= saved["row_sparse_tokens_equal_dense_share"] <= 1


def test_an_int8_layer_looks_for_zeros_only_where_skipping_them_pays(monkeypatch):
    monkeypatch.setattr(row_sparse, "FIND_COST_BYTES", 100)
    layer = Int8Linear.from_linear(int_linear(24, 10, True))
    with torch.no_grad():
        row_linear(layer, sparse_ints((1, 1, 24), 1.0))  # nothing to skip: reads every row from now on
        assert layer.__dict__["_row_skip"] is False
        sparse = sparse_ints((1, 1, 24), 0.1)
        torch.testing.assert_close(row_linear(layer, sparse), layer(sparse), rtol=1e-6, atol=0)
        for _ in range(row_sparse.RECHECK_CALLS):  # a periodic look sees the sparser input
            row_linear(layer, sparse)
        assert layer.__dict__["_row_skip"] is True
