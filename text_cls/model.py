"""BERT-family classifiers: loading, conversion with DA-QCFS sites, and the sequential simulation.

The spiking structure comes from ``spike_modules`` (the BERT adapter, ``SpikeLinear``,
``SpikeAttention``, ``SpikeNorm``, rate-domain GELU); nothing here copies it. The pooler and
the classification head stay float: in the time-stepped simulation they read out the
time-mean of the encoder's last hidden state (an integrating readout), so for constant
inputs the simulation gives the parallel-mode logits exactly and any gap is the spiking's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from spikingjelly.activation_based.functional import invalidate_reset_cache
from torch import nn

from spike_modules.adapters.bert import SITE_SCOPES, set_site_scope
from spike_modules.attention import PROBS_SCALES, set_probs_scale
from spike_modules.conversion import ConversionConfig, convert_
from spike_modules.norm import SpikeNorm
from spike_modules.quantizer import check_timesteps, coding_levels
from spike_modules.simulation import sequential_mode
from spike_modules.site import iter_sites
from spike_modules.temporal import unfold
from stac_common.assets import minilm_dir, not_offline

EMBEDDED_MODEL = "all-MiniLM-L6-v2"
EMBEDDED_ALIASES = {"", "embedded", "minilm", "minilm-l6", EMBEDDED_MODEL.lower(),
                    f"sentence-transformers/{EMBEDDED_MODEL.lower()}"}
# the research command's --net_arch names; each means "the BERT-family model given by --model_name_or_path"
NET_ARCHS = ("bert_base_qcfs", "bert_qcfs", "bert")
ACTIVATIONS = ("keep", "relu")
NORM_SCHEDULES = ("causal", "held")
SEQUENTIAL_NEURONS = ("catch_up", "if")


def is_embedded(name: str | None) -> bool:
    return name is None or name.strip().lower() in EMBEDDED_ALIASES


def model_source(name: str | None) -> str:
    """The folder or hub name to load: the embedded MiniLM-L6 folder for ``embedded``."""
    return str(minilm_dir()) if is_embedded(name) else name


def load_classifier(name: str | None, num_labels: int, id2label: dict[int, str]) -> tuple[nn.Module, object]:
    """``(model, tokenizer)``: a BERT-family encoder with a (new, if the checkpoint has none)
    classification head for ``num_labels`` classes, float32, eval mode.

    Raises:
        MissingAssetError: the name is neither a folder nor cached and the hub cannot be reached.
        ValueError: the checkpoint is not a BERT-family model.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = model_source(name)
    try:
        config = AutoConfig.from_pretrained(source)
        tok = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise not_offline(name, e, EMBEDDED_MODEL) from None
    if config.model_type not in ("bert", "roberta"):
        raise ValueError(f"{name!r} is a {config.model_type!r} model; text_cls converts BERT-family encoders "
                         "(model_type bert or roberta)")
    labels = {int(k): str(v) for k, v in id2label.items()}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier weights newly initialized" is expected: we fine-tune them
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=num_labels, id2label=labels, label2id={v: k for k, v in labels.items()},
            ignore_mismatched_sizes=True, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.problem_type = "single_label_classification"
    return model.eval(), tok


