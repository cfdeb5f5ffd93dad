"""``TextClsOptions``: every parameter of one text-classification run, validated, saved as JSON.

``None`` fields are resolved in ``__post_init__`` (dataset-dependent max length, the T sweep,
the run directory), so the saved options hold the values that were used. Some fields keep the
research command's names; ``text_cls.cli`` maps the shared flags onto them (``--timesteps`` ->
``time_steps``, ``--primary_timesteps`` -> ``time_step``, ``--output_dir`` -> ``savedir``,
``--batch_size`` -> ``batchsize``, ``--eval_batch_size`` -> ``eval_batchsize``,
``--model_name_or_path`` -> ``model_name``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from spike_modules.adapters.bert import SITE_SCOPES
from spike_modules.quantizer import CODINGS, coding_levels
from stac_common.cli import MAX_TIMESTEPS as MAX_T

from .data import DATASETS, FILE_MAX_LEN, FILE_SUFFIXES, HUB_DATASETS, TWEETS, TWEETS_MAX_LEN
from .model import ACTIVATIONS, NET_ARCHS, NORM_SCHEDULES, SEQUENTIAL_NEURONS

DEFAULT_SWEEP = (4, 8, 16)
DEFAULT_T = 8
NEURON_TYPES = ("ParaInfNeuron", "IFNeuron")
NEURON_ALIASES = {"parainfneuron": "ParaInfNeuron", "parainfneuron_text": "ParaInfNeuron", "parallel": "ParaInfNeuron",
                  "ifneuron": "IFNeuron", "ifneuron_text": "IFNeuron", "sequential": "IFNeuron"}
DATASET_ALIASES = {"textcls": TWEETS, "tweet": TWEETS, "sst-2": "sst2", "agnews": "ag_news"}
THRESHOLD_RULES = ("max", "percentile", "mse")
SELECT_BY = ("agreement", "kl")
# options that only shape the DA-QCFS fine-tune: refused at a non-default value when no fine-tune runs
FINE_TUNE_ONLY = ("distill_samples", "train_cycle", "distill_temperature", "float_loss", "hidden_distill", "distill",
                  "train_thresholds")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|\d+)$")


def _int(name: str, v, lo: int, hi: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {bound}, got {v!r}")


def _float(name: str, v, lo: float, hi: float, lo_open: bool = True) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (lo < v if lo_open else lo <= v) and v <= hi
    if not ok:
        raise ValueError(f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")


def _choice(name: str, v, allowed) -> None:
    if v not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {v!r}")


@dataclass(frozen=True)
class TextClsOptions:
    """One run (the CLI's flags, same names).

    Raises:
        ValueError: a value out of range, an unknown choice, conflicting data flags, a missing file.
    """

    dataset: str = TWEETS
    datadir: str | None = None
    train_file: str | None = None
    test_file: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    encoding: str = "utf-8"
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    max_train_samples: int | None = 2000
    distill_samples: int | str | None = None
    max_eval_samples: int | None = 800
    sequential_samples: int | str | None = "auto"
    max_len: int | None = None
    model_name: str = "embedded"
    net_arch: str = "bert_base_qcfs"
    spike_sites: str = "all"
    activation: str = "keep"
    norm_schedule: str = "causal"
    sequential_neuron: str = "catch_up"
    coding: str = "weighted"
    neuron_type: str = "ParaInfNeuron"
    time_step: int | None = None
    time_steps: tuple[int, ...] | None = None
    ann_epochs: int = 1
    trainsnn_epochs: int | None = None
    learning_rate: float = 1e-4
    snn_learning_rate: float = 1e-4
    batchsize: int = 32
    eval_batchsize: int = 64
    freeze_embeddings: bool = True
    direct_inference: bool = False
    calibrate_th: bool = True
    fit_affine: bool = True
    threshold_rule: str = "percentile"
    percentile: float = 99.9
    threshold_candidates: tuple[str, ...] = ("mse",)
    distill: float = 1.0
    distill_temperature: float = 1.0
    train_cycle: tuple[int, ...] | None = None
    select_by: str = "agreement"
    float_loss: float = 0.0
    train_thresholds: str = "mse"
    hidden_distill: float = 0.0
    probs_scale: str = "max"
    calib_samples: int = 256
    device: str = "auto"
    savedir: str | None = None
    overwrite: bool = False
    seed: int = 0
    threads: int | None = None
    progress: bool = True

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: resolve once)
        dataset = DATASET_ALIASES.get(str(self.dataset).lower(), str(self.dataset).lower())
        _choice("dataset", dataset, DATASETS)
        set_("dataset", dataset)
        if self.datadir is not None:
            self._files_from_datadir(dataset)
        if self.train_file is not None and dataset != TWEETS:
            raise ValueError(f"--train_file gives the data; it cannot be combined with --dataset {dataset}")
        if self.test_file is not None and self.train_file is None:
            raise ValueError("--test_file needs --train_file (the classes come from the training data)")
        for key in ("train_file", "test_file"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"--{key} {path}: no such file")
        for key in ("validation_fraction", "test_fraction"):
            _float(key, getattr(self, key), 0.0, 0.5)
        for key in ("max_train_samples", "max_eval_samples", "sequential_samples", "distill_samples"):
            if (key, getattr(self, key)) in (("sequential_samples", "auto"), ("distill_samples", "all")):
                continue
            if getattr(self, key) is not None:
                _int(key, getattr(self, key), 1)
        if self.max_len is None:
            set_("max_len", HUB_DATASETS[dataset]["max_len"] if dataset in HUB_DATASETS
                 else FILE_MAX_LEN if self.train_file else TWEETS_MAX_LEN)
        _int("max_len", self.max_len, 2, 4096)
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise ValueError("model_name must be a non-empty string: 'embedded', a local folder or a hub name")
        _choice("net_arch", self.net_arch, NET_ARCHS)
        _choice("spike_sites", self.spike_sites, SITE_SCOPES)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("norm_schedule", self.norm_schedule, NORM_SCHEDULES)
        _choice("sequential_neuron", self.sequential_neuron, SEQUENTIAL_NEURONS)
        _choice("coding", self.coding, CODINGS)
        set_("neuron_type", NEURON_ALIASES.get(str(self.neuron_type).lower(), self.neuron_type))
        _choice("neuron_type", self.neuron_type, NEURON_TYPES)
        self._resolve_timesteps()
        if self.coding == "weighted" and self.sequential_neuron != "catch_up":
            raise ValueError(f"--sequential_neuron {self.sequential_neuron} chooses between rate-coded neurons; weighted "
                             "neurons (WeightedIFNeuron) fire after their whole window and have no such choice: leave "
                             "it out, or give --coding rate")
        if self.trainsnn_epochs is None:  # weighted sites keep the float ANN's weights; rate sites need the fine-tune
            set_("trainsnn_epochs", 0 if self.coding == "weighted" else 1)
        for key, lo in (("ann_epochs", 0), ("trainsnn_epochs", 0), ("batchsize", 1), ("eval_batchsize", 1),
                        ("calib_samples", 1), ("seed", 0)):
            _int(key, getattr(self, key), lo)
        for key in ("learning_rate", "snn_learning_rate"):
            _float(key, getattr(self, key), 0.0, 1.0)
        _choice("threshold_rule", self.threshold_rule, THRESHOLD_RULES)
        _float("percentile", self.percentile, 0.0, 100.0)
        set_("threshold_candidates", tuple(self.threshold_candidates))
        for rule in self.threshold_candidates:
            _choice("each of threshold_candidates", rule, THRESHOLD_RULES)
        _float("distill", self.distill, 0.0, 1.0, lo_open=False)
        _float("float_loss", self.float_loss, 0.0, 1.0, lo_open=False)
        _float("distill_temperature", self.distill_temperature, 0.0, 100.0)
        _choice("select_by", self.select_by, SELECT_BY)
        if isinstance(self.distill_samples, int) and self.max_train_samples is not None \
                and self.distill_samples < self.max_train_samples:
            raise ValueError(f"distill_samples ({self.distill_samples}) counts the fine-tune's own "
                             f"{self.max_train_samples} training samples and more; give at least that many, or leave "
                             "it out")
        _float("hidden_distill", self.hidden_distill, 0.0, 100.0, lo_open=False)
        _choice("probs_scale", self.probs_scale, ("sum", "max"))
        _choice("train_thresholds", self.train_thresholds, ("shared", *THRESHOLD_RULES))
        if self.float_loss and self.ann_epochs:
            raise ValueError("float_loss trains the float network that shares the DA-QCFS network's weights; with "
                             "ann_epochs (default 1) the reference is a separate float network: give --ann_epochs 0 "
                             "with --float_loss")
        if self.trainsnn_epochs == 0 or self.direct_inference:
            defaults = {f.name: f.default for f in fields(self)}
            shaping = {k: defaults[k] for k in FINE_TUNE_ONLY} | {"train_cycle": self.time_steps}  # resolved: the sweep
            given = [k for k, v in shaping.items() if getattr(self, k) != v]
            if given:
                raise ValueError(f"{', '.join('--' + k for k in given)} shape(s) the DA-QCFS fine-tune, which does not "
                                 "run here (--trainsnn_epochs 0, the default with weighted coding, or "
                                 "--direct_inference); give --trainsnn_epochs 1 as well, or leave them out")
        device = str(self.device).lower()
        if not DEVICE_RE.match(device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or a GPU index N, got {self.device!r}")
        set_("device", f"cuda:{device}" if device.isdigit() else device)
        if self.threads is not None:
            _int("threads", self.threads, 1)
        for key in ("freeze_embeddings", "direct_inference", "calibrate_th", "fit_affine", "overwrite", "progress"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.savedir is None:
            data = Path(self.train_file).stem if self.train_file else dataset
            set_("savedir", str(Path("runs") / f"text_cls_{data}_{self.spike_sites}"))

    def _files_from_datadir(self, dataset: str) -> None:
        """``--datadir``: the hub datasets' cache, or (for the local-file pipeline) a folder holding
        ``train.{csv,tsv,jsonl}`` and optionally ``test.*``, used as ``--train_file``/``--test_file``."""
        d = Path(self.datadir)
        if not d.is_dir():
            raise ValueError(f"--datadir {d}: no such directory")
        if dataset in HUB_DATASETS or self.train_file is not None:
            return
        found = {part: [d / f"{part}{s}" for s in FILE_SUFFIXES if (d / f"{part}{s}").is_file()]
                 for part in ("train", "test")}
        if not found["train"]:
            raise ValueError(f"--datadir {d} holds no train.csv, train.tsv or train.jsonl; put the data there, "
                             "or give --train_file, or leave out --datadir for the embedded tweets")
        if len(found["train"]) > 1 or len(found["test"]) > 1:
            raise ValueError(f"--datadir {d} holds several train/test files ({found}); keep one of each")
        object.__setattr__(self, "train_file", str(found["train"][0]))
        if found["test"]:
            object.__setattr__(self, "test_file", str(found["test"][0]))

    def _resolve_timesteps(self) -> None:
        sweep = self.time_steps
        if sweep is None:
            sweep = (self.time_step,) if self.time_step is not None else DEFAULT_SWEEP
        sweep = tuple(sweep)
        if not sweep:
            raise ValueError("time_steps is empty; give at least one T, e.g. --timesteps 4,8")
        for T in sweep:
            _int("each of time_steps", T, 1, MAX_T)
            coding_levels(T, self.coding)  # weighted coding refuses T above MAX_WEIGHTED_TIMESTEPS
        primary = self.time_step if self.time_step is not None else (DEFAULT_T if DEFAULT_T in sweep else max(sweep))
        _int("time_step", primary, 1, MAX_T)
        object.__setattr__(self, "time_steps", tuple(sorted(set(sweep) | {primary})))
        object.__setattr__(self, "time_step", primary)
        cycle = tuple(self.train_cycle) if self.train_cycle is not None else self.time_steps
        if not cycle or set(cycle) - set(self.time_steps):
            raise ValueError(f"train_cycle {list(cycle)} must be a non-empty list of T's of the sweep "
                             f"{list(self.time_steps)} (repeats weight a T more)")
        object.__setattr__(self, "train_cycle", cycle)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["time_steps"] = list(self.time_steps)
        d["train_cycle"] = list(self.train_cycle)
        d["threshold_candidates"] = list(self.threshold_candidates)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
