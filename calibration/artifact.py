"""The ``Calibration`` artifact: per-site ``theta``/``psi``/``phi``/``burst``, saved as safetensors + JSON."""

from __future__ import annotations

import json
from importlib.metadata import version
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from spike_modules.attention import KV_SITES
from spike_modules.quantizer import (capped_levels, check_init_mem, check_max_burst, check_max_levels, check_timesteps,
                                     coding_levels)
from spike_modules.site import iter_sites
from stac_common.io import atomic_dir, sha256_file, write_json

from .thresholds import STEP_ROUNDINGS, check_rule

FORMAT_VERSION = 2
TENSORS_FILE = "calibration.safetensors"
META_FILE = "calibration.json"
PARAMS = ("theta", "psi", "phi", "burst", "dead")  # dead: zeros in files saved before dead zones


@dataclass(frozen=True)
class CalibrationConfig:
    """How a calibration was made; saved beside the tensors and checked on load.

    ``reservoir_rows`` rows (tokens) per site are kept for the ``psi``/``phi`` fit: 4096 rows of a
    1536-channel site take 25 MB. Fewer rows make the per-channel mean-error estimate too noisy
    for the fit to carry over to new text (bench/calibration_smollm2.py).
    ``bias_weight``: see :func:`calibration.affine.fit_affine`.
    ``max_burst``: the most spikes a neuron may fire per step, the same cap for every neuron.
    1 is the plain IF neuron (values beyond ``theta`` are clipped); above 1, the rare huge
    activations of some tokens pass with the same step ``theta/T`` instead of being clipped.
    The cap is uniform, not fitted to the calibration maxima: outliers in new text land in
    channels where calibration never saw one (measured on SmolLM2's down projection: caps at
    the calibration maxima kept most of the clipping loss). Thresholds are chosen by ``rule``
    either way; bursts only add the spikes those outliers need, and reports count them. The
    largest cap is ``2**24 // T`` (counts stay exact in float32). SmolLM2's "massive
    activations" (the first token, a few fixed channels of two down projections) need over
    200,000 spikes per step at a 99th-percentile threshold; a cap of 4096 that clipped them cost
    0.04 top-1 agreement.
    ``burst_budget``: if set, the most spikes per step a neuron may need for the largest value
    calibration saw in its channel; a channel whose maximum would need more gets the larger
    threshold ``absmax / burst_budget`` (its usual values then pass at a coarser step). This
    keeps those massive activations (fixed channels, seen in every calibration window) from
    firing millions of spikes, while ``max_burst`` still lets outliers calibration never saw pass.
    ``power_of_two_steps``: every threshold moved to a power-of-two fraction of its site's
    largest (:func:`calibration.thresholds.power_of_two_steps`), before the psi/phi fit;
    ``step_rounding`` says how: ``'up'`` (never a finer step) or ``'nearest'`` (in log scale).
    """

    T: int
    rule: str = "percentile"
    percentile: float = 99.9
    n_samples: int = 0
    seed: int = 0
    init_mem: float = 0.5
    fit_affine: bool = True
    bias_weight: float = 4.0
    reservoir_rows: int = 4096
    max_burst: int = 1
    burst_budget: int | None = None
    coding: str = "rate"
    power_of_two_steps: bool = False
    step_rounding: str = "up"
    kv_levels: int | None = None

    def __post_init__(self):
        check_timesteps(self.T)
        coding_levels(self.T, self.coding)
        check_max_levels(self.kv_levels, self.coding)
        check_rule(self.rule, self.percentile)
        check_init_mem(self.init_mem)
        if self.n_samples < 0 or self.reservoir_rows < 0 or not self.bias_weight >= 0:
            raise ValueError("n_samples, reservoir_rows and bias_weight must be >= 0")
        check_max_burst(self.max_burst, self.T, self.coding)
        if not isinstance(self.power_of_two_steps, bool):
            raise ValueError(f"power_of_two_steps must be true or false, got {self.power_of_two_steps!r}")
        if self.step_rounding not in STEP_ROUNDINGS:
            raise ValueError(f"step_rounding must be one of {STEP_ROUNDINGS}, got {self.step_rounding!r}")
        b = self.burst_budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= self.max_burst):
            raise ValueError(f"burst_budget is the spikes per step planned for a channel's calibration maximum: None or "
                             f"an integer from 1 to max_burst ({self.max_burst}), got {b!r}")

    @property
    def levels(self) -> int:
        """Quantisation levels per sign of the coding at T (``spike_modules.quantizer.coding_levels``)."""
        return coding_levels(self.T, self.coding)

    def levels_of(self, site: str) -> int:
        """The levels per sign of the site named ``site``: :attr:`levels`, capped at ``kv_levels`` for an
        attention's k and v sites (``spike_modules.attention.KV_SITES``)."""
        cap = self.kv_levels if site.rpartition(".")[2] in KV_SITES else None
        return capped_levels(self.T, self.coding, cap)


