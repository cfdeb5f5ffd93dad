"""Every check of the verification report fails on a model broken on purpose, and passes on a healthy one.

The model: a tiny Llama trained for a few seconds (``trained_tiny``; a random one predicts from its
residual stream alone, so its quality cannot be seen to fail), converted in full mode at T=8, so
the quality bars of ``stac_lm.checks.gates`` for T=8 apply. Each broken variant is built in place and
undone after its test.
"""

import io
import json

import pytest
import torch
from rich.console import Console
from torch import nn
from tiny_models import tiny_model

import run_conversion
import stac_lm.io.saving as saving
from spike_modules import iter_sites
from spike_modules.site import DAQCFSSite, SiteMode
from stac_lm.checks import gates
from stac_lm.convert.options import ConvertOptions
from stac_lm.convert.pipeline import run
from stac_lm.checks.verify import verify

T = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def converted(trained_llama, tmp_path_factory):
    opts = ConvertOptions(model_name=str(trained_llama), output_dir=str(tmp_path_factory.mktemp("gates") / "snn"),
                          calib_tokens=256, eval_tokens=512, timesteps=T, coding="rate")  # the measured bars of T=8
    return run(opts, progress=False, console=Console(file=io.StringIO()))


def report(out, ann=None, mode="full", coding=None) -> dict:
    return verify(ann if ann is not None else out.ann, out.snn, out.tokenizer, out.eval_stream.ids, T=T,
                  activation="keep", mode=mode, calibration=out.calibration.config, coding=coding, progress=False,
                  console=Console(file=io.StringIO()))


def failed(rep: dict) -> set[str]:
    return {c["name"] for c in rep["checks"] if not c["passed"]}


ALL = {"every site fires", "no site saturates", "op counts consistent", "predictions varied", "finite perplexity",
       "quality: perplexity ratio", "quality: top-1 agreement", "spikes drive the output: T changes the logits",
       "spikes drive the output: no site passes float through", "site activity matches calibration",
       "sequential neurons give parallel counts", "sequential SNN agrees with the ANN"}


def test_a_healthy_model_passes_every_check(converted):
    rep = converted.report
    assert {c["name"] for c in rep["checks"]} == ALL and not failed(rep), [c for c in rep["checks"] if not c["passed"]]
    bars = gates.GATES[("full", "rate")].quality[T]
    assert rep["quality_bars"]["ppl_ratio_max"] == bars.ppl_ratio and rep["coding"] == "rate"
    # measurements, not constants: the T-change and the SNN's distance from the ANN are what they are
    assert 0.01 < rep["probe"]["relative_logit_change"] < 1
    assert 0 < rep["probe"]["relative_logit_error_vs_ann"] < 0.2


@pytest.fixture
def thresholds(converted):
    """``scale(f)`` multiplies every site's thresholds by ``f``; undone after the test."""
    kept = {n: (s.theta.detach().clone(), s.burst.detach().clone()) for n, s in iter_sites(converted.snn)}

    def scale(f: float, burst: float | None = None):
        for n, s in iter_sites(converted.snn):
            s.set_params(kept[n][0] * f, s.psi.detach().clone(), s.phi.detach().clone(),
                         kept[n][1] if burst is None else burst)

    yield scale
    for n, s in iter_sites(converted.snn):
        s.set_params(kept[n][0], s.psi.detach().clone(), s.phi.detach().clone(), kept[n][1])


def test_thresholds_x10_fail_activity_and_quality(converted, thresholds):
    thresholds(10.0)
    bad = failed(report(converted))
    assert {"site activity matches calibration", "quality: perplexity ratio", "quality: top-1 agreement"} <= bad, bad
    assert "every site fires" not in bad  # a few spikes per site remain: only the activity gate sees it


def test_thresholds_x1000_fail_firing_drive_and_activity(converted, thresholds):
    thresholds(1000.0)
    bad = failed(report(converted))
    assert {"every site fires", "spikes drive the output: T changes the logits", "site activity matches calibration",
            "quality: perplexity ratio", "quality: top-1 agreement"} <= bad, bad


def test_tiny_thresholds_without_bursts_saturate(converted, thresholds):
    thresholds(1e-3, burst=1.0)
    assert "no site saturates" in failed(report(converted))


@pytest.fixture
def pass_through(monkeypatch):
    """Sites that claim parallel mode and count their spikes, but hand the float input on."""
    inner = DAQCFSSite.forward

    def forward(self, x):
        inner(self, x)
        return x

    monkeypatch.setattr(DAQCFSSite, "forward", forward)


