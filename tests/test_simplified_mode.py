"""Simplified mode keeps the model's own activation (a usable LM, gated at its bars); the ReLU swap
is still there when asked (``--activation relu``) and is reported as what it is."""

import io
import json

import pytest
from rich.console import Console
from tiny_models import save_tiny
from torch import nn
from transformers.activations import SiLUActivation

import run_conversion
from spike_modules import iter_sites
from spike_modules.quantizer import max_exact_burst
from stac_lm.checks import gates
from stac_lm.convert.options import ConvertOptions
from stac_lm.convert.pipeline import run
from stac_lm.checks.verify import RELU_NOTE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llama") / "model", "llama")


def _run(model, out, **kw):
    kw = {"calib_tokens": 256, "eval_tokens": 512, **kw}
    opts = ConvertOptions(model_name=str(model), simplified=True, timesteps=8, output_dir=str(out), **kw)
    return run(opts, progress=False, console=Console(file=io.StringIO()))


def test_simplified_defaults_are_fast_and_keep_the_activation():
    o = ConvertOptions(simplified=True)
    assert (o.coding, o.timesteps, o.activation, o.quant_backend, o.spike_head, o.spike_probs, o.calib_tokens) == \
        ("rate", 16, "keep", "none", False, False, 2048)
    assert (o.threshold_rule, o.percentile, o.max_burst, o.burst_budget) == \
        ("percentile", 95.0, max_exact_burst(16, "rate"), 64)
    assert o.finetune_weight_lr == 0.0  # nothing to repair: the weights stay as they are
    assert ConvertOptions(simplified=True, activation="relu").finetune_weight_lr > 0


def test_simplified_mode_keeps_silu(tiny_llama, tmp_path):
    out = _run(tiny_llama, tmp_path / "keep")
    acts = [type(m) for m in out.snn.modules() if isinstance(m, (nn.ReLU, nn.SiLU, SiLUActivation))]
    assert acts and nn.ReLU not in acts
    assert "ReLU" not in (tmp_path / "keep" / "conversion_log.txt").read_text()
    report = json.loads((tmp_path / "keep" / "report.json").read_text())
    assert report["options"]["activation"] == "keep" and "ppl_relu_ann" not in report
    assert report.get("note") != RELU_NOTE
    names = [n for n, _ in iter_sites(out.snn)]
    assert names and not any(n.endswith("p_site") for n in names)  # probabilities in the rate domain
    assert out.calibration.config.burst_budget == 64 and out.calibration.config.fit_affine is False


def test_spiked_probabilities_and_no_burst_budget_when_asked(tiny_llama, tmp_path):
    out = _run(tiny_llama, tmp_path / "probs", spike_probs=True, burst_budget=0, verify=False)
    assert sum(n.endswith("p_site") for n, _ in iter_sites(out.snn)) == 2  # one per layer
    assert out.calibration.config.burst_budget is None


def test_activation_relu_still_swaps_and_says_so(tiny_llama, tmp_path):
    out = _run(tiny_llama, tmp_path / "relu", activation="relu")
    acts = {type(m) for m in out.snn.modules() if isinstance(m, (nn.ReLU, nn.SiLU, SiLUActivation))}
    assert acts == {nn.ReLU}
    assert "-> ReLU" in (tmp_path / "relu" / "conversion_log.txt").read_text()
    report = json.loads((tmp_path / "relu" / "report.json").read_text())
    assert report["options"]["activation"] == "relu" and report["note"] == RELU_NOTE
    assert report["ppl_relu_ann"] > 0


def test_the_cli_flag_reaches_the_options(tiny_llama, tmp_path):
    code = run_conversion.main(["--model_name", str(tiny_llama), "--simplified", "--activation", "relu",
                                "--timesteps", "8", "--calib_tokens", "256", "--no-verify",
                                "--output_dir", str(tmp_path / "out")])
    assert code == 0 and "-> ReLU" in (tmp_path / "out" / "conversion_log.txt").read_text()


def test_simplified_mode_claims_quality_at_its_measured_t():
    g = gates.GATES[("simplified", "rate")]
    assert g.usable and set(g.quality) == {16, 32}
    for T, bar in g.quality.items():
        assert bar.ppl_ratio <= (1.30 if T == 16 else 1.15)  # the targets the mode is held to
        assert "bench_convert_simplified.json" in bar.measured
        rows, said = gates.quality_checks("simplified", "rate", T, 1.0, 0.99)
        assert said["usable"] and all(r["passed"] for r in rows)
        rows, _ = gates.quality_checks("simplified", "rate", T, bar.ppl_ratio + 0.01, 0.99)
        assert [r["name"] for r in rows if not r["passed"]] == ["quality: perplexity ratio"]
