"""Checks of a ``TemporalSpikeProcessor`` on a converted model: the cache contract, positions,
masks and spike rates, each a row with the measured figure and the bar it must reach.

All of them run one fixed three-turn conversation (``THREE_TURNS``), replies teacher-forced:
prompts are fed in one step (prefill), replies one token per step (decoding), the way a chat
feeds them.

Why two precisions. Sites act per element, so the cached path computes what a full pass
computes, but not bit for bit: attention sums in another order over a cache than over a full
sequence, and a site whose input sits within a rounding error of a level boundary flips one
level. In a deep network in float32 such flips cascade (SmolLM2-135M, full mode, T=16: a 1e-6
difference in the attention output becomes a 5% difference at the last layer, 0.2 relative
logit error over three turns, 87% equal top-1). In float64 the same computation flips nothing
and the paths agree to rounding (~5e-16 relative). So the logic (cache, positions, masks) is checked on a float64
copy of the model (:func:`exact_processor`) to ``REL_TOL``; the cache contract is also
measured in float32, as deployed, against the looser ``F32_REL_TOL`` / ``F32_TOP1_MIN`` that
sit between that noise and what a broken processor does on the same model and conversation
(float32 cache contract: a cache that forgets earlier tokens 1.27 relative error / 0.18 equal
top-1, positions reset per turn 1.17 / 0.38; in float64 the healthy paths differ by ~5e-16).
"""

from __future__ import annotations

import copy
import operator
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from spike_modules.site import reset_spike_stats

from stac_lm.chat.segments import Segment, segments
from stac_lm.generate.processor import TemporalSpikeProcessor
from . import gates
from stac_lm.checks.verify import AT_CAP_BOUND, SATURATION_BOUND, probe_section, spike_checks, spike_section
from stac_common.runtime import embedding_dtype, input_device

REL_TOL = 1e-6       # float64: relative logit error (Frobenius) within which two computations are equal
TOP1_MIN = 1.0       # float64: share of positions whose top-1 token must agree
F32_REL_TOL = 0.5    # float32: level flips on rounding give ~0.2; a lost cache or reset positions >= 1.17
F32_TOP1_MIN = 0.75  # float32: flips leave ~0.87 equal; a lost cache or reset positions <= 0.38
T_CHANGE_MIN = 0.01  # relative logit change T -> T/2 must cause (the same pass at the same T repeats exactly)

THREE_TURNS = [
    ("user", "Hi! I am planning a trip to the mountains next month. Any advice?"),
    ("assistant", "Pack warm layers, good boots and plenty of water, and check the weather before you go."),
    ("user", "Thanks. Should I go alone or with friends?"),
    ("assistant", "Going with friends is safer, and it is more fun to share the views."),
    ("user", "What should I cook at the campsite?"),
    ("assistant", "Simple one-pot meals work well: pasta, rice with beans, or a vegetable stew."),
]

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}


def check(group: str, name: str, value: float, op: str, bound: float, detail: str = "") -> dict:
    """One row: ``value op bound`` must hold (NaN never passes)."""
    v = float(value)
    return {"group": group, "name": name, "value": v, "bar": f"{op} {bound:g}",
            "passed": bool(v == v and _OPS[op](v, bound)), "detail": detail}


def info(group: str, name: str, value: float, detail: str = "") -> dict:
    """A measured figure without a bar (``passed`` None: it neither passes nor fails)."""
    return {"group": group, "name": name, "value": float(value), "bar": "-", "passed": None, "detail": detail}


