"""A saved SNN loaded within a memory budget: the layers that do not fit read their weights from the saved files
for each forward (accelerate's hooks), with the same logits and replies as the model loaded whole."""

import pytest
import torch
from accelerate.utils import has_offloaded_params
from tiny_models import save_tiny

from stac_lm.convert.layerwise import decoder_layers
from stac_lm.convert.options import ConvertOptions
from stac_lm.convert.pipeline import run
from stac_lm.io.offload import _heavy_modules, is_offloaded, layers_on_disk, own_tensors
from stac_lm.io.saving import load_snn

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    base = tmp_path_factory.mktemp("offload")
    src = save_tiny(base / "model", "llama")
    run(ConvertOptions(model_name=str(src), output_dir=str(base / "snn"), calib_tokens=256, eval_tokens=512,
                       device="cpu", verify=False), progress=False)
    return base / "snn"


def _sizes(model):
    layers = decoder_layers(model)[1]
    heavy = [sum(t.nbytes for _, m in _heavy_modules(layer) for _, t in own_tensors(m)) for layer in layers]
    total = sum(t.nbytes for _, t in [*model.named_parameters(), *model.named_buffers()])
    return total - sum(heavy), heavy


def _on_disk(model):
    return sorted({int(n.split(".")[2]) for n, m in model.named_modules() if has_offloaded_params(m)})


def test_budget_keeps_what_fits_and_reads_the_rest_from_disk(saved):
    whole = load_snn(saved)[0]
    resident, heavy = _sizes(whole)
    assert heavy[0] == heavy[1]
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = whole(ids).logits
        ref_gen = whole.generate(ids, max_new_tokens=6, do_sample=False)
    # room for what stays and one layer to load: both layers on disk; one byte short of the whole model: still
    # both (a layer kept beside the room to load the other would be the whole model); the whole model: none
    for budget, disk in ((resident + heavy[0], [0, 1]), (resident + 2 * heavy[0] - 1, [0, 1]),
                         (resident + 2 * heavy[0], []), (10 ** 9, [])):
        model = load_snn(saved, max_memory={"cpu": str(budget)})[0]
        assert _on_disk(model) == disk and is_offloaded(model) == bool(disk)
        assert not any(t.device.type == "meta" for n, t in model.state_dict().items()
                       if not n.startswith(tuple(f"model.layers.{i}." for i in disk)))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref)
            assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), ref_gen)


def test_budget_too_small_and_other_devices_are_refused(saved):
    whole = load_snn(saved)[0]
    resident, heavy = _sizes(whole)
    with pytest.raises(ValueError, match="does not hold the embeddings, head, norms and sites"):
        load_snn(saved, max_memory={"cpu": str(resident + heavy[0] - 1)})
    with pytest.raises(ValueError, match="CPU and disk only"):
        layers_on_disk(whole, {"0": "10GiB"}, decoder_layers(whole))
    with pytest.raises(ValueError, match="on the CPU"):
        load_snn(saved, device="cuda", max_memory="cpu=1GiB")


def test_conversational_checks_run_within_a_budget(saved, monkeypatch):
    # the SNN and the float64 copy of the exact checks load with both layers on disk (the copy's float weights
    # widen as they load), the source model reads from disk: the same check values as without a budget
    from stac_lm.checks import conversation, suite
    from stac_lm.generate.processor import TemporalSpikeProcessor

    resident, heavy = _sizes(load_snn(saved)[0])
    groups = ["multi_turn", "positions", "masks"]
    ref = suite.run_suite(str(saved), groups, device="cpu", conversations=2, progress=False)
    made, anns = [], []
    real_exact, real_ann = conversation.exact_processor, suite.load_ann

    def exact(proc: TemporalSpikeProcessor, fresh=None):
        made.append((proc.model, fresh))
        return real_exact(proc, fresh)

    monkeypatch.setattr(conversation, "exact_processor", exact)
    monkeypatch.setattr(suite, "load_ann", lambda config, dev, offload=False: anns.append(offload) or
                        real_ann(config, dev, offload))
    budget = {"cpu": str(resident + heavy[0])}
    got = suite.run_suite(str(saved), groups, device="cpu", conversations=2, progress=False, max_memory=budget)
    (model, fresh), = made
    assert _on_disk(model) == [0, 1] and _on_disk(fresh) == [0, 1] and fresh is not model
    assert fresh.lm_head.site.theta.dtype == torch.float64 and anns == [True]
    assert [(r["name"], r["value"]) for r in got["checks"]] == [(r["name"], r["value"]) for r in ref["checks"]]
    assert got["all_passed"] == ref["all_passed"]
    memory = got["memory"]
    assert memory["max_memory"] == budget and memory["within_budget"] == (memory["peak_rss_bytes"] <= int(budget["cpu"]))
    assert ref["memory"]["within_budget"] is None
