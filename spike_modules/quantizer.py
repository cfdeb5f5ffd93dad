"""The one quantizer every spiking site agrees on (docs/design.md section 1).

An integrate-and-fire neuron with soft reset and membrane starting at
``init_mem * theta``, fed the constant input ``x`` for ``t`` steps, has emitted

    c_t = clamp(floor(t * x / theta + init_mem), lo * B * t, B * t)

spikes, where ``lo`` is 0 for an unsigned site and -1 for a signed one, and
``B`` is the burst cap: the most spikes a neuron may fire in one step (1 for a
plain IF neuron; per channel). The decoded value ``theta * c_T / T`` is the
QCFS quantizer; a burst cap B > 1 widens its range to ``B * theta`` with the
same step ``theta / T``, so rare large activations are not clipped. Everything here works
on the *normalised* input ``u = x / theta`` so that the sequential neurons, the
parallel neuron and the quantizer do the same float operations and agree bit
for bit.
"""

from __future__ import annotations

import math

import torch

MAX_TIMESTEPS = 4096
EXACT_COUNTS = 2**24  # float32 holds every whole number up to here: spike counts stay exact
CODINGS = ("rate", "weighted")
MAX_WEIGHTED_TIMESTEPS = 16  # 65,535 levels per sign; with bursts the counts must stay below 2**24


def check_coding(coding: str) -> str:
    """Return ``coding`` if it is one of :data:`CODINGS`, else ``ValueError``."""
    if coding not in CODINGS:
        raise ValueError(f"coding must be one of {', '.join(CODINGS)}, got {coding!r}")
    return coding


def coding_levels(T: int, coding: str = "rate") -> int:
    """Quantisation levels per sign that ``T`` steps of a coding reach: ``T`` for rate coding
    (one spike per level), ``2**T - 1`` for weighted spikes (step ``k`` weighs ``2**(T-1-k)``).

    Raises:
        ValueError: bad ``T`` or coding, or a weighted ``T`` above :data:`MAX_WEIGHTED_TIMESTEPS`.
    """
    T = check_timesteps(T)
    if check_coding(coding) == "rate":
        return T
    if T > MAX_WEIGHTED_TIMESTEPS:
        raise ValueError(f"weighted coding takes T from 1 to {MAX_WEIGHTED_TIMESTEPS} steps (2**T - 1 levels), "
                         f"got T={T}; use a smaller T or --coding rate")
    return 2**T - 1


def check_max_levels(max_levels: int | None, coding: str) -> int | None:
    """Return ``max_levels`` (None: no cap) if it is a whole number >= 1 on a weighted site, else ``ValueError``.

    A weighted neuron reaches every count up to ``2**T - 1`` in T steps, so a site may quantise to
    fewer levels than its T allows (a KV cache of int8 counts holds 127 per sign); a rate neuron's
    levels are its steps, so it takes no cap."""
    if max_levels is None:
        return None
    if isinstance(max_levels, bool) or not isinstance(max_levels, int) or max_levels < 1:
        raise ValueError(f"max_levels must be None or a whole number >= 1, got {max_levels!r}")
    if check_coding(coding) != "weighted":
        raise ValueError(f"max_levels caps the counts of weighted spikes; {coding} coding's levels are its "
                         "timesteps, so lower T instead")
    return max_levels


def capped_levels(T: int, coding: str = "rate", max_levels: int | None = None) -> int:
    """Levels per sign of a site at ``T`` whose counts are capped at ``max_levels`` (None: the coding's
    :func:`coding_levels`; a cap at or above them changes nothing)."""
    full = coding_levels(T, coding)
    return full if max_levels is None else min(full, check_max_levels(max_levels, coding))


def max_exact_burst(T: int, coding: str = "rate") -> int:
    """The largest per-step burst cap ``B`` whose counts ``B * levels`` stay exact in float32."""
    return EXACT_COUNTS // coding_levels(T, coding)


def check_max_burst(max_burst: int, T: int, coding: str = "rate") -> int:
    """Return ``max_burst`` if it is a whole number from 1 to :func:`max_exact_burst`, else ``ValueError``."""
    top = max_exact_burst(T, coding)
    if isinstance(max_burst, bool) or not isinstance(max_burst, int) or not 1 <= max_burst <= top:
        raise ValueError(f"max_burst must be an integer between 1 and {top} at T={T} with {coding} coding "
                         f"(2**24 / levels, so that spike counts stay exact in float32), got {max_burst!r}")
    return max_burst


