"""Bad input: a ValueError that says what is wrong and what is allowed; nothing half-written."""

import json

import pytest
import torch
from torch import nn

import calibration.artifact as artifact
from calibration import Calibration, CalibrationConfig, ChannelObserver, calibrate
from spike_modules import DAQCFSSite, IFNeuron, ParaInfNeuron, SignedIFNeuron
from stac_common.io import OutputExistsError

NEURONS = [IFNeuron, SignedIFNeuron, ParaInfNeuron, lambda T, th=1.0: DAQCFSSite(3, T)]


@pytest.mark.parametrize("make", NEURONS)
@pytest.mark.parametrize("T", [0, -3, 1.5, True, 5000])
def test_bad_timesteps(make, T):
    with pytest.raises(ValueError, match="T must be"):
        make(T)


@pytest.mark.parametrize("make", [IFNeuron, SignedIFNeuron, ParaInfNeuron])
@pytest.mark.parametrize("th", [0.0, -1.0, float("nan"), float("inf"), torch.tensor([1.0, 0.0, 2.0]),
                                torch.ones(2, 2)])
def test_bad_thresholds(make, th):
    with pytest.raises(ValueError, match="th must"):
        make(4, th)


def test_site_rejects_bad_parameters():
    site = DAQCFSSite(3, 4, name="blk.0")
    with pytest.raises(ValueError, match="'blk.0' theta must be finite and > 0"):
        site.set_params(torch.tensor([1.0, -2.0, 1.0]))
    with pytest.raises(ValueError, match="psi must be a scalar or have 3 channels"):
        site.set_params(1.0, torch.zeros(4))
    with pytest.raises(ValueError, match="phi must be > 0"):
        site.set_params(1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="unknown mode 'spiky'; allowed: ann, quant, parallel, sequential"):
        site.mode = "spiky"


@pytest.mark.parametrize("call", [
    lambda: ParaInfNeuron(4, torch.ones(5))(torch.rand(2, 3, 4)),
    lambda: IFNeuron(4, torch.ones(5))(torch.rand(4, 2, 4)),
    lambda: DAQCFSSite(5, 4, mode="parallel")(torch.rand(2, 4)),
    lambda: ChannelObserver(5, "s").update(torch.rand(2, 4)),
])
def test_shape_not_matching_calibrated_channels(call):
    with pytest.raises(ValueError, match="5"):
        call()


def test_sequential_neuron_wants_T_leading_steps():
    with pytest.raises(ValueError, match=r"expected input shaped \[T=4, \.\.\., H\]"):
        IFNeuron(4)(torch.rand(3, 2))


class Blows(nn.Module):
    """A toy model whose second site receives inf/NaN."""

    def __init__(self):
        super().__init__()
        self.ok = DAQCFSSite(3, 4, name="ok")
        self.bad = DAQCFSSite(3, 4, name="layers.1.mlp.down")

    def forward(self, x):
        return self.bad(self.ok(x) / (x - x))  # 0/0 = NaN, y/0 = inf


def test_nan_and_inf_in_calibration_name_the_site():
    with pytest.raises(ValueError, match=r"site 'bad': \d+ NaN/inf activation\(s\) in calibration batch 1"):
        calibrate(Blows(), [torch.rand(4, 3)], CalibrationConfig(T=4), progress=False)


def test_calibration_config_validates():
    with pytest.raises(ValueError, match="unknown threshold rule 'median'; allowed: max, percentile, mse"):
        CalibrationConfig(T=8, rule="median")
    with pytest.raises(ValueError, match="percentile must be in"):
        CalibrationConfig(T=8, percentile=0)
    with pytest.raises(ValueError, match="T must be"):
        CalibrationConfig(T=0)


def small_calibration():
    model = nn.Sequential(DAQCFSSite(3, 4, name="a"))
    return model, calibrate(model, [torch.rand(8, 3)], CalibrationConfig(T=4), progress=False)


def test_interrupted_save_leaves_nothing_that_loads(tmp_path, monkeypatch):
    _, calib = small_calibration()

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C after the tensors, before the JSON
    monkeypatch.setattr(artifact, "write_json", dies)
    with pytest.raises(KeyboardInterrupt):
        calib.save(tmp_path / "calib")
    assert list(tmp_path.iterdir()) == []  # no final directory, no temporary left behind
    with pytest.raises(ValueError, match="expected calibration.json and calibration.safetensors"):
        Calibration.load(tmp_path / "calib")


def test_corrupt_or_mismatched_saves_are_refused(tmp_path):
    model, calib = small_calibration()
    d = calib.save(tmp_path / "calib")
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        calib.save(d)
    calib.save(d, overwrite=True)
    tensors = d / "calibration.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-8])
    with pytest.raises(ValueError, match="does not match its checksum"):
        Calibration.load(d)
    calib.save(d, overwrite=True)
    meta = json.loads((d / "calibration.json").read_text())
    meta["format_version"] = 99
    (d / "calibration.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99"):
        Calibration.load(d)
    other = nn.Sequential(DAQCFSSite(4, 4, name="a"), DAQCFSSite(3, 4, name="b"))
    with pytest.raises(ValueError, match="site '0': calibrated for 3 channels, model has 4") as err:
        calib.apply_to(other)
    assert "site '1' is in the model but not in the calibration" in str(err.value)
    with pytest.raises(ValueError, match="calibrated for T=4, asked for T=8"):
        calib.check_against(model, T=8)
