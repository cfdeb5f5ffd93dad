"""Calibration on synthetic data whose channels differ in scale by four orders of magnitude."""

import pytest
import torch
from torch import nn

from calibration import (Calibration, CalibrationConfig, ChannelObserver, calibrate, choose_thresholds, fit_affine,
                         site_error)
from spike_modules import DAQCFSSite, iter_sites, set_mode

H = 12


def synthetic(n_batches, rows, seed, signed=False):
    """Channels with scales 1e-2 .. 1e2 and three distribution shapes (half-normal, lognormal, uniform)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 2, H)
    out = []
    for _ in range(n_batches):
        z = torch.randn(rows, H, generator=g)
        x = torch.empty(rows, H)
        x[:, 0::3] = z[:, 0::3].abs()
        x[:, 1::3] = torch.exp(0.7 * z[:, 1::3]) - 0.8          # lognormal, some negatives
        x[:, 2::3] = torch.rand(rows, H // 3, generator=g) * 1.5 - 0.2
        x = x * scale
        out.append(x if not signed else x - x.mean(0) * 0.5)
    return out


def observe(batches, **kw):
    obs = ChannelObserver(H, "synthetic", **kw)
    for b in batches:
        obs.update(b)
    return obs


def test_percentile_thresholds_within_5_percent_of_true_per_channel_percentile():
    batches = synthetic(60, 500, seed=1)
    obs = observe(batches)
    data = torch.cat(batches)
    for signed, values in ((False, data), (True, data.abs())):
        for q in (99.0, 99.9):
            true = torch.quantile(values.double(), q / 100, dim=0)
            est = choose_thresholds(obs, "percentile", 16, signed, percentile=q).double()
            rel = (est / true - 1).abs()
            assert bool((rel < 0.05).all()), f"q={q} signed={signed}: worst {rel.max():.3f}"
    assert torch.equal(choose_thresholds(obs, "max", 16, False), data.max(0).values)


def test_mse_rule_beats_max_rule_on_heavy_tails():
    batches = synthetic(20, 500, seed=2)
    obs = observe(batches)
    data = torch.cat(batches)
    zero, one = torch.zeros(H), torch.ones(H)
    err = {rule: site_error(data, choose_thresholds(obs, rule, 4, False), zero, one, 4, False).pow(2).mean(0)
           for rule in ("max", "mse")}
    lognormal = slice(1, None, 3)  # the heavy-tailed channels, where clipping pays
    assert bool((err["mse"][lognormal] < err["max"][lognormal]).all())
    assert err["mse"].sum() < err["max"].sum()


def test_daqcfs_fit_has_lower_error_than_one_global_threshold():
    model = nn.Sequential(DAQCFSSite(H, 8, name="site"))
    calib = calibrate(model, synthetic(30, 400, seed=3), CalibrationConfig(T=8), progress=False)
    p = calib.sites["0"]
    held_out = torch.cat(synthetic(10, 400, seed=4))
    pooled = torch.quantile(torch.cat(synthetic(30, 400, seed=3)).flatten()[::7], 0.999)
    zero, one = torch.zeros(H), torch.ones(H)
    glob = site_error(held_out, pooled.expand(H), zero, one, 8, False)
    da = site_error(held_out, p.theta, p.psi, p.phi, 8, False)
    assert da.abs().mean() < 0.75 * glob.abs().mean()
    # relative to each channel's own scale the global threshold loses the small channels
    scale = held_out.abs().mean(0)
    assert (da.abs().mean(0) / scale).mean() < 0.3 * (glob.abs().mean(0) / scale).mean()
    # the psi/phi fit removes most of the per-channel mean error the plain quantizer leaves
    plain = site_error(held_out, p.theta, zero, one, 8, False).mean(0).abs()
    fitted = da.mean(0).abs()
    assert fitted.sum() < 0.5 * plain.sum()
    assert calib.config.n_samples == 30 * 400 and calib.stats["0"]["rows"] == 30 * 400


def test_affine_fit_never_scores_worse_than_identity_on_its_samples():
    obs = observe(synthetic(10, 300, seed=8))
    for signed in (False, True):
        theta = choose_thresholds(obs, "percentile", 4, signed)
        psi, phi = fit_affine(obs.reservoir, theta, 4, signed)
        zero, one = torch.zeros(H), torch.ones(H)

        def score(a, b):
            e = site_error(obs.reservoir, theta, a, b, 4, signed)
            return e.pow(2).mean(0) + 4.0 * e.mean(0).pow(2)
        assert bool((score(psi, phi) <= score(zero, one)).all())
        assert bool(((phi != 1) | (psi != 0)).any()), "the fit should move some channel"


def test_observer_memory_is_bounded_and_reservoir_spans_the_stream():
    obs = ChannelObserver(H, "s", reservoir_rows=256, seed=0)
    sizes = None
    for i in range(200):
        obs.update(torch.full((50, H), float(i + 1)))
        now = (obs.hist.numel(), obs.reservoir.numel())
        sizes = sizes or now
        assert obs.reservoir.shape[0] <= 256 and now[0] == sizes[0]
    ids = obs.reservoir[:, 0]
    assert ids.min() < 40 and ids.max() > 160 and 70 < ids.mean() < 130  # uniform over 1..200


def test_calibration_round_trips_bit_exactly_and_applies_to_the_model(tmp_path):
    model = nn.Sequential(DAQCFSSite(H, 16, name="a"), nn.Linear(H, H), DAQCFSSite(H, 16, signed=True, name="b"))
    calib = calibrate(model, synthetic(5, 100, seed=5), CalibrationConfig(T=16, rule="mse", seed=7),
                      model_id="toy", progress=False)
    calib.save(tmp_path / "calib")
    loaded = Calibration.load(tmp_path / "calib")
    assert loaded.config == calib.config and loaded.model_id == "toy" and loaded.stats == calib.stats
    for name, p in calib.sites.items():
        q = loaded.sites[name]
        assert q.signed == p.signed
        assert all(torch.equal(getattr(p, k), getattr(q, k)) for k in ("theta", "psi", "phi"))
    loaded.apply_to(model)
    set_mode(model, "parallel")
    assert torch.equal(dict(iter_sites(model))["2"].theta, calib.sites["2"].theta)
    out = model(torch.cat(synthetic(1, 20, seed=6)))
    assert torch.isfinite(out).all()


def test_power_of_two_steps_round_each_threshold_up_to_a_shift_of_the_largest():
    from calibration.thresholds import power_of_two_steps

    theta = torch.tensor([3.0, 1.5, 1.4999, 0.7, 1e-3, 2.9, 3.0 / 1024])
    got = power_of_two_steps(theta)
    assert got.max() == theta.max() and bool((got >= theta).all()) and bool((got < 2 * theta).all())
    k = torch.log2(theta.max().double() / got.double())
    assert torch.equal(k, k.round())
    assert got.tolist()[:4] == [3.0, 1.5, 1.5, 0.75] and got[-1] == theta[-1]


def test_nearest_power_of_two_steps_round_in_log_scale():
    from calibration.thresholds import STEP_ROUNDINGS, power_of_two_steps
    from stac_lm.convert.options import STEP_ROUNDINGS as OPTION_ROUNDINGS

    assert OPTION_ROUNDINGS == STEP_ROUNDINGS
    # log2(4 / t): 0.5 -> 1 (2.0 rounds to 2.83 -> 2.0 at k=1), just below and above sqrt(2) apart
    theta = torch.tensor([4.0, 2.0, 2.9, 2.8, 1.0, 1.5, 4.0 / 1024])
    got = power_of_two_steps(theta, "nearest")
    assert got.tolist() == [4.0, 2.0, 4.0, 2.0, 1.0, 2.0, 4.0 / 1024]
    ratio = got.double() / theta.double()
    assert bool((ratio <= 2 ** 0.5).all()) and bool((ratio >= 2 ** -0.5).all())
    assert bool((got < theta).any())  # unlike 'up', some steps get finer
    with pytest.raises(ValueError, match="step rounding must be one of"):
        power_of_two_steps(theta, "down")


def test_a_power_of_two_calibration_prices_weighted_spikes_as_shifts():
    from calibration.thresholds import power_of_two_steps
    from spike_modules.energy_profile import steps_power_of_two

    model = nn.Sequential(DAQCFSSite(H, 5, name="a", coding="weighted"), nn.Linear(H, H))
    data = synthetic(3, 100, seed=2)
    plain = calibrate(model, data, CalibrationConfig(T=5, coding="weighted"), progress=False)
    shifted = calibrate(model, data, CalibrationConfig(T=5, coding="weighted", power_of_two_steps=True), progress=False)
    plain.apply_to(model)
    assert not steps_power_of_two(model[0])
    shifted.apply_to(model)
    assert steps_power_of_two(model[0])
    assert bool((shifted.sites["0"].theta >= plain.sites["0"].theta).all())
    nearest = CalibrationConfig(T=5, coding="weighted", power_of_two_steps=True, step_rounding="nearest")
    near = calibrate(model, data, nearest, progress=False)
    near.apply_to(model)
    assert steps_power_of_two(model[0])
    assert torch.equal(near.sites["0"].theta, power_of_two_steps(plain.sites["0"].theta, "nearest"))
    with pytest.raises(ValueError, match="step_rounding must be one of"):
        CalibrationConfig(T=5, coding="weighted", power_of_two_steps=True, step_rounding="down")
