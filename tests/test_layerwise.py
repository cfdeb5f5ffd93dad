"""Layer-by-layer conversion gives the whole-model conversion's weights, thresholds and logits, bit for bit,
with the source model in memory or on disk (accelerate's offload); the options and the memory record."""

import json

import pytest
import torch
from tiny_models import save_tiny, tiny_model

from calibration import CalibrationConfig, calibrate
from calibration.gptq import input_hessians
from calibration.int8 import find_linears, quantize_weights_
from spike_modules import set_mode
from spike_modules.conversion import ConversionConfig, convert
from stac_common.runtime import input_device
from stac_lm.convert.layerwise import convert_layerwise, decoder_layers
from stac_lm.convert.options import ConvertOptions, parse_max_memory
from stac_lm.convert.pipeline import load_source, run, within_budget
from stac_lm.io.offload import is_offloaded
from stac_lm.io.saving import load_snn

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ConversionConfig(T=7, mode="full", coding="weighted", spike_head=True)
CCFG = CalibrationConfig(T=7, coding="weighted", max_burst=2 ** 24 // 127, burst_budget=64, reservoir_rows=64)


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 300, (1, 24), generator=g) for _ in range(3)]


def _whole(ann, rounding="nearest"):
    snn = convert(ann, CFG)
    batches = _batches()
    hessians = input_hessians(snn, find_linears(snn), batches) if rounding == "gptq" else None
    q = quantize_weights_(snn, "own", progress=False, head=True, hessians=hessians)
    cal = calibrate(snn, batches, CCFG, progress=False)
    cal.apply_to(snn)
    set_mode(snn, "parallel")
    return snn, cal, q


def _layerwise(ann, rounding="nearest"):
    snn, cal, q, seconds = convert_layerwise(ann, CFG, _batches(), CCFG, backend="own", rounding=rounding,
                                             group_size=0, int8_head=True, device=torch.device("cpu"),
                                             progress=False)
    set_mode(snn, "parallel")
    assert len(seconds) == len(decoder_layers(snn)[1])
    return snn, cal, q


def _assert_same(a, b):
    (snn_a, cal_a, q_a), (snn_b, cal_b, q_b) = a, b
    assert list(cal_a.sites) == list(cal_b.sites)
    for name, p in cal_a.sites.items():
        for attr in ("theta", "psi", "phi", "burst", "dead"):
            assert torch.equal(getattr(p, attr), getattr(cal_b.sites[name], attr)), (name, attr)
    sa, sb = snn_a.state_dict(), snn_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(snn_a(ids).logits, snn_b(ids).logits)
    assert q_a["paths"] == q_b["paths"] and q_a["int8_head"] == q_b["int8_head"]
    for k in ("layers", "bytes_before", "bytes_after", "max_rel_error"):
        assert q_a[k] == q_b[k], k
    assert q_a["mean_rel_error"] == pytest.approx(q_b["mean_rel_error"], rel=1e-12)  # summed in another order


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "phi3", "opt"])
def test_layerwise_equals_whole_model_bit_for_bit(arch):
    # llama: tied int8 table; gpt2: Conv1D, learned positions; gemma2: local/global layers with their own masks;
    # phi3: fused projections; opt: positions from the mask
    ann = tiny_model(arch)
    _assert_same(_whole(ann), _layerwise(ann))


def test_layerwise_gptq_takes_the_float_models_inputs():
    ann = tiny_model("llama")
    _assert_same(_whole(ann, "gptq"), _layerwise(ann, "gptq"))


def test_layerwise_leaves_the_source_model_untouched():
    ann = tiny_model("llama")
    before = {k: v.clone() for k, v in ann.state_dict().items()}
    attn = ann.config._attn_implementation
    _layerwise(ann)
    assert ann.config._attn_implementation == attn
    assert all(torch.equal(v, before[k]) for k, v in ann.state_dict().items())


def test_offloaded_source_converts_as_the_loaded_one(tmp_path):
    src = save_tiny(tmp_path / "model", "llama")
    whole, _ = load_source(str(src))
    offloaded, _ = load_source(str(src), offload=True)
    assert set(offloaded.hf_device_map.values()) == {"disk"}
    assert offloaded.model.layers[0].mlp.down_proj.weight.device.type == "meta"  # nothing resident
    assert input_device(offloaded) == torch.device("cpu")  # where it computes, not where its weights sit
    _assert_same(_layerwise(whole), _layerwise(offloaded))


