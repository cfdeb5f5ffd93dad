"""Layers that read one input, read by rows in one kernel call (spike_modules.row_groups): each
member's numbers, the kept products, when a group is not joined, and the int8 ANN of bench/decode.py."""

import pytest
import torch
from torch import nn

import spike_modules.row_groups as row_groups
from calibration.int8 import Int8Linear, quantize_weights_
from spike_modules.layers import SpikeLinear
from spike_modules.row_groups import RowGroup, group_readers_
from spike_modules.row_sparse import RowReadLinear, drop_row_tables, read_by_rows_, row_linear
from spike_modules.site import set_spike_counting
from tests.test_attention import calibrated
from tests.test_converter import data
from tests.test_row_sparse import int_linear, sparse_ints

pytestmark = pytest.mark.usefixtures("one_thread")  # one thread: no table is split, so every bit is the member's own


class Reader(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear


def group_of(*outs, width=24, bias=False):
    group = RowGroup()
    group.members = [Reader(Int8Linear.from_linear(int_linear(width, o, bias, seed=i))) for i, o in enumerate(outs)]
    return group


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("rate", [0.2, 1.0])
def test_each_member_gets_its_own_row_read_product(bias, tokens, rate):
    group = group_of(16, 6, 6, bias=bias)
    x = sparse_ints((1, tokens, 24), rate)
    with torch.no_grad():
        alone = [row_linear(m.linear, x) for m in group.members]
        got = [group.product(m, x) for m in group.members]
    assert row_groups._TABLE in group.members[0].__dict__  # joined: one table, on the first member
    for a, g, m in zip(alone, got, group.members):
        assert g.shape == a.shape == (1, tokens, m.linear.scale.shape[0])
        assert torch.equal(g, a)


def test_products_are_kept_for_the_same_tensor_only():
    group = group_of(8, 4)
    first, second = group.members
    x, other = sparse_ints((1, 1, 24), 0.5, seed=1), sparse_ints((1, 1, 24), 0.5, seed=2)
    calls = []
    with torch.no_grad():
        inner = row_groups._joined_products
        row_groups._joined_products = lambda *a: calls.append(1) or inner(*a)
        try:
            group.product(first, x)
            y = group.product(second, x)            # kept from the first call
            assert len(calls) == 1 and torch.equal(y, row_linear(second.linear, x))
            y = group.product(second, other)        # another tensor: computed again
            assert len(calls) == 2 and torch.equal(y, row_linear(second.linear, other))
            x.mul_(2)                               # an in-place change: not the tensor the products were for
            group.product(first, x)
            assert len(calls) == 3
        finally:
            row_groups._joined_products = inner
    assert group._x is x and set(group._outs) == {id(second)}


def test_wide_groups_and_float_members_are_read_one_by_one():
    wide = group_of(600, 600, width=24)  # 1,200 outputs joined: past JOIN_MAX_OUT
    floats = RowGroup()
    floats.members = [Reader(int_linear(24, 8, False)), Reader(Int8Linear.from_linear(int_linear(24, 8, False)))]
    x = sparse_ints((1, 1, 24), 0.5)
    with torch.no_grad():
        for group in (wide, floats):
            for m in group.members:
                torch.testing.assert_close(group.product(m, x), m.linear(x), rtol=1e-5, atol=1e-4)
            assert row_groups._TABLE not in group.members[0].__dict__


def test_the_joined_table_follows_the_members_weights():
    group = group_of(8, 4)
    first, second = group.members
    with torch.no_grad():
        group.product(first, sparse_ints((1, 1, 24), 1.0, seed=1))
        q = second.linear.weight_int8
        q.copy_(-q)  # in place: its version moves, so the joined table is rebuilt
        x = sparse_ints((1, 1, 24), 1.0, seed=2)
        group.product(first, x)
        assert torch.equal(group.product(second, x), row_linear(second.linear, x))
    assert drop_row_tables(nn.ModuleList(group.members)) == 2  # the joined table (first member), second's own
    assert row_groups._TABLE not in first.__dict__


@pytest.fixture(scope="module")
def snn():
    model = calibrated("llama", 4)
    quantize_weights_(model, "own", progress=False)
    set_spike_counting(model, False)
    return model


def test_the_snn_reads_q_k_v_in_one_call_and_decodes_the_same_tokens(snn, monkeypatch):
    shared = {id(m._shared): m._shared for m in snn.modules() if isinstance(m, SpikeLinear)}.values()
    assert sorted(len(s.rows.members) for s in shared if len(s.rows.members) > 1) == [2, 2, 3, 3]  # 2 layers
    x = data(n=1, seq=10, seed=3)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    joined = []
    inner = row_groups._joined_products
    monkeypatch.setattr(row_groups, "_joined_products", lambda *a: (lambda r: joined.append(r is not None) or r)(inner(*a)))
    with torch.no_grad():
        together = snn.generate(x, **kw)
        assert any(joined)  # q/k/v were joined while decoding
        monkeypatch.setattr(row_groups, "_joined_products", lambda *a: None)  # every layer alone
        alone = snn.generate(x, **kw)
    assert torch.equal(together, alone)


def test_group_readers_joins_the_int8_ann_as_the_snn_is():
    from tests.test_converter import tiny_llama

    model = tiny_llama()
    quantize_weights_(model, "own", progress=False)
    read_by_rows_(model, Int8Linear)
    x = data(n=1, seq=8, seed=5)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        alone = model.generate(x, **kw)
        groups = group_readers_(model, x)
        together = model.generate(x, **kw)
    readers = [m for m in model.modules() if isinstance(m, RowReadLinear)]
    sizes = sorted({id(m.rows): len(m.rows.members) for m in readers if "rows" in m.__dict__}.values())
    assert groups == len(sizes) and sizes.count(3) >= 1 and sizes.count(2) >= 1  # q/k/v and gate/up per layer
    assert torch.equal(together, alone)