@dataclass(frozen=True)
class SiteSpec:
    """Where the spiking sites go. ``sites``: ``ffn`` (FFN intermediate activation only) or
    ``all`` (every encoder linear input plus the attention probabilities). ``activation``:
    ``keep`` GELU (rate domain, signed FFN site) or swap to ``relu``. ``norms``: the LayerNorms'
    schedule in the sequential simulation, ``causal`` (per-step differences of the norm of the
    running mean, docs/design.md section 2) or ``held`` (the norm of the mean over the T steps, the same
    value at every step: each norm waits for its window, as a float op between spiking stages).
    ``sequential``: the sites' neurons in the sequential simulation, ``catch_up`` (a step may fire
    every spike the count still allows, and take back spikes fired too early:
    ``BurstIFNeuron(catch_up=True)``) or ``if`` (at most one spike a step, or the calibrated burst:
    IF / ST-BIF); it applies to rate coding (weighted neurons integrate their whole window before
    they fire, so they have no catch-up). Parallel mode is the same whatever the norms and neurons
    of the simulation. ``coding``: ``rate`` (T levels per sign) or ``weighted`` (spike ``k`` of
    the window weighs ``2**(T-1-k)`` levels: ``2**T - 1`` levels, docs/design.md section 1).
    ``probs``: the attention probability sites (``sites='all'``) see the softmax probabilities
    (``sum``) or each row over its largest probability, normalised after probs.V (``max``;
    ``spike_modules.attention.set_probs_scale``)."""

    sites: str = "all"
    activation: str = "keep"
    T: int = 8
    norms: str = "causal"
    sequential: str = "catch_up"
    probs: str = "sum"
    coding: str = "rate"

    def __post_init__(self):
        if self.sites not in SITE_SCOPES:
            raise ValueError(f"spike_sites must be one of {', '.join(SITE_SCOPES)}, got {self.sites!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.norms not in NORM_SCHEDULES:
            raise ValueError(f"norm_schedule must be one of {', '.join(NORM_SCHEDULES)}, got {self.norms!r}")
        if self.sequential not in SEQUENTIAL_NEURONS:
            raise ValueError(f"sequential_neuron must be one of {', '.join(SEQUENTIAL_NEURONS)}, "
                             f"got {self.sequential!r}")
        if self.probs not in PROBS_SCALES:
            raise ValueError(f"probs_scale must be one of {', '.join(PROBS_SCALES)}, got {self.probs!r}")
        check_timesteps(self.T)
        coding_levels(self.T, self.coding)

    def conversion_config(self) -> ConversionConfig:
        return ConversionConfig(T=self.T, mode="full", activation=self.activation, spike_qkv=False,
                                spike_probs=self.sites == "all", spike_norm=self.norms == "causal",
                                spike_head=False, coding=self.coding)


def convert_classifier(model: nn.Module, spec: SiteSpec) -> nn.Module:
    """A converted copy of ``model`` with DA-QCFS sites (in ``ann`` mode) where ``spec`` says."""
    snn = copy.deepcopy(model)
    set_site_scope(snn, spec.sites)
    convert_(snn, spec.conversion_config())
    if spec.sites == "all":
        set_probs_scale(snn, spec.probs)
    set_sequential_schedule(snn, spec.norms, spec.sequential)
    invalidate_reset_cache(snn)
    return snn


def set_sequential_schedule(model: nn.Module, norms: str, sequential: str) -> None:
    """Set the LayerNorms' schedule (``causal`` or ``held``) and the sites' neurons (``catch_up`` or
    ``if``) of a converted classifier's sequential simulation (see :class:`SiteSpec`); parallel mode
    is the same either way."""
    for m in model.modules():
        if isinstance(m, SpikeNorm):
            m.causal = norms == "causal"
    for _, site in iter_sites(model):
        if site.coding == "rate":
            site.catch_up = sequential == "catch_up"
        elif sequential != "catch_up":  # the default, which names no choice for weighted neurons
            raise ValueError(f"site {site.name!r}: sequential neuron {sequential!r} is a rate-coded neuron; "
                             f"{site.coding} neurons fire after their whole window and have no such choice")


def float_copy(snn: nn.Module, template: nn.Module) -> nn.Module:
    """The float network of a converted model's (trained) weights: a copy of ``template`` (the
    original architecture) loaded strictly with ``snn``'s weights; site parameters are dropped,
    the wrappers' ``.linear`` / ``.norm`` / ``.act`` levels removed from the names."""
    state = {}
    for key, value in snn.state_dict().items():
        if ".site." in key or "_site." in key:
            continue
        state[key.replace(".linear.", ".").replace(".norm.", ".").replace(".act.", ".")] = value
    model = copy.deepcopy(template)
    model.load_state_dict(state, strict=True)
    return model.eval()


def relu_swap_(model: nn.Module) -> nn.Module:
    """Replace the FFN activation (GELU) of every layer by ReLU, in place (``--activation relu``)."""
    from spike_modules.adapters import adapter_for

    for path in adapter_for(model).activation_paths(model):
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, nn.ReLU())
    return model


def _head(model: nn.Module):
    """The float readout after the encoder: ``hidden [B, S, H] -> logits [B, C]``."""
    if hasattr(model, "bert"):  # BertForSequenceClassification: pooler (first token, dense, tanh), classifier
        return lambda h: model.classifier(model.dropout(model.bert.pooler(h)))
    if hasattr(model, "roberta"):  # RobertaClassificationHead reads the first token itself
        return model.classifier
    raise ValueError(f"{type(model).__name__}: text_cls knows the heads of BertForSequenceClassification and "
                     "RobertaForSequenceClassification")


@torch.no_grad()
def run_sequential(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   T: int | None = None) -> torch.Tensor:
    """Logits ``[B, C]`` of the time-stepped simulation of a converted classifier.

    Token ids are repeated T times along the batch (step-major), so the embeddings are
    constant over the T steps; every site runs its SpikingJelly multi-step neuron (membranes
    reset before each batch); LayerNorm, GELU and softmax run in the rate domain. The
    encoder's last hidden state is averaged over the T steps and read out by the float head.
    ``T=None`` uses the sites' T.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    B = input_ids.shape[0]
    encoder = model.base_model
    with sequential_mode(model, T) as T:
        ids = input_ids.repeat(T, 1)
        mask = None if attention_mask is None else attention_mask.repeat(T, 1)
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        mean = unfold(hidden, T).mean(0)
        return _head(model)(mean)


@torch.no_grad()
def classify(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[B, C]`` of a converted classifier with the neuron it was loaded for
    (``stac_neuron_type``): one parallel pass (ParaInfNeuron) or the time-stepped simulation (IFNeuron)."""
    if getattr(model, "stac_neuron_type", "ParaInfNeuron") == "IFNeuron":
        return run_sequential(model, input_ids, attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask).logits
