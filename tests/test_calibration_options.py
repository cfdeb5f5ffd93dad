"""The calibration options of a conversion run reach the saved thresholds, each as documented.

Every run goes through ``stac_lm.convert.pipeline.run`` on a tiny random model and reads the thresholds back
from the saved directory (``calibration.safetensors``). The values each rule should give are computed
here from the site inputs themselves (the same calibration windows, sites in ANN mode), not from the
calibration's own observer, so an option that is dropped on the way shows.
"""

import io
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tiny_models import save_tiny

from calibration import Calibration
from spike_modules import iter_sites, set_mode
from spike_modules.quantizer import coding_levels
from stac_lm.convert.options import ConvertOptions
from stac_lm.convert.pipeline import CALIB_SEQ, run
from stac_lm.convert.texts import calibration_batches

T = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("calib_opts") / "model", "llama")


def convert(tiny: Path, out: Path, **kw):
    """A conversion whose thresholds are the rule's own (power-of-two rounding, full mode's default, off
    unless asked: these tests check the rules)."""
    kw.setdefault("power_of_two_steps", False)
    opts = ConvertOptions(model_name=str(tiny), output_dir=str(out), calib_tokens=kw.pop("calib_tokens", 256),
                          timesteps=T, verify=False, **kw)
    return run(opts, progress=False, console=Console(file=io.StringIO()))


def saved_thetas(converted) -> dict[str, torch.Tensor]:
    calib = Calibration.load(converted.options.output_dir)
    return {n: p.theta for n, p in calib.sites.items()}


def saved(converted, key: str) -> dict[str, torch.Tensor]:
    return {n: getattr(p, key) for n, p in Calibration.load(converted.options.output_dir).sites.items()}


@torch.no_grad()
def site_inputs(converted) -> dict[str, tuple[torch.Tensor, bool]]:
    """Every site's inputs ``[N, H]`` over the run's calibration windows, sites in ANN mode (as calibration sees them)."""
    snn, n_tokens = converted.snn, converted.options.calib_tokens
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [s.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, s in iter_sites(snn)]
    set_mode(snn, "ann")
    try:
        for batch in calibration_batches(converted.calib_stream.ids, min(CALIB_SEQ, n_tokens)):
            snn(batch)
    finally:
        set_mode(snn, "parallel")
        for h in hooks:
            h.remove()
    signed = {n: s.signed for n, s in iter_sites(snn)}
    return {n: (torch.cat(v).double(), signed[n]) for n, v in seen.items()}


def rule_thetas(inputs, rule: str, q: float = 0.0) -> dict[str, torch.Tensor]:
    """The documented rule on the observed values: ``max`` of x (|x| if signed), or its ``q``-th percentile;
    a channel that never fires gets the site's largest threshold."""
    out = {}
    for n, (x, signed) in inputs.items():
        v = x.abs() if signed else x
        theta = v.max(0).values if rule == "max" else torch.quantile(v, q / 100, dim=0)
        theta = theta.clamp(min=0)
        out[n] = torch.where(theta > 0, theta, theta.max())
    return out


BIN = 1.05  # the observer's histogram bins are 4.4% wide (calibration.observer)


def percentile_verdict(theta: torch.Tensor, x: torch.Tensor, signed: bool, q: float):
    """Per channel: does ``theta`` lie between the order statistics around the ``q``-th percentile of the
    observed ``x`` (``|x|`` if signed), widened by one histogram bin? And which channels are ambiguous
    (that bracket touches zero, where the rule falls back to the site's largest threshold)?"""
    v = (x.abs() if signed else x).sort(0).values
    k = math.ceil(q / 100 * v.shape[0])
    lo, hi = v[max(k - 2, 0)], v[min(k, v.shape[0] - 1)]
    theta = theta.double()
    return (theta >= lo / BIN) & (theta <= hi * BIN), lo <= 0


