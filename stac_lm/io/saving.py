"""A conversion run as a directory (``save_snn``), and ``load_snn`` that rebuilds it from that directory alone.

The directory is a :class:`~stac_lm.io.hf_native.SpikingCausalLM`'s (``config.json`` that transformers
reads, ``stac_conversion.json``, ``snn_model.safetensors``, the calibration files and the
tokenizer; see :mod:`stac_lm.io.hf_native`), plus what only a run knows::

    conversion_log.txt        what was swapped where, site parameters, timings
    report.json               the verification report (when verified)

``stac_conversion.json`` also records the run: every option, the texts, the fine-tune and the
seconds per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from spike_modules import iter_sites
from spike_modules.conversion import swap_log
from stac_common.io import write_json

from stac_lm.io.hf_native import SpikingCausalLM, _load, write_pretrained
from stac_lm.io.hf_native import (  # noqa: F401  (names this module had before hf_native: callers import them from here)
    CALIB_FILES, CONFIG_FILE, CONVERSION_FILE, SAVEABLE_INT8, WEIGHTS_FILE, calibration_from_model, library_versions,
)
from stac_lm.convert.report import assemble_report

LOG_FILE = "conversion_log.txt"
REPORT_FILE = "report.json"


def conversion_log(out) -> str:
    """The human-readable ``conversion_log.txt`` of a :class:`~stac_lm.convert.pipeline.Converted` run."""
    o = out.options
    lines = [f"STAC conversion of {out.source['model_id']} ({o.model_name})", f"mode: {o.mode}, T={o.timesteps}",
             "options: " + ", ".join(f"{k}={v}" for k, v in sorted(o.to_dict().items())), "",
             "== modules swapped or added =="]
    lines += swap_log(out.snn).splitlines()
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
    silence = out.silence
    if silence:
        lines += ["", f"== dead zones: KL {silence['kl']:.4g} (budget {silence['config']['budget']}), top-1 vs the SNN "
                      f"without them {silence['top1_vs_dense']:.3f}, {silence['bytes_share_silenced']:.1%} of the rows' "
                      f"bytes silenced on the statistics window =="]
        lines += [f"{g}: {share:.0%} silent" for g, share in silence["silent_share_per_group"].items()]
    if out.finetune:
        lines += ["", "== fine-tune ==", json.dumps(out.finetune, sort_keys=True, default=str)]
    lines += ["", "== seconds per step =="] + [f"{k}: {v:.1f}" for k, v in out.step_seconds.items()]
    return "\n".join(lines) + "\n"


def run_record(out) -> dict:
    """What ``stac_conversion.json`` records of a run beyond what the model knows (source, options, texts, ...)."""
    return {
        "source": out.source,
        "options": out.options.to_dict(),
        "finetune": out.finetune,
        "silence": out.silence,
        "memory": out.memory,
        "texts": {"calibration": out.calib_stream.describe(), "evaluation": out.eval_stream.describe()},
        "step_seconds": out.step_seconds, "conversion_seconds": out.conversion_seconds,
    }


def save_snn(out, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a converted run (:class:`~stac_lm.convert.pipeline.Converted`) to ``output_dir`` atomically.

    ``out.snn`` becomes a :class:`SpikingCausalLM` (in place): ``out.snn.save_pretrained`` and
    ``out.snn.generate`` work on it afterwards.

    Raises:
        OutputExistsError: ``output_dir`` exists and ``overwrite`` is False.
        ValueError: 8-bit weights of a backend that cannot be rebuilt on load.
    """
    backend = (out.quantization or {}).get("backend", "none")
    if backend not in SAVEABLE_INT8:
        raise ValueError(f"a model with {backend!r} 8-bit weights cannot be saved: load_snn rebuilds only "
                         f"{', '.join(SAVEABLE_INT8)} layers; use --quant_backend own to save")
    model = SpikingCausalLM.from_converted_(out.snn, out.calibration, out.tokenizer,
                                            quantization=out.quantization or {"backend": "none", "paths": []},
                                            conversion=run_record(out))

    def run_files(tmp: Path, conversion: dict) -> None:
        (tmp / LOG_FILE).write_text(conversion_log(out))
        if out.report is not None:
            out.report = assemble_report(out.report, conversion)
            write_json(tmp / REPORT_FILE, out.report)

    return write_pretrained(model, output_dir, overwrite, extra=run_files)


def load_snn(directory: str | Path, device: str | torch.device = "cpu",
             max_memory: dict | str | None = None) -> tuple[nn.Module, object, dict]:
    """Rebuild a saved SNN from ``directory`` alone: ``(model, tokenizer, config)``.

    ``model`` is a :class:`SpikingCausalLM` (see :func:`stac_lm.io.hf_native.from_pretrained`);
    ``config`` is ``stac_conversion.json`` with the transformers config under ``"hf_config"``.
    A directory of the first layout (one STAC ``config.json``) loads too.

    Raises:
        ValueError: a missing file, bad JSON, another format version, a checksum or shape
            mismatch, or site parameters that disagree with the calibration files.
    """
    model, conversion, hf = _load(Path(directory), device, max_memory)
    return model, model.tokenizer, dict(conversion, hf_config=hf)