@pytest.mark.parametrize("silence,weighting,rounding", [(0.0, None, "nearest"), (0.05, "columns", "nearest"),
                                                         (0.05, "fisher", "gptq")])
def test_run_layerwise_gives_the_whole_model_report(tmp_path, silence, weighting, rounding):
    # the converted layers live on disk (offloaded) until saved; dead zones are placed through them
    # (Fisher weights: a backward pass through the offloaded layers, one recomputed at a time). The
    # rounding is given: by default the whole model takes GPTQ's and layer by layer rounds to nearest
    src = save_tiny(tmp_path / "model", "llama")
    common = dict(model_name=str(src), calib_tokens=256, eval_tokens=512, device="cpu", silence_budget=silence,
                  silence_weighting=weighting, int8_rounding=rounding)
    whole = run(ConvertOptions(output_dir=str(tmp_path / "whole"), **common), progress=False)
    lw = run(ConvertOptions(output_dir=str(tmp_path / "lw"), max_memory="cpu=20GiB", **common), progress=False)
    assert lw.options.layerwise and not whole.options.layerwise
    assert is_offloaded(lw.snn) and not is_offloaded(whole.snn)
    for key in ("ppl_ann", "ppl_snn", "top1_agreement", "mean_spike_rate", "energy_ratio"):
        assert lw.report[key] == whole.report[key], key
    assert lw.report["energy_total"]["snn_over_ann_int8"] == whole.report["energy_total"]["snn_over_ann_int8"]
    assert lw.silence == whole.silence or (lw.silence["kl"] == whole.silence["kl"] and silence)
    if silence:
        assert lw.silence["config"]["weighting"] == weighting and lw.silence["bytes_share_silenced"] > 0
        for key in ("bytes_share_silenced", "group_sensitivity", "silent_share_per_group", "trace"):
            assert lw.silence[key] == whole.silence[key], key
    a, b = load_snn(tmp_path / "whole")[0], load_snn(tmp_path / "lw")[0]  # saved as it loaded, streamed
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    saved = json.loads((tmp_path / "lw" / "report.json").read_text())
    memory = saved["memory"]
    assert memory["layerwise"] and memory["max_memory"] == {"cpu": "20GiB"}
    assert memory["peak_rss_bytes"] > 0 and memory["within_budget"] is True
    assert len(memory["seconds_per_layer"]) == 2
    assert saved["memory"]["conversion"]["peak_rss_bytes"] <= memory["peak_rss_bytes"]
    assert json.loads((tmp_path / "whole" / "report.json").read_text())["memory"]["within_budget"] is None


def test_run_layerwise_fine_tunes_as_the_whole_model(tmp_path):
    # the distillation's backward pass recomputes one offloaded layer at a time: the same steps, the same SNN
    src = save_tiny(tmp_path / "model", "llama")
    common = dict(model_name=str(src), calib_tokens=256, eval_tokens=512, device="cpu", silence_budget=0.0,
                  finetune_steps=3, int8_rounding="nearest")  # given: the two paths' default roundings differ
    whole = run(ConvertOptions(output_dir=str(tmp_path / "whole"), **common), progress=False)
    lw = run(ConvertOptions(output_dir=str(tmp_path / "lw"), max_memory="cpu=20GiB", **common), progress=False)
    assert is_offloaded(lw.snn) and lw.finetune["steps"] == 3
    assert (lw.finetune["loss_first"], lw.finetune["loss_last"]) == (whole.finetune["loss_first"],
                                                                     whole.finetune["loss_last"])
    for key in ("ppl_snn", "top1_agreement", "energy_ratio"):
        assert lw.report[key] == whole.report[key], key
    a, b = load_snn(tmp_path / "whole")[0], load_snn(tmp_path / "lw")[0]
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_max_memory_notation_and_refusals(tmp_path):
    assert parse_max_memory("cpu=6GiB,0=20GiB") == {"cpu": "6GiB", "0": "20GiB"}
    assert parse_max_memory({0: "1GB"}) == {"0": "1GB"}
    assert ConvertOptions(max_memory="cpu=6GiB").layerwise is True
    assert ConvertOptions().layerwise is False
    for bad, words in (("cpu", "DEVICE=SIZE"), ("gpu=1GiB", "unknown device"), ("cpu=lots", "not a size"),
                       ("cpu=0GiB", "not a size")):
        with pytest.raises(ValueError, match=words):
            ConvertOptions(max_memory=bad)
    with pytest.raises(ValueError, match="--max_memory bounds"):
        ConvertOptions(max_memory="cpu=6GiB", layerwise=False)
    with pytest.raises(ValueError, match="--quant_backend own only"):
        ConvertOptions(layerwise=True, quant_backend="torchao")
    assert ConvertOptions(layerwise=True, finetune_steps=5).finetune_weight_lr == 0.0
    with pytest.raises(ValueError, match="keeps on disk"):
        ConvertOptions(layerwise=True, finetune_steps=5, finetune_weight_lr=1e-5)
    gib = 2 ** 30
    assert within_budget(3 * gib, {"0": "2GiB", "cpu": "4GiB"}, peak_cuda=gib) is True
    assert within_budget(3 * gib, {"0": "2GiB", "cpu": "4GiB"}, peak_cuda=3 * gib) is False
    assert within_budget(5 * gib, {"0": "2GiB", "cpu": "4GiB"}, peak_cuda=gib) is False
    assert within_budget(5 * gib, {"0": "2GiB"}) is None and within_budget(5 * gib, None) is None
    with pytest.raises(ValueError, match="use --device cuda:0"):
        run(ConvertOptions(model_name="embedded", max_memory="0=2GiB,cpu=4GiB", device="cpu",
                           output_dir=str(tmp_path / "snn")), progress=False)
    old = ConvertOptions().to_dict()
    del old["layerwise"], old["max_memory"]
    assert ConvertOptions.from_dict(old).layerwise is False  # saved before: the whole-model path


