"""``ConvertOptions``: every parameter of one conversion run, validated, saved as JSON.

Mode-dependent defaults (``None`` below) are resolved in ``__post_init__``, so a saved
options file always holds the concrete values that were used:

=================  =====================  ==============
option             full mode              ``--simplified``
=================  =====================  ==============
coding             weighted [1]           rate
timesteps          8 [1] (rate: 16)       16
spike_head         on                     off
spike_probs        off                    off [3]
threshold_rule     percentile             percentile
percentile         99.9 (rate: 95.0 [2])  95.0 [2]
max_burst          2**24 // levels        2**24 // levels
burst_budget       64 (0: none)           64
power_of_two_steps on (weighted) [8]      off
step_rounding      up [8]                 up
quant_backend      own                    none (int8 is refused)
int8_rounding      gptq [4]               -
int8_group_size    0 (a scale per row)    -
int8_head          on (own backend) [5]   - (refused)
silence_budget     0.012 (weighted) [6]   0 (rate coding refuses dead zones)
silence_weighting  fisher [6]             columns (< 4096 calib tokens: columns)
kv_levels          127 (weighted) [9]     0 (rate coding refuses it)
layerwise          off (on with max_memory) [7]
activation         keep                   keep [3]
calib_tokens       8192                   2048
=================  =====================  ==============

[1] Weighted spikes at T=8 (255 levels per sign, a level costs its signed-digit spikes; the key and
value sites 127, [9]). With dead zones ([6]) at KL 0.012 and GPTQ's weights, on the embedded SmolLM2,
every target of the six held-out texts of [4] holds (0.880-0.885 of the int8 ANN's total energy, top-1
0.904-0.924, ``docs/results/held_out_demo.json``), where T=7 at KL 0.02 missed top-1 0.90 on the sonnets
(0.897, ``docs/results/held_out_demo_t7.json``). The price of T=8: op energy 0.48 of the float32 ANN's
against 0.42, and batched prefill 1.79 of the int8 ANN's energy against 1.67
(``docs/results/report_demo.json``, ``report_demo_t7.json``). Without dead
zones rate coding at T=16 costs perplexity ratio 1.17-1.23 (``docs/frontier.json``). ``make chat``
keeps T=7 (its checks were measured there, ``docs/conversational.md``).
[2] With rate coding, 85.0 with ``calib_text='chitchat'``: chat replies have many next tokens that
the ANN itself nearly ties, so a finer step keeps its top-1 choice more often (chit-chat agreement
0.87 at T=16, against 0.80-0.85 with 95.0); it costs about half as many spikes again
(``docs/conversational.md``). Weighted coding gets its finer steps from more levels instead.
[3] Simplified mode is the fast, float-weight conversion: per-channel percentile thresholds with
bursts and no ``psi``/``phi`` fit, the LM head dense: on the embedded SmolLM2 and The Tempest,
perplexity ratio 1.039 / top-1 0.864 at T=16 and 1.011 / 0.927 at T=32, converted in 95-98 s on
the shared 2-core CPU (``docs/bench_convert_simplified.json``).
The attention probabilities stay in the rate domain in both modes: spiked (``spike_probs``), they
leave parallel mode's perplexity nearly as it was but make the time-stepped network drift from it
(top-1 of sequential against parallel mode 0.63 at T=16 in simplified mode, 0.88 without).
``activation='relu'`` swaps SiLU/GELU for ReLU, which breaks a pretrained LM without fine-tuning
(the report says so and measures it).
[4] ``gptq`` rounds the same int8 format with GPTQ's error compensation on the calibration
inputs (``calibration.gptq``; the LM head and embeddings stay rounded to nearest). The default where
the whole model is in memory: the 8-bit network starts closer to the float one, so the dead zones
([6]) can take more silence for the same quality. On the embedded SmolLM2, six held-out texts
(``bench.held_out``), GPTQ at KL 0.02 against rounding to nearest at 0.018: 0.890-0.895 of the int8
ANN's total energy against 0.897-0.902, top-1 0.897-0.920 against 0.896-0.920, perplexity ratio
1.005-1.018 against 1.011-1.029 (``docs/results/held_out_demo_t7.json``, ``held_out_demo_nearest.json``);
rounded to nearest at 0.02 too: 0.888-0.893, but top-1 0.891-0.921, 0.90 on 2 texts of 6
(``held_out_nearest_kl02.json``); these at T=7, T=8 in [6]. About 30 s more on the 2-core CPU. Layer by layer (``--layerwise``, ``--max_memory``) the default
stays ``nearest``: GPTQ keeps a square input Hessian per layer and a second stream of the float
model's hidden states, memory a budget is set against, not measured on the large configurations.
Scales per group of input columns (``int8_group_size``) did
not keep more of the ANN's replies on the embedded SmolLM2 (``docs/generation_fidelity.md``) and
cost energy, so one scale per row stays the default.
[5] The LM head and input embeddings in int8 too, one table when tied (``calibration.int8_embedding``):
on SmolLM2-135M the float32 tied table is 113 MB of the 223 MB a full-mode SNN stores (138 MB with
it int8), and the head is read for every decoded token. Put on the saved float-head SNN (thresholds
kept), perplexity ratio 1.0085 against 1.0068, top-1 agreement 0.942 against 0.943 on The Tempest
(``docs/int8_head_check.json``). Off with other backends (refused: only ``own`` builds it). Options
saved before this option existed read back as off, which is what those runs did.
[6] Dead zones (``calibration.silence``): per site, channels whose input adds little to the SNN's
next-token distribution stay silent for the token, so their weight rows are not read; the shares are
allocated over the sites for the most bytes left unread within this budget, the mean KL divergence
(nats per token) the dead zones may add to the SNN's next-token distribution on held calibration
windows. 0 turns them off. Only weighted coding keeps dead zones. Options saved before it read back as 0.
``silence_weighting``: what a channel's input is weighted by, ``fisher`` (the root-mean-square gradient
of the SNN's sampled next-token log-likelihood in it, one backward pass) or ``columns`` (the norm of
its weight column over the readers). The default budget depends on the weights' rounding and T
(``SILENCE_BUDGETS``): at T=8, 0.012 with GPTQ's weights and rounded to nearest (the layer-by-layer
default; held-out 0.882-0.887 of the int8 ANN's energy, top-1 0.904-0.935,
``docs/results/held_out_layerwise_kv127.json``; with every level at the key and value sites 0.893-0.899,
top-1 0.905-0.923, ``held_out_t8_nearest_kl012.json``); at other T, 0.02 and 0.018, measured at T=7.
Each was chosen on the frontier (``docs/results/frontier.json``) and the held-out texts of [4], which
therefore took part in the choice: at T=8 with GPTQ, KL 0.02 was tried first (top-1 0.880-0.907), then 0.014 with every level at
the key and value sites (0.887-0.892 of the int8 ANN's energy, top-1 0.903-0.921,
``docs/results/held_out_t8_kl014.json``). On the embedded SmolLM2 and The Tempest, at an earlier default
budget 0.015, Fisher weights left more bytes unread at better top-1: 0.916 of the int8 ANN's total
energy at top-1 0.920 against 0.928 at 0.916; budget 0.018 gives 0.897 at 0.915
(``docs/results/frontier.json``). A layer-by-layer conversion takes the Fisher weights too: their
backward pass recomputes one decoder layer at a time (activation checkpointing), so it holds one layer's
weights, not the model's. A calibration text under 4,096 tokens uses ``columns`` (Fisher weights read 4
windows of 512 tokens for the statistics and 4 others for the budget; with fewer, the two share
windows and the budget is fitted on the statistics' own text). Options saved before the choice read
back as ``columns``.
[7] ``layerwise`` (``--layerwise``, on by itself with ``--max_memory``) converts one decoder layer at a
time with the source model's weights on disk (``stac_lm.convert.layerwise``); the thresholds and
weights are those of the whole-model path. ``max_memory`` is the budget it is checked against (the
report records the measured peak). Options saved before it read back as the whole-model path.
[8] ``power_of_two_steps``: every threshold rounded up to a power-of-two fraction of its site's
largest before the psi/phi fit (``calibration.thresholds.power_of_two_steps``), so a weighted spike is
a shifted int8 weight added into an integer accumulator, not an fp32 MAC (docs/design.md section 5).
On the embedded SmolLM2 and The Tempest (``docs/results/frontier_steps.json``, weighted T=7, KL budget 0.015) it
was better on both axes: 0.947 against 0.964 of the int8 ANN's total energy, top-1 agreement 0.916
against 0.907, perplexity ratio 1.015 against 1.014 (the KV cache then still 2 bytes per element).
Rate coding leaves it off (not measured). Options saved before it read back as off.
``step_rounding='nearest'`` rounds to the nearest power of two in log scale instead of up: on the same
text, KL budget 0.015, 0.929 of the int8 ANN's energy at top-1 0.912 against 0.928 at 0.916 rounded up, and
along the same line at budgets 0.018-0.022 (``docs/results/frontier_rounding.json``); options saved before
the choice read back as ``up``.
``finetune_text='replies'`` distils on the ANN's own greedy chat replies (``stac_lm.convert.replies``)
instead of the calibration text.
[9] ``kv_levels``: weighted coding's k and v sites quantise to at most this many levels per sign
(``spike_modules.attention.KV_SITES``), the counts a KV cache stores: 127 keeps them in int8 slots at
T=8 as at T=7, where 255 levels need int16 (2 bytes per cached element against the int8 ANN's 1 and
its scales). On the embedded SmolLM2 at T=8 with GPTQ's weights the KV cache then stores 1.002 bytes
per element against 2.0, and the int8 ANN's decode energy meets the SNN's at 80,768 keys of context
instead of 1,587 (``docs/results/report_demo.json``, ``report_demo_kv255.json``); at the same dead-zone
budget the coarser keys and values cost top-1 (KL 0.014: 0.914 at 0.874 of the int8 ANN's energy
against 0.923 at 0.885, ``docs/results/frontier.json``), so the default budget
is 0.012 ([6]). 0: every level T reaches. Options saved before it read back as 0.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from stac_common.assets import EMBEDDED_LM, is_embedded_lm
from stac_common.cli import MAX_TIMESTEPS as MAX_CLI_TIMESTEPS  # the one T range of every CLI

CHITCHAT = "chitchat"  # --calib_text keyword: the embedded chit-chat data in the chat template (stac_lm.convert.texts)
CHAT_PERCENTILE = 85.0  # full mode's default threshold percentile with --calib_text chitchat (see [1] above)

DEFAULT_CODING = {"full": "weighted", "simplified": "rate"}
DEFAULT_TIMESTEPS = {"rate": 16, "weighted": 8}  # weighted: 2**8 - 1 = 255 levels per sign (see [1])
DEVICES = ("auto", "cpu", "cuda")
THRESHOLD_RULES = ("max", "percentile", "mse")
QUANT_BACKENDS = ("own", "bnb", "torchao", "none")
ACTIVATIONS = ("keep", "relu")
INT8_ROUNDINGS = ("nearest", "gptq")
STEP_ROUNDINGS = ("up", "nearest")  # calibration.thresholds.STEP_ROUNDINGS, here without importing torch
DEFAULT_STEP_ROUNDING = "up"  # see [8]
FINETUNE_TEXTS = ("calib", "replies")  # replies: the ANN's greedy chat replies (stac_lm.convert.replies)
DEFAULT_SILENCE_BUDGET = 0.012  # mean KL, nats per token, that dead zones may add: GPTQ's weights, T=8 (see [6])
# the default budget by (int8 rounding, T), each measured on the held-out texts of [4]; other T take the
# rounding's entry under None
SILENCE_BUDGETS = {("gptq", 8): DEFAULT_SILENCE_BUDGET, ("gptq", None): 0.02, ("nearest", 8): 0.012,
                   ("nearest", None): 0.018}


def default_silence_budget(rounding: str, timesteps: int) -> float:
    """The default dead-zone budget for weights rounded by ``rounding`` at ``timesteps`` (weighted coding)."""
    return SILENCE_BUDGETS.get((rounding, timesteps), SILENCE_BUDGETS[(rounding, None)])
SILENCE_WEIGHTINGS = ("columns", "fisher")  # calibration.silence.WEIGHTINGS, here without importing torch
DEFAULT_SILENCE_WEIGHTING = "fisher"  # see [6]
FISHER_MIN_CALIB_TOKENS = 4096  # Fisher weights read 4 + 4 windows of 512 calibration tokens (calibration.silence.WINDOWS)
DEFAULT_INT8_GROUP = 0  # one scale per output row
DEFAULT_KV_LEVELS = 127  # weighted coding: k and v counts in int8 at any T (see [9]); 0: the coding's 2**T - 1
EVAL_WINDOW = 512  # the fixed perplexity protocol of stac_lm.eval.perplexity
FORMAT_VERSION = 1


def surrogate_names() -> tuple[str, ...]:
    """Surrogate-gradient classes SpikingJelly offers (``spikingjelly.activation_based.surrogate``)."""
    import inspect

    from spikingjelly.activation_based import surrogate

    base = surrogate.SurrogateFunctionBase
    return tuple(sorted(n for n, c in inspect.getmembers(surrogate, inspect.isclass)
                        if issubclass(c, base) and c is not base))


def parse_max_memory(value) -> dict[str, str]:
    """A memory budget per device in accelerate's notation, ``{"cpu": "6GiB", "0": "20GiB"}``, from
    that dict or from ``"cpu=6GiB,0=20GiB"``; device keys are ``cpu`` or a CUDA index, sizes as
    :func:`memory_bytes` reads them.

    Raises:
        ValueError: another device name, or a size accelerate cannot read.
    """
    if isinstance(value, str):
        pairs = [part.split("=", 1) for part in value.replace(" ", ",").split(",") if part]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"--max_memory {value!r}: give DEVICE=SIZE pairs, e.g. cpu=6GiB or cpu=6GiB,0=20GiB")
        value = dict(pairs)
    if not isinstance(value, dict) or not value:
        raise ValueError(f"max_memory must map devices to sizes, e.g. {{'cpu': '6GiB'}}, got {value!r}")
    out = {}
    for device, size in value.items():
        device = str(device)
        if device != "cpu" and not device.isdigit():
            raise ValueError(f"--max_memory: unknown device {device!r}; use cpu or a CUDA index such as 0")
        try:
            if memory_bytes(size) <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"--max_memory {device}={size}: not a size; write it as accelerate does, e.g. 6GiB "
                             "or 500MB") from None
        out[device] = str(size)
    return out


def memory_bytes(size: str | int) -> int:
    """Bytes of a size in accelerate's notation (``6GiB``, ``500MB``) or a plain number of bytes.

    Raises:
        ValueError: neither."""
    from accelerate.utils import convert_file_size_to_int

    if isinstance(size, bool):
        raise ValueError(f"not a size: {size!r}")
    if isinstance(size, int) or str(size).strip().isdigit():
        return int(size)
    return convert_file_size_to_int(size)


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class ConvertOptions:
    """One conversion run (the CLI's flags, same names). ``None`` means "the mode's default".

    Raises:
        ValueError: any value out of range, an unknown choice, int8 asked in simplified mode,
            a missing text file, or the same file given for calibration and evaluation.
    """

    model_name: str = "embedded"
    simplified: bool = False
    timesteps: int | None = None
    coding: str | None = None
    spike_head: bool | None = None
    spike_probs: bool | None = None
    output_dir: str | None = None
    overwrite: bool = False
    device: str = "auto"
    calib_text: str | None = None
    calib_tokens: int | None = None
    eval_text: str | None = None
    eval_tokens: int = 4096
    threshold_rule: str | None = None
    percentile: float | None = None
    quant_backend: str | None = None
    int8_rounding: str | None = None
    int8_group_size: int | None = None
    int8_head: bool | None = None
    silence_budget: float | None = None
    silence_weighting: str | None = None
    kv_levels: int | None = None
    activation: str | None = None
    max_burst: int | None = None
    burst_budget: int | None = None
    power_of_two_steps: bool | None = None
    step_rounding: str | None = None
    finetune_steps: int = 0
    finetune_text: str = "calib"
    finetune_weight_lr: float | None = None
    surrogate_function: str = "Sigmoid"
    use_sparse: bool = False
    verify: bool = True
    seed: int = 0
    layerwise: bool | None = None
    max_memory: dict | None = None

    def __post_init__(self):
        # spike_modules imports torch: here, not at the top, so the CLI's --help does not load it
        from spike_modules.quantizer import CODINGS, check_max_burst, coding_levels, max_exact_burst

        full = not self.simplified
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: resolve defaults once)
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise ValueError("model_name must be a non-empty string (a hub name, a local folder, or 'embedded')")
        if self.coding is None:
            set_("coding", DEFAULT_CODING[self.mode])
        _check_choice("coding", self.coding, CODINGS)
        if self.spike_head is None:
            set_("spike_head", full)
        if not isinstance(self.spike_head, bool):
            raise ValueError(f"spike_head must be true or false, got {self.spike_head!r}")
        if self.spike_probs is None:
            set_("spike_probs", False)  # both modes: see [3]
        if not isinstance(self.spike_probs, bool):
            raise ValueError(f"spike_probs must be true or false, got {self.spike_probs!r}")
        _check_choice("device", self.device, DEVICES)
        if self.threshold_rule is None:
            set_("threshold_rule", "percentile")
        _check_choice("threshold_rule", self.threshold_rule, THRESHOLD_RULES)
        if self.percentile is None:
            # rate coding, either mode: a finer step, bursts carry the tail (bench/convert.py), finer still for
            # chat text; weighted coding gets its finer steps from more levels
            rate = self.coding == "rate"
            set_("percentile", (CHAT_PERCENTILE if self.calib_text == CHITCHAT else 95.0) if rate else 99.9)
        if self.power_of_two_steps is None:
            set_("power_of_two_steps", full and self.coding == "weighted")  # see [8]
        if not isinstance(self.power_of_two_steps, bool):
            raise ValueError(f"power_of_two_steps must be true or false, got {self.power_of_two_steps!r}")
        if self.step_rounding is None:
            set_("step_rounding", DEFAULT_STEP_ROUNDING if self.power_of_two_steps else "up")  # see [8]
        _check_choice("step_rounding", self.step_rounding, STEP_ROUNDINGS)
        if self.step_rounding != "up" and not self.power_of_two_steps:
            raise ValueError(f"--step_rounding {self.step_rounding} rounds power-of-two steps: add "
                             "--power_of_two_steps, or leave --step_rounding out")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if self.max_memory is not None:  # before the rounding, whose default follows the path
            set_("max_memory", parse_max_memory(self.max_memory))
        if self.layerwise is None:
            set_("layerwise", self.max_memory is not None)  # a memory budget converts layer by layer
        if not isinstance(self.layerwise, bool):
            raise ValueError(f"layerwise must be true or false, got {self.layerwise!r}")
        if self.max_memory is not None and not self.layerwise:
            raise ValueError("--max_memory bounds a layer-by-layer conversion; drop --no-layerwise or --max_memory")
        if self.quant_backend is None:
            set_("quant_backend", "own" if full else "none")
        _check_choice("quant_backend", self.quant_backend, QUANT_BACKENDS)
        if self.int8_rounding is None:  # see [4]: GPTQ where the whole model is in memory
            set_("int8_rounding", "nearest" if self.layerwise or self.quant_backend != "own" else "gptq")
        _check_choice("int8_rounding", self.int8_rounding, INT8_ROUNDINGS)
        if self.int8_group_size is None:
            set_("int8_group_size", DEFAULT_INT8_GROUP if self.quant_backend == "own" else 0)
        _check_int("int8_group_size", self.int8_group_size, 0)
        if self.quant_backend != "own" and (self.int8_rounding != "nearest" or self.int8_group_size):
            raise ValueError(f"--int8_rounding gptq and --int8_group_size are built by --quant_backend own only "
                             f"(asked: backend {self.quant_backend}, rounding {self.int8_rounding}, group size "
                             f"{self.int8_group_size}); use --quant_backend own or drop them")
        if self.timesteps is None:
            set_("timesteps", DEFAULT_TIMESTEPS[self.coding])
        _check_int("timesteps", self.timesteps, 1, MAX_CLI_TIMESTEPS)
        coding_levels(self.timesteps, self.coding)  # weighted coding takes at most 16 steps
        if self.max_burst is None:
            # both modes: bursts carry the rare huge activations that plain IF neurons (1) would clip
            set_("max_burst", max_exact_burst(self.timesteps, self.coding))
        check_max_burst(self.max_burst, self.timesteps, self.coding)
        if self.burst_budget is None:
            set_("burst_budget", min(64, self.max_burst))
        if self.burst_budget is not None:
            _check_int("burst_budget", self.burst_budget, 0, self.max_burst)  # 0: no budget
        if self.simplified and self.quant_backend != "none":
            raise ValueError(f"--simplified does not quantize weights (quant_backend {self.quant_backend!r} asked); "
                             "drop --quant_backend, or drop --simplified for 8-bit weights")
        if self.silence_budget is None:
            set_("silence_budget", default_silence_budget(self.int8_rounding, self.timesteps)
                 if self.coding == "weighted" else 0.0)
        if isinstance(self.silence_budget, bool) or not isinstance(self.silence_budget, (int, float)) \
                or not 0.0 <= self.silence_budget < 1.0:
            raise ValueError(f"silence_budget is a KL divergence in nats per token in [0, 1), got {self.silence_budget!r}")
        if self.silence_budget and self.coding != "weighted":
            raise ValueError(f"--silence_budget {self.silence_budget} places dead zones, which need weighted coding (its "
                             "neurons know their count before firing); use --coding weighted or --silence_budget 0")
        if self.kv_levels is None:
            set_("kv_levels", DEFAULT_KV_LEVELS if self.coding == "weighted" else 0)  # see [9]
        _check_int("kv_levels", self.kv_levels, 0)
        if self.kv_levels and self.coding != "weighted":
            raise ValueError(f"--kv_levels {self.kv_levels} caps the levels of weighted spikes; {self.coding} coding's "
                             "levels are its timesteps: use --coding weighted or --kv_levels 0")
        if self.int8_head is None:
            set_("int8_head", self.quant_backend == "own")  # see [5]
        if not isinstance(self.int8_head, bool):
            raise ValueError(f"int8_head must be true or false, got {self.int8_head!r}")
        if self.int8_head and self.quant_backend != "own":
            why = "--simplified keeps float weights" if self.simplified else \
                f"--quant_backend {self.quant_backend} does not build it"
            raise ValueError(f"--int8_head needs --quant_backend own ({why}); drop --int8_head or give "
                             "--no-int8_head")
        if self.activation is None:
            set_("activation", "keep")  # relu only when asked: without fine-tuning it breaks a pretrained LM
        _check_choice("activation", self.activation, ACTIVATIONS)
        if self.calib_tokens is None:
            set_("calib_tokens", 8192 if full else 2048)
        _check_int("calib_tokens", self.calib_tokens, 1)
        _check_int("eval_tokens", self.eval_tokens, EVAL_WINDOW)
        _check_int("finetune_steps", self.finetune_steps, 0)
        _check_choice("finetune_text", self.finetune_text, FINETUNE_TEXTS)
        if self.finetune_text != "calib" and not self.finetune_steps:
            raise ValueError(f"--finetune_text {self.finetune_text} chooses the distillation text, but "
                             "--finetune_steps is 0 (no distillation); give --finetune_steps N")
        if self.finetune_weight_lr is None:
            # after a ReLU swap the weights must adapt; otherwise thresholds and shifts are enough
            set_("finetune_weight_lr", 1e-5 if self.activation == "relu" else 0.0)
        if isinstance(self.finetune_weight_lr, bool) or not isinstance(self.finetune_weight_lr, (int, float)) \
                or not 0.0 <= self.finetune_weight_lr < 1.0:
            raise ValueError(f"finetune_weight_lr must be in [0, 1), got {self.finetune_weight_lr!r}")
        _check_int("seed", self.seed, 0)
        for key in ("simplified", "overwrite", "use_sparse", "verify"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.use_sparse and not self.verify:
            raise ValueError("--use_sparse applies to the sequential simulation, which only verification runs; "
                             "drop --no-verify or --use_sparse")
        if self.silence_weighting is None:
            few = self.calib_tokens < FISHER_MIN_CALIB_TOKENS  # too few windows to keep statistics and budget apart
            set_("silence_weighting", "columns" if few or not self.silence_budget else DEFAULT_SILENCE_WEIGHTING)
        _check_choice("silence_weighting", self.silence_weighting, SILENCE_WEIGHTINGS)
        if self.layerwise and self.finetune_steps and self.finetune_weight_lr:
            raise ValueError(f"--finetune_weight_lr {self.finetune_weight_lr} with --layerwise: it trains the decoder's "
                             "weights, which a layer-by-layer conversion keeps on disk; the thresholds alone train "
                             "layer by layer (--finetune_weight_lr 0), or convert the whole model")
        if self.layerwise and self.quant_backend not in ("own", "none"):
            raise ValueError(f"--layerwise builds 8-bit weights with --quant_backend own only (asked: "
                             f"{self.quant_backend}); use --quant_backend own or convert the whole model at once")
        self._check_texts()
        names = surrogate_names()  # last: the only check that imports SpikingJelly (and torch)
        if self.surrogate_function not in names:
            raise ValueError(f"unknown surrogate_function {self.surrogate_function!r}; SpikingJelly offers: "
                             f"{', '.join(names)}")
        if self.output_dir is None:
            set_("output_dir", str(Path("out") / f"snn_{self.model_slug}_T{self.timesteps}_{self.mode}"))

    def _check_texts(self) -> None:
        for key in ("calib_text", "eval_text"):
            path = getattr(self, key)
            if key == "calib_text" and path == CHITCHAT:  # rendered from the embedded chit-chat data
                continue
            if path is not None and not Path(path).is_file():
                raise ValueError(f"--{key} {path}: no such file")
        if self.calib_text is not None and self.eval_text is not None \
                and Path(self.calib_text).resolve() == Path(self.eval_text).resolve():
            raise ValueError(f"--calib_text and --eval_text are the same file ({self.calib_text}); evaluation "
                             "text must be kept apart from calibration text: give another file for one of them")

    @property
    def mode(self) -> str:
        return "simplified" if self.simplified else "full"

    @property
    def model_slug(self) -> str:
        """A file-name-safe short name of the source model."""
        name = EMBEDDED_LM if is_embedded_lm(self.model_name) else Path(self.model_name.rstrip("/")).name
        return re.sub(r"[^A-Za-z0-9._-]+", "-", name) or "model"

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ConvertOptions":
        """Inverse of :meth:`to_dict`; unknown keys are an error (a file from another version)."""
        if not isinstance(d, dict):
            raise ValueError(f"conversion options must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown conversion option(s) {unknown}; known: {', '.join(sorted(known))}")
        if "quant_backend" in d and "int8_rounding" not in d:  # saved before GPTQ and groups: nearest, per row
            d = dict(d, int8_rounding="nearest", int8_group_size=0)
        if "coding" in d and "silence_budget" not in d:  # saved before dead zones: there were none
            d = dict(d, silence_budget=0.0)
        if "silence_budget" in d and "silence_weighting" not in d:  # saved before the choice: column norms
            d = dict(d, silence_weighting="columns")
        if "quant_backend" in d and "int8_head" not in d:  # saved before the int8 head: the head stayed float
            d = dict(d, int8_head=False)
        if "seed" in d and "layerwise" not in d:  # saved before layer-by-layer conversion: whole model
            d = dict(d, layerwise=False)
        if "coding" in d and "power_of_two_steps" not in d:  # saved before power-of-two steps: none
            d = dict(d, power_of_two_steps=False)
        if "power_of_two_steps" in d and "step_rounding" not in d:  # saved before the choice: steps rounded up
            d = dict(d, step_rounding="up")
        if "coding" in d and "kv_levels" not in d:  # saved before the cap: k and v sites took every level
            d = dict(d, kv_levels=0)
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "ConvertOptions":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"conversion options are not valid JSON ({e})") from None
