"""The chat REPL: read a line, stream the model's reply, run ``:commands``.

Ctrl-C during a reply stops it (the conversation keeps what was said); Ctrl-C at the prompt
only prints a hint; Ctrl-D or ``:exit`` ends the session.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Callable, TextIO

from stac_lm.chat.engines import Engine, ReplyStats
from stac_lm.chat.format import ChatFormat
from spike_modules.energy import E_AC_PJ, E_MAC_PJ
from stac_lm.generate.sampling import SamplingConfig

PROMPT = "you> "
HELP = """commands:
  :help               this list
  :exit               end the session (:quit and Ctrl-D too)
  :reset              forget the conversation
  :history            the conversation so far
  :stats              speed, spike rate per layer group and energy estimate of the last reply
  :set KEY=VALUE ...  change a setting: {keys}
Ctrl-C stops a reply and keeps the session."""


@dataclass(frozen=True)
class Settings:
    """Generation settings; ``temperature`` 0 is greedy, above 0 samples at that temperature."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        self.sampling()  # SamplingConfig checks top_k, top_p and seed

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(do_sample=self.temperature > 0, temperature=float(self.temperature or 1.0),
                              top_k=self.top_k, top_p=float(self.top_p), seed=self.seed)


def _seed(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


# what :set accepts, with the parser of each value
SETTABLE: dict[str, Callable[[str], object]] = {
    "T": int, "temperature": float, "top_k": int, "top_p": float, "max_new_tokens": int, "seed": _seed}


class _Stream:
    """Prints a reply as its tokens come. The whole reply is decoded each time and only the new
    suffix printed, so a character split over several tokens appears once it is complete."""

    def __init__(self, fmt: ChatFormat, out: TextIO):
        self.fmt, self.out = fmt, out
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, tok: int) -> None:
        self.ids.append(tok)
        text = self.fmt.reply_text(self.ids).lstrip()
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return  # an incomplete character, or a decode that rewrote earlier text: wait for more
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text