def messages(pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


def three_turns(tokenizer) -> list[Segment]:
    return segments(tokenizer, messages(THREE_TURNS))


def exact_processor(proc: TemporalSpikeProcessor, fresh: nn.Module | None = None) -> TemporalSpikeProcessor:
    """A processor with ``proc``'s settings over a float64 copy of its model (see the module docstring):
    a deep copy widened, or ``fresh``, another load of the same model, widened in place (a model whose
    layers stay on disk cannot be copied; its layers' float weights widen as they load for each forward)."""
    model = (copy.deepcopy(proc.model) if fresh is None else fresh).double()
    return TemporalSpikeProcessor(model, proc.T, proc.max_context_length, pad_token_id=proc.pad_token_id)


def tolerances(proc: TemporalSpikeProcessor) -> tuple[float, float, str]:
    """``(relative error bound, top-1 share bound, label)`` for the precision ``proc`` runs in."""
    if embedding_dtype(proc.model) == torch.float64:
        return REL_TOL, TOP1_MIN, "float64"
    return F32_REL_TOL, F32_TOP1_MIN, "float32"


def compare(a: torch.Tensor, ref: torch.Tensor) -> dict:
    """``a`` against ``ref`` (``[..., V]``): relative error, max abs difference, share of equal top-1."""
    a, ref = a.double(), ref.double()
    return {"rel_error": float((a - ref).norm() / ref.norm()), "max_abs_diff": float((a - ref).abs().max()),
            "top1_equal": float((a.argmax(-1) == ref.argmax(-1)).float().mean())}


def equal_rows(proc: TemporalSpikeProcessor, group: str, what: str, stats: list[dict]) -> list[dict]:
    """The two "equal" rows over several comparisons (the worst relative error, the worst top-1 share),
    with the bounds of ``proc``'s precision."""
    rel_tol, top1_min, label = tolerances(proc)
    rel = max(s["rel_error"] for s in stats)
    top1 = min(s["top1_equal"] for s in stats)
    mad = max(s["max_abs_diff"] for s in stats)
    return [check(group, f"{what} ({label}): relative logit error", rel, "<=", rel_tol, f"max abs diff {mad:.4g}"),
            check(group, f"{what} ({label}): top-1 equal", top1, ">=", top1_min)]


@contextmanager
def recorded_calls(model: nn.Module) -> Iterator[list[dict]]:
    """Record what every forward of ``model`` gets: ids, mask, positions and the cache length before it."""
    calls: list[dict] = []
    inner, own = model.forward, "forward" in model.__dict__

    def forward(*args, **kw):
        pkv, mask, pos = kw.get("past_key_values"), kw.get("attention_mask"), kw.get("position_ids")
        calls.append({"ids": kw["input_ids"].detach().cpu(), "past": pkv.get_seq_length() if pkv is not None else 0,
                      "mask": None if mask is None else mask.detach().cpu(),
                      "positions": None if pos is None else pos.detach().cpu()})
        return inner(*args, **kw)

    model.forward = forward
    try:
        yield calls
    finally:
        if own:
            model.forward = inner
        else:
            del model.forward


def feed(proc: TemporalSpikeProcessor, segs: list[Segment], cid: str, use_cache: bool = True,
         decode: bool = True) -> list[torch.Tensor]:
    """Feed ``segs`` into conversation ``cid`` (prompts open a turn, replies extend it); returns each
    segment's logits ``[n, V]``. With ``decode`` a cached reply goes one token per step."""
    out = []
    for s in segs:
        if s.reply and use_cache and decode:
            steps = [proc(t.view(1), conversation_id=cid, new_turn=False).logits[0] for t in s.ids]
            out.append(torch.cat(steps))
        else:
            out.append(proc(s.ids, conversation_id=cid, use_cache=use_cache, new_turn=not s.reply).logits[0])
    return out


def turn_slices(segs: list[Segment], tokens: bool = True) -> list[slice]:
    """The turns (a prompt and the reply after it): token ranges in the concatenated segments, or
    (``tokens=False``) segment ranges."""
    bounds, start, pos = [], 0, 0
    for i, s in enumerate(segs):
        pos += int(s.ids.numel()) if tokens else 1
        if s.reply or i == len(segs) - 1:
            bounds.append(slice(start, pos))
            start = pos
    return bounds


# -- the cache contract --------------------------------------------------------------------------

def cache_contract(proc: TemporalSpikeProcessor, tokenizer) -> tuple[list[dict], dict]:
    """Prefill + decode over three turns against ``use_cache=False`` recompute of each segment."""
    segs = three_turns(tokenizer)
    cached = torch.cat(feed(proc, segs, "check/cache"))
    ref = torch.cat(feed(proc, segs, "check/recompute", use_cache=False))
    proc.reset("check/cache"), proc.reset("check/recompute")
    per_turn = [compare(cached[s], ref[s]) for s in turn_slices(segs)]
    rows = equal_rows(proc, "multi_turn", "cache contract (3 turns, prefill + decode vs recompute)", per_turn)
    return rows, {"tokens": int(cached.shape[0]), "precision": tolerances(proc)[2], "per_turn": per_turn}


# -- positions -----------------------------------------------------------------------------------

@torch.no_grad()
def one_pass(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[n, V]`` of one full pass over ``ids`` from position 0, without the processor."""
    ids = ids.to(input_device(model))
    pos = torch.arange(ids.numel(), device=ids.device)[None]
    return model(input_ids=ids[None], position_ids=pos, use_cache=False).logits[0]


def position_gaps(calls: list[dict]) -> int:
    """Calls of one conversation (no padding) whose position ids are not the cache length + arange."""
    bad = 0
    for c in calls:
        n = c["ids"].shape[1]
        if c["positions"] is None or not torch.equal(c["positions"][0], c["past"] + torch.arange(n)):
            bad += 1
    return bad


def turn_boundaries(proc: TemporalSpikeProcessor, tokenizer) -> tuple[list[dict], dict]:
    """Three cached turns: positions of every call, and the logits of the first tokens of each turn and of
    its reply, against one pass of the model over the whole conversation."""
    segs = three_turns(tokenizer)
    with recorded_calls(proc.model) as calls:
        cached = torch.cat(feed(proc, segs, "check/boundaries"))
    proc.reset("check/boundaries")
    full = one_pass(proc.model, torch.cat([s.ids for s in segs]))
    starts, pos = [], 0
    for s in segs:
        starts.append(pos)
        pos += int(s.ids.numel())
    idx = torch.tensor(starts)
    stats = compare(cached[idx], full[idx])
    gaps = position_gaps(calls)
    rows = equal_rows(proc, "positions", "turn boundaries vs one full pass", [stats])
    rows.append(check("positions", "calls whose position ids are not cache length + arange", gaps, "==", 0,
                      f"{len(calls)} calls"))
    return rows, {"boundary_tokens": starts, **stats, "calls": len(calls), "position_gaps": gaps}


def context_limit(proc: TemporalSpikeProcessor, tokenizer) -> tuple[list[dict], dict]:
    """A processor whose limit drops turn 1 when turn 3 arrives: the re-encoded conversation (turns 2-3)
    must equal one pass over the kept tokens, positions restarting at 0."""
    segs = three_turns(tokenizer)
    turns = [torch.cat([s.ids for s in segs[sl]]) for sl in turn_slices(segs, tokens=False)]
    n1, n2, n3 = (int(t.numel()) for t in turns)
    limit = max(n1 + n2, n2 + n3)  # turns 1-2 fit, and so do turns 2-3 once turn 1 is gone
    if n1 + n2 + int(segs[-2].ids.numel()) <= limit:
        raise ValueError("the check conversation's third prompt is too short to push turn 1 out")
    small = TemporalSpikeProcessor(proc.model, proc.T, max_context_length=limit, pad_token_id=proc.pad_token_id)
    dropped, restart, logits = 0, None, []
    with recorded_calls(proc.model) as calls:
        for s in segs:
            first = len(calls)
            if s.reply:
                outs = [small(t.view(1), new_turn=False) for t in s.ids]
                logits.append(torch.cat([o.logits[0] for o in outs]))
            else:
                outs = [small(s.ids)]
                logits = [outs[0].logits[0]]
            for k, o in enumerate(outs):
                if o.dropped_turns["default"]:
                    dropped += o.dropped_turns["default"]
                    restart = calls[first + k]  # the call that re-encoded what was kept
    kept = small.history()
    t3 = torch.cat(logits)
    stats = compare(t3, one_pass(proc.model, kept)[-t3.shape[0]:])
    restarts_at_0 = restart is not None and restart["positions"] is not None \
        and torch.equal(restart["positions"][0], torch.arange(restart["ids"].shape[1]))
    ok = bool(torch.equal(kept, torch.cat(turns[1:]))) and restarts_at_0
    rows = equal_rows(proc, "positions", "context limit: re-encoded turns vs one full pass", [stats])
    rows += [check("positions", "turns dropped at the context limit", dropped, "==", 1,
                   f"limit {limit} tokens, kept {kept.numel()}"),
             check("positions", "kept tokens are turns 2-3, re-encoded from position 0", float(ok), "==", 1)]
    return rows, {"limit": limit, "dropped": dropped, "kept_tokens": int(kept.numel()),
                  "reencoded_from_0": restarts_at_0, **stats}


# -- spike rates ---------------------------------------------------------------------------------

def spike_rates(proc: TemporalSpikeProcessor, tokenizer, calibration=None) -> tuple[list[dict], dict]:
    """Spike statistics over the three cached turns (verify's fire / saturation checks), whether
    another T changes the logits, and (given the model's ``CalibrationConfig``) verify's gates on one
    pass over the conversation: no site passes float through, each site fires at least a tenth of
    what its calibration rule predicts."""
    segs = three_turns(tokenizer)
    reset_spike_stats(proc.model)
    feed(proc, segs, "check/spikes")
    proc.reset("check/spikes")
    section = spike_section(proc.model)
    verdict = {c["name"]: c for c in spike_checks(section)}
    rates, at_cap = section["per_site"], section["at_cap_share"]
    plain = [r for n, r in rates.items() if n not in set(section["bursting_sites"])]
    lowest = min(rates.values()) if all(r == r for r in rates.values()) else float("nan")  # NaN: a site never ran
    fires = check("spike_rates", "every site fires (lowest site rate)", lowest, ">", 0,
                  verdict["every site fires"]["detail"])
    cap = max(at_cap.values())
    sat = check("spike_rates", "no site saturates (largest share at the burst cap)", cap, "<", AT_CAP_BOUND,
                verdict["no site saturates"]["detail"])
    if plain:
        sat["detail"] += f"; sites without bursts must stay below rate {SATURATION_BOUND}"
    for row, name in ((fires, "every site fires"), (sat, "no site saturates")):
        row["passed"] = verdict[name]["passed"]  # verify's verdict is the one that counts
    other = proc.T // 2 if proc.T > 1 else 2  # halving T coarsens every site's quantization
    change = timestep_change(proc, torch.cat([s.ids for s in segs]), other)
    rows = [fires, sat, check("spike_rates", f"T changes the output (relative logit change T={proc.T} -> {other})",
                              change, ">=", T_CHANGE_MIN),
            info("spike_rates", "mean spikes per neuron per step", section["mean_spike_rate"],
                 f"{len(rates)} sites, {len(section['bursting_sites'])} with burst neurons; "
                 f"largest site rate {max(rates.values()):.4g}")]
    measured = {"sites": len(rates), "mean_spike_rate": section["mean_spike_rate"],
                "min_site_rate": lowest, "max_site_rate": max(rates.values()),
                "max_at_cap_share": cap, "bursting_sites": len(section["bursting_sites"]),
                "timestep_change": {"from": proc.T, "to": other, "relative_logit_change": change}}
    if calibration is not None:
        rows += gate_rows(proc, torch.cat([s.ids for s in segs]), calibration, measured)
    return rows, measured


def gate_rows(proc: TemporalSpikeProcessor, ids: torch.Tensor, calibration, measured: dict) -> list[dict]:
    """verify's pass-through and activity gates (``stac_lm.checks.gates``) as rows, on one pass over ``ids``."""
    dev = input_device(proc.model)
    probe = probe_section(None, proc.model, ids.to(dev)[None], proc.T, calibration)
    reset_spike_stats(proc.model)
    leak = max(probe["pass_through_share"].values())
    pred, got = probe["predicted_rate"], probe["measured_rate"]
    low = min((got[n] / p if got[n] == got[n] else 0.0 for n, p in pred.items() if p > 0), default=float("nan"))
    (drive,) = [c for c in gates.drive_checks(1.0, proc.T, proc.T, probe["pass_through_share"])
                if c["name"].endswith("float through")]
    (active,) = gates.activity_check(got, pred)
    rows = [check("spike_rates", "no site passes float through (largest share of off-level inputs unchanged)",
                  leak, "<=", gates.PASS_THROUGH_MAX, drive["detail"]),
            check("spike_rates", "site activity matches calibration (lowest measured / predicted rate)",
                  low, ">=", gates.ACTIVITY_MIN_RATIO, active["detail"])]
    for row, verdict in zip(rows, (drive, active)):
        row["passed"] = verdict["passed"]  # the gates' verdict is the one that counts
    measured["probe"] = {k: probe[k] for k in ("tokens", "prediction", "measured_rate", "predicted_rate",
                                               "pass_through_share")}
    return rows


def timestep_change(proc: TemporalSpikeProcessor, ids: torch.Tensor, other: int) -> float:
    """Relative change of one pass's logits over ``ids`` when the sites run ``other`` steps instead of T."""
    T = proc.T
    base = one_pass(proc.model, ids)
    try:
        proc.set_timesteps(other)
        moved = one_pass(proc.model, ids)
    finally:
        proc.set_timesteps(T)
    return compare(moved, base)["rel_error"]
