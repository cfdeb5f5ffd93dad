#!/usr/bin/env python
"""Validate a converted spiking LM in conversation: the KV-cache contract, positions, masks,
multi-turn quality against the original ANN, and spike rates.

  python test_conversational_snn.py --test_all                       # converts the embedded SmolLM2 first
  python test_conversational_snn.py --test_all --model_dir out/chat_smollm2_T7
  python test_conversational_snn.py --test_positions --test_masks --model_dir DIR -T 32

Groups: --test_multi_turn (cache contract over three turns, chit-chat perplexity and agreement
with the ANN reply by reply, recall of a turn-1 fact in turn 3), --test_positions (turn
boundaries and the context limit against one full pass), --test_masks (batched left-padded
conversations against each alone, mask and position continuity), --test_spike_rates (every site
fires, none saturates, T changes the output, no site passes float through, each site fires at least
a tenth of what its calibration rule predicts: the gates of stac_lm/checks/gates.py), --test_fidelity
(greedy replies of SNN and ANN to held-out questions and chit-chat openings: the share whose first
16 tokens agree, and the share of the ANN's right answers the SNN keeps; stac_lm/checks/free_running.py).
No group flag means --test_all. Cache, position and mask logits are compared on a float64 copy of the model, where the cached and the one-pass
computations agree to rounding; the cache contract is also measured in float32, where rounding
flips a few quantization levels (stac_lm/checks/conversation.py says why and how much).

Without --model_dir the embedded SmolLM2-135M-Instruct is converted for chatting as `make chat`
does (full mode, --calib_text chitchat, T from --timesteps, default the full mode's: 7 with weighted spikes) into out/chat_smollm2_T<T>,
or that directory is used if it exists. Prints a table (check, measured figure, bar, PASS/FAIL) and writes
it as JSON to --out. Every flag also takes dashes (--model-dir). Exit codes: 0 every check passed,
1 a check failed, 2 bad input (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import stac_common.cli as stac_cli
from stac_common.cli import TIMESTEPS_RANGE, Parser, flag
from stac_common.cli import fail as cli_fail

PROG = "test_conversational_snn.py"
FLOAT32_ONLY = ("the checks run the SNN in float32, where its spike counts are exact whole numbers, and compare "
                "cache, positions and masks on a float64 copy (stac_lm/checks/conversation.py)")
GROUP_FLAGS = ("test_multi_turn", "test_positions", "test_masks", "test_spike_rates", "test_fidelity")
DEFAULT_OUT = "out/conversational_checks.json"

fail = partial(cli_fail, PROG)


def build_parser() -> Parser:
    p = Parser(PROG, __doc__)
    g = p.add_argument_group("what to check")
    flag(g, "test_all", action="store_true", help="every group below (the default)")
    flag(g, "test_multi_turn", action="store_true", help="cache contract, chit-chat quality, recall")
    flag(g, "test_positions", action="store_true", help="positions at turn boundaries and the context limit")
    flag(g, "test_masks", action="store_true", help="batched vs alone, mask continuity")
    flag(g, "test_spike_rates", action="store_true", help="sites fire, none saturates, T changes the output, no "
                                                             "float pass-through, activity against calibration")
    flag(g, "test_fidelity", action="store_true", help="free-running greedy replies to held-out questions and "
                                                          "chit-chat: first 16 tokens equal the ANN's, right "
                                                          "answers kept")
    g = p.add_argument_group("model and run")
    stac_cli.model_dir_flag(g, help="a saved SNN directory (default: convert the embedded SmolLM2)")
    stac_cli.timesteps_flag(g, help=f"timesteps the processor runs, {TIMESTEPS_RANGE} (default: the model's)")
    stac_cli.device_flag(g, default="auto")
    stac_cli.dtype_flag(g, default="float32", help="float32 only (the default): the checks are defined in float32 "
                                                   "and float64")
    flag(g, "conversations", type=int, default=50, metavar="N", help="chit-chat conversations scored (default 50)")
    flag(g, "max_context_length", type=int, default=512, metavar="N",
         help="most tokens a conversation keeps (default 512)")
    flag(g, "max_memory", metavar="cpu=SIZE", help="run within SIZE of memory (e.g. cpu=6GiB, CPU only): the SNN's "
                                                   "decoder layers that do not fit, and every weight of the source "
                                                   "model, are read from disk for each forward; the JSON records the "
                                                   "peak resident memory")
    g = p.add_argument_group("output")
    flag(g, "out", metavar="PATH", default=DEFAULT_OUT, help=f"JSON result (default {DEFAULT_OUT})")
    flag(g, "overwrite", action="store_true", help="replace an existing --out file")
    return p


def groups_of(args: argparse.Namespace) -> list[str]:
    chosen = [f.removeprefix("test_") for f in GROUP_FLAGS if getattr(args, f)]
    if args.test_all or not chosen:
        return [f.removeprefix("test_") for f in GROUP_FLAGS]
    return chosen


def check_args(args: argparse.Namespace) -> None:
    """Refuse a missing directory and bad numbers before a conversion or a model load."""
    if args.model_dir is not None and not Path(args.model_dir).is_dir():
        raise ValueError(f"--model_dir {args.model_dir}: no such directory")
    if args.conversations < 1:
        raise ValueError(f"--conversations must be >= 1, got {args.conversations}")
    if args.max_context_length < 2:
        raise ValueError(f"--max_context_length must be >= 2, got {args.max_context_length}")
    if args.max_memory is not None:
        from stac_lm.convert.options import parse_max_memory

        if set(parse_max_memory(args.max_memory)) != {"cpu"} or args.device not in ("cpu", "auto"):
            raise ValueError(f"--max_memory {args.max_memory}: the checks run within a budget on the CPU only; give "
                             "cpu=SIZE and --device cpu")


def converted_dir(args: argparse.Namespace) -> str:
    """The embedded SmolLM2 converted for chatting, as `make chat` does (reusing an existing conversion
    at ``out/chat_smollm2_T<T>``)."""
    from stac_lm.convert.options import CHITCHAT, ConvertOptions

    opts = ConvertOptions(timesteps=args.timesteps, device=args.device, calib_text=CHITCHAT)
    opts = ConvertOptions(timesteps=opts.timesteps, device=args.device, calib_text=CHITCHAT,
                          output_dir=f"out/chat_smollm2_T{opts.timesteps}")
    if Path(opts.output_dir).exists():
        print(f"using the existing conversion in {opts.output_dir}", file=sys.stderr)
        return opts.output_dir
    from stac_lm.convert.pipeline import run

    run(opts)
    return opts.output_dir


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stac_cli.float32_only(PROG, args.dtype, FLOAT32_ONLY)
    from stac_common.io import check_output_free, write_json

    from stac_common.assets import MissingAssetError

    try:
        check_output_free(args.out, args.overwrite)  # before minutes of work
        check_args(args)
        from rich.console import Console

        from stac_lm.checks.suite import checks_table, run_suite

        model_dir = args.model_dir or converted_dir(args)
        device = "cpu" if args.max_memory is not None else args.device
        result = run_suite(model_dir, groups_of(args), timesteps=args.timesteps, device=device,
                           conversations=args.conversations, max_context_length=args.max_context_length,
                           max_memory=args.max_memory)
        check_output_free(args.out, args.overwrite)  # something may have appeared meanwhile
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, MissingAssetError) as e:  # OutputExistsError is a ValueError
        fail(str(e))
    Console().print(checks_table(result))
    failed = result["failed"]
    print(f"written to {args.out}" + (f"; FAILED: {'; '.join(failed)}" if failed else "; every check passed"),
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