def test_float_pass_through_fails_drive_checks(converted, pass_through):
    rep = report(converted)
    bad = failed(rep)
    assert {"spikes drive the output: no site passes float through",
            "spikes drive the output: T changes the logits"} <= bad, bad
    assert rep["ppl_ratio"] == pytest.approx(1.0, abs=0.01)  # what fooled the report: the (8-bit) ANN's own quality
    assert min(rep["probe"]["pass_through_share"].values()) == 1.0


def test_a_different_seed_ann_fails_agreement(converted):
    other = tiny_model("llama", len(converted.tokenizer), seed=1)
    assert "quality: top-1 agreement" in failed(report(converted, ann=other))


def test_a_collapsed_model_fails_varied_predictions(converted, monkeypatch):
    head = converted.snn.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: out + 50 * (torch.arange(out.shape[-1]) == 5))
    try:
        bad = failed(report(converted))
    finally:
        handle.remove()
    assert {"predictions varied", "quality: perplexity ratio", "quality: top-1 agreement"} <= bad, bad


def test_non_finite_logits_fail_finite_perplexity(converted):
    head = converted.snn.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: out.index_fill(-1, torch.tensor([3]), float("inf")))
    try:
        bad = failed(report(converted))
    finally:
        handle.remove()
    assert "finite perplexity" in bad


def test_a_layer_outside_the_count_fails_op_counts(converted):
    model = converted.snn.model
    norm, width = model.norm, converted.snn.config.hidden_size
    extra = nn.Linear(width, width, bias=False)
    nn.init.eye_(extra.weight)
    model.norm = nn.Sequential(norm, extra)  # an extra dense layer the ANN does not have: identical logits
    try:
        bad = failed(report(converted))
    finally:
        model.norm = norm
    assert bad == {"op counts consistent"}, bad


def test_a_broken_simulation_fails_parallel_vs_sequential(converted, monkeypatch):
    inner = DAQCFSSite.forward

    def forward(self, x):  # the time-stepped sites lose every spike
        y = inner(self, x)
        return torch.zeros_like(y) if self.mode is SiteMode.SEQUENTIAL else y

    monkeypatch.setattr(DAQCFSSite, "forward", forward)
    assert failed(report(converted)) == {"sequential neurons give parallel counts", "sequential SNN agrees with the ANN"}


def test_sequential_neurons_that_lose_their_last_step_fail_the_count_check(converted, monkeypatch):
    inner = DAQCFSSite.forward

    def forward(self, x):  # spikes of the last step never leave the neuron: counts fall short by a level or more
        y = inner(self, x)
        if self.mode is SiteMode.SEQUENTIAL:
            y = y.clone()
            y[-1] = 0
        return y

    monkeypatch.setattr(DAQCFSSite, "forward", forward)
    rep = report(converted)
    assert "sequential neurons give parallel counts" in failed(rep)
    assert rep["sequential"]["sites"]["off_share"] > 0.01


def test_the_healthy_simulation_matches_parallel_counts_but_at_ties(converted):
    sites = converted.report["sequential"]["sites"]
    assert sites["elements"] > 0 and sites["off_share"] <= gates.SEQUENTIAL_TIE_SHARE and sites["max_off_levels"] <= 1.5
    agree = converted.report["sequential"]["ann_agreement"]
    assert set(agree) == {"parallel", "sequential"} and 0 < agree["parallel"] <= 1


def test_a_report_without_an_ann_fails_the_sequential_quality_gate():
    seq = {"tokens": 8, "top1_agreement": 1.0,
           "sites": {"elements": 10, "off_elements": 0, "off_share": 0.0, "max_off_levels": 0.0, "worst_site": ""}}
    rows = {r["name"]: r["passed"] for r in gates.sequential_checks("full", "rate", seq)}
    assert rows == {"sequential neurons give parallel counts": True, "sequential SNN agrees with the ANN": False}


def test_a_mode_marked_not_usable_fails_its_quality_gate_whatever_it_measures(converted, monkeypatch):
    unusable = gates.ModeGates(usable=False, sequential_margin=0.1, quality=dict(gates.GATES[("full", "rate")].quality),
                               note="this mode is not usable as a language model")
    monkeypatch.setitem(gates.GATES, ("simplified", "rate"), unusable)
    rep = report(converted, mode="simplified", coding="rate")  # the healthy SNN, judged as an unusable mode
    assert failed(rep) == {"quality: mode claims quality"}
    assert "not usable" in next(c["detail"] for c in rep["checks"] if not c["passed"])


def test_simplified_mode_is_judged_by_its_own_bars(converted):
    rep = report(converted, mode="simplified", coding="rate")  # T=8: simplified mode claims T=16 and 32 only
    assert not failed(rep) and rep["quality_bars"]["gated"] is False and "T=[16, 32]" in rep["quality_bars"]["why"]


