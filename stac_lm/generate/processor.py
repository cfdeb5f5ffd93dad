"""``TemporalSpikeProcessor``: KV-cached multi-turn generation with a converted spiking LM.

Spiking state is not KV state. The model runs in parallel mode (each site's T-step spike
train in closed form), so a neuron's membrane lives for one token step only; what carries
over between steps is the cache of decoded keys and values (:class:`SpikeKVCache`). A
prefill plus incremental decoding therefore computes what recomputing the whole context
computes, up to float summation order.

Conversations are kept by id, each as its list of turns (token ids fed, replies included)
and its cache. Positions continue across turns. When a conversation would outgrow
``max_context_length`` (or the model's positions), its oldest turns are dropped and the rest
re-encoded from position 0; the result says how many turns went (``dropped_turns``). Several
conversations run batched: their caches are left-padded into one, the attention mask keeps
the padding out, and each row gets its own positions, so each gives what it gives alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from calibration import keep_float_weights
from spike_modules.kv_cache import ENCODED_FLAG, SpikeKVCache, attention_layers
from spike_modules.quantizer import check_timesteps
from spike_modules.site import frozen, iter_sites, set_mode, set_timesteps

from stac_lm.convert.pipeline import max_positions
from stac_lm.generate.sampling import SamplingConfig, pick_next
from stac_common.runtime import input_device

DEFAULT_ID = "default"


@dataclass
class Conversation:
    """One conversation: the token ids of its turns (in the order fed) and the cache over them."""

    turns: list[torch.Tensor] = field(default_factory=list)
    cache: SpikeKVCache | None = None  # covers a prefix of the turns' tokens; None: nothing encoded yet

    @property
    def length(self) -> int:
        return sum(int(t.numel()) for t in self.turns)

    @property
    def cached(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    def ids(self) -> torch.Tensor:
        return torch.cat(self.turns) if self.turns else torch.zeros(0, dtype=torch.long)

    def unfed(self) -> torch.Tensor:
        """Tokens of the turns that the cache does not cover yet (a reply's last token, or all
        of them after turns were dropped): fed before the next new tokens."""
        return self.ids()[self.cached:]

    def add(self, ids: torch.Tensor, new_turn: bool) -> None:
        if new_turn or not self.turns:
            self.turns.append(ids.clone())
        else:
            self.turns[-1] = torch.cat([self.turns[-1], ids])


@dataclass
class StepOutput:
    """What one call of the processor returns: logits ``[B, S, V]`` for the new tokens (left-padded
    rows in a batch) and, per conversation, how many of its oldest turns were dropped."""

    logits: torch.Tensor
    dropped_turns: dict[str, int]


@dataclass
class Generation:
    """One conversation's reply."""

    conversation_id: str
    tokens: list[int]
    stop_reason: str          # "stop_token", "max_new_tokens" or "interrupted"
    prompt_tokens: int
    dropped_turns: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("nan")


