"""Event-driven accumulation (``run_sequential(..., sparse=True)``): the same numbers as dense."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from calibration.int8 import Int8Linear, quantize_weights_
from smollm2_converter import ConversionConfig, run_sequential, sequential_mode
from spike_modules.layers import SpikeLinear
from spike_modules.layers import unsupported_layers
from spike_modules.sparse import event_linear, sparse_supported
from tests.test_attention import calibrated, padded
from tests.test_converter import MODELS, data


def spike_like(shape, rate, seed=0):
    """theta * s with s in {-2..2}, nonzero with probability ``rate``: what a burst site emits."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(shape[-1], generator=g) + 0.1
    counts = torch.randint(-2, 3, shape, generator=g).float()
    fired = torch.rand(shape, generator=g) < rate
    return counts * fired * theta


def conv1d(i, o):
    layer = Conv1D(o, i)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("make", [lambda: nn.Linear(12, 7), lambda: nn.Linear(12, 7, bias=False), lambda: conv1d(12, 7),
                                  lambda: Int8Linear.from_linear(nn.Linear(12, 7))],
                         ids=["linear", "linear-nobias", "conv1d", "int8"])
@pytest.mark.parametrize("rate", [0.0, 0.1, 1.0])
def test_event_linear_equals_the_dense_layer(make, rate):
    layer = make()
    x = spike_like((3, 5, 12), rate)
    with torch.no_grad():
        torch.testing.assert_close(event_linear(layer, x), layer(x), rtol=1e-5, atol=1e-5)


def test_event_linear_refuses_layers_it_cannot_read():
    assert not sparse_supported(nn.Conv2d(2, 2, 1))
    with pytest.raises(TypeError, match="--quant_backend own or none"):
        event_linear(nn.Conv2d(2, 2, 1), torch.zeros(1, 2))


@pytest.mark.parametrize("arch", MODELS)
def test_sparse_simulation_gives_the_dense_simulation_logits(arch):
    snn = calibrated(arch, 4)
    x = data(n=3, seq=12, seed=4)
    mask = padded(x)
    dense = run_sequential(snn, x, 6, attention_mask=mask)
    sparse = run_sequential(snn, x, 6, attention_mask=mask, sparse=True)
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)
    assert not torch.equal(dense, run_sequential(snn, x, 2))  # the comparison is not trivially equal
    assert not any(m.sparse for m in snn.modules() if isinstance(m, SpikeLinear))  # flags restored


def test_sparse_simulation_runs_own_int8_layers():
    snn = calibrated("llama", 4)
    quantize_weights_(snn, "own", progress=False)
    x = data(n=2, seq=10, seed=2)
    torch.testing.assert_close(run_sequential(snn, x, 4, sparse=True), run_sequential(snn, x, 4),
                               rtol=1e-4, atol=1e-4)


def test_sparse_simulation_refuses_unreadable_layers_by_name():
    snn = calibrated("gpt2", 4)
    name, layer = next((n, m) for n, m in snn.named_modules() if isinstance(m, SpikeLinear))
    layer.linear = nn.Conv2d(1, 1, 1)  # stands in for a bitsandbytes/torchao layer
    assert unsupported_layers(snn) == [name]
    with pytest.raises(ValueError, match=name):
        with sequential_mode(snn, 4, sparse=True):
            pass
