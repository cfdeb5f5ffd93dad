"""Per-channel activation observer that streams over batches in bounded memory.

Memory does not grow with the number of batches: per channel it keeps the exact
min/max/mean, a log-spaced histogram of positive and of negative values (for
percentiles and the MSE clip search, outliers included) and a uniform reservoir
of whole rows (tokens), which keeps the token structure of outliers for the
``psi``/``phi`` fit.
"""

from __future__ import annotations

import torch

# Histogram of |x| in log2 space: bins cover 2**LOG2_MIN .. 2**LOG2_MAX; values
# outside land in the first or last bin (the exact max is tracked separately).
LOG2_MIN, LOG2_MAX = -24, 24


class ChannelObserver:
    """Streams ``[..., H]`` activations of one site.

    Args:
        num_channels: H.
        name: site name, used in every error message.
        bins_per_octave: histogram resolution; 16 gives bins 4.4% wide, refined by interpolation.
        reservoir_rows: rows (tokens) kept for fits that need real samples.
        seed: seed of the reservoir sampler, so a calibration is reproducible.
    """

    def __init__(self, num_channels: int, name: str, bins_per_octave: int = 16,
                 reservoir_rows: int = 4096, seed: int = 0):
        if num_channels < 1:
            raise ValueError(f"observer {name!r}: num_channels must be >= 1, got {num_channels}")
        self.H, self.name, self.bpo = num_channels, name, int(bins_per_octave)
        self.n_bins = (LOG2_MAX - LOG2_MIN) * self.bpo
        self.reservoir_rows = int(reservoir_rows)
        self._gen = torch.Generator().manual_seed(seed)
        self.rows = 0
        self.batches = 0
        self.min = torch.full((num_channels,), float("inf"), dtype=torch.float64)
        self.max = torch.full((num_channels,), float("-inf"), dtype=torch.float64)
        self.sum = torch.zeros(num_channels, dtype=torch.float64)
        # [sign, H, bins]: sign 0 counts x > 0 by log2(x), sign 1 counts x < 0 by log2(-x)
        self.hist = torch.zeros(2, num_channels, self.n_bins, dtype=torch.int64)
        self.zeros = torch.zeros(num_channels, dtype=torch.int64)
        self.reservoir = torch.empty(0, num_channels)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch ``[..., H]``. Raises ``ValueError`` on a wrong shape or NaN/inf values."""
        if x.dim() == 0 or x.shape[-1] != self.H:
            raise ValueError(f"site {self.name!r}: calibration input has shape {tuple(x.shape)}, "
                             f"expected [..., {self.H}] (the site's channels)")
        rows = x.detach().reshape(-1, self.H).to("cpu", torch.float32)
        lo, hi = rows.min(0).values, rows.max(0).values  # NaN and inf show here (reductions propagate NaN)
        if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            bad = ~torch.isfinite(rows)
            chans = bad.any(0).nonzero().flatten()[:8].tolist()
            raise ValueError(
                f"site {self.name!r}: {int(bad.sum())} NaN/inf activation(s) in calibration batch "
                f"{self.batches + 1} (channels {chans}); nothing was clipped. Run the model in float32 "
                "and check the calibration inputs, or exclude this site.")
        self.batches += 1
        self.min = torch.minimum(self.min, lo.double())
        self.max = torch.maximum(self.max, hi.double())
        self.sum += rows.sum(0).double()  # float32 sums use cascaded summation
        self.hist_update(rows)
        self._sample(rows)
        self.rows += rows.shape[0]

    def hist_update(self, rows: torch.Tensor) -> None:
        """Count ``rows [N, H]`` into the histograms and the zero counts with one ``bincount``:
        per channel, slots ``0..B-1`` are x > 0 by log2(x), ``B..2B-1`` are x < 0 by log2(-x)
        and slot ``2B`` is x == 0."""
        nb = self.n_bins
        width = 2 * nb + 1
        # slot indices are computed in floating point (exact below 2**24 in float32), in place
        dtype = torch.float32 if self.H * width < 2 ** 24 else torch.float64
        b = rows.abs().to(dtype).log2_().sub_(LOG2_MIN).mul_(self.bpo).floor_().clamp_(0, nb - 1)
        b.add_(torch.signbit(rows), alpha=nb)
        b.masked_fill_(rows == 0, 2 * nb)
        b.add_(torch.arange(0, self.H * width, width, dtype=dtype))
        b = b.to(torch.int32 if dtype == torch.float32 else torch.int64)
        counts = torch.bincount(b.reshape(-1), minlength=self.H * width).view(self.H, width)
        self.hist[0] += counts[:, :nb]
        self.hist[1] += counts[:, nb:2 * nb]
        self.zeros += counts[:, 2 * nb]

    def _sample(self, rows: torch.Tensor) -> None:
        """Reservoir sampling (Algorithm R) over rows, vectorised per batch."""
        cap, seen = self.reservoir_rows, self.rows
        take = min(max(cap - seen, 0), rows.shape[0])
        if take:
            self.reservoir = torch.cat([self.reservoir, rows[:take]])
        rest = rows[take:]
        if rest.shape[0] == 0 or cap == 0:
            return
        # row i of the stream (0-based) replaces slot j ~ U[0, i] when j < cap
        idx = torch.arange(seen + take, seen + rows.shape[0], dtype=torch.float64)
        j = (torch.rand(rest.shape[0], generator=self._gen, dtype=torch.float64) * (idx + 1)).long()
        keep = j < cap
        slots, picked = j[keep], rest[keep]
        # the later row wins when two land in the same slot, as in the sequential algorithm
        # (index_put with repeated indices leaves the winner unspecified, so pick it here)
        last = torch.full((cap,), -1, dtype=torch.int64).scatter_reduce_(
            0, slots, torch.arange(slots.numel()), "amax")
        hit = last >= 0
        self.reservoir[hit] = picked[last[hit]]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.rows, 1)

    def bin_edges(self) -> torch.Tensor:
        """Lower edges of the magnitude bins (``n_bins + 1`` edges)."""
        return torch.pow(2.0, LOG2_MIN + torch.arange(self.n_bins + 1, dtype=torch.float64) / self.bpo)

    def magnitude_hist(self, signed: bool) -> torch.Tensor:
        """Counts per magnitude bin ``[H, bins]``: of ``x > 0`` (unsigned) or of ``|x|`` (signed)."""
        return self.hist[0] + self.hist[1] if signed else self.hist[0]

    def percentile(self, q: float, signed: bool) -> torch.Tensor:
        """Per-channel ``q``-th percentile of ``x`` (unsigned) or of ``|x|`` (signed), as float64 ``[H]``.

        Interpolates in log space inside the histogram bin; exact at the max. Channels whose
        percentile is not positive return 0.
        """
        if not 0.0 < q <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {q}")
        if self.rows == 0:
            raise ValueError(f"site {self.name!r}: no calibration data was seen")
        hist = self.magnitude_hist(signed).double()
        below = (self.zeros + (0 if signed else self.hist[1].sum(1))).double()  # mass at or below zero
        target = q / 100.0 * self.rows
        cum = below[:, None] + hist.cumsum(1)
        k = torch.searchsorted(cum, torch.full((self.H, 1), target, dtype=torch.float64)).squeeze(1)
        k = k.clamp(max=self.n_bins - 1)
        prev = torch.where(k > 0, cum.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1), below)
        inside = hist.gather(1, k[:, None]).squeeze(1)
        frac = ((target - prev) / inside.clamp(min=1)).clamp(0, 1)
        log2 = LOG2_MIN + (k.double() + frac) / self.bpo
        value = torch.pow(2.0, log2)
        top = torch.maximum(self.max, -self.min) if signed else self.max
        value = torch.minimum(value, top)  # never beyond the exact max
        return torch.where(target <= below, torch.zeros_like(value), value)

    def absmax(self, signed: bool) -> torch.Tensor:
        """Exact per-channel max of ``x`` (unsigned) or of ``|x|`` (signed); 0 where never positive."""
        top = torch.maximum(self.max, -self.min) if signed else self.max
        return top.clamp(min=0)
