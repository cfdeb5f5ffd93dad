"""DA-QCFS ``psi`` (shift) / ``phi`` (scale) fit per hidden dimension."""

from __future__ import annotations

import torch

from spike_modules.quantizer import decode, quantize

DEFAULT_PHI_GRID = (0.9, 0.94, 0.97, 1.0, 1.03, 1.06, 1.1)


def site_error(x: torch.Tensor, theta: torch.Tensor, psi: torch.Tensor, phi: torch.Tensor, T: int,
               signed: bool, init_mem: float = 0.5, burst: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Decoded minus true value, ``[N, H]``, for samples ``x`` of one site."""
    q = quantize(phi * (x + psi) / theta, T, signed, init_mem, burst=burst)
    return decode(q, theta, T) - x


def fit_affine(samples: torch.Tensor, theta: torch.Tensor, T: int, signed: bool, init_mem: float = 0.5,
               bias_weight: float = 4.0, phi_grid: tuple[float, ...] = DEFAULT_PHI_GRID,
               iters: int = 4, burst: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``psi``, ``phi`` ``[H]`` so that the decoded value tracks ``x`` per channel.

    Objective per channel: ``mean(err^2) + bias_weight * mean(err)^2``. A channel's mean error
    is the same for every token, so it adds up coherently through the next linear layer
    where rounding noise does not; ``bias_weight`` says how much more it counts.
    For each ``phi`` on the grid, ``psi`` is moved (within one quantization step) until the
    mean error is zero; the best pair wins. The identity (``psi=0, phi=1``) is always a
    candidate, so the fit never scores worse than no fit on the calibration samples.
    """
    H = theta.numel()
    if samples.dim() != 2 or samples.shape[1] != H:
        raise ValueError(f"samples must be [N, {H}], got {tuple(samples.shape)}")
    x = samples.float()
    zero = torch.zeros(H)
    best_psi, best_phi = zero.clone(), torch.ones(H)
    if x.shape[0] == 0:
        return best_psi, best_phi

    def score(psi, phi):
        err = site_error(x, theta, psi, phi, T, signed, init_mem, burst)
        return err.pow(2).mean(0) + bias_weight * err.mean(0).pow(2)

    best = score(best_psi, best_phi)
    step = theta / T
    for p in phi_grid:
        phi = torch.full((H,), float(p))
        psi = zero.clone()
        for _ in range(iters):
            bias = site_error(x, theta, psi, phi, T, signed, init_mem, burst).mean(0)
            psi = torch.clamp(psi - bias / phi, -step, step)
        s = score(psi, phi)
        better = s < best
        best = torch.where(better, s, best)
        best_psi = torch.where(better, psi, best_psi)
        best_phi = torch.where(better, phi, best_phi)
    return best_psi, best_phi
