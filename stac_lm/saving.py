"""A converted SNN as a directory, and ``load_snn`` that rebuilds it from that directory alone.

Layout::

    config.json               format, source model (id, revision or sha256), the HF config, mode, T,
                              every option, converter/calibration configs, 8-bit paths, versions,
                              sha256 of the tensor files
    snn_model.safetensors     the converted model's state dict (tied embeddings stored once)
    calibration.safetensors   per-site theta/psi/phi (+ calibration.json), taken from the model's
    calibration.json          sites at save time: the state dict and these must agree on load
    tokenizer/                the source tokenizer
    conversion_log.txt        what was swapped where, site parameters, timings
    report.json               the verification report (when verified)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from calibration import Calibration, SiteParams
from calibration.artifact import PARAMS as SITE_PARAMS
from spike_modules import iter_sites, set_mode
from stac_io import atomic_dir, read_saved_config, sha256_file, write_json

from . import integration
from .report import assemble_report

FORMAT_VERSION = 1
FORMAT = "stac-snn"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "snn_model.safetensors"
CALIB_FILES = ("calibration.safetensors", "calibration.json")
TOKENIZER_DIR = "tokenizer"
LOG_FILE = "conversion_log.txt"
REPORT_FILE = "report.json"
SAVEABLE_INT8 = ("own", "bnb", "torchao", "none")  # backends whose layers calibration.int8.prepare_int8_ rebuilds


def library_versions() -> dict[str, str]:
    return {p: version(p) for p in ("torch", "transformers", "spikingjelly", "safetensors", "accelerate")}


def calibration_from_model(model: nn.Module, base: Calibration) -> Calibration:
    """The model's current site parameters as a :class:`Calibration` (``base`` gives config and stats).

    The model's sites are the one source of truth: a fine-tune may have moved them since
    calibration."""
    sites = {name: SiteParams(**{k: getattr(site, k).detach().float().cpu().clone() for k in SITE_PARAMS},
                              signed=site.signed)
             for name, site in iter_sites(model)}
    return Calibration(base.config, sites, base.model_id, base.stats)


def conversion_log(out) -> str:
    """The human-readable ``conversion_log.txt`` of a :class:`~stac_lm.pipeline.Converted` run."""
    o = out.options
    lines = [f"STAC conversion of {out.source['model_id']} ({o.model_name})", f"mode: {o.mode}, T={o.timesteps}",
             "options: " + ", ".join(f"{k}={v}" for k, v in sorted(o.to_dict().items())), "",
             "== modules swapped or added =="]
    lines += integration.swap_log(out.snn).splitlines()
    lines += ["", "== spiking sites (theta min / median / max; channels with psi != 0 or phi != 1) =="]
    for name, site in iter_sites(out.snn):
        th = site.theta.detach().float().cpu()
        moved = int(((site.psi != 0) | (site.phi != 1)).sum())
        lines.append(f"{name}: {site.num_channels} channels, {'signed' if site.signed else 'unsigned'}, theta "
                     f"{float(th.min()):.4g} / {float(th.median()):.4g} / {float(th.max()):.4g}, affine {moved}")
    if out.quantization:
        q = out.quantization
        lines += ["", f"== 8-bit weights: {q['backend']} ({q['layers']} layers, max rel error "
                      f"{q['max_rel_error']:.3g}) =="] + list(q["paths"])
    if out.finetune:
        lines += ["", "== fine-tune ==", json.dumps(out.finetune, sort_keys=True, default=str)]
    lines += ["", "== seconds per step =="] + [f"{k}: {v:.1f}" for k, v in out.step_seconds.items()]
    return "\n".join(lines) + "\n"


def build_config(out, files: dict[str, str]) -> dict:
    o = out.options
    q = out.quantization or {"backend": "none", "paths": []}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "source": out.source,
        "hf_config": out.ann.config.to_dict(),  # the source architecture; load_snn converts it again
        "mode": o.mode, "timesteps": o.timesteps,
        "options": o.to_dict(),
        "conversion_config": integration.conversion_config_to_dict(out.conversion_config),
        "calibration_config": asdict(out.calibration.config),
        "quantization": {"backend": q["backend"], "quantized_paths": integration.quantized_paths(q),
                         "summary": {k: v for k, v in q.items() if k != "paths"}},
        "finetune": out.finetune,
        "site_mode": "parallel",
        "texts": {"calibration": out.calib_stream.describe(), "evaluation": out.eval_stream.describe()},
        "step_seconds": out.step_seconds, "conversion_seconds": out.conversion_seconds,
        "files": files,
        "versions": library_versions(),
    }


def save_snn(out, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a converted run (:class:`~stac_lm.pipeline.Converted`) to ``output_dir`` atomically.

    Raises:
        OutputExistsError: ``output_dir`` exists and ``overwrite`` is False.
        ValueError: 8-bit weights of a backend that cannot be rebuilt on load.
    """
    backend = (out.quantization or {}).get("backend", "none")
    if backend not in SAVEABLE_INT8:
        raise ValueError(f"a model with {backend!r} 8-bit weights cannot be saved: load_snn rebuilds only "
                         f"{', '.join(SAVEABLE_INT8)} layers; use --quant_backend own to save")
    with atomic_dir(output_dir, overwrite) as tmp:
        save_model(out.snn, str(tmp / WEIGHTS_FILE))
        calibration_from_model(out.snn, out.calibration).write_files(tmp)
        out.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        (tmp / LOG_FILE).write_text(conversion_log(out))
        files = {name: sha256_file(tmp / name) for name in (WEIGHTS_FILE, CALIB_FILES[0])}
        config = build_config(out, files)
        write_json(tmp / CONFIG_FILE, config)
        if out.report is not None:
            out.report = assemble_report(out.report, config)
            write_json(tmp / REPORT_FILE, out.report)
    return Path(output_dir)


