"""A conversation as token segments, the way a chat application feeds it turn by turn.

Each user message becomes a *prompt* segment (the text the template puts around it, the
assistant header included) and each assistant message a *reply* segment (its content and
the end-of-turn token: the tokens a model would have to produce). Segments are the differences
between the template rendered over growing prefixes of the conversation, so their
concatenation is what the template gives for the whole conversation. A tokenizer without a
chat template (the tiny test tokenizers) gets a plain ``User: ... / Assistant: ...`` format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PLAIN_USER = "User: {text}\nAssistant:"
PLAIN_REPLY = " {text}\n"


@dataclass
class Segment:
    """Token ids ``[n]`` of one turn's part; ``reply`` marks the assistant's tokens (the scored ones)."""

    ids: torch.Tensor
    reply: bool


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def _rendered(tokenizer, messages: list[dict]) -> list[str]:
    """The template over each prefix of ``messages``; a prefix ending with a user message gets the
    assistant header (generation prompt)."""
    out = []
    for k in range(1, len(messages) + 1):
        gen = messages[k - 1]["role"] == "user"
        out.append(tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=gen))
    return out


def _template_texts(tokenizer, messages: list[dict]) -> list[str]:
    texts, prev = [], ""
    for k, full in enumerate(_rendered(tokenizer, messages)):
        if not full.startswith(prev):
            # a template that rewrites earlier turns cannot be fed incrementally with a cache
            raise ValueError(f"the chat template is not incremental: rendering message {k + 1} changes the text "
                             "of the earlier ones")
        texts.append(full[len(prev):])
        prev = full
    return texts


def segments(tokenizer, messages: list[dict]) -> list[Segment]:
    """``messages`` (``{"role": "user"|"assistant", "content": str}``, alternating, user first) as segments.

    A reply segment ends with the tokenizer's end-of-turn (eos) token where the template puts one;
    what the template adds after it (a newline) opens the next prompt segment (after the last
    reply it is left out).

    Raises:
        ValueError: roles that do not alternate from ``user``, or a template that is not incremental.
    """
    for i, m in enumerate(messages):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError(f"message {i + 1} has role {m['role']!r}; roles must alternate user, assistant, ...")
    if has_template(tokenizer):
        texts = _template_texts(tokenizer, messages)
    else:
        texts = [(PLAIN_USER if m["role"] == "user" else PLAIN_REPLY).format(text=m["content"]) for m in messages]
    out, carry = [], torch.zeros(0, dtype=torch.long)
    eos = tokenizer.eos_token_id
    for m, text in zip(messages, texts):
        ids = torch.cat([carry, _encode(tokenizer, text)])
        carry = torch.zeros(0, dtype=torch.long)
        if m["role"] == "assistant" and eos is not None and has_template(tokenizer):
            hits = (ids == eos).nonzero()
            if len(hits):
                cut = int(hits[0]) + 1
                ids, carry = ids[:cut], ids[cut:]
        out.append(Segment(ids, m["role"] == "assistant"))
    return out