def _truncate(cache: SpikeKVCache, length: int) -> None:
    """Cut every layer of ``cache`` back to ``length`` slots (undoing a step that did not finish)."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.keys.shape[-2] > length:
            layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]


class _Batch:
    """Conversations stepped together: one left-padded cache, the mask over its slots, and the
    number of real tokens (= the next position) of each row."""

    def __init__(self, model: nn.Module, caches: list[SpikeKVCache | None], lengths: list[int], device):
        self.model, self.device, self.lengths = model, device, list(lengths)
        width = max(lengths)
        self.mask = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
        for i, n in enumerate(lengths):
            self.mask[i, width - n:] = 1
        if width == 0:
            self.cache = SpikeKVCache(model)
        elif len(caches) == 1:
            self.cache = caches[0]
        else:
            ref = next(c for c in caches if c is not None)
            data = []
            decoded = [c.layer_tensors() if c is not None else None for c in caches]  # counts -> values
            ref_tensors = ref.layer_tensors()
            for layer in range(len(ref.layers)):
                ks, vs = [], []
                for c, n in zip(decoded, lengths):
                    k0, v0 = ref_tensors[layer]
                    k = c[layer][0] if c is not None else k0[:1, :, :0]
                    v = c[layer][1] if c is not None else v0[:1, :, :0]
                    ks.append(torch.cat([k.new_zeros(1, *k.shape[1:2], width - n, k.shape[-1]), k], -2))
                    vs.append(torch.cat([v.new_zeros(1, *v.shape[1:2], width - n, v.shape[-1]), v], -2))
                data.append((torch.cat(ks), torch.cat(vs)))
            self.cache = SpikeKVCache(model, data)

    @torch.no_grad()
    def step(self, new: list[torch.Tensor | None], pad_id: int) -> torch.Tensor:
        """Feed each row its new ids (``None``: nothing, a masked pad slot); returns logits ``[B, S, V]``
        (left-padded). A step interrupted half-way is undone, so the cache stays consistent."""
        S = max(int(x.numel()) if x is not None else 1 for x in new)
        B = len(new)
        ids = torch.full((B, S), pad_id, dtype=torch.long, device=self.device)
        step_mask = torch.zeros(B, S, dtype=torch.long, device=self.device)
        pos = torch.zeros(B, S, dtype=torch.long, device=self.device)
        for i, x in enumerate(new):
            if x is None:
                continue
            n = int(x.numel())
            ids[i, S - n:] = x.to(self.device)
            step_mask[i, S - n:] = 1
            pos[i, S - n:] = self.lengths[i] + torch.arange(n, device=self.device)
        mask = torch.cat([self.mask, step_mask], 1)
        slots = self.mask.shape[1]
        padded = bool((mask == 0).any())
        try:
            out = self.model(input_ids=ids, attention_mask=mask if padded else None, position_ids=pos,
                             past_key_values=self.cache, use_cache=True)
        except BaseException:
            _truncate(self.cache, slots)
            for m in attention_layers(self.model).values():
                m.__dict__.pop(ENCODED_FLAG, None)
            raise
        self.mask = mask
        self.lengths = [n + (int(x.numel()) if x is not None else 0) for n, x in zip(self.lengths, new)]
        return out.logits

    def split(self) -> list[SpikeKVCache]:
        """Each row's cache, its padding slots removed."""
        if self.mask.shape[0] == 1 and bool(self.mask.all()):
            return [self.cache]
        out = []
        for i in range(self.mask.shape[0]):
            keep = self.mask[i].bool()
            out.append(SpikeKVCache(self.model, [(k[i:i + 1, :, keep], v[i:i + 1, :, keep])
                                                 for k, v in self.cache.layer_tensors()]))
        return out


