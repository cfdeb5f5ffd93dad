"""Next-token choice: greedy, or sampling shaped by transformers' own logits warpers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


@dataclass(frozen=True)
class SamplingConfig:
    """``do_sample=False`` is greedy; otherwise ``temperature`` (> 0), ``top_k`` (0: off) and
    ``top_p`` (in (0, 1], 1: off) shape the distribution, and ``seed`` (None: unseeded) fixes it."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be true or false, got {self.do_sample!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    def warpers(self) -> LogitsProcessorList:
        out = LogitsProcessorList()
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k:
            out.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(float(self.top_p)))
        return out

    def generator(self) -> torch.Generator | None:
        """A CPU generator for one conversation (sampling happens on CPU, so a seed gives the
        same tokens on every device)."""
        if not self.do_sample:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def pick_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> int:
    """The next token from one position's logits ``[V]``."""
    scores = logits.detach().float().cpu()[None]
    if not cfg.do_sample:
        return int(scores.argmax(-1))
    scores = cfg.warpers()(None, scores)
    probs = torch.softmax(scores, -1)
    return int(torch.multinomial(probs, 1, generator=generator))
