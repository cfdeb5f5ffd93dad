"""A conversation as the text fed to the model, one turn at a time.

The model keeps a KV cache of everything fed so far, so each user turn feeds only the text
the chat template adds for it. The template renders a finished assistant reply its own way
(ChatML puts ``"\\n"`` after ``<|im_end|>``), while what was fed is the reply the model
generated, stop token included; so the fed text is tracked as a string, and the next turn
feeds the rendered conversation beyond it (the template's tail of the last reply first).
A template that renders earlier turns differently once a new one is added (one that trims
or rewrites old replies) gives a rendering the fed text is not a prefix of: that turn then
starts over and feeds the whole conversation (``Turn.restart``).

A tokenizer without a chat template gets a plain format (``PLAIN_TEMPLATE``): a system line,
``User: ...`` and ``Assistant:`` lines; a reply ends at the first newline or at eos.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError

# "Assistant:" with no space after it: the model's first token usually brings its own space.
# A reply that ended on a newline token already holds its newline, so none is added after it.
PLAIN_TEMPLATE = (
    r"{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    r"{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    r"{% else %}{{ 'Assistant:' + m['content'] }}{% if not m['content'].endswith('\n') %}{{ '\n' }}{% endif %}"
    r"{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

# end-of-turn markers of common templates; a tokenizer's eos is always a stop token too
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclass(frozen=True)
class Turn:
    """A prepared user turn: ``text`` is what to feed now; ``restart``: the model must forget the
    conversation and be fed ``text`` (the whole of it) from scratch."""

    text: str
    restart: bool
    messages: tuple[dict, ...]
    rendered: str


def _ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


class ChatFormat:
    """How the conversation with ``tokenizer``'s model is written down.

    Args:
        tokenizer: a Hugging Face tokenizer; its ``chat_template`` is used when it has one.
        system: an optional system message (first in the conversation).
        eos_token_id: the model config's eos id(s), stop tokens besides the tokenizer's eos.

    Raises:
        ValueError: the template refuses a system message (so ``system`` cannot be used).
    """

    def __init__(self, tokenizer, system: str | None = None, eos_token_id=None):
        self.tokenizer = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.template = tokenizer.chat_template if self.templated else PLAIN_TEMPLATE
        self.system = system
        vocab = tokenizer.get_vocab()
        markers = {vocab[m] for m in END_OF_TURN if m in vocab and (m in self.template or m == tokenizer.eos_token)}
        self.end_ids = frozenset(markers | _ids(tokenizer.eos_token_id) | _ids(eos_token_id))
        self.stop_ids = self.end_ids if self.templated else self.end_ids | self._newline_ids()
        self.reset()
        if system:
            try:
                self._render([*self.messages, {"role": "user", "content": "hi"}], True)
            except TemplateError as e:
                raise ValueError(f"this model's chat template refuses a system message ({e}); leave out --system") \
                    from None

    def _newline_ids(self) -> set[int]:
        """Tokens holding a newline: in the plain format a reply ends with its line."""
        texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        return {i for i, t in enumerate(texts) if "\n" in t}

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.fed = ""  # all text fed to the model so far, replies as generated

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(list(messages), chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def encode(self, text: str) -> list[int]:
        # the template writes every special token it wants (bos included), as apply_chat_template does
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prepare(self, user_text: str) -> Turn:
        """The text to feed for a new user message (nothing changes until :meth:`commit`)."""
        messages = (*self.messages, {"role": "user", "content": user_text})
        rendered = self._render(messages, True)
        if rendered.startswith(self.fed):
            return Turn(rendered[len(self.fed):], False, messages, rendered)
        return Turn(rendered, True, messages, rendered)

    def commit(self, turn: Turn, reply_ids: list[int]) -> str:
        """Record a turn that was fed and the reply the model gave (ids as generated, stop token
        included, possibly cut short); returns the reply's text as the history keeps it."""
        content = self._content(reply_ids)
        self.messages = [*turn.messages, {"role": "assistant", "content": content}]
        self.fed = turn.rendered + self.decode(reply_ids)
        return content

    def _content(self, ids: list[int]) -> str:
        """The reply as the template should render it: without its end-of-turn token (the
        template writes its own); the plain format keeps a final newline token's text."""
        if ids and ids[-1] in self.end_ids:
            ids = ids[:-1]
        return self.decode(ids)

    def reply_text(self, ids: list[int]) -> str:
        """What the user sees of a reply (stop tokens and, in the plain format, all from the first
        newline on, left out)."""
        text = self._content(ids)
        return text if self.templated else text.split("\n", 1)[0]

    def history(self) -> list[tuple[str, str]]:
        """``(role, text)`` of each message so far."""
        return [(m["role"], m["content"].strip()) for m in self.messages]

    def describe(self) -> str:
        return "the model's chat template" if self.templated else "plain 'User:/Assistant:' lines (no chat template)"