def _check_sites_agree(model: nn.Module, calib: Calibration, T: int, bad: str) -> None:
    calib.check_against(model, T=T)
    for name, site in iter_sites(model):
        p = calib.sites[name]
        for k in SITE_PARAMS:
            if not torch.equal(getattr(site, k).detach().float().cpu(), getattr(p, k)):
                raise ValueError(f"{bad}: site {name!r} {k} differs between {WEIGHTS_FILE} and "
                                 f"{CALIB_FILES[0]}; the directory was edited or mixed from two runs")


def load_snn(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, object, dict]:
    """Rebuild a saved SNN from ``directory`` alone: ``(model, tokenizer, config)``.

    The model is built from the saved HF config (random weights), converted with the saved
    converter config, given 8-bit shells at the saved paths, then loaded strictly. Its sites
    are in parallel mode and it is in eval mode on ``device``.

    Raises:
        ValueError: a missing file, bad JSON, another format version, a checksum or shape
            mismatch, or site parameters that disagree with the calibration files.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = Path(directory)
    bad = f"saved SNN in {d} is unusable"
    if not d.is_dir():
        raise ValueError(f"{bad}: no such directory")
    config = read_saved_config(d, bad, CONFIG_FILE, (WEIGHTS_FILE, *CALIB_FILES), (TOKENIZER_DIR,), FORMAT,
                               FORMAT_VERSION, "STAC SNN", "convert the model again with this version")
    try:
        hf = dict(config["hf_config"])
        hf_config = AutoConfig.for_model(hf.pop("model_type"), **hf)
        conv_cfg = integration.conversion_config_from_dict(config["conversion_config"])
        T, backend = int(config["timesteps"]), config["quantization"]["backend"]
        paths = list(config["quantization"]["quantized_paths"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{bad}: {CONFIG_FILE} does not describe a model ({type(e).__name__}: {e})") from None
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    integration.convert_(model, conv_cfg)
    if paths:
        if backend not in SAVEABLE_INT8:
            raise ValueError(f"{bad}: 8-bit backend {backend!r} cannot be rebuilt; saveable: {SAVEABLE_INT8}")
        integration.prepare_int8(model, paths, backend)
    try:
        load_model(model, str(d / WEIGHTS_FILE), strict=True)
    except (RuntimeError, SafetensorError) as e:
        msg = " ".join(str(e).split())[:600]
        raise ValueError(f"{bad}: {WEIGHTS_FILE} does not fit the model rebuilt from {CONFIG_FILE}: {msg}") from None
    calib = Calibration.load(d)
    _check_sites_agree(model, calib, T, bad)
    set_mode(model, config.get("site_mode", "parallel"))
    tok_dir = d / TOKENIZER_DIR
    if not tok_dir.is_dir():
        raise ValueError(f"{bad}: no {TOKENIZER_DIR}/ folder")
    try:
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{bad}: {TOKENIZER_DIR}/ is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    return model.eval().to(device), tok, config
