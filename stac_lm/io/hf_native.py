"""Converted LMs as Hugging Face-style models: ``save_pretrained`` / ``from_pretrained`` and ``generate()``.

A converted model stays the transformers model it was (``isinstance(model, LlamaForCausalLM)``);
:class:`SpikingCausalLM` is mixed into its class, which adds the STAC directory format and makes
``model.generate()`` run with a :class:`~spike_modules.kv_cache.SpikeKVCache`::

    from stac_lm import SpikingCausalLM
    model = SpikingCausalLM.from_pretrained("out/demo_smollm2")      # or stac_lm.from_pretrained(...)
    out = model.generate(**model.tokenizer("To be", return_tensors="pt"), max_new_tokens=20)
    model.save_pretrained("out/copy")

Layout of a saved directory::

    config.json               the source architecture's transformers config (AutoConfig reads it)
    generation_config.json    its generation defaults
    stac_conversion.json      the conversion: format, source model, mode, T, options, converter and
                              calibration configs, 8-bit paths, versions, sha256 of the tensor files
    snn_model.safetensors     the converted model's state dict (tied embeddings stored once; a model
                              converted layer by layer: shards of at most 1 GiB, snn_model-00001-of-000NN
                              .safetensors, ..., and snn_model.safetensors.index.json); not
                              ``model.safetensors``, so ``AutoModelForCausalLM.from_pretrained`` refuses
                              the directory instead of loading the spiking weights into a float model
    calibration.safetensors   per-site theta/psi/phi/burst (+ calibration.json), taken from the
    calibration.json          model's sites at save time: the state dict and these must agree on load
    tokenizer_config.json,    the tokenizer (``AutoTokenizer.from_pretrained(dir)`` reads it)
    tokenizer.json, ...
    conversion_log.txt        (written by a conversion run) what was swapped where, site parameters
    report.json               (written by a verified conversion run) the verification report

Directories saved before this layout (one ``config.json`` with ``"format": "stac-snn"``, the
tokenizer in ``tokenizer/``) still load. Nothing is unpickled: JSON and safetensors only.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from calibration import Calibration, Int8Linear, SiteParams, prepare_int8_
from calibration.artifact import PARAMS as SITE_PARAMS
from calibration.int8_embedding import Int8Embedding, int8_head_info, prepare_int8_head_
from spike_modules import iter_sites, set_mode
from spike_modules.conversion import ConversionConfig, convert_
from spike_modules.kv_cache import SpikeKVCache
from spike_modules.site import frozen
from stac_common.io import atomic_dir, read_saved_config, sha256_file, write_json
from stac_lm.io.offload import (budget_device, is_offloaded, load_budgeted_, module_state, plan_layers, read_shards, weight_files,
                                write_shards)

FORMAT = "stac-snn"
FORMAT_VERSION = 2          # 1: the one-config.json layout (still read, see _load_legacy)
CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"
CONVERSION_FILE = "stac_conversion.json"
WEIGHTS_FILE = "snn_model.safetensors"
CALIB_FILES = ("calibration.safetensors", "calibration.json")
TOKENIZER_FILE = "tokenizer_config.json"  # always written by a tokenizer's save_pretrained
LEGACY_TOKENIZER_DIR = "tokenizer"
SAVEABLE_INT8 = ("own", "bnb", "torchao", "none")  # backends whose layers calibration.int8.prepare_int8_ rebuilds
REDO = "re-save it with this version (run the conversion again with --overwrite)"


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


def _quantization(model: nn.Module, summary: dict | None) -> dict:
    """``{"backend", "quantized_paths", "summary"}`` of ``model``'s 8-bit layers.

    Without a ``quantize_weights_`` summary, STAC's own :class:`Int8Linear` layers are found by
    type (an int8 head with its :class:`Int8Embedding` goes under ``summary["int8_head"]``, not
    ``quantized_paths``: it is rebuilt apart, tied); other backends' layers cannot be told apart
    reliably, so they need the summary."""
    if summary is None:
        head = int8_head_info(model)
        own = [name for name, m in model.named_modules() if isinstance(m, Int8Linear)
               and (head is None or name != head["head"])]
        others = [name for name, m in model.named_modules() if not isinstance(m, (Int8Linear, Int8Embedding))
                  and isinstance(getattr(m, "weight", None), torch.Tensor)
                  and (m.weight.dtype == torch.int8 or type(m.weight) not in (nn.Parameter, torch.Tensor))]
        if others:
            raise ValueError(f"{others[0]!r} holds 8-bit weights of another backend than 'own'; pass the summary "
                             "calibration.quantize_weights_ returned as quantization=")
        sizes = {getattr(model.get_submodule(p), "group_size", 0) for p in own}
        if len(sizes) > 1:
            raise ValueError(f"the 8-bit layers use several group sizes {sorted(sizes)}; pass the summary "
                             "calibration.quantize_weights_ returned as quantization=")
        summary = {"backend": "own" if own or head else "none", "paths": own, "group_size": sizes.pop() if sizes else 0,
                   "int8_head": head}
    backend = summary.get("backend", "none")
    if backend not in SAVEABLE_INT8:
        raise ValueError(f"a model with {backend!r} 8-bit weights cannot be saved: loading rebuilds only "
                         f"{', '.join(SAVEABLE_INT8)} layers; use --quant_backend own to save")
    return {"backend": backend, "quantized_paths": list(summary["paths"]),
            "summary": {k: v for k, v in summary.items() if k != "paths"}}


class SpikingCausalLM:
    """Mixed into a converted transformers causal LM's class (``SpikingLlamaForCausalLM`` is
    ``(SpikingCausalLM, LlamaForCausalLM)``): the STAC directory format and a spiking KV cache for
    ``generate()``. Get one with :meth:`from_pretrained` or :meth:`from_converted_`.

    Attributes set on the model: ``tokenizer``, ``stac_calibration`` (how the sites were
    calibrated; their current values are the model's), ``stac_conversion`` (what
    ``stac_conversion.json`` records beyond what the model itself knows: source, options, texts).
    """

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        max_memory: dict | str | None = None) -> SpikingCausalLM:
        """Rebuild a saved SNN from ``directory`` alone (see :func:`from_pretrained`)."""
        return _load(Path(directory), device, max_memory)[0]

    @classmethod
    def from_converted_(cls, model: nn.Module, calibration: Calibration, tokenizer, *,
                        quantization: dict | None = None, conversion: dict | None = None) -> SpikingCausalLM:
        """Make a converted, calibrated model a :class:`SpikingCausalLM`, in place (its class changes;
        the same object is returned).

        Args:
            model: converted by ``smollm2_converter.convert`` and calibrated (sites hold their parameters).
            calibration: the :class:`Calibration` applied to it (its config and statistics are saved).
            tokenizer: the source model's tokenizer, saved beside the weights.
            quantization: the summary ``calibration.quantize_weights_`` returned, if 8-bit weights of
                a backend other than ``own`` were given (``own`` layers are found by themselves).
            conversion: further facts for ``stac_conversion.json`` (source, options, texts, ...).

        Raises:
            ValueError: the model was not converted by STAC, or its sites do not match ``calibration``.
        """
        if getattr(model, "stac_conversion_config", None) is None:
            raise ValueError(f"{type(model).__name__} was not converted by STAC; convert it with "
                             "smollm2_converter.convert and calibrate it first")
        calibration.check_against(model)
        if not isinstance(model, SpikingCausalLM):
            model.__class__ = _spiking_class(type(model))
        source = {"model_id": getattr(model.config, "_name_or_path", "") or ""}
        model.stac_conversion = {"source": source, "options": None, **(conversion or {}),
                                 "quantization": _quantization(model, quantization)}
        model.stac_calibration = calibration
        model.tokenizer = tokenizer
        return model

    def save_pretrained(self, save_directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model, its calibration and tokenizer to ``save_directory`` atomically (see the
        module docstring for the layout); :meth:`from_pretrained` rebuilds it with identical logits.

        Raises:
            OutputExistsError: ``save_directory`` exists and ``overwrite`` is False.
        """
        return write_pretrained(self, save_directory, overwrite)

    def generate(self, *args, **kwargs):
        """transformers' ``generate`` with a :class:`SpikeKVCache` (each token's keys and values pass
        their sites once, when fed) unless another cache or ``use_cache=False`` is asked for. Sampling
        draws from torch's global generator, as transformers does: ``torch.manual_seed(s)`` before a
        CPU call gives the tokens of ``TemporalSpikeProcessor.generate(..., seed=s)`` for one prompt."""
        config = kwargs.get("generation_config")
        config = self.generation_config if config is None else config
        use_cache = kwargs.get("use_cache", config.use_cache)
        implementation = kwargs.get("cache_implementation", config.cache_implementation)
        if kwargs.get("past_key_values") is None and use_cache is not False and implementation in (None, "dynamic"):
            kwargs["past_key_values"] = SpikeKVCache(self)
        with frozen(self):  # nothing edits a site while generating: skip the per-call parameter checks
            return super().generate(*args, **kwargs)

    def tie_weights(self, *args, **kwargs):
        """transformers' tying, except with an int8 head: its :class:`Int8Embedding` already reads the
        head's table (tied by construction), and tying by name would put a float weight over it."""
        if isinstance(self.get_input_embeddings(), Int8Embedding):
            return None
        return super().tie_weights(*args, **kwargs)

    def resize_token_embeddings(self, *args, **kwargs):
        """Refused with an int8 head/embedding (new rows would need new int8 scales and a new spiking
        head calibration); otherwise transformers' own."""
        if isinstance(self.get_input_embeddings(), Int8Embedding):
            raise ValueError("this SNN has an int8 LM head and embedding, which cannot be resized: resize the float "
                             "model's embeddings before conversion, or convert with --no-int8_head")
        return super().resize_token_embeddings(*args, **kwargs)


