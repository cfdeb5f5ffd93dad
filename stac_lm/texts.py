"""Calibration and evaluation token streams, kept apart.

Defaults are the embedded Shakespeare plays: calibration on Hamlet, Macbeth and
Othello, evaluation on The Tempest. A text given by path is read as UTF-8; the calibration
text may also be the keyword ``chitchat``: embedded chit-chat conversations rendered in the
tokenizer's chat template, for a model meant to chat. The two streams never come from the
same file or the same text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from stac_assets import chitchat_json, shakespeare_dir, shakespeare_text

from .options import CHITCHAT

CALIB_PLAYS = ("hamlet_gut", "macbeth_gut", "othello_gut")
EVAL_PLAYS = ("tempest_gut",)
CALIB_BATCH = 4  # windows per calibration batch
PREFIX_MARGIN = 64  # tokens tokenized beyond those used
# conversations rendered for --calib_text chitchat (about 100k tokens), from the END of the ids in sorted order:
# test_conversational_snn.py scores conversations from the start, so the two never meet
CHITCHAT_CONVERSATIONS = 200


@dataclass(frozen=True)
class TokenStream:
    """The first ``ids.numel()`` tokens of a text (no special tokens added)."""

    ids: torch.Tensor
    source: str            # the file or the plays it came from
    files: tuple[str, ...]  # resolved paths of the files read
    text_sha256: str
    text_chars: int         # characters in the whole text

    def describe(self) -> dict:
        return {"source": self.source, "tokens_used": int(self.ids.numel()), "text_chars": self.text_chars,
                "text_sha256": self.text_sha256}


def chitchat_data() -> tuple[Path, dict]:
    """The embedded chit-chat conversations: ``(file, {conversation id: conversation})``."""
    path = chitchat_json()
    return path, json.loads(path.read_text(encoding="utf-8"))


def turn_texts(conversation: dict) -> list[str]:
    """Each turn of a chit-chat conversation as one text (its messages joined by newlines, stripped)."""
    return ["\n".join(m["text"].strip() for m in turn).strip() for turn in conversation.get("messages", [])]


def as_chat(texts: list[str]) -> list[dict]:
    """Turns alternating between the user and the assistant, the user first."""
    return [{"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(texts)]


def chitchat_text(tokenizer) -> tuple[str, str, tuple[str, ...]]:
    """``(text, description, files)``: the last :data:`CHITCHAT_CONVERSATIONS` chit-chat conversations
    (sorted ids) with two or more turns, each rendered whole in ``tokenizer``'s chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--calib_text {CHITCHAT} renders conversations in the tokenizer's chat template and this "
                         "model's tokenizer has none; give a text file instead")
    path, data = chitchat_data()
    ids = sorted(data)
    parts, first = [], len(ids)
    for i in range(len(ids) - 1, -1, -1):
        texts = [t for t in turn_texts(data[ids[i]]) if t]
        if len(texts) < 2:
            continue
        parts.append(tokenizer.apply_chat_template(as_chat(texts), tokenize=False))
        first = i
        if len(parts) == CHITCHAT_CONVERSATIONS:
            break
    source = (f"embedded chit-chat: {len(parts)} conversations in the chat template (sorted ids, positions "
              f"{first}..{len(ids) - 1} of {len(ids)}, read from the last)")
    return "\n".join(parts), source, (str(path.resolve()),)


def read_text(path: str | None, plays: tuple[str, ...], tokenizer=None) -> tuple[str, str, tuple[str, ...]]:
    """``(text, description, files)`` of ``path``, of the default ``plays`` when ``path`` is None, or
    of :func:`chitchat_text` for the keyword ``chitchat`` (needs ``tokenizer``)."""
    if path == CHITCHAT:
        if tokenizer is None:
            raise ValueError(f"{CHITCHAT!r} is a calibration text rendered with the model's tokenizer, not a file")
        return chitchat_text(tokenizer)
    if path is None:
        folder = shakespeare_dir()
        files = tuple(str((folder / f"{p}.txt").resolve()) for p in plays)
        return shakespeare_text(list(plays)), "embedded Shakespeare: " + ", ".join(plays), files
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"text file {path} does not exist")
    return p.read_text(encoding="utf-8", errors="replace"), str(path), (str(p.resolve()),)


