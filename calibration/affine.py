"""DA-QCFS ``psi`` (shift) / ``phi`` (scale) fit per hidden dimension."""

from __future__ import annotations

import torch

from spike_modules.quantizer import decode, quantize

DEFAULT_PHI_GRID = (0.9, 0.94, 0.97, 1.0, 1.03, 1.06, 1.1)


def site_error(x: torch.Tensor, theta: torch.Tensor, psi: torch.Tensor, phi: torch.Tensor, T: int,
               signed: bool, init_mem: float = 0.5) -> torch.Tensor:
    """Decoded minus true value, ``[N, H]``, for samples ``x`` of one site."""
    q = quantize(phi * (x + psi) / theta, T, signed, init_mem)
    return decode(q, theta, T) - x


def fit_affine(samples: torch.Tensor, theta: torch.Tensor, T: int, signed: bool, init_mem: float = 0.5,
               phi_grid: tuple[float, ...] = DEFAULT_PHI_GRID, iters: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``psi``, ``phi`` ``[H]`` so that the decoded value tracks ``x`` per channel.

    For each ``phi`` on the grid, ``psi`` is moved (within one quantization step) until the
    channel's mean error is zero; the pair with the lowest mean squared error wins. The
    identity (``psi=0, phi=1``) is always a candidate, so the fit never does worse than no
    fit on the calibration samples.
    """
    H = theta.numel()
    if samples.dim() != 2 or samples.shape[1] != H:
        raise ValueError(f"samples must be [N, {H}], got {tuple(samples.shape)}")
    x = samples.float()
    zero = torch.zeros(H)
    best_psi, best_phi = zero.clone(), torch.ones(H)
    if x.shape[0] == 0:
        return best_psi, best_phi
    best_err = site_error(x, theta, zero, best_phi, T, signed, init_mem).pow(2).mean(0)
    step = theta / T
    for p in phi_grid:
        phi = torch.full((H,), float(p))
        psi = zero.clone()
        for _ in range(iters):
            bias = site_error(x, theta, psi, phi, T, signed, init_mem).mean(0)
            psi = torch.clamp(psi - bias / phi, -step, step)
        err = site_error(x, theta, psi, phi, T, signed, init_mem).pow(2).mean(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_psi = torch.where(better, psi, best_psi)
        best_phi = torch.where(better, phi, best_phi)
    return best_psi, best_phi
