"""A converted text classifier as a directory, and :func:`load_text_snn` that rebuilds it in one call.

Layout (``<savedir>/model``)::

    config.json                      format, the HF config, classes, max length, site spec, T's,
                                     the run's options, source, versions, sha256 of the tensor files
    model.safetensors                the converted model's state dict (sites at the default T)
    calibration/T<T>/calibration.*   the per-T site parameters (``calibration.Calibration``)
    tokenizer/                       the tokenizer
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from calibration import Calibration
from calibration.artifact import PARAMS as SITE_PARAMS
from spike_modules.site import iter_sites, set_mode, set_timesteps
from stac_common.io import read_saved_config, sha256_file, write_json

from .model import SiteSpec, convert_classifier

FORMAT = "stac-text-cls"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CALIB_DIR = "calibration"
TOKENIZER_DIR = "tokenizer"
SITE_MODES = {"ParaInfNeuron": "parallel", "IFNeuron": "sequential"}


def write_model(directory: Path, snn: nn.Module, tokenizer, calibrations: dict[int, Calibration], T: int,
                spec: SiteSpec, info: dict) -> None:
    """Write the model directory (into an existing, empty ``directory``; the caller makes it atomic).
    ``calibrations[T]`` must be applied to ``snn``; ``info`` adds classes, max_len, options, source."""
    directory.mkdir(parents=True, exist_ok=True)
    save_model(snn, str(directory / WEIGHTS_FILE))
    files = {WEIGHTS_FILE: sha256_file(directory / WEIGHTS_FILE)}
    for t, calib in sorted(calibrations.items()):
        sub = directory / CALIB_DIR / f"T{t}"
        sub.mkdir(parents=True)
        calib.write_files(sub)
    tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "hf_config": snn.config.to_dict(),
              "site_spec": {"sites": spec.sites, "activation": spec.activation, "norms": spec.norms,
                            "sequential": spec.sequential, "probs": spec.probs, "coding": spec.coding}, "default_T": T,
              "timesteps": sorted(calibrations), "files": files,
              "versions": {p: version(p) for p in ("torch", "transformers", "spikingjelly", "safetensors")}, **info}
    write_json(directory / CONFIG_FILE, config)


def load_text_snn(directory: str | Path, T: int | None = None, device: str | torch.device = "cpu",
                  neuron_type: str | None = None) -> tuple[nn.Module, object, dict]:
    """Rebuild a saved spiking classifier: ``(model, tokenizer, config)``.

    The model is built from the saved HF config, converted with the saved site spec, loaded
    strictly, then given the calibration of ``T`` (default: the saved default T), sites in
    ``parallel`` mode. :func:`text_cls.model.classify` runs it with ``neuron_type`` (kept as
    ``model.stac_neuron_type``): one parallel pass (ParaInfNeuron) or the time-stepped simulation
    (IFNeuron); default: the neuron type the run was made with. The rebuilt :class:`SiteSpec` is
    kept as ``model.stac_site_spec``.

    Raises:
        ValueError: a missing or edited file, another format, a T that was not calibrated, or
            weights that do not fit.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    d = Path(directory)
    bad = f"saved text_cls model in {d} is unusable"
    if not d.is_dir():
        raise ValueError(f"{bad}: no such directory")
    config = read_saved_config(d, bad, CONFIG_FILE, (WEIGHTS_FILE,), (TOKENIZER_DIR, CALIB_DIR), FORMAT,
                               FORMAT_VERSION, "text_cls model", "run python -m text_cls again with this version")
    T = int(config["default_T"]) if T is None else T
    if T not in config["timesteps"]:
        raise ValueError(f"T={T} was not calibrated for this model; saved T's: {config['timesteps']}")
    hf = dict(config["hf_config"])
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf),
                                                           dtype=torch.float32)
    site_spec = config["site_spec"]
    # directories written before these were options ran causal norms and one-spike-a-step neurons
    spec = SiteSpec(site_spec["sites"], site_spec["activation"], int(config["default_T"]),
                    site_spec.get("norms", "causal"), site_spec.get("sequential", "if"), site_spec.get("probs", "sum"),
                    site_spec.get("coding", "rate"))
    model = convert_classifier(model, spec)
    try:
        load_model(model, str(d / WEIGHTS_FILE), strict=True)
    except (RuntimeError, SafetensorError) as e:
        raise ValueError(f"{bad}: {WEIGHTS_FILE} does not fit the model rebuilt from {CONFIG_FILE}: "
                         f"{' '.join(str(e).split())[:400]}") from None
    if T != int(config["default_T"]):
        Calibration.load(d / CALIB_DIR / f"T{T}").apply_to(model)
    else:  # the state dict holds the default T's sites; they must agree with its calibration file
        calib = Calibration.load(d / CALIB_DIR / f"T{T}")
        calib.check_against(model, T)
        for name, site in iter_sites(model):
            if any(not torch.equal(getattr(site, k).detach(), getattr(calib.sites[name], k)) for k in SITE_PARAMS):
                raise ValueError(f"{bad}: site {name!r} differs between {WEIGHTS_FILE} and its calibration files")
    set_timesteps(model, T)
    neuron = neuron_type or config.get("options", {}).get("neuron_type", "ParaInfNeuron")
    if neuron not in SITE_MODES:
        raise ValueError(f"neuron_type must be one of {', '.join(SITE_MODES)}, got {neuron!r}")
    set_mode(model, "parallel")
    model.stac_neuron_type = neuron
    model.stac_site_spec = spec  # as rebuilt, defaults for older directories included
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d / TOKENIZER_DIR))
    return model.eval().to(device), tok, config
