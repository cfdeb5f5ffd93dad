#!/usr/bin/env python
"""Convert a causal language model into a spiking network, verify it against the original, save it.

  python run_conversion.py                                   # embedded SmolLM2-135M-Instruct, full mode, weighted spikes, T=8
  python run_conversion.py --simplified --timesteps 8
  python run_conversion.py --model_name_or_path distilgpt2 --output_dir out/distilgpt2_T16
  python run_conversion.py --verify --model_dir out/snn_SmolLM2-135M-Instruct_T8_full

Every flag also takes dashes (--model-name-or-path). Exit codes: 0 done, 3 done but a verification check
failed (report.json says which), 2 bad input (one line on stderr), 1 a STAC component missing from
this checkout, 130 interrupted (nothing half-written is left).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import stac_common.cli as stac_cli
from stac_common.cli import TIMESTEPS_RANGE, Parser
from stac_common.cli import fail as cli_fail
from stac_common.cli import flag as cli_flag
from stac_lm.convert.options import (ACTIVATIONS, DEVICES, QUANT_BACKENDS, SILENCE_WEIGHTINGS, STEP_ROUNDINGS,
                                    THRESHOLD_RULES)

PROG = "run_conversion.py"
# flags that still mean something when verifying a saved directory
VERIFY_FLAGS = {"model_dir", "verify", "eval_text", "eval_tokens", "device", "use_sparse", "max_memory"}
FLAG_OF = {"model_name": "model_name_or_path"}  # option fields whose flag has another name
# why --dtype takes float32 only here
FLOAT32_ONLY = ("conversion calibrates, rounds weights to int8 and verifies in float32, where spike counts are exact "
                "whole numbers (docs/design.md); chat.py --ann --dtype runs the original network in half precision")

fail = partial(cli_fail, PROG)
flag = partial(cli_flag, unset=True)  # unset flags stay unset: the defaults live in ConvertOptions


def build_parser() -> Parser:
    p = Parser(PROG, __doc__)
    g = p.add_argument_group("model and mode")
    stac_cli.model_flag(g, unset=True, help="source model: 'embedded' (default: SmolLM2-135M-Instruct, offline), "
                                            "a local Hugging Face folder, or a hub name (online or cached)")
    flag(g, "simplified", action="store_true", help="fast conversion: float weights, 2048 calibration "
                                                     "tokens, percentile thresholds without the psi/phi fit")
    stac_cli.timesteps_flag(g, unset=True, help=f"spike timesteps, {TIMESTEPS_RANGE}; default 16 for rate "
                                                "coding, 8 for weighted")
    flag(g, "coding", choices=("rate", "weighted"),
         help="spike coding of every site: rate (a level costs one spike per unit, T levels) or weighted (step k "
              "weighs 2**(T-1-k): 2**T - 1 levels, a level costs the nonzero digits of its signed-digit form) "
              "(default: weighted in full mode, rate with --simplified)")
    flag(g, "spike_probs", action=argparse.BooleanOptionalAction,
         help="a spiking site on the attention probabilities too (default: off: they stay in the rate domain, "
              "where the time-stepped network keeps closer to parallel mode)")
    flag(g, "spike_head", action=argparse.BooleanOptionalAction,
         help="a spiking site at the LM head's input, so the head is spike-driven too (default: on in full mode)")
    flag(g, "activation", choices=ACTIVATIONS, help="keep the model's SiLU/GELU or swap them for ReLU "
                                                    "(default: keep; relu breaks a pretrained LM unless fine-tuned)")
    stac_cli.device_flag(g, choices=DEVICES, unset=True)
    stac_cli.dtype_flag(g, unset=True, help="float32 only (the default): conversion and verification run in float32")
    g = p.add_argument_group("calibration and evaluation text (kept apart)")
    flag(g, "calib_text", metavar="PATH", help="UTF-8 text for calibration (default: embedded Shakespeare: "
                                                "Hamlet, Macbeth, Othello), or 'chitchat': embedded chit-chat "
                                                "conversations in the model's chat template, for a model meant to chat")
    flag(g, "calib_tokens", type=int, metavar="N", help="calibration tokens (default 8192; 2048 with --simplified)")
    flag(g, "eval_text", metavar="PATH", help="UTF-8 text for evaluation (default: embedded The Tempest)")
    flag(g, "eval_tokens", type=int, metavar="N", help="evaluation tokens, >= 512 (default 4096)")
    g = p.add_argument_group("thresholds, weights, fine-tune")
    flag(g, "threshold_rule", choices=THRESHOLD_RULES, help="per-channel threshold rule (default: percentile)")
    flag(g, "percentile", type=float, metavar="Q", help="percentile of the percentile rule "
                                                         "(rate coding: 95.0, 85.0 with --calib_text chitchat; weighted: 99.9)")
    flag(g, "max_burst", type=int, metavar="B", help="most spikes a neuron may fire in one step, 1..2**24/T; "
                                                      "values past theta pass as bursts instead of being clipped, "
                                                      "every spike counted (default 2**24/T, i.e. no clipping; "
                                                      "1: plain IF neurons)")
    flag(g, "burst_budget", type=int, metavar="B", help="spikes per step a channel's calibration maximum may "
                                                         "need; channels needing more get theta = max / B "
                                                         "(default 64; 0: none)")
    flag(g, "power_of_two_steps", action=argparse.BooleanOptionalAction,
         help="round every threshold up to a power-of-two fraction of its site's largest, so a weighted spike is a "
              "shifted int8 weight (priced as an integer add and shift, not a MAC); steps up to 2x coarser "
              "(default: on with weighted coding in full mode)")
    flag(g, "step_rounding", choices=STEP_ROUNDINGS,
         help="how --power_of_two_steps rounds a threshold: up (steps never finer than fitted) or to the nearest "
              "power of two in log scale (default: up)")
    flag(g, "quant_backend", choices=QUANT_BACKENDS, help="8-bit weights (default: own; none with --simplified)")
    flag(g, "int8_rounding", choices=("nearest", "gptq"),
         help="how weights round to int8: to nearest, or GPTQ's error compensation on the calibration text's "
              "inputs (same stored format; default gptq, nearest with --layerwise or --max_memory)")
    flag(g, "int8_group_size", type=int, metavar="G", help="input columns per int8 scale; 0 = one scale per output "
                                                             "row (default 0); each group costs one rescale "
                                                             "multiply-add per output and token, counted in energy")
    flag(g, "int8_head", action=argparse.BooleanOptionalAction,
         help="the LM head and input embeddings in int8 as well, one table when tied (default: on with "
              "--quant_backend own; --no-int8_head keeps them float32)")
    flag(g, "silence_budget", type=float, metavar="KL",
         help="dead zones: the most mean KL divergence (nats per token) silent channels may add to the SNN's "
              "next-token distribution on held calibration windows; the silence is spread over the sites for the "
              "most weight bytes left unread (default with weighted coding at T=8: 0.012, with GPTQ's weights or "
              "rounded to nearest; at other T 0.02 with GPTQ's, 0.018 rounded to nearest; 0: none; rate coding: refused)")
    flag(g, "silence_weighting", choices=SILENCE_WEIGHTINGS,
         help="what weighs a channel's input when dead zones are placed: fisher (the gradient of the SNN's own "
              "next-token log-likelihood, one backward pass, one decoder layer recomputed at a time; the default) or "
              "columns (the norm of its weight column over the readers; the default under 4096 calibration tokens)")
    flag(g, "kv_levels", type=int, metavar="N",
         help="weighted coding: the attention's key and value sites quantise to at most N levels per sign, what the "
              "KV cache stores (default 127: int8 counts at any T; 0: all 2**T - 1 levels, int16 past T=7)")
    flag(g, "finetune_steps", type=int, metavar="N", help="spike-aware distillation steps from the ANN (default 0)")
    flag(g, "finetune_text", choices=("calib", "replies"), help="what the distillation reads: calib (the calibration "
         "text, default) or replies (the ANN's greedy chat replies to chit-chat openings calibration reads)")
    flag(g, "finetune_weight_lr", type=float, metavar="LR", help="learning rate of the decoder weights in the "
                                                                 "fine-tune (default 1e-5 after a ReLU swap, else 0: "
                                                                 "thresholds and shifts only)")
    flag(g, "surrogate_function", metavar="NAME", help="SpikingJelly surrogate gradient for the fine-tune, e.g. "
                                                       "Sigmoid, ATan (default Sigmoid)")
    stac_cli.seed_flag(g, unset=True, help="seed of the calibration sampling (default 0)")
    g = p.add_argument_group("models larger than memory")
    flag(g, "layerwise", action=argparse.BooleanOptionalAction,
         help="convert one decoder layer at a time, the source model's weights read from disk as each layer "
              "needs them (same thresholds and weights as the whole-model conversion; default: on with "
              "--max_memory, else off)")
    flag(g, "max_memory", metavar="DEV=SIZE[,DEV=SIZE]",
         help="memory budget per device in accelerate's notation, e.g. cpu=8GiB or 0=20GiB,cpu=8GiB; converts "
              "layer by layer and records the measured peak against it in the report (a GPU's budget: the "
              "conversion computes on that GPU, --device cuda); with --model_dir, the saved SNN loads within "
              "it (layers that do not fit read from disk; with a GPU named, the first layers on the GPU, the "
              "next in CPU memory) and the source model stays on disk")
    g = p.add_argument_group("verification and output")
    flag(g, "verify", action=argparse.BooleanOptionalAction,
         help="measure the SNN against the ANN and write report.json (default: on); with --model_dir, "
              "verify a saved directory instead of converting")
    stac_cli.model_dir_flag(g, unset=True, help="a saved SNN directory to verify (with --verify)")
    flag(g, "use_sparse", action="store_true", help="event-driven accumulation in the sequential simulation "
                                                     "that verification runs")
    stac_cli.output_dir_flag(g, unset=True, help="where to save (default: out/snn_<model>_T<T>_<mode>)")
    flag(g, "overwrite", action="store_true", help="replace an existing output directory")
    return p


def _verify_saved(given: dict) -> dict:
    extra = sorted(set(given) - VERIFY_FLAGS)
    if extra:
        flags = ", ".join("--" + FLAG_OF.get(e, e) for e in extra)
        fail(f"--model_dir verifies a saved SNN; conversion flags do not apply: {flags}")
    if given.get("verify") is False:
        fail("--model_dir with --no-verify does nothing; use --verify --model_dir DIR")
    from stac_lm.convert.pipeline import verify_saved

    return verify_saved(given["model_dir"], given.get("eval_text"), given.get("eval_tokens"),
                        given.get("device", "auto"), use_sparse=given.get("use_sparse"),
                        max_memory=given.get("max_memory"))


def _convert(given: dict) -> tuple[dict | None, str]:
    from stac_lm.convert.options import ConvertOptions

    from stac_common.io import check_output_free

    opts = ConvertOptions(**given)  # bad flags fail here, before any model loads
    check_output_free(opts.output_dir, opts.overwrite)
    from stac_lm.convert.pipeline import run

    out = run(opts)
    return out.report, opts.output_dir


def _backend_errors() -> tuple[type[BaseException], ...]:
    """An 8-bit backend that is not installed is the user's setup, not a bug. Its error type is
    looked up only if its module was imported (a module never imported cannot have raised it), so
    a failure before any work pulls in no torch."""
    backends = sys.modules.get("calibration.int8_backends")
    return (backends.BackendUnavailableError,) if backends is not None else ()


def main(argv: list[str] | None = None) -> int:
    given = vars(build_parser().parse_args(argv))
    stac_cli.float32_only(PROG, given.pop("dtype", None), FLOAT32_ONLY)
    from stac_common.assets import MissingAssetError  # light: no torch until the work needs it

    target = given.get("model_dir") or given.get("output_dir") or "the output directory"
    try:
        if "model_dir" in given:
            report, where = _verify_saved(given), f"report written to {given['model_dir']}/report.json"
        else:
            report, saved = _convert(given)
            where = f"saved to {saved}"
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written to {target}", file=sys.stderr)
        return 130
    except Exception as e:
        # ValueError covers OutputExistsError; MissingAssetError is a FileNotFoundError
        if isinstance(e, (ValueError, FileNotFoundError, MissingAssetError, *_backend_errors())):
            fail(str(e))
        raise  # anything else is a bug: let it show its traceback
    if report is not None:
        from rich.console import Console

        from stac_lm.convert.report import report_table

        Console().print(report_table(report))
    failed = [c["name"] for c in (report or {}).get("checks", []) if not c["passed"]]
    print(where + (f"; FAILED checks: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
