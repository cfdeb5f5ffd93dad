"""What the chat REPL talks to: the converted SNN (through :class:`TemporalSpikeProcessor`) or,
with ``--ann``, the original network (a short KV-cached loop over the plain HF model).

Both run one conversation, take one user turn at a time and report each reply's cost:
tokens per second, spike rate per layer group (SNN only) and the energy estimate of
``spike_modules.energy`` (45 nm op counts; the ANN's energy for the same ops is all MACs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from spike_modules.energy import E_MAC_PJ, counting
from stac_lm.convert.pipeline import max_positions
from stac_lm.generate.processor import TemporalSpikeProcessor
from stac_lm.generate.sampling import SamplingConfig, pick_next
from spike_modules.site import reset_spike_stats

from stac_lm.checks.verify import spike_section
from stac_common.runtime import input_device

CONVERSATION = "chat"


@dataclass(frozen=True)
class ReplyStats:
    """The cost of one reply. ``processed``: tokens that went through the model (the turn's
    prompt and the reply); ``ann_energy_pj``: the same ops as dense MACs."""

    tokens: int
    seconds: float
    stop_reason: str
    processed: int
    energy_pj: float
    ann_energy_pj: float
    T: int | None
    spike_rates: dict[str, float] | None   # mean over each layer group's sites; None for the ANN
    mean_spike_rate: float | None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class Reply:
    tokens: list[int]
    stop_reason: str          # "stop_token" or "max_new_tokens" ("interrupted" raises instead)
    dropped_turns: int


class Engine:
    """One conversation with a model. :meth:`generate` counts ops and times each reply;
    subclasses say how a reply is made (:meth:`_run`)."""

    kind = "model"
    spiking = False

    def __init__(self, model: nn.Module, max_context_length: int):
        self.model = model
        positions = max_positions(model)
        self.limit = min(max_context_length, positions) if positions else max_context_length
        self.last: ReplyStats | None = None

    @property
    def T(self) -> int | None:
        return None

    def reset(self) -> None:
        raise NotImplementedError

    def _run(self, ids: list[int], max_new_tokens: int, sampling: SamplingConfig, stops: frozenset[int],
             on_token: Callable[[int], None]) -> tuple[str, int]:
        """Feed ``ids`` as a new turn and generate; returns ``(stop_reason, dropped_turns)``."""
        raise NotImplementedError

    def generate(self, ids: list[int], max_new_tokens: int, sampling: SamplingConfig, stops: frozenset[int],
                 on_token: Callable[[int], None]) -> Reply:
        """Reply to ``ids`` (a new turn), calling ``on_token`` for each token as it comes.

        Raises:
            KeyboardInterrupt: Ctrl-C; the conversation keeps the reply so far and :attr:`last`
                holds its stats.
            ValueError: the turn does not fit the context (nothing was fed).
        """
        tokens: list[int] = []

        def on(tok: int) -> None:
            tokens.append(tok)
            on_token(tok)

        reset_spike_stats(self.model)
        reason, dropped = "interrupted", 0
        t0 = time.perf_counter()
        with counting(self.model) as counts:
            try:
                reason, dropped = self._run(ids, max_new_tokens, sampling, stops, on)
            except KeyboardInterrupt:
                pass  # re-raised below, once the counts of the partial reply are complete
        self.last = self._stats(len(tokens), time.perf_counter() - t0, reason, counts)
        if reason == "interrupted":
            raise KeyboardInterrupt
        return Reply(tokens, reason, dropped)

    def _stats(self, n: int, seconds: float, reason: str, counts) -> ReplyStats:
        rates = mean = None
        if self.spiking:
            section = spike_section(self.model)
            rates = {g: s["mean"] for g, s in section["per_group"].items()}
            mean = section["mean_spike_rate"]
        return ReplyStats(n, seconds, reason, counts.tokens, counts.energy_pj,
                          counts.total_macs_equivalent * E_MAC_PJ, self.T, rates, mean)


class SNNEngine(Engine):
    """The converted model, KV-cached by :class:`TemporalSpikeProcessor`."""

    kind = "snn"
    spiking = True

    def __init__(self, model: nn.Module, T: int, max_context_length: int, pad_token_id: int = 0,
                 float_weights: bool = False):
        super().__init__(model, max_context_length)
        self.processor = TemporalSpikeProcessor(model, T=T, max_context_length=self.limit, pad_token_id=pad_token_id,
                                                float_weights=float_weights)

    @property
    def T(self) -> int:
        return self.processor.T

    def set_timesteps(self, T: int) -> None:
        self.processor.set_timesteps(T)

    def reset(self) -> None:
        self.processor.reset(CONVERSATION)

    def _run(self, ids, max_new_tokens, sampling, stops, on_token):
        gen = self.processor.generate(torch.tensor(ids, dtype=torch.long), max_new_tokens,
                                      conversation_id=CONVERSATION, do_sample=sampling.do_sample,
                                      temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                                      seed=sampling.seed, stop_tokens=tuple(stops),
                                      on_token=lambda _cid, tok: on_token(tok))
        return gen.stop_reason, gen.dropped_turns


class ANNEngine(Engine):
    """The original network: one conversation as turns of token ids and an HF cache over them."""

    kind = "ann"

    def __init__(self, model: nn.Module, max_context_length: int):
        super().__init__(model.eval(), max_context_length)
        self.device = input_device(model)
        self.reset()

    def reset(self) -> None:
        self.turns: list[list[int]] = []
        self.cache = None  # covers a prefix of the turns' tokens; the last reply token is fed next turn

    def _make_room(self, incoming: int) -> int:
        if incoming > self.limit:
            raise ValueError(f"the turn needs {incoming} tokens (input and max_new_tokens), more than the "
                             f"context limit of {self.limit}")
        dropped = 0
        while self.turns and sum(map(len, self.turns)) + incoming > self.limit:
            self.turns.pop(0)
            dropped += 1
            self.cache = None  # positions restart at 0: the remaining turns are encoded again
        return dropped

    @torch.no_grad()
    def _run(self, ids, max_new_tokens, sampling, stops, on_token):
        dropped = self._make_room(len(ids) + max_new_tokens)
        self.turns.append(list(ids))
        cached = self.cache.get_seq_length() if self.cache is not None else 0
        feed = [t for turn in self.turns for t in turn][cached:]
        generator, n = sampling.generator(), 0
        try:
            while True:
                out = self.model(input_ids=torch.tensor([feed], device=self.device), past_key_values=self.cache,
                                 use_cache=True)
                self.cache = out.past_key_values
                tok = pick_next(out.logits[0, -1], sampling, generator)
                self.turns[-1].append(tok)
                n += 1
                on_token(tok)
                if tok in stops:
                    return "stop_token", dropped
                if n >= max_new_tokens:
                    return "max_new_tokens", dropped
                feed = [tok]
        except KeyboardInterrupt:
            # a forward cut short may have extended some layers' cache: encode everything again next turn
            self.cache = None
            raise


HALF_DTYPES = ("float16", "bfloat16")  # the original network (ann) runs in these too


def open_engine(model_dir: str, device: str, T: int | None, max_context_length: int,
                ann: bool, float_weights: bool = False, dtype: str = "float32",
                max_memory: str | None = None) -> tuple[Engine, object, dict]:
    """Load a saved SNN directory as ``(engine, tokenizer, config)``; with ``ann``, the engine
    runs the directory's source model instead, cast to ``dtype``. ``float_weights``: the SNN keeps
    float copies of its 8-bit weights (see :class:`TemporalSpikeProcessor`). ``max_memory``
    (``cpu=SIZE``, or ``0=SIZE,cpu=SIZE`` to compute on that GPU): the SNN's weights that do not fit stay on disk, read for each forward
    (:func:`stac_lm.io.hf_native.from_pretrained`).

    Raises:
        ValueError: a missing or damaged directory, a bad device, ``T`` or context length, or a
            ``dtype`` other than float32 for the SNN (its spike counts are exact in float32 only).
        OSError: the source model cannot be found (``ann``).
    """
    from stac_lm.convert.pipeline import load_source
    from stac_common.runtime import resolve_device
    from stac_lm.io.saving import load_snn

    if dtype != "float32" and (not ann or dtype not in HALF_DTYPES):
        what = "the original network" if ann else "the SNN"
        allowed = "float32, float16 or bfloat16" if ann else "float32 only (its spike counts are exact in float32)"
        raise ValueError(f"{what} runs in {allowed}, got dtype {dtype!r}")
    if max_memory is not None and (ann or float_weights):
        raise ValueError("--max_memory loads the SNN's weights within a budget; it does not apply to --ann or "
                         "--float_weights")
    dev = resolve_device(device)
    model, tok, config = load_snn(model_dir, dev, max_memory)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    if not ann:
        T = int(config["timesteps"]) if T is None else T
        return SNNEngine(model, T, max_context_length, pad, float_weights), tok, config
    del model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its weight-loading bar would land in the chat
    source, _ = load_source(config["options"]["model_name"])
    return ANNEngine(source.to(dev, getattr(torch, dtype)), max_context_length), tok, config
