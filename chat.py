#!/usr/bin/env python
"""Chat in the terminal with a spiking LM saved by run_conversion.py (or, with --ann, its original).

  python chat.py --model_dir out/chat_smollm2_T7
  python chat.py --model_dir out/chat_smollm2_T7 -T 8 --temperature 0.7 --seed 1
  python chat.py --model_dir out/chat_smollm2_T7 --ann      # the original network, to compare
  python chat.py --model_dir out/chat_smollm2_T7 --ann --dtype bfloat16   # ... in half precision
  python chat.py --model_dir out/chat_smollm2_T7 --float_weights   # same replies, faster, more memory

The tokenizer's chat template writes the conversation when it has one; otherwise plain
"User:/Assistant:" lines. Replies stream as they come. In the session, :help lists the
commands (:reset, :history, :stats, :set T=8, :set temperature=0.7, :exit). Ctrl-C stops a
reply and keeps the session; Ctrl-D ends it. Every flag also takes dashes (--model-dir).
Exit codes: 0 done, 2 bad input (one line on stderr), 130 interrupted while loading.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import stac_common.cli as stac_cli
from stac_common.cli import TIMESTEPS_RANGE, Parser, flag
from stac_common.cli import fail as cli_fail

PROG = "chat.py"
# why the SNN takes float32 only
SNN_FLOAT32 = ("the SNN runs in float32, where its spike counts are exact whole numbers (docs/design.md); "
               "half precision is for the original network (--ann)")

fail = partial(cli_fail, PROG)


def build_parser() -> Parser:
    p = Parser(PROG, __doc__)
    stac_cli.model_dir_flag(p, required=True, help="a directory saved by run_conversion.py")
    stac_cli.device_flag(p, default="auto")
    stac_cli.dtype_flag(p, default="float32", help="float32 (default); float16 and bfloat16 with --ann only: the "
                                                   "SNN's spike counts are exact in float32")
    stac_cli.timesteps_flag(p, help=f"spike timesteps per token, {TIMESTEPS_RANGE} (default: the saved T)")
    flag(p, "max_new_tokens", type=int, default=128, metavar="N", help="longest reply in tokens (default 128)")
    flag(p, "temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples at that temperature")
    flag(p, "top_k", type=int, default=0, metavar="K", help="sample among the K likeliest tokens (default 0: off)")
    flag(p, "top_p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1: off)")
    stac_cli.seed_flag(p, help="seed of the sampling (default: unseeded)")
    flag(p, "max_context_length", type=int, default=2048, metavar="N",
         help="tokens of conversation the model keeps; the oldest turns go beyond it (default 2048, at most "
              "the model's positions)")
    flag(p, "system", metavar="PROMPT", help="a system message, for chat templates that take one")
    flag(p, "max_memory", metavar="[0=SIZE,]cpu=SIZE",
         help="keep the SNN's weights within a budget (e.g. cpu=6GiB): the decoder layers that do not fit are read "
              "from the saved files for each token; with a GPU named (e.g. 0=10GiB,cpu=20GiB, --device cuda) the "
              "first layers sit on the GPU, the next in CPU memory")
    flag(p, "float_weights", action="store_true", help="keep float copies of the 8-bit weights: the same replies, "
                                                        "faster, the original model's weight memory")
    flag(p, "ann", action="store_true", help="chat with the original network (the directory's source model) "
                                              "instead of the SNN, to compare")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.model_dir).is_dir():  # before the heavy imports: a typo fails at once
        fail(f"{args.model_dir} is not a directory; pass a directory saved by run_conversion.py")
    if args.max_context_length < 2:
        fail(f"--max_context_length must be >= 2, got {args.max_context_length}")
    if args.ann and args.float_weights:
        fail("--float_weights applies to the SNN's 8-bit weights; the original network (--ann) is float already")
    if not args.ann:
        stac_cli.float32_only(PROG, args.dtype, SNN_FLOAT32)
    from stac_lm.chat.engines import open_engine
    from stac_lm.chat.format import ChatFormat
    from stac_lm.chat.session import ChatSession, Settings

    try:
        settings = Settings(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
        engine, tok, config = open_engine(args.model_dir, args.device, args.timesteps, args.max_context_length,
                                          args.ann, args.float_weights, args.dtype, args.max_memory)
        fmt = ChatFormat(tok, args.system, config["hf_config"].get("eos_token_id"))
    except (ValueError, OSError) as e:  # a bad directory or setting; MissingAssetError is an OSError
        fail(str(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted while loading", file=sys.stderr)
        return 130
    sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets '?', not a crash
    session = ChatSession(engine, fmt, settings)
    print(banner(args, config, engine, session), flush=True)
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    return session.run()


def banner(args, config: dict, engine, session) -> str:
    what = "the original network (--ann)" if engine.kind == "ann" else f"the {config.get('mode', '')} SNN"
    source = config.get("source", {}).get("model_id") or config["options"].get("model_name")
    saved_T = f", calibrated at T={config['timesteps']}" if engine.kind == "snn" else ""
    settings = ", ".join(f"{k}={v}" for k, v in session.describe().items())
    from stac_common.runtime import embedding_dtype, input_device

    dtype = str(embedding_dtype(engine.model)).removeprefix("torch.")
    return (f"STAC chat with {what} of {source} on {input_device(engine.model)} in {dtype}{saved_T}\n"
            f"settings: {settings}; context {engine.limit} tokens\n"
            f"format: {session.fmt.describe()}\n"
            ":help lists the commands; Ctrl-C stops a reply, Ctrl-D ends the session")


if __name__ == "__main__":
    sys.exit(main())