_CLASSES: dict[type, type] = {}


def _spiking_class(base: type) -> type:
    """``Spiking<Base>``: :class:`SpikingCausalLM` first, so its methods win; one class per base."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Spiking{base.__name__}", (SpikingCausalLM, base),
                              {"__module__": __name__, "stac_base_class": base})
    return _CLASSES[base]


def _with_current_head(model: nn.Module, quantization: dict) -> dict:
    """``quantization`` with its ``int8_head`` entry as the model has it now: the model is the source
    of truth, and a head made int8 after ``from_converted_`` (``bench/int8_head.py`` does) must be
    rebuilt on load, or the saved table would not fit the float shells."""
    head, summary = int8_head_info(model), quantization.get("summary", {})
    recorded = summary.get("int8_head")
    if head is None:
        return quantization if not recorded else {**quantization, "summary": {**summary, "int8_head": None}}
    if recorded and all(recorded.get(k) == v for k, v in head.items()):
        return quantization
    if head["head"] in quantization["quantized_paths"]:
        raise ValueError(f"{head['head']!r} is recorded as a block 8-bit layer and is the int8 head; pass the summary "
                         "calibration.quantize_weights_ returned as quantization=")
    return {**quantization, "backend": "own", "summary": {**summary, "backend": "own", "int8_head": head}}


def conversion_record(model: SpikingCausalLM, files: dict[str, str]) -> dict:
    """``stac_conversion.json`` of ``model``: what it carries (source, options, 8-bit layers, ...),
    with mode, T and the converter and calibration configs taken from the model at save time."""
    calib = model.stac_calibration
    return {
        **model.stac_conversion,
        "quantization": _with_current_head(model, model.stac_conversion["quantization"]),
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "architecture": model.stac_base_class.__name__,
        "mode": model.stac_conversion_config.mode, "timesteps": calib.config.T,
        "conversion_config": asdict(model.stac_conversion_config),
        "calibration_config": asdict(calib.config),
        "site_mode": "parallel",
        "files": files,
        "versions": library_versions(),
    }


def write_pretrained(model: SpikingCausalLM, directory: str | Path, overwrite: bool = False,
                     extra: Callable[[Path, dict], None] | None = None) -> Path:
    """Write ``model`` to ``directory`` atomically; ``extra(tmp, conversion)`` may add files first
    (``stac_lm.io.saving.save_snn`` adds the conversion log and report). ``stac_conversion.json`` is
    written last.

    Raises:
        OutputExistsError: ``directory`` exists and ``overwrite`` is False.
        ValueError: the model is not a :class:`SpikingCausalLM` or has no tokenizer.
    """
    if not isinstance(model, SpikingCausalLM):
        raise ValueError(f"{type(model).__name__} is not a SpikingCausalLM; use SpikingCausalLM.from_converted_")
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("the model has no tokenizer to save with it; set model.tokenizer")
    with atomic_dir(directory, overwrite) as tmp:
        if is_offloaded(model):  # layers on disk: written one shard at a time, as they load
            written = write_shards(module_state(model), tmp, WEIGHTS_FILE)
        else:
            save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            written = [WEIGHTS_FILE]
        calibration_from_model(model, model.stac_calibration).write_files(tmp)
        model.tokenizer.save_pretrained(str(tmp))
        hf = model.config.to_dict()
        hf["architectures"] = [model.stac_base_class.__name__]
        emb = model.get_input_embeddings()  # an int8 table computes in its scales' dtype
        hf["dtype"] = str((emb.scale if isinstance(emb, Int8Embedding) else emb.weight).dtype).removeprefix("torch.")
        write_json(tmp / CONFIG_FILE, hf)
        if model.can_generate():
            model.generation_config.save_pretrained(str(tmp))
        conversion = conversion_record(model, {n: sha256_file(tmp / n) for n in (*written, CALIB_FILES[0])})
        if extra is not None:
            extra(tmp, conversion)
        write_json(tmp / CONVERSION_FILE, conversion)
    return Path(directory)


def from_pretrained(directory: str | Path, device: str | torch.device = "cpu",
                    max_memory: dict | str | None = None) -> SpikingCausalLM:
    """Rebuild a saved SNN from ``directory`` alone: a :class:`SpikingCausalLM` (the converted
    transformers model) with its ``tokenizer``.

    The model is built from ``config.json`` (random weights), converted with the saved converter
    config, given 8-bit shells at the saved paths, then loaded strictly. Its sites are in parallel
    mode and it is in eval mode on ``device``.

    ``max_memory`` (``{"cpu": "6GiB"}`` or ``"cpu=6GiB"``): the model is built empty and only what
    fits stays in memory; the decoder layers that do not fit keep their weights in the saved files,
    read for each forward (``stac_lm.io.offload.plan_layers``). With a GPU in the budget
    (``{"0": "20GiB", "cpu": "6GiB"}``, ``device`` cuda) the model computes there: the first layers on
    the GPU, the next in CPU memory, the rest on disk, each loaded onto the GPU for its forward.

    Raises:
        ValueError: a missing file, bad JSON, another format version, a checksum or shape mismatch,
            site parameters that disagree with the calibration files, or a budget that does not hold
            the embeddings and head.
    """
    return _load(Path(directory), device, max_memory)[0]


def _is_legacy(d: Path) -> bool:
    """A directory of the first layout: no ``stac_conversion.json``, a STAC ``config.json``."""
    if (d / CONVERSION_FILE).is_file() or not (d / CONFIG_FILE).is_file():
        return False
    try:
        config = json.loads((d / CONFIG_FILE).read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


def _read_current(d: Path, bad: str) -> tuple[dict, dict, Path]:
    """``(conversion, hf config dict, tokenizer folder)`` of a directory of this layout."""
    weights = WEIGHTS_FILE if weight_files(d, WEIGHTS_FILE) is None else f"{WEIGHTS_FILE}.index.json"
    missing = [n for n in (CONFIG_FILE, weights, *CALIB_FILES, CONVERSION_FILE, TOKENIZER_FILE)
               if not (d / n).is_file()]
    if missing:
        raise ValueError(f"{bad}: missing {', '.join(missing)} (not a complete STAC SNN directory)")
    conversion = read_saved_config(d, bad, CONVERSION_FILE, (weights, *CALIB_FILES, CONFIG_FILE), (), FORMAT,
                                   FORMAT_VERSION, "STAC SNN", REDO)
    try:
        hf = json.loads((d / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{bad}: {CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{bad}: {CONFIG_FILE} is not a transformers config (a JSON object expected)")
    return conversion, hf, d


def _read_legacy(d: Path, bad: str) -> tuple[dict, dict, Path]:
    config = read_saved_config(d, bad, CONFIG_FILE, (WEIGHTS_FILE, *CALIB_FILES), (LEGACY_TOKENIZER_DIR,), FORMAT,
                               1, "STAC SNN", REDO)
    warnings.warn(f"{d} has the layout of STAC's first format (its config.json is STAC's, not transformers'); it "
                  "loads, but transformers cannot read it: re-save it with model.save_pretrained(new_dir), or run "
                  "the conversion again with --overwrite", UserWarning, stacklevel=4)
    hf = config.pop("hf_config", None)
    if not isinstance(hf, dict):
        raise ValueError(f"{bad}: {CONFIG_FILE} has no hf_config; {REDO}")
    return config, hf, d / LEGACY_TOKENIZER_DIR


def _check_sites_agree(model: nn.Module, calib: Calibration, T: int, bad: str) -> None:
    calib.check_against(model, T=T)
    for name, site in iter_sites(model):
        p = calib.sites[name]
        for k in SITE_PARAMS:
            if not torch.equal(getattr(site, k).detach().float().cpu(), getattr(p, k)):
                raise ValueError(f"{bad}: site {name!r} {k} differs between {WEIGHTS_FILE} and "
                                 f"{CALIB_FILES[0]}; the directory was edited or mixed from two runs")


def _read(bad: str, what: str, cls, directory: Path):
    """``cls.from_pretrained(directory)`` with its errors as one clear ``ValueError``."""
    try:
        return cls.from_pretrained(str(directory))
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{bad}: {what} is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None


def _load(d: Path, device: str | torch.device, max_memory: dict | str | None = None
          ) -> tuple[SpikingCausalLM, dict, dict]:
    """``(model, conversion, hf config dict)`` of a saved directory of either layout."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    bad = f"saved SNN in {d} is unusable"
    if not d.is_dir():
        raise ValueError(f"{bad}: no such directory")
    legacy = _is_legacy(d)
    conversion, hf, tok_dir = (_read_legacy if legacy else _read_current)(d, bad)
    try:
        fields = dict(hf)
        hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        conv_cfg = ConversionConfig(**conversion["conversion_config"])
        T, backend = int(conversion["timesteps"]), conversion["quantization"]["backend"]
        paths = list(conversion["quantization"]["quantized_paths"])
        group_size = int(conversion["quantization"].get("summary", {}).get("group_size") or 0)
        head = conversion["quantization"].get("summary", {}).get("int8_head")  # absent before int8 heads
    except (KeyError, TypeError, ValueError) as e:
        where = CONFIG_FILE if legacy else f"{CONFIG_FILE} / {CONVERSION_FILE}"
        raise ValueError(f"{bad}: {where} does not describe a model ({type(e).__name__}: {e})") from None
    shards = None if legacy else weight_files(d, WEIGHTS_FILE)
    if max_memory is not None:
        from stac_lm.convert.options import parse_max_memory

        max_memory = parse_max_memory(max_memory)
        device = budget_device(max_memory, device)
        shards = shards or [d / WEIGHTS_FILE]
    if shards is None:
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    else:  # a sharded (large) model: built empty, every tensor then comes from its shard
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        model.tie_weights()
    convert_(model, conv_cfg)
    if paths:
        if backend not in SAVEABLE_INT8:
            raise ValueError(f"{bad}: 8-bit backend {backend!r} cannot be rebuilt; saveable: {SAVEABLE_INT8}")
        # one scale per row (group_size 0) is prepare_int8's default; groups are passed only when used
        prepare_int8_(model, paths, backend, **({"group_size": group_size} if group_size else {}))
    if head:
        if backend != "own":
            raise ValueError(f"{bad}: an int8 head is built by the 'own' backend only; this directory says {backend!r}")
        try:
            prepare_int8_head_(model, head)
        except ValueError as e:
            raise ValueError(f"{bad}: {e}") from None
    try:
        if shards is None:
            load_model(model, str(d / WEIGHTS_FILE), strict=True)
        else:
            if max_memory is not None:
                from stac_lm.convert.layerwise import decoder_layers

                layers = decoder_layers(model)
                missing = load_budgeted_(model, shards, layers, plan_layers(model, max_memory, layers), device)
            else:
                missing = read_shards(model, shards)
            if missing:
                raise RuntimeError(f"missing {len(missing)} tensor(s): {', '.join(missing[:4])}")
    except (RuntimeError, SafetensorError) as e:
        msg = " ".join(str(e).split())[:600]
        raise ValueError(f"{bad}: {WEIGHTS_FILE} does not fit the model rebuilt from {CONFIG_FILE}: {msg}") from None
    calib = Calibration.load(d)
    _check_sites_agree(model, calib, T, bad)
    set_mode(model, conversion.get("site_mode", "parallel"))
    tok = _read(bad, f"{LEGACY_TOKENIZER_DIR}/" if legacy else "the tokenizer", AutoTokenizer, tok_dir)
    if (d / GENERATION_FILE).is_file() and not legacy:
        model.generation_config = _read(bad, GENERATION_FILE, GenerationConfig, d)
    kept = {k: v for k, v in conversion.items() if k not in ("format", "format_version", "files", "versions")}
    SpikingCausalLM.from_converted_(model, calib, tok, conversion=kept,
                                    quantization={**conversion["quantization"].get("summary", {}),
                                                  "backend": backend, "paths": paths})
    model.eval()
    return (model if is_offloaded(model) else model.to(device)), conversion, hf
