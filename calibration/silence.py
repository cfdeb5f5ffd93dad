"""Dead zones: channels that stay silent for a token when their input is small, placed per site
against a quality budget (docs/design.md section 5).

An SNN beats an ANN of the same width only by silence: a channel that fires nothing in a token
costs neither its accumulates nor the read of its weight row. With 127 (or 255) levels almost
every channel fires. A dead zone (``DAQCFSSite.dead``, in counts) silences channel ``c`` when

    |y_c| * w_c < tau_s        (y_c the decoded input, w_c the channel's weight, tau_s one
                                threshold per site)

so a channel is judged by what it adds, not by its magnitude alone. ``w_c`` is by default
(``weighting='fisher'``) the root-mean-square gradient of the SNN's next-token log-likelihood in
``y_c``, tokens sampled from its own distribution (:func:`fisher_weights`): silencing ``y_c`` in a
token then adds about ``(y_c w_c)^2 / 2`` nats of KL divergence, in the same units at every site
and counting everything downstream. With ``weighting='columns'`` it is the norm of the channel's
weight column over the site's readers (what the readers' outputs lose). Sites tolerate silence very
differently (on SmolLM2-135M, zeroing the smallest 25% of every block input costs about 2%
perplexity, 40% costs 18%), so the shares are allocated, not set globally:

1. statistics: every driving site's scores ``|y| w`` on calibration tokens, without dead zones;
2. per site and silent share ``p``: the bytes it saves (``p`` of its weight rows) and the error it
   adds: with Fisher weights the mean ``(y w)^2`` silenced per score (a predicted KL divergence),
   with column norms the share of ``sum (y w)^2`` that falls silent (the readers' output error if
   their weight columns were orthogonal);
3. for a price ``lam`` every site takes the share maximising ``bytes saved - lam * error``;
4. ``lam`` is bisected (on a log scale) for the most silence whose next-token distribution on other
   calibration windows stays within ``budget`` (mean KL divergence, nats per token) of the SNN's
   without dead zones. Not perplexity: silence can leave perplexity flat while the top-1 token
   changes (on SmolLM2, 25% silence at the q/k/v input: perplexity -1.5%, top-1 agreement 0.94 -> 0.87).

Only weighted coding keeps dead zones (its neurons integrate the whole window before firing).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import align_module_device
from torch import nn

from .checkpointing import checkpointed_layers
from spike_modules.energy import group_name, stored_width
from spike_modules.layers import SpikeLinear
from spike_modules.linear import float_weight, linear_shape
from spike_modules.site import DAQCFSSite, iter_sites, set_spike_counting

SHARES = tuple(i / 100 for i in range(0, 81))  # silent shares a site may take (at most 80%: every site keeps firing)
WEIGHTINGS = ("columns", "fisher")           # what a channel's |y| is weighted by (SilenceConfig.weighting)
# calibration windows (statistics, budget) by weighting: column norms keep the 1 and 2 they were
# introduced with (saved options reproduce); the Fisher weights were measured best with 4 and 4
WINDOWS = {"columns": (1, 2), "fisher": (4, 4)}
MIN_SCORES = 1 << 16                           # scores kept per site at least (a random subset above)


@dataclass(frozen=True)
class SilenceConfig:
    """``budget``: the most mean KL divergence (nats per token) the dead zones may add between the SNN
    without them and with them, on held calibration windows; ``weighting``: what weighs a channel's
    decoded input ``|y_c|`` (:data:`WEIGHTINGS`: ``fisher``, :func:`fisher_weights`; ``columns``, the
    norm of its weight column over the readers); ``stat_windows``/``eval_windows``: calibration windows
    for the statistics and for the budget (different ones where there are enough; by default those of
    :data:`WINDOWS` for the weighting); ``steps``: bisection steps.

    Raises:
        ValueError: a value out of range.
    """

    budget: float = 0.02
    weighting: str = "fisher"
    stat_windows: int | None = None
    eval_windows: int | None = None
    steps: int = 9
    probe: float = 0.2
    max_scores: int = 1 << 20

    def __post_init__(self):
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0 <= self.budget < 1:
            raise ValueError(f"silence budget is a KL divergence in nats per token in [0, 1), got {self.budget!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"silence weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        for key, default in zip(("stat_windows", "eval_windows"), WINDOWS[self.weighting]):
            if getattr(self, key) is None:
                object.__setattr__(self, key, default)
        for key in ("stat_windows", "eval_windows", "steps", "max_scores"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be a positive integer, got {v!r}")


@torch.no_grad()
def _column_weight(linear: nn.Module) -> torch.Tensor:
    """The layer's weight ``[out, in]`` as it computes: STAC's int8 layers dequantized, plain float layers
    read, any other (bitsandbytes, torchao) measured by running it on the identity."""
    if hasattr(linear, "dequantize") and hasattr(linear, "weight_int8"):
        return linear.dequantize()
    weight = getattr(linear, "weight", None)
    if type(weight) in (nn.Parameter, torch.Tensor) and weight.is_floating_point():
        return float_weight(linear).detach().float()
    width = linear.in_features
    eye = torch.eye(width, device=weight.device, dtype=torch.float32)
    out = linear(eye).float()
    if getattr(linear, "bias", None) is not None:
        out = out - linear.bias.detach().float()
    return out.t()


WHOLE_SUM_ELEMENTS = 1 << 26  # weights up to this size are summed in one reduction; larger ones by blocks of rows


def _column_squares(w: torch.Tensor) -> torch.Tensor:
    """``sum over rows of w**2`` per column, in float64: in one reduction up to :data:`WHOLE_SUM_ELEMENTS`
    elements, else a block of rows at a time (an 8B model's LM head in float64 would take 4 GB at once)."""
    if w.numel() <= WHOLE_SUM_ELEMENTS:
        return w.double().pow(2).sum(0)
    out = torch.zeros(w.shape[1], dtype=torch.float64, device=w.device)
    step = max(1, WHOLE_SUM_ELEMENTS // 4 // w.shape[1])
    for start in range(0, w.shape[0], step):
        out += w[start:start + step].double().pow(2).sum(0)
    return out


def driving_sites(model: nn.Module, column_norms: bool = True) -> dict[str, tuple[DAQCFSSite, torch.Tensor | None, float]]:
    """``{site name: (site, w, row_bytes)}`` for every site in front of linear layers: ``w`` the norm
    of each input channel's weight column over all its readers (None without ``column_norms``: the
    weights are then not read), ``row_bytes`` the weight bytes one input channel's rows take over them."""
    out: dict[str, list] = {}
    for m in model.modules():
        if isinstance(m, SpikeLinear):
            site = m._shared.site
            entry = out.setdefault(site.name, [site, torch.zeros(site.num_channels, dtype=torch.float64), 0.0])
            shape = linear_shape(m.linear)
            if column_norms or shape is None:
                with align_module_device(m.linear):  # an offloaded layer's weights, for the time it is read
                    w = _column_weight(m.linear)
                    entry[1] += _column_squares(w).cpu()
                rows = w.shape[0]
            else:
                rows = shape[1]
            entry[2] += rows * stored_width(m.linear)[0]
    return {k: (s, w.sqrt().float() if column_norms else None, b) for k, (s, w, b) in out.items()}


def fisher_weights(model: nn.Module, sites: dict, batches: list, seed: int = 0,
                   layers: nn.ModuleList | None = None) -> dict[str, torch.Tensor]:
    """Per driving site, ``sqrt`` of the diagonal Fisher information of the model's next-token
    distributions in each channel's decoded input: ``sqrt(E[(d log p(s) / d y_c)^2])`` over tokens,
    ``s`` sampled from the model's own distribution at every position (one backward pass per batch).
    A channel silenced in one token then adds about ``(|y_c| f_c)^2 / 2`` nats to the summed KL divergence
    of the window's predictions, in the same units at every site. The sites run in quant mode for
    the pass (the same values as parallel mode, straight-through gradients).

    ``layers`` (the model's decoder layers) run checkpointed: the backward pass then holds one
    layer's weights and activations at a time beside every layer's input hidden states, not the whole
    model's, and gives the same weights (recomputation repeats the same operations)."""
    found = {n: torch.zeros(s.num_channels, dtype=torch.float64) for n, (s, _, _) in sites.items()}

    def grad_hook(name):
        def fn(g):
            found[name] += g.detach().double().pow(2).reshape(-1, g.shape[-1]).sum(0).cpu()
        return fn

    def hook(name):
        def fn(site, args, y):
            if y.requires_grad:  # a layer recomputed in the backward pass adds hooks that never fire
                y.register_hook(grad_hook(name))
        return fn

    modes = {n: s.mode for n, s in iter_sites(model)}
    grads = {p: p.requires_grad for p in model.parameters()}
    handles = [s.register_forward_hook(hook(n)) for n, (s, _, _) in sites.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.detach().requires_grad_()))
    g = torch.Generator().manual_seed(seed)
    tokens = 0
    try:
        for p in grads:
            p.requires_grad_(False)
        for _, site in iter_sites(model):
            site.mode = "quant"
        with checkpointed_layers(layers):
            for ids in batches:
                with torch.enable_grad():
                    logits = model(ids, use_cache=False).logits.float()
                    lp = F.log_softmax(logits, -1).reshape(-1, logits.shape[-1])
                    pick = torch.multinomial(lp.detach().exp().cpu(), 1, generator=g).to(lp.device)
                    lp.gather(1, pick).sum().backward()
                tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, on in grads.items():
            p.requires_grad_(on)
        for name, site in iter_sites(model):
            site.mode = modes[name]
    return {n: (f / max(tokens, 1)).sqrt().float() for n, f in found.items()}


@torch.no_grad()
def _score_curves(model: nn.Module, sites: dict, batches: list, max_scores: int, seed: int = 0,
                  absolute: bool = False) -> dict[str, tuple]:
    """Per site, the :func:`_curves` of its scores ``|y| w`` over ``batches`` (a random subset of ``max_scores``
    at most); each site's sorted scores are made, used and dropped in turn, so one site's are in memory."""
    found: dict[str, list[torch.Tensor]] = {n: [] for n in sites}

    def hook(name):
        def fn(site, args, y):
            found[name].append((y.detach().float().abs() * sites[name][1].to(y.device)).reshape(-1).cpu())
        return fn

    handles = [s.register_forward_hook(hook(n)) for n, (s, _, _) in sites.items()]
    try:
        for ids in batches:
            model(ids)
    finally:
        for h in handles:
            h.remove()
    g = torch.Generator().manual_seed(seed)
    never = [name for name, parts in found.items() if not parts]
    if never:
        raise ValueError(f"site {never[0]!r} never ran on the calibration text; dead zones cannot be placed")
    out = {}
    for name in list(found):
        s = torch.cat(found.pop(name))
        if s.numel() > max(max_scores, MIN_SCORES):
            s = s[torch.randperm(s.numel(), generator=g)[:max_scores]]
        out[name] = _curves(torch.sort(s).values.double(), absolute)  # float32 sorted, then widened: the same values
    return out


def _curves(scores: torch.Tensor, absolute: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per share of :data:`SHARES`: (threshold tau, error), and the share already silent. The error is
    the share of ``sum score**2`` silenced, or with ``absolute`` its mean per score."""
    n = scores.numel()
    energy = torch.cumsum(scores.pow(2), 0)
    total = n if absolute else (float(energy[-1]) or 1.0)
    k = torch.tensor([min(int(p * n), n - 1) for p in SHARES])
    tau = scores[k]
    err = torch.where(k > 0, energy[(k - 1).clamp(min=0)] / total, torch.zeros_like(tau))
    return tau, err, float((scores == 0).double().mean())


def _choose(curves: dict, lam: float, alphas: dict[str, float]) -> dict[str, int]:
    """Per site, the share index maximising bytes saved minus ``lam`` times its group's measured
    sensitivity times its error."""
    shares = torch.tensor(SHARES, dtype=torch.float64)
    out = {}
    for name, (tau, err, zero, row_bytes, channels) in curves.items():
        saved = (shares - zero).clamp(min=0) * row_bytes * channels
        out[name] = int(torch.argmax(saved - lam * alphas[group_name(name)] * err))
    return out


def _alphas(model: nn.Module, sites: dict, curves: dict, held: list, dense: list, probe: float) -> dict[str, float]:
    """Per layer group: the KL divergence from the SNN without dead zones per unit of local error, measured with only that
    group silenced (every site at share ``probe``): local errors of different groups are not
    worth the same (a silenced LM-head input costs far more than a silenced MLP input)."""
    k = SHARES.index(probe)
    alphas = {}
    for g in sorted({group_name(n) for n in sites}):
        choice = {n: (k if group_name(n) == g else 0) for n in sites}
        set_dead_zones(sites, curves, choice)
        rise = _divergence(model, held, dense)[0]
        err = sum(float(curves[n][1][k]) for n, c in choice.items() if c)
        alphas[g] = max(rise, 1e-6) / max(err, 1e-12)
    return alphas


def set_dead_zones(sites: dict, curves: dict, choice: dict[str, int]) -> None:
    """Dead zones in counts from each site's chosen threshold: ``|n| step w < tau`` falls silent."""
    for name, k in choice.items():
        site, w, _ = sites[name]
        tau = float(curves[name][0][k])
        step = (site.theta.detach().float() / site.levels).cpu()
        never = float(site.burst.max()) * site.levels + 1  # a channel whose weights are all zero adds nothing
        dead = torch.where(w > 0, tau / (w * step).clamp(min=1e-30), torch.full_like(w, never)) if k else torch.zeros_like(w)
        site.set_params(site.theta, site.psi, site.phi, site.burst, dead.clamp(max=never))


@torch.no_grad()
def _log_probs(model: nn.Module, batches: list) -> list[torch.Tensor]:
    return [F.log_softmax(model(ids).logits.float(), -1) for ids in batches]


@torch.no_grad()
def _divergence(model: nn.Module, batches: list, reference: list[torch.Tensor]) -> tuple[float, float]:
    """(mean KL(reference || model) per token in nats, share of tokens whose top-1 is the reference's)."""
    kl = same = count = 0.0
    for ids, ref in zip(batches, reference):
        lp = F.log_softmax(model(ids).logits.float(), -1)
        kl += float((ref.exp() * (ref - lp)).sum())
        same += float((lp.argmax(-1) == ref.argmax(-1)).sum())
        count += ref.shape[0] * ref.shape[1]
    return kl / count, same / count


def calibrate_silence_(model: nn.Module, batches: list, config: SilenceConfig, progress: bool = False,
                       layers: nn.ModuleList | None = None) -> dict:
    """Place dead zones on every weighted site in front of linear layers of ``model`` (in place,
    sites in parallel mode, already calibrated) within ``config.budget``; returns a summary. ``layers``,
    the model's decoder layers, are checkpointed in the Fisher weights' backward pass
    (:func:`fisher_weights`: one layer in memory at a time, the same result).

    Raises:
        ValueError: a driving site that does not code weighted spikes, or no calibration batches.
    """
    if not batches:
        raise ValueError("dead zones need calibration text: no calibration batches were given")
    start = time.perf_counter()
    sites = driving_sites(model, column_norms=config.weighting == "columns")  # Fisher weights replace them
    rate = [n for n, (s, _, _) in sites.items() if s.coding != "weighted"]
    if rate:
        raise ValueError(f"dead zones need weighted coding (its neurons know their count before firing); "
                         f"{rate[0]!r} codes {sites[rate[0]][0].coding}: use --coding weighted or --silence_budget 0")
    for site, _, _ in sites.values():
        site.set_params(site.theta, site.psi, site.phi, site.burst, 0.0)
    counting = {name: s.count_spikes for name, s in iter_sites(model)}
    set_spike_counting(model, False)  # the passes below need no spike statistics
    try:
        return _place(model, sites, batches, config, progress, start, layers)
    finally:
        for name, s in iter_sites(model):
            s.count_spikes = counting[name]


def split_windows(windows: list, stat: int, held: int) -> tuple[list, list]:
    """The first ``stat`` windows for the statistics and the next ``held`` for the budget; where there
    are fewer, they are shared out in that proportion (each side at least one), and a single window
    serves both."""
    n = len(windows)
    if n >= stat + held:
        return windows[:stat], windows[stat:stat + held]
    if n < 2:
        return windows, windows
    k = min(n - 1, max(1, round(n * stat / (stat + held))))
    return windows[:k], windows[k:]


def _place(model: nn.Module, sites: dict, batches: list, config: SilenceConfig, progress: bool, start: float,
           layers: nn.ModuleList | None) -> dict:
    batches = [w[None] for b in batches for w in b]  # one window per forward: the statistics stay small
    stat, held = split_windows(batches, config.stat_windows, config.eval_windows)
    if config.weighting == "fisher":
        fisher = fisher_weights(model, sites, stat, layers=layers)
        sites = {n: (s, fisher[n], b) for n, (s, _, b) in sites.items()}
    curves = {n: (*c, sites[n][2], sites[n][0].num_channels) for n, c in
              _score_curves(model, sites, stat, config.max_scores, absolute=config.weighting == "fisher").items()}
    dense = _log_probs(model, held)
    alphas = _alphas(model, sites, curves, held, dense, config.probe)
    total_bytes = sum(c[3] * c[4] for c in curves.values())
    span = [math.log(total_bytes) - 6, math.log(total_bytes) + 10]  # lam: every share at its most ... none
    best, trace = None, []
    for _ in range(config.steps if config.budget > 0 else 0):
        lam = math.exp(sum(span) / 2)
        choice = _choose(curves, lam, alphas)
        set_dead_zones(sites, curves, choice)
        rise, agree = _divergence(model, held, dense)
        saved = sum(max(SHARES[k] - curves[n][2], 0.0) * curves[n][3] * curves[n][4] for n, k in choice.items())
        trace.append({"lam": lam, "kl": rise, "top1_vs_dense": agree, "bytes_share_silenced": saved / total_bytes})
        if rise <= config.budget:
            best, span[1] = (choice, rise, saved, agree), math.log(lam)
        else:
            span[0] = math.log(lam)
        if progress:
            print(f"  silence: lam {lam:.3g}: KL {rise:.4f}, top-1 vs dense {agree:.3f}, "
                  f"{saved / total_bytes:.1%} of the rows' bytes silenced")
    choice, rise, saved, agree = best or ({n: 0 for n in sites}, 0.0, 0.0, 1.0)
    set_dead_zones(sites, curves, choice)
    groups: dict[str, list[float]] = {}
    for n, k in choice.items():
        g = groups.setdefault(group_name(n), [0.0, 0.0])
        g[0] += SHARES[k] * curves[n][3] * curves[n][4]
        g[1] += curves[n][3] * curves[n][4]
    return {"config": asdict(config), "kl": rise, "top1_vs_dense": agree, "group_sensitivity": alphas, "bytes_share_silenced": saved / total_bytes,
            "silent_share_per_group": {g: a / b for g, (a, b) in groups.items()}, "trace": trace,
            "stat_tokens": sum(int(b.numel()) for b in stat), "eval_tokens": sum(int(b.numel()) for b in held),
            "seconds": time.perf_counter() - start,
            "rule": RULES[config.weighting]}


RULES = {"columns": "channel silent in a token when |decoded input| x (its weight column's norm over the readers) < the "
                    "site's threshold; thresholds chosen by bytes saved - lam x (share of sum (y w)^2 silenced), lam "
                    "bisected for the most silence within the KL budget on held calibration windows",
         "fisher": "channel silent in a token when |decoded input| x (root-mean-square gradient of the SNN's sampled "
                   "next-token log-likelihood in it) < the site's threshold; thresholds chosen by bytes saved - lam x "
                   "(mean (y w)^2 silenced, a predicted KL divergence), lam bisected for the most silence within the "
                   "KL budget on held calibration windows"}