def signed_digits(counts: torch.Tensor, T: int, burst: float | torch.Tensor = 1.0) -> list[torch.Tensor]:
    """The digits ``S[k]`` (``k = 0..T-1``, weight ``2**(T-1-k)``, each in ``[-B, B]``) a weighted
    neuron fires for whole-number ``counts``, most significant first; ``sum_k S[k] 2**(T-1-k)``
    is the count clamped to ``[-B L, B L]`` (``L = 2**T - 1``).

    Rule at weight ``w`` for the remainder ``r``: take as many spikes as the lower digits cannot
    carry (``ceil((|r| - B (w-1)) / w)``, at most ``B``), else one spike if ``|r| > floor(2w/3)``,
    else none; the sign is ``r``'s. With ``B = 1`` this gives a signed-digit form with the fewest
    nonzero digits that T digits allow (checked against an exhaustive search for every count up
    to T = 12): about a third of the binary digits are spikes, against a half for plain binary.
    """
    r = counts.detach().float()
    b = torch.as_tensor(burst, dtype=r.dtype, device=r.device)
    digits = []
    for k in range(T):
        w = float(2 ** (T - 1 - k))
        a = r.abs()
        need = torch.ceil((a - b * (w - 1)) / w).clamp_(min=0)
        d = torch.where(need > 0, need, (a > (2 * w) // 3).to(r.dtype))
        d = torch.minimum(d, b) * torch.sign(r)
        r = r - d * w
        digits.append(d)
    return digits


_DIGIT_TABLES: dict[tuple[int, str], torch.Tensor] = {}


def weighted_digit_table(T: int, device: torch.device) -> torch.Tensor:
    """Spikes of every count ``0..L`` (float32, indexed by the count), for lookups."""
    key = (T, str(device))
    if key not in _DIGIT_TABLES:
        n = torch.arange(0, 2**T, dtype=torch.float32)
        _DIGIT_TABLES[key] = torch.stack(signed_digits(n, T)).abs().sum(0).to(device)
    return _DIGIT_TABLES[key]


def weighted_spikes(counts: torch.Tensor, T: int, burst: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Spikes a weighted neuron fires for each count: the magnitudes of its :func:`signed_digits`.

    Counts within ``L`` (all but the rare bursts) are looked up in a table of the ``L + 1`` counts;
    the digits of larger ones are computed."""
    a = counts.detach().abs().float()
    L = 2**T - 1
    spikes = weighted_digit_table(T, a.device)[a.clamp(max=L).long()]
    big = a > L
    if bool(big.any()):
        b = torch.as_tensor(burst, dtype=a.dtype, device=a.device).expand_as(a)[big]
        spikes[big] = torch.stack(signed_digits(a[big], T, b)).abs().sum(0)
    return spikes


def check_timesteps(T: int) -> int:
    """Return ``T`` as an int, or raise ``ValueError`` saying what is allowed."""
    if isinstance(T, bool) or not isinstance(T, int):
        raise ValueError(f"T must be an integer number of timesteps, got {T!r} ({type(T).__name__})")
    if not 1 <= T <= MAX_TIMESTEPS:
        raise ValueError(f"T must be between 1 and {MAX_TIMESTEPS} timesteps, got {T}")
    return T


def check_init_mem(init_mem: float) -> float:
    """Initial membrane as a fraction of the threshold; 0.5 gives round-to-nearest."""
    init_mem = float(init_mem)
    if not 0.0 <= init_mem < 1.0 or math.isnan(init_mem):
        raise ValueError(f"init_mem is a fraction of the threshold in [0, 1), got {init_mem}")
    return init_mem


def as_threshold(th: float | torch.Tensor, name: str = "th") -> torch.Tensor:
    """A positive finite threshold as a float32 tensor: a scalar or one value per channel ``[H]``.

    Raises:
        ValueError: if any value is not finite and positive, or the tensor is not 0-d or 1-d.
    """
    t = th.detach().clone() if isinstance(th, torch.Tensor) else torch.tensor(float(th))
    if not t.is_floating_point():
        t = t.float()
    if t.dim() > 1:
        raise ValueError(f"{name} must be a float or a per-channel tensor of shape [H], got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is an empty tensor; give a float or one value per channel")
    bad = ~torch.isfinite(t) | (t <= 0)
    if bool(bad.any()):
        idx = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{name} must be finite and > 0 everywhere; {int(bad.sum())} bad value(s), "
            f"e.g. at channel(s) {idx}: {t.flatten()[idx].tolist()}"
        )
    return t.float()


def check_channels(x: torch.Tensor, th: torch.Tensor, what: str) -> None:
    """A per-channel threshold must match the last dimension of the input."""
    if th.dim() == 1 and (x.dim() == 0 or x.shape[-1] != th.numel()):
        got = x.shape[-1] if x.dim() else "a scalar"
        raise ValueError(
            f"{what}: input has {got} channels in its last dimension but the thresholds "
            f"were set for {th.numel()} channels (input shape {tuple(x.shape)}); "
            "pass an input shaped [..., H] with the calibrated H"
        )


def as_burst(burst: float | torch.Tensor, name: str = "burst") -> torch.Tensor:
    """A burst cap as a float32 tensor (scalar or ``[H]``): whole numbers >= 1.

    Raises:
        ValueError: non-integer, below 1, non-finite, or not 0-d / 1-d.
    """
    b = burst.detach().clone().float() if isinstance(burst, torch.Tensor) else torch.tensor(float(burst))
    if b.dim() > 1 or b.numel() == 0:
        raise ValueError(f"{name} must be a number or a per-channel tensor of shape [H], got shape {tuple(b.shape)}")
    bad = ~torch.isfinite(b) | (b < 1) | (b != torch.floor(b))
    if bool(bad.any()):
        idx = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} is the most spikes a neuron may fire per step: whole numbers >= 1; "
                         f"{int(bad.sum())} bad value(s), e.g. {b.flatten()[idx].tolist()}")
    return b


class _FloorSTE(torch.autograd.Function):
    """floor in the forward pass, identity gradient (straight-through) in the backward pass."""

    @staticmethod
    def forward(ctx, x):
        return torch.floor(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def spike_count(u: torch.Tensor, t: int | torch.Tensor, signed: bool, init_mem: float = 0.5,
                burst: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Spikes emitted after ``t`` steps of constant normalised input ``u``.

    ``t`` is an int, or a tensor broadcastable against ``u`` to get every step at once;
    ``burst`` is the per-step cap B (a number or a per-channel tensor).
    """
    return _clamp_levels(torch.floor(u * t + init_mem), t, signed, burst)


def surrogate_floor(y: torch.Tensor, surrogate: torch.nn.Module) -> torch.Tensor:
    """``floor(y)`` whose gradient is a SpikingJelly surrogate at the nearest step.

    Near the integer ``j = round(y)``, ``floor(y) = (j - 1) + H(y - j)``; ``surrogate`` (a
    ``spikingjelly.activation_based.surrogate`` function in spiking mode) gives ``H`` its
    forward value exactly and its smooth derivative backward.
    """
    j = torch.round(y).detach()
    return (j - 1) + surrogate(y - j)


def quantize(u: torch.Tensor, T: int, signed: bool, init_mem: float = 0.5, ste: bool = False,
             burst: float | torch.Tensor = 1.0, surrogate: torch.nn.Module | None = None) -> torch.Tensor:
    """QCFS levels ``c_T`` of the normalised input, optionally with a trainable floor.

    ``ste=True`` passes gradients straight through the floor, or through ``surrogate`` when
    one is given (:func:`surrogate_floor`). The forward value is bit-identical to
    :func:`spike_count` with ``t=T``.
    """
    return levels(u * T + init_mem, T, signed, ste, burst, surrogate)


def levels(pre: torch.Tensor, T: int, signed: bool, ste: bool = False, burst: float | torch.Tensor = 1.0,
           surrogate: torch.nn.Module | None = None) -> torch.Tensor:
    """QCFS levels from the pre-activation ``pre = T u + init_mem``: its floor, clamped to the
    levels a neuron with burst cap ``burst`` reaches in ``T`` steps (``ste``/``surrogate`` as in
    :func:`quantize`)."""
    if not ste:
        floored = torch.floor(pre)
    elif surrogate is not None:
        floored = surrogate_floor(pre, surrogate)
    else:
        floored = _FloorSTE.apply(pre)
    return _clamp_levels(floored, T, signed, burst)


def _clamp_levels(floored: torch.Tensor, t: int | torch.Tensor, signed: bool,
                  burst: float | torch.Tensor = 1.0) -> torch.Tensor:
    if isinstance(t, torch.Tensor) or isinstance(burst, torch.Tensor):
        hi = torch.as_tensor(t, dtype=floored.dtype, device=floored.device) * torch.as_tensor(
            burst, dtype=floored.dtype, device=floored.device)
        return torch.minimum(torch.maximum(floored, -hi if signed else torch.zeros_like(hi)), hi)
    hi = float(t) * float(burst)
    return torch.clamp(floored, min=-hi if signed else 0.0, max=hi)


def decode(counts: torch.Tensor, th: torch.Tensor, T: int) -> torch.Tensor:
    """Decoded value of ``counts`` spikes of height ``th`` over ``T`` steps: ``counts * (th / T)``,
    one multiply by the step, as a site decodes."""
    return counts * (th / T)