@dataclass
class SiteParams:
    theta: torch.Tensor
    psi: torch.Tensor
    phi: torch.Tensor
    signed: bool
    burst: torch.Tensor | None = None  # per-channel cap; None means 1 everywhere
    dead: torch.Tensor | None = None   # per-channel dead zone in counts; None means none (0 everywhere)

    def __post_init__(self):
        if self.burst is None:
            self.burst = torch.ones_like(self.theta)
        if self.dead is None:
            self.dead = torch.zeros_like(self.theta)

    @property
    def channels(self) -> int:
        return self.theta.numel()


@dataclass
class Calibration:
    """Per-site parameters plus how they were obtained. ``stats`` holds JSON-able per-site facts."""

    config: CalibrationConfig
    sites: dict[str, SiteParams]
    model_id: str = ""
    stats: dict[str, dict] = field(default_factory=dict)

    def check_against(self, model: nn.Module, T: int | None = None, prefix: str = "") -> None:
        """Raise ``ValueError`` listing every way ``model`` (its sites) or ``T`` differs from this calibration.
        ``prefix``: where ``model`` sits in the calibrated model (one decoder layer of it)."""
        problems = []
        if T is not None and T != self.config.T:
            problems.append(f"calibrated for T={self.config.T}, asked for T={T}")
        found = _sites_named(model, prefix)
        for name in sorted(set(self.sites) - set(found)):
            problems.append(f"site {name!r} is in the calibration but not in the model")
        for name in sorted(set(found) - set(self.sites)):
            problems.append(f"site {name!r} is in the model but not in the calibration")
        for name in sorted(set(found) & set(self.sites)):
            p, s = self.sites[name], found[name]
            if p.channels != s.num_channels:
                problems.append(f"site {name!r}: calibrated for {p.channels} channels, model has {s.num_channels}")
            if p.signed != s.signed:
                problems.append(f"site {name!r}: calibrated signed={p.signed}, model site signed={s.signed}")
            if s.coding != self.config.coding:
                problems.append(f"site {name!r}: calibrated for {self.config.coding} coding, model site codes {s.coding}")
            elif capped_levels(self.config.T, s.coding, s.max_levels) != self.config.levels_of(name):
                problems.append(f"site {name!r}: calibrated for {self.config.levels_of(name)} levels per sign at "
                                f"T={self.config.T}, model site caps them at {s.max_levels} (kv_levels differ)")
        if problems:
            head = f"calibration (model {self.model_id!r}) does not match this model/config:\n  - "
            raise ValueError(head + "\n  - ".join(problems) + "\nre-run calibration for this model and T")

    def apply_to(self, model: nn.Module, prefix: str = "") -> None:
        """Check, then copy every site's parameters into ``model`` (T is set from the config).
        ``prefix``: see :meth:`check_against`."""
        self.check_against(model, prefix=prefix)
        for name, site in _sites_named(model, prefix).items():
            p = self.sites[name]
            site.set_params(p.theta, p.psi, p.phi, p.burst, p.dead)
            site.T = self.config.T

    def write_files(self, directory: str | Path) -> None:
        """Write the two files into an existing directory (callers that build a larger output
        directory atomically use this; :meth:`save` is the atomic stand-alone form)."""
        directory = Path(directory)
        tensors = {f"{name}.{k}": getattr(p, k).detach().cpu().float().contiguous()
                   for name, p in self.sites.items() for k in PARAMS}
        save_file(tensors, str(directory / TENSORS_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "config": asdict(self.config),
            "model_id": self.model_id,
            "sites": {name: {"channels": p.channels, "signed": p.signed} for name, p in self.sites.items()},
            "stats": self.stats,
            "tensors_sha256": sha256_file(directory / TENSORS_FILE),
            "versions": _versions(),
        }
        write_json(directory / META_FILE, meta)  # written last: its presence marks a complete save

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Save atomically to ``directory``; an interrupted save leaves nothing that loads."""
        with atomic_dir(directory, overwrite) as tmp:
            self.write_files(tmp)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> "Calibration":
        """Load and verify (format, checksum, keys, shapes, values); ``ValueError`` says what is wrong."""
        directory = Path(directory)
        bad = f"calibration in {directory} is unusable"
        meta_path, tensor_path = directory / META_FILE, directory / TENSORS_FILE
        if not meta_path.is_file() or not tensor_path.is_file():
            raise ValueError(f"{bad}: expected {META_FILE} and {TENSORS_FILE} there; re-run calibration")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{bad}: {META_FILE} is not valid JSON ({e})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{bad}: format_version {meta.get('format_version')!r}, this STAC reads "
                             f"{FORMAT_VERSION}; re-run calibration with this version")
        if sha256_file(tensor_path) != meta.get("tensors_sha256"):
            raise ValueError(f"{bad}: {TENSORS_FILE} does not match its checksum (truncated or edited)")
        try:
            tensors = load_file(str(tensor_path))
            config = CalibrationConfig(**meta["config"])
            declared = meta["sites"]
        except (SafetensorError, KeyError, TypeError) as e:
            raise ValueError(f"{bad}: {e}") from None
        expected = {f"{n}.{k}" for n in declared for k in PARAMS}
        if not any(k.endswith(".dead") for k in tensors):  # saved before dead zones: none
            tensors.update({f"{n}.dead": torch.zeros_like(tensors[f"{n}.theta"]) for n in declared
                            if f"{n}.theta" in tensors})
        if set(tensors) != expected:
            raise ValueError(f"{bad}: tensors {sorted(set(tensors) ^ expected)[:6]} missing or unexpected")
        sites = {}
        for name, d in declared.items():
            p = SiteParams(*(tensors[f"{name}.{k}"] for k in PARAMS[:3]), signed=bool(d["signed"]),
                           burst=tensors[f"{name}.burst"], dead=tensors[f"{name}.dead"])
            if any(getattr(p, k).shape != (d["channels"],) for k in PARAMS):
                raise ValueError(f"{bad}: site {name!r} tensors are not all of shape [{d['channels']}]")
            if not bool((p.theta > 0).all()) or not all(bool(torch.isfinite(getattr(p, k)).all()) for k in PARAMS):
                raise ValueError(f"{bad}: site {name!r} has non-finite or non-positive thresholds")
            if not bool(((p.burst >= 1) & (p.burst == torch.floor(p.burst))).all()):
                raise ValueError(f"{bad}: site {name!r} has burst caps that are not whole numbers >= 1")
            if not bool((p.dead >= 0).all()):
                raise ValueError(f"{bad}: site {name!r} has a negative dead zone")
            sites[name] = p
        return cls(config, sites, meta.get("model_id", ""), meta.get("stats", {}))


def _sites_named(model: nn.Module, prefix: str) -> dict[str, nn.Module]:
    return {f"{prefix}.{name}" if prefix else name: site for name, site in iter_sites(model)}


def _versions() -> dict[str, str]:
    return {pkg: version(pkg) for pkg in ("torch", "safetensors", "spikingjelly")}