class ChatSession:
    """A REPL over ``engine`` (one conversation) with the conversation written by ``fmt``.

    Args:
        engine: the SNN or ANN engine.
        fmt: the chat format of the engine's tokenizer.
        settings: initial generation settings.
        out: where everything is printed (stdout).
    """

    def __init__(self, engine: Engine, fmt: ChatFormat, settings: Settings, out: TextIO = sys.stdout):
        self.engine, self.fmt, self.settings, self.out = engine, fmt, settings, out
        self.label = f"{engine.kind}> "
        self.dropped = 0  # turns the model no longer sees (context limit)
        self.commands = {"help": self.cmd_help, "exit": None, "quit": None, "reset": self.cmd_reset,
                         "history": self.cmd_history, "stats": self.cmd_stats, "set": self.cmd_set}

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def run(self, read: Callable[[str], str] = input) -> int:
        """The loop; returns the exit status (0)."""
        while True:
            try:
                line = read(PROMPT)
            except KeyboardInterrupt:
                self.say("\n(Ctrl-C stops a reply; Ctrl-D or :exit ends the session)")
                continue
            except EOFError:
                self.say()
                return 0
            try:
                if not self.handle(line):
                    return 0
            except KeyboardInterrupt:  # between two tokens' bookkeeping: the session still goes on
                self.say("\n(interrupted)")

    def handle(self, line: str) -> bool:
        """One line of input; False ends the session."""
        text = line.strip()
        if not text:
            return True
        if not text.startswith(":"):
            self.send(text)
            return True
        name, _, args = text[1:].partition(" ")
        if name not in self.commands:
            self.say(f"unknown command :{name}; :help lists the commands")
            return True
        command = self.commands[name]
        if command is None:
            return False
        command(args.strip())
        return True

    # -- a turn --------------------------------------------------------------------------------

    def send(self, text: str) -> None:
        """Feed a user message and stream the reply."""
        turn = self.fmt.prepare(text)
        ids = self.fmt.encode(turn.text)
        budget = min(self.settings.max_new_tokens, self.engine.limit - len(ids))
        if budget < 1:
            self.say(f"that turn is {len(ids)} tokens and the context holds {self.engine.limit} "
                     "(--max_context_length); send something shorter" + (" or :reset" if turn.restart else ""))
            return
        if turn.restart:
            self.engine.reset()
        stream = _Stream(self.fmt, self.out)
        self.out.write(self.label)
        self.out.flush()
        try:
            reply = self.engine.generate(ids, budget, self.settings.sampling(), self.fmt.stop_ids, stream)
        except ValueError as e:
            self.say(f"\nerror: {e}")
            return
        except KeyboardInterrupt:
            self.fmt.commit(turn, stream.ids)  # the engine kept the reply so far
            self.say("\n(reply stopped by Ctrl-C; the conversation keeps it, the session goes on)")
            return
        self.fmt.commit(turn, stream.ids)
        self.say()
        if reply.stop_reason == "max_new_tokens":
            self.say(f"(cut at {budget} new tokens; :set max_new_tokens=N for longer replies)")
        if reply.dropped_turns:
            self.dropped += reply.dropped_turns
            self.say(f"(context limit of {self.engine.limit} tokens reached: the model no longer sees the "
                     f"{reply.dropped_turns} oldest turn(s))")

    # -- commands ------------------------------------------------------------------------------

    def cmd_help(self, _args: str) -> None:
        self.say(HELP.format(keys=", ".join(SETTABLE)))

    def cmd_reset(self, _args: str) -> None:
        self.engine.reset()
        self.fmt.reset()
        self.dropped = 0
        self.say("(conversation cleared)")

    def cmd_history(self, _args: str) -> None:
        history = self.fmt.history()
        if not any(role != "system" for role, _ in history):
            self.say("(no conversation yet)")
            return
        if self.dropped:
            self.say(f"(the model no longer sees the {self.dropped} oldest turn(s): context limit)")
        for role, text in history:
            self.say(f"{role}: {text}")

    def cmd_stats(self, _args: str) -> None:
        for line in stats_lines(self.engine.last, self.engine):
            self.say(line)

    def cmd_set(self, args: str) -> None:
        usage = f"usage: :set KEY=VALUE ...; settable: {', '.join(SETTABLE)} (e.g. :set T=8 temperature=0.7)"
        pairs = [a.partition("=") for a in args.split()]
        if not pairs or any(not sep or key not in SETTABLE for key, sep, _ in pairs):
            self.say(usage)
            return
        values = {}
        for key, _, value in pairs:
            try:
                values[key] = SETTABLE[key](value)
            except ValueError:
                self.say(f"bad value for {key}: {value!r}; {usage}")
                return
        T = values.pop("T", None)
        try:
            settings = dataclasses.replace(self.settings, **values)
            if T is not None:
                self._set_timesteps(T)
        except ValueError as e:
            self.say(str(e))
            return
        self.settings = settings
        self.say("(" + ", ".join(f"{k}={v}" for k, v in self.describe().items()) + ")")

    def _set_timesteps(self, T: int) -> None:
        if not hasattr(self.engine, "set_timesteps"):
            raise ValueError("T does not apply: --ann runs the original network, which has no timesteps")
        self.engine.set_timesteps(T)

    def describe(self) -> dict[str, object]:
        """The settings in force (T first for the SNN)."""
        d = {"T": self.engine.T} if self.engine.T is not None else {}
        d.update(dataclasses.asdict(self.settings))
        d["temperature"] = d["temperature"] or "0 (greedy)"
        return d


def stats_lines(stats: ReplyStats | None, engine: Engine) -> list[str]:
    """``:stats``: speed, spike rate per layer group and energy of the last reply."""
    if stats is None:
        return ["(no reply yet)"]
    lines = [f"last reply: {stats.tokens} tokens in {stats.seconds:.2f} s, {stats.tokens_per_second:.1f} tokens/s "
             f"(stop: {stats.stop_reason}; {engine.kind.upper()}"
             + (f", T={stats.T})" if stats.T is not None else ")")]
    if stats.spike_rates is None:
        lines.append("spike rates: do not apply (--ann runs the original network; its energy is all MACs)")
    else:
        lines.append("spike rate per layer group (spikes per neuron per step, mean over the group's sites):")
        width = max(map(len, stats.spike_rates), default=0)
        lines += [f"  {g:<{width}}  {r:.4f}" for g, r in stats.spike_rates.items()]
        lines.append(f"  {'all sites':<{width}}  {stats.mean_spike_rate:.4f}")
    per_token = stats.energy_pj / stats.processed * 1e-6 if stats.processed else float("nan")
    energy = (f"energy estimate: {stats.energy_pj * 1e-6:.3f} µJ over {stats.processed} tokens through the model "
              f"(prompt and reply), {per_token:.4f} µJ/token")
    if stats.spike_rates is not None:
        ratio = stats.energy_pj / stats.ann_energy_pj if stats.ann_energy_pj else float("nan")
        energy += f"; SNN/ANN {ratio:.3f} for the same tokens"
    lines += [energy, f"  (op counts: MAC {E_MAC_PJ} pJ, spike accumulate {E_AC_PJ} pJ, 45 nm; memory traffic "
                      "not counted)"]
    return lines
