"""A saved SNN loaded within a memory budget: the layers that do not fit read their weights from the saved files
for each forward (accelerate's hooks), with the same logits and replies as the model loaded whole."""

import pytest
import torch
from accelerate.utils import has_offloaded_params
from tiny_models import save_tiny

from stac_lm.convert.layerwise import decoder_layers
from stac_lm.convert.options import ConvertOptions
from stac_lm.convert.pipeline import run
from stac_lm.io.offload import (_heavy_modules, budget_device, hook_in_memory_, is_offloaded, own_tensors,
                                plan_layers, resident_to_)
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
    with pytest.raises(ValueError, match="names no GPU"):
        load_snn(saved, device="cuda", max_memory="cpu=1GiB")
    with pytest.raises(ValueError, match="one GPU"):
        plan_layers(whole, {"0": "10GiB", "1": "10GiB"}, decoder_layers(whole))
    with pytest.raises(ValueError, match="use --device cuda:0"):
        load_snn(saved, device="cpu", max_memory="0=1GiB,cpu=1GiB")
    with pytest.raises(ValueError, match="use --device cuda:1"):
        budget_device({"1": "1GiB"}, "cuda:0")
    assert budget_device({"1": "1GiB"}, "cuda") == torch.device("cuda", 1)
    assert budget_device({"1": "1GiB"}, "auto") == torch.device("cuda", 1)
    assert budget_device({"cpu": "1GiB"}, "auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="max_memory 0=.* does not hold"):
        plan_layers(whole, {"0": str(resident + heavy[0] - 1), "cpu": "1GiB"}, decoder_layers(whole))


def test_a_gpu_budget_places_layers_on_the_gpu_then_in_cpu_memory_then_on_disk(saved):
    # a plan is arithmetic on the sizes, so it is checked here without a GPU: the GPU holds what stays and room to
    # load one layer, then the layers that fit; the CPU the next ones; the rest are read from disk
    whole = load_snn(saved)[0]
    resident, heavy = _sizes(whole)
    layers = decoder_layers(whole)
    one = str(resident + heavy[0])
    assert plan_layers(whole, {"0": one}, layers) == ["disk", "disk"]
    assert plan_layers(whole, {"0": one, "cpu": str(heavy[0])}, layers) == ["cpu", "disk"]
    assert plan_layers(whole, {"0": one, "cpu": str(2 * heavy[0])}, layers) == ["cpu", "cpu"]
    assert plan_layers(whole, {"0": str(resident + 2 * heavy[0]), "cpu": "1"}, layers) == ["0", "0"]
    assert plan_layers(whole, {"0": str(resident + 2 * heavy[0] - 1), "cpu": str(heavy[0])}, layers) == ["cpu", "disk"]
    assert plan_layers(whole, {"cpu": one}, layers) == ["disk", "disk"]
    assert plan_layers(whole, {"cpu": "1GiB"}, layers) == ["cpu", "cpu"]


def test_weights_kept_in_cpu_memory_load_for_each_forward(saved):
    # the mechanism of a GPU budget's "cpu" layers, run on the CPU: accelerate's CPU offload leaves the layer's
    # weights in a map and loads them for each forward; the logits and the replies do not change
    whole = load_snn(saved)[0]
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, ref_gen = whole(ids).logits, whole.generate(ids, max_new_tokens=6, do_sample=False)
    model = load_snn(saved)[0]
    hook_in_memory_(decoder_layers(model)[1][0], torch.device("cpu"))
    resident_to_(model, torch.device("cpu"))
    assert _on_disk(model) == [0] and model.model.layers[0].self_attn.q_proj.site.theta.device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), ref_gen)


def test_resident_to_keeps_tied_weights_one_tensor():
    lin = torch.nn.Linear(3, 3)
    model = torch.nn.Sequential(lin, torch.nn.Linear(3, 3))
    model[1].weight = lin.weight
    model[0].register_buffer("scale", torch.ones(3), persistent=False)
    resident_to_(model, torch.device("meta"))
    assert model[0].weight is model[1].weight and model[0].weight.device.type == "meta"
    assert isinstance(model[0].weight, torch.nn.Parameter) and model[0].scale.device.type == "meta"


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


def test_device_bench_budgets_split_the_layers_as_named():
    from bench.devices import budgets

    got = budgets(100, [10] * 8)
    assert got["whole on the GPU"] is None
    assert got["GPU + CPU"] == {"0": str(100 + 10 + 40), "cpu": "40"}
    assert got["GPU + CPU + disk"] == {"0": str(100 + 10 + 20), "cpu": "20"}
    assert got["GPU + disk"] == {"0": "110"}
    cpu = budgets(100, [10] * 8, gpu=False)
    assert cpu == {"whole": None, "half on disk": {"cpu": "150"}, "all on disk": {"cpu": "110"}}


def test_shard_reader_reads_what_safetensors_reads(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from stac_lm.io.offload import ShardReader, safetensors_index

    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(4, generator=g).bfloat16(),
               "i8": torch.randint(-128, 127, (2, 3, 4), generator=g, dtype=torch.int8), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4), "flags": torch.tensor([True, False, True]),
               "i64": torch.arange(7), "f16": torch.randn(2, 2, generator=g).half()}
    save_file(dict(list(tensors.items())[:4]), str(tmp_path / "a.safetensors"))
    save_file(dict(list(tensors.items())[4:]), str(tmp_path / "b.safetensors"), metadata={"format": "pt"})
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    reader = ShardReader(safetensors_index(files))
    assert sorted(reader) == sorted(tensors)
    for name, t in tensors.items():
        got = reader[name]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:  # threads share the open files: each read keeps its own position
        got = list(pool.map(lambda name: reader[name], [*tensors] * 50))
    assert all(torch.equal(g, tensors[n]) for g, n in zip(got, [*tensors] * 50))
    widened = ShardReader(safetensors_index(files, dtype="float32"))
    assert widened["bf16"].dtype == torch.float32 and torch.equal(widened["bf16"], tensors["bf16"].float())
    with safe_open(str(files[0]), framework="pt") as f:  # what accelerate's loader reads, for the same names
        assert all(torch.equal(f.get_tensor(k), reader[k]) for k in f.keys())
    (tmp_path / "b.safetensors").write_bytes((tmp_path / "b.safetensors").read_bytes()[:-8])  # cut short
    last = max((n for n in reader.index if reader.index[n]["safetensors_file"] == str(files[1])),
               key=lambda n: reader.index[n]["span"][1])
    with pytest.raises(OSError, match="ends past the end of the file"):
        ShardReader({last: reader.index[last]})[last]
    (tmp_path / "c.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        safetensors_index([tmp_path / "c.safetensors"])
