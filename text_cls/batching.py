"""Tokenized samples and their batches.

Every sample is padded / truncated to one fixed length with the model's tokenizer, attention
mask kept. A batch drops the trailing columns that are padding in every one of its rows:
those positions are masked out as keys and never read by the head, so the logits are those
of the fixed-length batch (up to float rounding) at a fraction of the work. Evaluation
batches group samples of similar length (a fixed, deterministic order); training batches do too,
in a seeded shuffle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Encoded:
    """``input_ids``, ``attention_mask`` ``[N, L]`` and ``labels`` ``[N]`` of one split."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(1)


def encode(tokenizer, rows: list[tuple[str, int]], max_len: int) -> Encoded:
    """Tokenize ``rows`` (text, label id) to ``max_len`` tokens each (pad and truncate)."""
    if not rows:
        raise ValueError("no samples to tokenize")
    enc = tokenizer([t for t, _ in rows], max_length=max_len, padding="max_length", truncation=True,
                    return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in rows], dtype=torch.long))


def pick(data: Encoded, n: int | None, seed: int) -> Encoded:
    """``n`` samples drawn without replacement (seeded; all of them when ``n`` is None or not smaller),
    kept in their original order."""
    if n is None or n >= len(data):
        return data
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Encoded(data.input_ids[idx], data.attention_mask[idx], data.labels[idx])


# the sequential simulation's default subset: about this many tokens (about 120 tweets, 35 passages of 118
# tokens), so its cost follows the texts' length (never under 32 samples or over 256). At 8,192 tokens the
# sequential passes of the plays (69 passages at T = 4, 8, 16) took 355 of the evaluation's 531 s
SEQUENTIAL_TOKENS = 4096
SEQUENTIAL_RANGE = (32, 256)


def sequential_count(data: Encoded, setting: int | str | None) -> int | None:
    """How many samples of ``data`` the sequential simulation runs on: ``setting`` as given (``None``:
    all), or for ``"auto"`` :data:`SEQUENTIAL_TOKENS` divided by the mean tokens per sample, clamped
    to :data:`SEQUENTIAL_RANGE`."""
    if setting != "auto":
        return setting
    lo, hi = SEQUENTIAL_RANGE
    return max(lo, min(hi, round(SEQUENTIAL_TOKENS / max(1.0, float(data.lengths.float().mean())))))


def _batch(data: Encoded, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = data.attention_mask[idx]
    width = max(int(mask.sum(1).max()), 1)
    return {"input_ids": data.input_ids[idx, :width], "attention_mask": mask[:, :width], "labels": data.labels[idx]}


def eval_batches(data: Encoded, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Batches in a fixed order that groups similar lengths (stable sort by length, then index)."""
    order = torch.sort(data.lengths, stable=True).indices
    return [_batch(data, order[i:i + batch_size]) for i in range(0, len(data), batch_size)]


def train_batches(data: Encoded, batch_size: int, generator: torch.Generator,
                  group: int = 50) -> list[dict[str, torch.Tensor]]:
    """One epoch of shuffled batches whose samples have similar lengths: the shuffled samples are
    cut into chunks of ``group`` batches, each chunk sorted by length and cut into batches, and
    the batches shuffled (as ``group_by_length`` in transformers' Trainer). Tweets are ~30 tokens
    long but a random batch of 32 holds one of ~50; grouped, a batch costs what its samples need."""
    order = torch.randperm(len(data), generator=generator)
    chunk = batch_size * group
    batches = []
    for start in range(0, len(data), chunk):
        part = order[start:start + chunk]
        part = part[torch.sort(data.lengths[part], stable=True).indices]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [_batch(data, batches[i]) for i in perm]


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The keyword arguments of a model call (labels left out), moved to ``device``."""
    return {k: (v.to(device) if device is not None else v) for k, v in batch.items() if k != "labels"}
