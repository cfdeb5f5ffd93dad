"""Forward hooks on every spiking site, removed when the block ends (also on error)."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from spike_modules import iter_sites


@contextmanager
def site_hooks(model: nn.Module, fn):
    """``fn(name, site, x, y)`` on every site's forward while the context is open."""
    handles = [site.register_forward_hook(lambda m, args, out, n=name: fn(n, m, args[0], out))
               for name, site in iter_sites(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