def test_a_mode_or_coding_without_bars_fails_and_says_so(converted):
    rep = report(converted, coding="phase")
    (check,) = [c for c in rep["checks"] if not c["passed"]]
    assert check["name"] == "quality: bars for this mode and coding" and "add a row to stac_lm/checks/gates.py" in \
        check["detail"]


def test_a_t_without_bars_is_reported_ungated():
    rows, said = gates.quality_checks("full", "rate", 12, 1.5, 0.5)
    assert rows == [] and said["gated"] is False and "T=[8, 16, 32]" in said["why"]


@pytest.mark.parametrize("ratio, agreement, bad", [
    (1.0, 0.9, set()), (1.26, 0.9, {"quality: perplexity ratio"}), (1.0, 0.65, {"quality: top-1 agreement"}),
    (float("nan"), float("nan"), {"quality: perplexity ratio", "quality: top-1 agreement"})])
def test_quality_bars_at_t8(ratio, agreement, bad):
    rows, _ = gates.quality_checks("full", "rate", 8, ratio, agreement)
    assert {r["name"] for r in rows if not r["passed"]} == bad


def test_activity_check_flags_a_site_below_a_tenth_and_a_silent_one():
    pred = {"a": 0.4, "b": 0.3, "c": 0.2}
    assert gates.activity_check({"a": 0.3, "b": 0.05, "c": 0.2}, pred)[0]["passed"]
    assert not gates.activity_check({"a": 0.3, "b": 0.029, "c": 0.2}, pred)[0]["passed"]
    assert not gates.activity_check({"a": 0.3, "b": 0.3, "c": float("nan")}, pred)[0]["passed"]  # never ran


# -- the CLI: exit 3 naming the check ------------------------------------------------------------

def test_conversion_with_pass_through_sites_exits_3_and_names_the_check(trained_llama, tmp_path, pass_through,
                                                                        capsys):
    out = tmp_path / "snn"
    code = run_conversion.main(["--model_name", str(trained_llama), "--output_dir", str(out), "--timesteps", str(T),
                                "--calib_tokens", "256", "--eval_tokens", "512"])
    err = capsys.readouterr().err
    assert code == 3 and "FAILED checks:" in err and "no site passes float through" in err
    report_ = json.loads((out / "report.json").read_text())
    assert not report_["all_checks_passed"]


def test_verify_of_a_saved_model_with_thresholds_x10_exits_3(converted, monkeypatch, capsys):
    load = saving.load_snn

    def broken(*args, **kwargs):
        model, tok, config = load(*args, **kwargs)
        for _, s in iter_sites(model):
            s.set_params(s.theta.detach() * 10, s.psi.detach().clone(), s.phi.detach().clone(), s.burst.detach())
        return model, tok, config

    assert run_conversion.main(["--verify", "--model_dir", converted.options.output_dir]) == 0
    monkeypatch.setattr(saving, "load_snn", broken)
    assert run_conversion.main(["--verify", "--model_dir", converted.options.output_dir]) == 3
    assert "site activity matches calibration" in capsys.readouterr().err


def test_site_hooks_do_not_outlive_verify(converted):
    assert all(not s._forward_hooks for _, s in iter_sites(converted.snn))


@pytest.mark.parametrize("change, shares, bad", [
    (0.3, {"a": 0.0, "b": 0.02}, set()),
    (0.0, {"a": 0.0}, {"spikes drive the output: T changes the logits"}),
    (float("nan"), {"a": float("nan")}, {"spikes drive the output: T changes the logits",
                                         "spikes drive the output: no site passes float through"}),
    (0.3, {"a": 0.0, "b": 1.0}, {"spikes drive the output: no site passes float through"})])
def test_drive_checks(change, shares, bad):
    assert {c["name"] for c in gates.drive_checks(change, 8, 4, shares) if not c["passed"]} == bad


def test_a_tie_at_a_dead_zone_edge_is_one_level_and_a_lost_count_is_not():
    from stac_lm.checks.sequential import levels_off

    dead = torch.tensor([1.9, 1.9, 1.9, 0.0, 3.0, 1.9])
    counts = torch.tensor([2.0, -1.0, 3.0, 2.0, 3.0, 1.0])  # parallel, before the dead zone
    seq = torch.tensor([0.0, -2.0, 0.0, 0.0, 0.0, 0.0])     # sequential, dead zone applied
    off = levels_off(seq, counts, dead)
    # 2 -> 0: the tie 2 / 1 at the edge of 1.9, one level; -1 -> -2: a tie into the first kept level;
    # 3 -> 0: two levels from the nearest silenced count (1); no dead zone: 2 -> 0 is two levels;
    # 3 -> 0 with a dead zone of 3: one level (2 is silenced); 1 -> 0: silenced in both
    assert off.tolist() == [1.0, 1.0, 2.0, 2.0, 1.0, 0.0]