@pytest.mark.slow
@pytest.mark.ci_slow
def test_smollm2_layerwise_equals_whole_model():
    # the embedded SmolLM2-135M with full mode's defaults (weighted, T=7, int8 with the int8 head), 1024 tokens
    from stac_lm.convert.texts import calibration_batches, load_streams

    opts = ConvertOptions(calib_tokens=1024)
    ann, tok = load_source("embedded")
    calib, _ = load_streams(tok, None, 1024, None, 512)
    batches = calibration_batches(calib.ids, 512)
    cfg = ConversionConfig(T=opts.timesteps, mode=opts.mode, coding=opts.coding, spike_head=opts.spike_head)
    ccfg = CalibrationConfig(T=opts.timesteps, percentile=opts.percentile, max_burst=opts.max_burst,
                             burst_budget=opts.burst_budget, coding=opts.coding)
    snn = convert(ann, cfg)
    q = quantize_weights_(snn, "own", progress=False, head=True)
    cal = calibrate(snn, batches, ccfg, progress=False)
    cal.apply_to(snn)
    set_mode(snn, "parallel")
    lw = convert_layerwise(ann, cfg, batches, ccfg, backend="own", rounding="nearest", group_size=0, int8_head=True,
                           device=torch.device("cpu"), progress=False)
    set_mode(lw[0], "parallel")
    _assert_same((snn, cal, q), lw[:3])


def test_large_model_saves_in_shards_and_loads_empty_first(tmp_path, monkeypatch):
    import stac_lm.io.offload as offload

    monkeypatch.setattr(offload, "SHARD_BYTES", 20_000)  # a tiny model in several shards
    src = save_tiny(tmp_path / "model", "llama")
    # the same options on both paths (their default roundings differ: GPTQ whole, nearest layer by layer)
    common = dict(model_name=str(src), calib_tokens=256, eval_tokens=512, device="cpu", verify=False,
                  int8_rounding="gptq")
    whole = run(ConvertOptions(output_dir=str(tmp_path / "whole"), **common), progress=False)
    run(ConvertOptions(output_dir=str(tmp_path / "lw"), layerwise=True, **common), progress=False)
    shards = sorted(p.name for p in (tmp_path / "lw").glob("snn_model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "lw" / "snn_model.safetensors").exists()
    index = json.loads((tmp_path / "lw" / "snn_model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    files = json.loads((tmp_path / "lw" / "stac_conversion.json").read_text())["files"]
    assert set(shards) <= set(files)  # every shard has its checksum
    model = load_snn(tmp_path / "lw")[0]
    assert not any(t.device.type == "meta" for t in model.state_dict().values())
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert torch.equal(whole.snn(ids).logits, model(ids).logits)
    with open(tmp_path / "lw" / shards[1], "r+b") as f:  # a damaged shard is refused by name
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    with pytest.raises(ValueError, match=shards[1]):
        load_snn(tmp_path / "lw")