def assert_percentile_rule(got: dict, inputs: dict, q: float):
    checked = total = 0
    for n, (x, signed) in inputs.items():
        ok, ambiguous = percentile_verdict(got[n], x, signed, q)
        assert bool(ok[~ambiguous].all()), (n, q, got[n][~ok & ~ambiguous][:4])
        checked += int((~ambiguous).sum())
        total += ok.numel()
    assert checked >= 0.75 * total, (checked, total)


def assert_close(got: dict, want: dict, rel: float):
    assert got.keys() == want.keys()
    for n in got:
        err = float(((got[n].double() - want[n]) / want[n]).abs().max())
        assert err <= rel, (n, err)


@pytest.fixture(scope="module")
def simplified_runs(tiny, tmp_path_factory):
    """Simplified mode (no psi/phi fit, no 8-bit weights) without a burst budget (0): the rule alone sets theta."""
    base = tmp_path_factory.mktemp("simplified")
    return {q: convert(tiny, base / f"p{q}", simplified=True, percentile=q, calib_tokens=1024, burst_budget=0)
            for q in (50.0, 99.9)}


def test_percentile_sets_the_thresholds_as_the_rule_on_observed_values(simplified_runs):
    got = {q: saved_thetas(r) for q, r in simplified_runs.items()}
    for q, r in simplified_runs.items():
        assert_percentile_rule(got[q], site_inputs(r), q)
    lower = sum(int((got[50.0][n] < 0.7 * got[99.9][n]).sum()) for n in got[50.0])
    channels = sum(t.numel() for t in got[50.0].values())
    assert lower > 0.9 * channels, (lower, channels)


def test_max_rule_gives_the_exact_maximum(tiny, tmp_path, simplified_runs):
    r = convert(tiny, tmp_path / "max", simplified=True, threshold_rule="max", calib_tokens=1024)
    want = rule_thetas(site_inputs(r), "max")
    got = saved_thetas(r)
    assert_close(got, want, rel=1e-6)
    p999 = saved_thetas(simplified_runs[99.9])  # the mode's default rule on the same tokens: not the maximum
    assert sum(int((got[n] != p999[n]).sum()) for n in got) > 0.5 * sum(t.numel() for t in got.values())


def test_mse_rule_differs_from_max_and_percentile(tiny, tmp_path, simplified_runs):
    r = convert(tiny, tmp_path / "mse", simplified=True, threshold_rule="mse")
    got, top = saved_thetas(r), rule_thetas(site_inputs(r), "max")
    assert all(bool((got[n] <= top[n] * (1 + 1e-6)).all()) for n in got)  # a clip, never beyond the max
    assert any(not torch.allclose(got[n].double(), top[n]) for n in got)
    p999 = saved_thetas(simplified_runs[99.9])
    assert any(not torch.allclose(got[n], p999[n]) for n in got)


def test_calib_tokens_sets_how_much_text_calibration_sees(tiny, tmp_path):
    runs = {n: convert(tiny, tmp_path / f"t{n}", simplified=True, threshold_rule="max", calib_tokens=n)
            for n in (256, 1024)}
    for n, r in runs.items():
        calib = Calibration.load(r.options.output_dir)
        assert all(s["rows"] % n == 0 and s["rows"] >= n for s in calib.stats.values()), n  # q/k sites see heads
        assert_close(saved_thetas(r), rule_thetas(site_inputs(r), "max"), rel=1e-6)
    small, large = saved_thetas(runs[256]), saved_thetas(runs[1024])
    # four times the text: the maximum can only grow, and does somewhere
    assert all(bool((large[n] >= small[n]).all()) for n in small)
    assert any(bool((large[n] > small[n]).any()) for n in small)


@pytest.fixture(scope="module")
def full_runs(tiny, tmp_path_factory):
    base = tmp_path_factory.mktemp("full")
    # full mode's defaults except the percentile: at 95 most channels have calibration values above
    # their threshold, so a budget visibly raises thresholds (at the default 99.9 few do on 256 tokens)
    return {"default": convert(tiny, base / "default", percentile=95.0),
            "burst4": convert(tiny, base / "burst4", percentile=95.0, max_burst=4, burst_budget=4),
            "budget1": convert(tiny, base / "budget1", percentile=95.0, burst_budget=1)}