class TemporalSpikeProcessor:
    """KV-cached, multi-turn, batched generation with a converted spiking causal LM.

    Args:
        snn_model: a model converted by ``smollm2_converter.convert`` and calibrated (e.g. from
            ``load_snn``). Its sites are switched to parallel mode with ``T`` steps.
        T: timesteps per token (1..512); the model's thresholds are kept, so another T than the
            calibrated one quantizes more coarsely or finely.
        max_context_length: most tokens a conversation keeps (capped by the model's positions).
        pad_token_id: id fed into padding slots (never attended to); default 0.
        float_weights: keep a float32 copy of each own-backend 8-bit weight for the processor's
            life instead of converting it on every step (``calibration.keep_float_weights``):
            the same logits bit for bit, faster decoding, the float model's weight memory
            (``float_weight_bytes`` says how much). Default False.

    Raises:
        ValueError: the model was not converted by STAC, or a bad ``T`` / ``max_context_length``.
    """

    def __init__(self, snn_model: nn.Module, T: int = 16, max_context_length: int = 512, pad_token_id: int = 0,
                 float_weights: bool = False):
        attention_layers(snn_model)  # refuses a model that was not converted
        if not any(True for _ in iter_sites(snn_model)):
            raise ValueError("the model has no spiking sites; convert and calibrate it first")
        if isinstance(max_context_length, bool) or not isinstance(max_context_length, int) or max_context_length < 2:
            raise ValueError(f"max_context_length must be an integer >= 2, got {max_context_length!r}")
        self.model = snn_model.eval()
        self.set_timesteps(T)
        positions = max_positions(snn_model)
        self.max_context_length = min(max_context_length, positions) if positions else max_context_length
        self.pad_token_id = int(pad_token_id)
        self.device = input_device(snn_model)
        self.conversations: dict[str, Conversation] = {}
        self.float_weight_bytes = keep_float_weights(snn_model) if float_weights else 0

    # -- state ---------------------------------------------------------------------------------

    def set_timesteps(self, T: int) -> None:
        """Run every site with ``T`` steps from now on (parallel mode)."""
        self.T = check_timesteps(T)
        set_timesteps(self.model, self.T)
        set_mode(self.model, "parallel")

    def reset(self, conversation_id: str | None = None) -> None:
        """Delete one conversation (its turns and cache), or all of them when ``conversation_id`` is None."""
        if conversation_id is None:
            self.conversations.clear()
        else:
            self.conversations.pop(conversation_id, None)

    def history(self, conversation_id: str = DEFAULT_ID) -> torch.Tensor:
        """The token ids the conversation holds now (after any dropped turns)."""
        conv = self.conversations.get(conversation_id)
        return conv.ids() if conv else torch.zeros(0, dtype=torch.long)

    def cache_length(self, conversation_id: str = DEFAULT_ID) -> int:
        conv = self.conversations.get(conversation_id)
        return conv.cache.get_seq_length() if conv and conv.cache is not None else 0

    # -- internals -----------------------------------------------------------------------------

    def _conversation(self, cid: str) -> Conversation:
        if not isinstance(cid, str) or not cid:
            raise ValueError(f"conversation ids are non-empty strings, got {cid!r}")
        return self.conversations.setdefault(cid, Conversation())

    def _make_room(self, conv: Conversation, incoming: int, what: str) -> int:
        """Drop the oldest turns until ``incoming`` more tokens fit; returns how many were dropped."""
        limit = self.max_context_length
        if incoming > limit:
            raise ValueError(f"{what} needs {incoming} tokens, more than the context limit of {limit} "
                             "(max_context_length or the model's positions); shorten the input or ask for fewer "
                             "new tokens")
        dropped = 0
        while conv.turns and conv.length + incoming > limit:
            conv.turns.pop(0)
            dropped += 1
        if dropped:
            conv.cache = None  # positions restart at 0: the remaining turns are re-encoded
        return dropped

    def _as_rows(self, input_ids, attention_mask, conversation_id) -> tuple[list[str], list[torch.Tensor]]:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids [batch, seq] with seq >= 1, got shape "
                             f"{tuple(ids.shape)} and dtype {ids.dtype}")
        cids = [conversation_id] if isinstance(conversation_id, str) else list(conversation_id)
        if len(cids) != ids.shape[0]:
            raise ValueError(f"{ids.shape[0]} rows of input_ids but {len(cids)} conversation ids")
        if len(set(cids)) != len(cids):
            raise ValueError(f"a conversation can appear once per batch, got {cids}")
        if attention_mask is None:
            rows = [r.long().cpu() for r in ids]
        else:
            mask = torch.as_tensor(attention_mask)
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, "
                                 f"got {tuple(mask.shape)}")
            rows = []
            for r, m in zip(ids, mask):
                m = m.bool().cpu()
                n = int(m.sum())
                if n == 0 or not bool(m[-n:].all()):
                    raise ValueError("each row needs at least one token, left-padded (its mask zeros come first)")
                rows.append(r.cpu()[-n:].long())
        return cids, rows

    def _start(self, cids: list[str], rows: list[torch.Tensor], reserve: int,
               new_turn: bool) -> tuple[_Batch, list[int], list[torch.Tensor]]:
        """Make room, add ``rows`` to the conversations and batch them; returns the batch, the turns
        dropped per conversation and what each row must feed (its unfed tokens, ``rows`` last)."""
        convs = [self._conversation(c) for c in cids]
        dropped = [self._make_room(conv, int(r.numel()) + reserve, f"conversation {c!r}: the input")
                   for c, conv, r in zip(cids, convs, rows)]
        batch = _Batch(self.model, [conv.cache for conv in convs], [conv.cached for conv in convs], self.device)
        for conv, r in zip(convs, rows):
            conv.cache = None  # owned by the batch until it is split back
            conv.add(r, new_turn)
        feeds = [conv.ids()[n:] for conv, n in zip(convs, batch.lengths)]
        return batch, dropped, feeds

    def _finish(self, cids: list[str], batch: _Batch) -> None:
        for c, cache in zip(cids, batch.split()):
            self.conversations[c].cache = cache

    # -- public API ----------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask=None, use_cache: bool = True,
                 conversation_id: str | list[str] = DEFAULT_ID, new_turn: bool = True) -> StepOutput:
        """Feed ``input_ids`` (``[S]``, ``[1, S]`` or a left-padded batch ``[B, S]`` with one
        conversation id per row) and return the logits of the new tokens.

        ``use_cache=False`` recomputes each conversation's whole context in one pass (the
        reference the cached path must match); the conversations are updated either way.
        ``new_turn=False`` appends the tokens to the conversation's last turn.
        """
        cids, rows = self._as_rows(input_ids, attention_mask, conversation_id)
        if not use_cache:
            return self._recompute(cids, rows, new_turn)
        batch, dropped, feeds = self._start(cids, rows, 0, new_turn)
        try:
            logits = batch.step(feeds, self.pad_token_id)
        except BaseException:
            for c, r in zip(cids, rows):  # the step did not happen: the input is not kept
                self._unfeed(c, r, new_turn)
            self._finish(cids, batch)
            raise
        self._finish(cids, batch)
        S = max(int(r.numel()) for r in rows)
        out = logits.new_zeros(len(rows), S, logits.shape[-1])
        for i, r in enumerate(rows):
            out[i, S - r.numel():] = logits[i, -r.numel():]
        return StepOutput(out, dict(zip(cids, dropped)))

    def _unfeed(self, cid: str, row: torch.Tensor, new_turn: bool) -> None:
        conv = self.conversations[cid]
        if new_turn:
            conv.turns.pop()
        else:
            conv.turns[-1] = conv.turns[-1][: -row.numel()]

    def _recompute(self, cids: list[str], rows: list[torch.Tensor], new_turn: bool) -> StepOutput:
        outs, dropped = [], {}
        for c, r in zip(cids, rows):
            conv = self._conversation(c)
            dropped[c] = self._make_room(conv, int(r.numel()), f"conversation {c!r}: the input")
            context = torch.cat([conv.ids(), r]).to(self.device)
            logits = self.model(input_ids=context[None], use_cache=False).logits[:, -r.numel():]
            outs.append(logits)
            conv.add(r, new_turn)
            conv.cache = None
        S = max(o.shape[1] for o in outs)
        pad = [torch.cat([o.new_zeros(1, S - o.shape[1], o.shape[-1]), o], 1) for o in outs]
        return StepOutput(torch.cat(pad), dropped)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 64, *, conversation_id: str = DEFAULT_ID,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 stop_tokens: list[int] | tuple[int, ...] = (), seed: int | None = None,
                 on_token: Callable[[str, int], None] | None = None) -> Generation:
        """Feed ``input_ids`` as a new turn of ``conversation_id`` and generate its reply (appended
        to the same turn). Greedy unless ``do_sample``; ``temperature``, ``top_k`` (0: off) and
        ``top_p`` (1: off) shape the sampling; ``seed`` makes it reproducible. Stops after a token
        in ``stop_tokens`` (kept in the history) or ``max_new_tokens``. ``on_token(id, token)`` is
        called for each token as it comes. Ctrl-C (``KeyboardInterrupt``) stops the reply, keeps
        what was generated, and is re-raised after the conversation is made consistent."""
        ids = torch.as_tensor(input_ids)
        return self.generate_batch({conversation_id: ids.reshape(-1)}, max_new_tokens, do_sample=do_sample,
                                   temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens,
                                   seed=seed, on_token=on_token)[conversation_id]

    @torch.no_grad()
    def generate_batch(self, inputs: dict[str, torch.Tensor], max_new_tokens: int = 64, *,
                       do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       stop_tokens: list[int] | tuple[int, ...] = (), seed: int | None = None,
                       on_token: Callable[[str, int], None] | None = None) -> dict[str, Generation]:
        """:meth:`generate` for several conversations at once (one new turn each, ``{id: ids [S]}``),
        batched with left padding; each reply is what the conversation would get alone (each has
        its own random generator, seeded with ``seed``)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not inputs:
            raise ValueError("generate_batch needs at least one conversation")
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p, seed)
        stops = {int(t) for t in stop_tokens}
        cids = list(inputs)
        rows = [self._as_rows(torch.as_tensor(inputs[c]).reshape(1, -1), None, c)[1][0] for c in cids]
        t0 = time.perf_counter()
        batch, dropped, feeds = self._start(cids, rows, max_new_tokens, True)
        gens = {c: sampling.generator() for c in cids}
        replies: dict[str, list[int]] = {c: [] for c in cids}
        reason = {c: "max_new_tokens" for c in cids}
        live = list(cids)
        feed: list[torch.Tensor | None] = feeds
        try:
            with frozen(self.model):  # nothing edits a site while generating
                while live:
                    logits = batch.step(feed, self.pad_token_id)[:, -1]
                    feed = [None] * len(cids)
                    for i, c in enumerate(cids):
                        if c not in live:
                            continue
                        tok = pick_next(logits[i], sampling, gens[c])
                        replies[c].append(tok)
                        if on_token is not None:
                            on_token(c, tok)
                        if tok in stops:
                            reason[c] = "stop_token"
                        if tok in stops or len(replies[c]) >= max_new_tokens:
                            live.remove(c)
                        feed[i] = torch.tensor([tok])
                    if live:
                        # the last token of a finished reply is kept in its history but needs no step
                        feed = [f if c in live else None for f, c in zip(feed, cids)]
        except KeyboardInterrupt:
            for c in live:
                reason[c] = "interrupted"
            raise
        finally:
            for c in cids:
                conv = self.conversations[c]
                conv.turns[-1] = torch.cat([conv.turns[-1], torch.tensor(replies[c], dtype=torch.long)])
            self._finish(cids, batch)  # a reply's last token is fed with the conversation's next input
        seconds = time.perf_counter() - t0
        return {c: Generation(c, replies[c], reason[c], int(r.numel()), d, seconds)
                for c, r, d in zip(cids, rows, dropped)}