def tokenize(tokenizer, text: str, n_tokens: int, what: str, source: str,
             files: tuple[str, ...]) -> TokenStream:
    """The first ``n_tokens`` tokens of ``text``; ``ValueError`` if it has fewer (``what`` names the flag).

    Only a prefix is tokenized, grown until it yields ``n_tokens`` plus a margin, so the last
    word cut by the prefix never reaches the tokens used.
    """
    chars = 8 * (n_tokens + PREFIX_MARGIN)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= n_tokens + PREFIX_MARGIN or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens:
        raise ValueError(f"the {what} text ({source}) has {len(ids)} tokens, fewer than the {n_tokens} needed; "
                         f"give a longer text or lower --{what}_tokens")
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return TokenStream(torch.tensor(ids[:n_tokens], dtype=torch.long), source, files, sha, len(text))


def load_streams(tokenizer, calib_text: str | None, calib_tokens: int, eval_text: str | None,
                 eval_tokens: int) -> tuple[TokenStream, TokenStream]:
    """``(calibration, evaluation)`` streams; ``ValueError`` if they share a file or a text."""
    c_text, c_src, c_files = read_text(calib_text, CALIB_PLAYS, tokenizer)
    e_text, e_src, e_files = read_text(eval_text, EVAL_PLAYS)
    shared = sorted(set(c_files) & set(e_files))
    if shared:
        raise ValueError(f"the calibration and evaluation texts share {shared[0]}; evaluation text must be kept "
                         "apart from calibration text: give another --calib_text or --eval_text")
    calib = tokenize(tokenizer, c_text, calib_tokens, "calib", c_src, c_files)
    evals = tokenize(tokenizer, e_text, eval_tokens, "eval", e_src, e_files)
    if calib.text_sha256 == evals.text_sha256:
        raise ValueError(f"the calibration text ({c_src}) and the evaluation text ({e_src}) are identical; "
                         "evaluation text must be kept apart from calibration text")
    return calib, evals


def calibration_batches(ids: torch.Tensor, seq: int, batch_size: int = CALIB_BATCH) -> list[torch.Tensor]:
    """Windows of ``seq`` tokens (the last partial window dropped), ``batch_size`` per batch."""
    if seq < 2:
        raise ValueError(f"calibration windows need at least 2 tokens, got {seq}")
    n = ids.numel() // seq
    if n == 0:
        raise ValueError(f"{ids.numel()} calibration tokens do not fill one {seq}-token window")
    return list(ids[: n * seq].view(n, seq).split(batch_size))


def finetune_windows(tokenizer, calib_text: str | None, steps: int, seq: int) -> tuple[list[torch.Tensor], int]:
    """Fine-tuning data: up to ``steps`` windows ``[1, seq]`` of the calibration text (never the
    evaluation text), one per optimizer step, cycled if the text is shorter.

    The calibration observes only the first ``--calib_tokens``; distillation reads further into
    the same text, so 300 steps do not revisit the same few windows 75 times.
    Returns ``(windows, tokens used)``.
    """
    text, source, files = read_text(calib_text, CALIB_PLAYS, tokenizer)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = min(steps, len(ids) // seq)
    if n == 0:
        raise ValueError(f"the calibration text ({source}) has {len(ids)} tokens, fewer than one {seq}-token "
                         "fine-tuning window; give a longer --calib_text")
    windows = torch.tensor(ids[: n * seq], dtype=torch.long).view(n, seq)
    return list(windows.split(1)), n * seq
