"""The conversion pipeline: load -> convert -> calibrate -> (int8) -> (finetune) -> verify -> save.

Every step is timed and logged; long steps show rich progress bars. The output
directory is checked before any work, and written atomically at the end.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from calibration import Calibration, CalibrationConfig, calibrate
from calibration.gptq import input_hessians
from calibration.silence import SilenceConfig, calibrate_silence_
from calibration.int8 import find_linears, quantize_weights_
from spike_modules import set_mode
from spike_modules.conversion import ConversionConfig, convert
from stac_common.assets import EMBEDDED_LM, PACKAGES, is_embedded_lm, load_causal_lm, not_offline, smollm2_gguf
from stac_common.io import check_output_free, sha256_file, write_json

from stac_lm.convert.layerwise import convert_layerwise, layer_list, offloaded_source, peak_memory
from stac_lm.convert.options import EVAL_WINDOW, ConvertOptions, memory_bytes, parse_max_memory
from stac_lm.convert.replies import ann_reply_windows
from stac_lm.io.offload import budget_device
from stac_common.runtime import StepTimer, input_device, map_large_allocations, place, resolve_device
from stac_lm.convert.texts import TokenStream, calibration_batches, finetune_windows, load_streams
from stac_lm.checks.verify import verify

CALIB_SEQ = 512  # tokens per calibration window (shorter only if the model or the text is shorter)
REPLY_WINDOWS = 128  # --finetune_text replies: ANN replies to distil on, cycled when there are more steps
FINETUNE_SEQ = 128  # tokens per distillation step: a step costs its tokens, so 300 steps stay in minutes


@dataclass
class Converted:
    """Everything a run produced; :func:`stac_lm.io.saving.save_snn` writes it out."""

    options: ConvertOptions
    ann: nn.Module
    snn: nn.Module
    tokenizer: object
    conversion_config: object
    calibration: Calibration
    calib_stream: TokenStream
    eval_stream: TokenStream
    source: dict
    device: torch.device
    quantization: dict | None = None
    finetune: dict | None = None
    silence: dict | None = None
    memory: dict | None = None
    step_seconds: dict[str, float] = field(default_factory=dict)
    conversion_seconds: float = 0.0
    report: dict | None = None


def source_info(model_name: str, model: nn.Module) -> dict:
    """Where the source weights came from: id, and the revision or file checksum where known."""
    if is_embedded_lm(model_name):
        gguf = smollm2_gguf()
        pkg = PACKAGES["smollm2"]
        return {"model_name": model_name, "model_id": EMBEDDED_LM, "package": f"{pkg.dist}=={pkg.pin}",
                "file": gguf.name, "sha256": sha256_file(gguf)}
    info = {"model_name": model_name, "model_id": getattr(model.config, "_name_or_path", model_name)}
    path = Path(model_name)
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors"))
        info["path"] = str(path.resolve())
        info["sha256"] = {w.name: sha256_file(w) for w in weights}
    else:
        info["revision"] = getattr(model.config, "_commit_hash", None)
    return info


def max_positions(model: nn.Module) -> int | None:
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


ENCODER_FAMILIES = ("bert",)  # adapters for encoders: text_cls converts them (classification), not this pipeline


def causal_families() -> str:
    """``family (model types); ...`` of the registered adapters for causal LMs, for error messages."""
    from spike_modules.adapters import ADAPTERS

    return "; ".join(sorted({f"{a.family} ({', '.join(a.model_types)})" for a in ADAPTERS.values()
                             if a.family not in ENCODER_FAMILIES}))


def check_architecture(model_name: str) -> None:
    """Refuse a model STAC cannot convert from its config alone, before any weights or tokenizer load.

    The config's ``model_type`` must have a registered adapter (``spike_modules.adapters``) for a
    causal LM; the adapter may refuse features of the config (ALiBi, cross-attention, ...). The
    embedded SmolLM2 (a Llama) needs no check.

    Raises:
        ValueError: unsupported architecture; the message lists the supported families.
        MissingAssetError: no config under that name offline.
    """
    if is_embedded_lm(model_name):
        return
    from transformers import AutoConfig

    from spike_modules.adapters import ADAPTERS, check_supported

    def refuse(model_type) -> ValueError:
        return ValueError(f"{model_name}: unsupported architecture {model_type!r}; STAC converts: "
                          f"{causal_families()}")

    config_file = Path(model_name) / "config.json"
    if config_file.is_file():  # read the type first: transformers refuses a type it does not know in its own words
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        if model_type not in ADAPTERS:
            raise refuse(model_type)
    try:
        config = AutoConfig.from_pretrained(model_name)
    except OSError as e:
        raise not_offline(model_name, e, EMBEDDED_LM) from None
    if config.model_type not in ADAPTERS or ADAPTERS[config.model_type].family in ENCODER_FAMILIES:
        raise refuse(config.model_type)
    check_supported(config)  # the family's own refusals (ALiBi, cross-attention, ...)


def load_source(model_name: str, offload: bool = False,
                device: torch.device = torch.device("cpu")) -> tuple[nn.Module, object]:
    """The source model (float32, eval mode) and its tokenizer, after :func:`check_architecture`.

    ``offload``: every module's weights stay on disk and load, in float32, for that module's forward
    alone: a local folder's safetensors are read in place (nothing is read at load) and its modules
    compute on ``device``; anything else goes through transformers' disk offload (which reads each file
    once to place it, and computes on the CPU). The embedded
    SmolLM2 (a GGUF file, 135M parameters) loads whole either way."""
    check_architecture(model_name)
    embedded = is_embedded_lm(model_name)
    folder = None
    if offload and not embedded and Path(model_name).is_dir():
        model = _offloaded_local(Path(model_name), device)
        if model is not None:
            from transformers import AutoTokenizer

            return model, AutoTokenizer.from_pretrained(model_name)
    if offload and not embedded:
        folder = tempfile.mkdtemp(prefix="stac-offload-")
    model, tok = load_causal_lm(None if embedded else model_name, dtype=torch.float32, offload_folder=folder)
    if folder is not None:
        weakref.finalize(model, shutil.rmtree, folder, True)  # what accelerate wrote there goes with the model
    return model.eval(), tok


def _offloaded_local(directory: Path, device: torch.device) -> nn.Module | None:
    """A local model read straight from its safetensors for each module's forward
    (:func:`stac_lm.convert.layerwise.offloaded_source`), with its generation defaults; None where
    its tensor names need transformers' renaming."""
    from transformers import AutoConfig, GenerationConfig

    model = offloaded_source(directory, AutoConfig.from_pretrained(directory), device)
    if model is not None and (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


def load_checked_source(config: dict, offload: bool = False, device: torch.device = torch.device("cpu")) -> nn.Module:
    """The source model a saved SNN was converted from (``config["source"]``), on the CPU (with ``offload``,
    its weights on disk and its modules computing on ``device``, see :func:`load_source`).

    Raises:
        ValueError: its weights (sha256) or revision changed since the conversion, so comparing
            the SNN with it would mislead.
    """
    source = config["source"]
    ann, _ = load_source(source["model_name"], offload=offload, device=device)
    now = source_info(source["model_name"], ann)
    changed = [k for k in ("sha256", "revision") if now.get(k) != source.get(k)]
    if changed:
        raise ValueError(f"the source model {source['model_name']!r} changed since this SNN was converted (its "
                         f"{' and '.join(changed)} differ); compare the SNN with the model it came from")
    return ann


def finetune(snn: nn.Module, ann: nn.Module, batches: list, steps: int, surrogate: str, progress: bool,
             weight_lr: float = 0.0, layers: nn.ModuleList | None = None) -> dict:
    """Spike-aware distillation of ``snn`` from ``ann`` with the named SpikingJelly surrogate (its
    default settings); returns the fine-tune's summary. ``layers``: the decoder layers, recomputed one
    at a time in the backward pass (a layer-by-layer conversion, whose layers stay on disk)."""
    from spikingjelly.activation_based import surrogate as sj_surrogate

    from calibration.distill import finetune_

    return finetune_(snn, ann, batches, steps, surrogate=getattr(sj_surrogate, surrogate)(), progress=progress,
                     weight_lr=weight_lr, layers=layers)


def run(opts: ConvertOptions, console: Console | None = None, progress: bool = True) -> Converted:
    """Convert ``opts.model_name`` as ``opts`` say, verify (if asked) and save to ``opts.output_dir``.

    Raises:
        ValueError: bad input of any kind (the message says what and what is allowed);
            ``OutputExistsError`` before any work if the output exists without ``overwrite``.
        MissingAssetError: the model or text asset is not available offline.
    """
    from stac_lm.io.saving import SAVEABLE_INT8, save_snn

    # everything that can be refused is refused before the first minute of work
    check_output_free(opts.output_dir, opts.overwrite)
    check_architecture(opts.model_name)
    device = resolve_device(opts.device)
    if set(opts.max_memory or {}) - {"cpu"}:  # a GPU's budget: the conversion computes on that GPU
        budget_device(opts.max_memory, device)
    if opts.quant_backend not in SAVEABLE_INT8:
        raise ValueError(f"--quant_backend {opts.quant_backend}: such a model cannot be saved yet (load_snn rebuilds "
                         f"only {', '.join(SAVEABLE_INT8)} 8-bit layers); use --quant_backend own")
    torch.manual_seed(opts.seed)
    if opts.layerwise:
        map_large_allocations()  # freed layers leave memory (see there)
    step = StepTimer(console, progress)

    with step("load model", spinner=True):
        ann, tok = load_source(opts.model_name, offload=opts.layerwise, device=device)
        source = source_info(opts.model_name, ann)
    positions = max_positions(ann)
    if positions is not None and positions < EVAL_WINDOW:
        raise ValueError(f"the model handles at most {positions} positions; the evaluation protocol needs "
                         f"{EVAL_WINDOW}-token windows")
    with step("read texts", spinner=True):
        calib, evals = load_streams(tok, opts.calib_text, opts.calib_tokens, opts.eval_text, opts.eval_tokens)
        seq = min(CALIB_SEQ, opts.calib_tokens, positions or CALIB_SEQ)
        batches = calibration_batches(calib.ids, seq)
    kv_levels = opts.kv_levels or None  # 0: every level
    cfg = ConversionConfig(T=opts.timesteps, mode=opts.mode, activation=opts.activation, coding=opts.coding,
                           spike_head=opts.spike_head, spike_probs=opts.spike_probs, kv_levels=kv_levels)
    # simplified: thresholds only; full: DA-QCFS, the per-channel psi/phi fit as well
    ccfg = CalibrationConfig(T=opts.timesteps, rule=opts.threshold_rule, percentile=opts.percentile,
                             max_burst=opts.max_burst, burst_budget=opts.burst_budget or None,
                             seed=opts.seed, fit_affine=not opts.simplified, coding=opts.coding,
                             power_of_two_steps=opts.power_of_two_steps, step_rounding=opts.step_rounding,
                             kv_levels=kv_levels)
    if opts.layerwise:
        if not hasattr(ann, "hf_device_map"):
            ann = place(ann, device)
        batches = [b.to(device) for b in batches]
        folder = tempfile.mkdtemp(prefix="stac-snn-offload-")  # the converted layers' weights until saved
        with step("convert, 8-bit weights and calibrate, layer by layer"):
            snn, calibration, quantization, per_layer = convert_layerwise(
                ann, cfg, batches, ccfg, backend=opts.quant_backend, rounding=opts.int8_rounding,
                group_size=opts.int8_group_size, int8_head=opts.int8_head, device=device,
                model_id=source["model_id"], offload_folder=folder, progress=progress)
            weakref.finalize(snn, shutil.rmtree, folder, True)
            set_mode(snn, "parallel")
    else:
        snn, calibration, quantization, batches = _convert_whole(ann, cfg, ccfg, opts, batches, device, step,
                                                                 source["model_id"], progress)
        ann = place(ann, device)
        per_layer = None
    dev = input_device(snn)
    out = Converted(opts, ann, snn, tok, cfg, calibration, calib, evals, source, device, quantization)
    out.memory = {"layerwise": opts.layerwise, "max_memory": opts.max_memory, "seconds_per_layer": per_layer}
    if opts.finetune_steps:
        with step(f"fine-tune ({opts.finetune_steps} steps)"):
            if opts.finetune_text == "replies":
                windows, ft_tokens = ann_reply_windows(ann, tok, min(opts.finetune_steps, REPLY_WINDOWS))
            else:
                windows, ft_tokens = finetune_windows(tok, opts.calib_text, opts.finetune_steps, min(FINETUNE_SEQ, seq))
            out.finetune = finetune(snn, ann, [w.to(dev) for w in windows], opts.finetune_steps,
                                    opts.surrogate_function, progress, weight_lr=opts.finetune_weight_lr,
                                    layers=layer_list(snn) if opts.layerwise else None)  # sites keep their mode
            out.finetune["tokens"] = ft_tokens
    if opts.silence_budget:
        with step(f"dead zones (budget KL {opts.silence_budget})"):  # after any fine-tune: the thresholds are final
            out.silence = calibrate_silence_(snn, batches, SilenceConfig(budget=opts.silence_budget,
                                                                         weighting=opts.silence_weighting),
                                             layers=layer_list(snn))
    out.conversion_seconds = sum(step.seconds.values())
    out.memory["conversion"] = peak_memory(device)
    if opts.verify:
        with step("verify"):
            out.report = verify(ann, snn, tok, evals.ids, T=opts.timesteps, activation=opts.activation,
                                mode=opts.mode, calibration=ccfg, coding=getattr(opts, "coding", None),
                                use_sparse=opts.use_sparse, progress=progress, console=step.console)
    out.step_seconds = dict(step.seconds)
    out.memory.update(peak_memory(device))
    out.memory["within_budget"] = within_budget(out.memory["peak_rss_bytes"], opts.max_memory,
                                                out.memory.get("peak_cuda_bytes"))
    with step("save", spinner=True):
        save_snn(out, opts.output_dir, overwrite=opts.overwrite)
    return out


def _convert_whole(ann: nn.Module, cfg: ConversionConfig, ccfg: CalibrationConfig, opts: ConvertOptions, batches: list,
                   device: torch.device, step: StepTimer, model_id: str, progress: bool) -> tuple:
    """The whole-model path: convert a copy of ``ann``, round every linear to 8 bits, calibrate every
    site in one pass. Returns ``(snn, calibration, quantization summary or None, batches on its device)``."""
    with step("convert", spinner=True):
        snn = place(convert(ann, cfg), device)
    dev = input_device(snn)
    batches = [b.to(dev) for b in batches]
    quantization = None
    if opts.quant_backend != "none":
        # before calibration, so the thresholds fit the activations of the 8-bit network
        hessians = None
        if opts.int8_rounding == "gptq":
            with step("int8 rounding statistics"):  # the inputs each linear layer sees, from the float model
                hessians = input_hessians(snn, find_linears(snn), batches)
        with step(f"8-bit weights ({opts.quant_backend}, {opts.int8_rounding})"):
            quantization = quantize_weights_(snn, opts.quant_backend, progress=progress,
                                             group_size=opts.int8_group_size, hessians=hessians,
                                             head=opts.int8_head)
            del hessians
    with step("calibrate"):
        calibration = calibrate(snn, batches, ccfg, model_id=model_id, progress=progress)
        calibration.apply_to(snn)
        set_mode(snn, "parallel")
    return snn, calibration, quantization, batches


def within_budget(peak_rss: int, max_memory: dict | None, peak_cuda: int | None = None) -> bool | None:
    """Whether the measured peaks kept the budget: resident memory the ``cpu`` one, the CUDA allocator's
    peak (``peak_cuda``) the GPU's (None: no budget given for what was measured)."""
    kept = []
    if max_memory and "cpu" in max_memory:
        kept.append(peak_rss <= memory_bytes(max_memory["cpu"]))
    gpus = [k for k in (max_memory or {}) if k != "cpu"]
    if gpus and peak_cuda is not None:
        kept.append(peak_cuda <= memory_bytes(max_memory[gpus[0]]))
    return all(kept) if kept else None


def verify_saved(model_dir: str | Path, eval_text: str | None = None, eval_tokens: int | None = None,
                 device: str = "auto", use_sparse: bool | None = None, console: Console | None = None,
                 progress: bool = True, max_memory: dict | str | None = None) -> dict:
    """Verify a saved SNN directory against its source model and (re)write its ``report.json``.

    The evaluation text is the saved run's unless ``eval_text``/``eval_tokens`` are given; it must
    differ from the saved calibration text. ``max_memory`` (``cpu=SIZE``, or ``0=SIZE,cpu=SIZE`` to compute
    on that GPU, see :func:`stac_lm.io.offload.plan_layers`): the SNN loads within that
    budget (its other layers read from the saved files) and the source model stays on disk, read
    module by module (accelerate's disk offload).

    Raises:
        ValueError: an unusable directory (see :func:`stac_lm.io.saving.load_snn`), a source model
            whose weights changed since conversion, or an evaluation text equal to the calibration text.
    """
    from stac_lm.convert.report import assemble_report
    from stac_lm.io.saving import REPORT_FILE, load_snn
    from stac_lm.convert.texts import EVAL_PLAYS, read_text, tokenize

    dev = resolve_device(device)
    if max_memory is not None:
        map_large_allocations()
        max_memory = parse_max_memory(max_memory)
        dev = budget_device(max_memory, dev)
    step = StepTimer(console, progress)
    with step("load saved SNN", spinner=True):
        snn, tok, config = load_snn(model_dir, dev if max_memory is not None else "cpu", max_memory)
    with step("load source model", spinner=True):
        ann = load_checked_source(config, offload=max_memory is not None, device=dev)
    saved = config["options"]
    if eval_text is None and eval_tokens is None:
        eval_text, eval_tokens = saved["eval_text"], saved["eval_tokens"]
    elif eval_tokens is None:
        eval_tokens = saved["eval_tokens"]
    if eval_tokens < EVAL_WINDOW:
        raise ValueError(f"eval_tokens must be >= {EVAL_WINDOW} (one evaluation window), got {eval_tokens}")
    with step("read evaluation text", spinner=True):
        text, src, files = read_text(eval_text, EVAL_PLAYS)
        evals = tokenize(tok, text, eval_tokens, "eval", src, files)
        calib = config["texts"]["calibration"]
        if evals.text_sha256 == calib["text_sha256"] or (saved["calib_text"] is not None and eval_text is not None
                                                         and Path(saved["calib_text"]).resolve() == Path(eval_text).resolve()):
            raise ValueError(f"the evaluation text ({src}) is the calibration text of this SNN; evaluation text "
                             "must be kept apart from calibration text")
    if max_memory is None:
        ann, snn = place(ann, dev), place(snn, dev)
    with step("verify"):
        measured = verify(ann, snn, tok, evals.ids, T=config["timesteps"], activation=saved["activation"],
                          mode=config["mode"], calibration=CalibrationConfig(**config["calibration_config"]),
                          coding=saved.get("coding"), use_sparse=saved["use_sparse"] if use_sparse is None else use_sparse, progress=progress,
                          console=step.console)
    config = dict(config, texts=dict(config["texts"], evaluation=evals.describe()))
    report = assemble_report(measured, config)
    report["verify_seconds"] = dict(step.seconds)
    write_json(Path(model_dir) / REPORT_FILE, report)
    return report
