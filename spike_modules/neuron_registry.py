"""Sequential neurons by coding: a neuron is one class and one ``@register_neuron`` line above it.

A site (:class:`~spike_modules.site.DAQCFSSite`) never names a neuron class: it asks
:func:`neuron_kind` for the first registered neuron of its coding that serves its sign and,
where a channel may burst, takes a per-channel burst cap. A neuron class follows one protocol:
``cls(T, th, init_mem)`` (plus ``signed=`` when it serves both signs), a settable ``T``,
``reset_stats()`` and ``spike_rate`` (``SpikeStats``), and it is called on ``[T, ..., H]`` as
``neuron(x, theta)``, or ``neuron(x, theta, burst)`` when it takes bursts. A neuron with a
``catch_up`` attribute lets its site catch up (``DAQCFSSite.catch_up``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .quantizer import check_coding


@dataclass(frozen=True)
class NeuronKind:
    """A registered sequential neuron: its class, its coding, the sites it serves (``signed``: True
    for signed sites only, False for unsigned only, None for both: the class then takes
    ``signed=``) and whether it takes a per-channel burst cap."""

    cls: type[nn.Module]
    coding: str
    signed: bool | None
    bursts: bool

    def build(self, T: int, init_mem: float, signed: bool) -> nn.Module:
        extra = {"signed": signed} if self.signed is None else {}
        return self.cls(T, 1.0, init_mem, **extra)

    def __call__(self, neuron: nn.Module, x, theta, burst):
        return neuron(x, theta, burst) if self.bursts else neuron(x, theta)


SEQUENTIAL_NEURONS: list[NeuronKind] = []


def register_neuron(*, coding: str, signed: bool | None = None, bursts: bool = False):
    """Class decorator: make the class a sequential neuron of ``coding`` (registration order is the
    order :func:`neuron_kind` tries them in)."""
    check_coding(coding)

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        SEQUENTIAL_NEURONS.append(NeuronKind(cls, coding, signed, bool(bursts)))
        return cls

    return add


def neuron_kind(coding: str, signed: bool, bursts: bool) -> NeuronKind:
    """The first registered neuron of ``coding`` for a ``signed`` (or unsigned) site that takes a burst
    cap if ``bursts``; ``ValueError`` naming the registered ones otherwise."""
    for kind in SEQUENTIAL_NEURONS:
        if kind.coding == coding and kind.signed in (None, bool(signed)) and (kind.bursts or not bursts):
            return kind
    have = ", ".join(f"{k.cls.__name__} ({k.coding}, signed={k.signed}, bursts={k.bursts})"
                     for k in SEQUENTIAL_NEURONS) or "none"
    raise ValueError(f"no sequential neuron registered for {coding} coding, signed={bool(signed)}, "
                     f"bursts={bool(bursts)}; registered: {have}")