def test_max_burst_is_the_saved_burst_cap(full_runs):
    top = 2 ** 24 // coding_levels(T, full_runs["default"].options.coding)  # counts stay exact in float32
    assert full_runs["default"].options.max_burst == top
    for key, cap in (("default", top), ("burst4", 4)):
        bursts = saved(full_runs[key], "burst")
        assert all(bool((b == cap).all()) for b in bursts.values()), key


def test_burst_budget_raises_thresholds_to_max_over_budget(full_runs):
    inputs = site_inputs(full_runs["default"])
    top = rule_thetas(inputs, "max")
    # budget 1: the largest calibration value must fit one spike per step, so theta is the maximum
    assert_close(saved_thetas(full_runs["budget1"]), top, rel=1e-6)
    # budget 64 (full mode's default): theta = max(percentile, max / 64): exactly max / 64 where
    # that is above the percentile's bracket, else the percentile
    got = saved_thetas(full_runs["default"])
    pct = full_runs["default"].options.percentile
    for n, (x, signed) in inputs.items():
        floor = top[n] / 64
        ok, ambiguous = percentile_verdict(got[n], x, signed, pct)
        exact = (got[n].double() - floor).abs() <= 1e-6 * floor
        assert bool((ok | ambiguous | exact).all()), n
        assert bool((got[n].double() >= floor * (1 - 1e-6)).all()), n  # never below the budget's floor
    # the calibration's own count of raised channels: a budget of 1 raises (nearly) every channel
    raised = {k: sum(s["budget_raised_channels"] for s in Calibration.load(r.options.output_dir).stats.values())
              for k, r in full_runs.items()}
    channels = sum(t.numel() for t in got.values())
    assert raised["budget1"] > 0.9 * channels and raised["budget1"] > raised["burst4"] >= raised["default"], raised


def test_power_of_two_steps_are_full_modes_default_with_weighted_coding(tiny, tmp_path):
    assert ConvertOptions().power_of_two_steps is True
    assert ConvertOptions(coding="rate").power_of_two_steps is False
    assert ConvertOptions(simplified=True).power_of_two_steps is False
    assert ConvertOptions.from_dict({"coding": "weighted", "seed": 0}).power_of_two_steps is False  # saved before it
    saved = ConvertOptions(step_rounding="up").to_dict()
    del saved["step_rounding"]  # saved before the rounding was a choice: rounded up
    assert ConvertOptions.from_dict(saved).step_rounding == "up"
    with pytest.raises(ValueError, match="add --power_of_two_steps"):
        ConvertOptions(coding="rate", step_rounding="nearest")
    with pytest.raises(ValueError, match="step_rounding"):
        ConvertOptions(step_rounding="down")
    got = saved_thetas(convert(tiny, tmp_path / "p2", power_of_two_steps=True, step_rounding="up"))
    nearest = convert(tiny, tmp_path / "p2n", power_of_two_steps=True, step_rounding="nearest")
    assert Calibration.load(nearest.options.output_dir).config.step_rounding == "nearest"
    near = saved_thetas(nearest)
    for theta in (*got.values(), *near.values()):
        k = torch.log2(theta.max().double() / theta.double())
        assert torch.equal(k, k.round())
    assert any(bool((near[n] < got[n]).any()) for n in got)  # nearest takes some steps below 'up''s


@pytest.mark.parametrize("argv, key, value", [(["--step_rounding", "nearest"], "step_rounding", "nearest"),
                                              (["--step-rounding", "up"], "step_rounding", "up"),
                                              ([], "step_rounding", None),
                                              (["--silence_weighting", "columns"], "silence_weighting", "columns"),
                                              (["--silence-weighting", "fisher"], "silence_weighting", "fisher"),
                                              ([], "silence_weighting", None)])
def test_the_step_rounding_and_silence_weighting_flags_reach_the_options(argv, key, value):
    import run_conversion

    args = vars(run_conversion.build_parser().parse_args(argv))
    assert args.get(key) == value

