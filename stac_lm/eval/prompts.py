"""The fixed prompts of the free-running fidelity measurements (``bench/generation.py`` and the
validator's fidelity gate): plain factual questions with the answers that count as right, short
instructions, and chit-chat openings taken from the embedded conversations that calibration never
reads (``stac_lm.convert.texts.chitchat_text`` reads the last 200 by sorted id; these
come from the front).

A reply answers a question correctly when it contains one of its answers as a whole word,
ignoring case. The questions are general knowledge a small instruction-tuned model may or may not
know; what matters is whether the SNN keeps the answers its ANN gets right.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import islice

QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the chemical symbol for water?", ("H2O", "H₂O")),
    ("How many days are there in a week?", ("seven", "7")),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "CO2", "CO₂")),
    ("Who wrote the play Romeo and Juliet?", ("Shakespeare",)),
    ("What is the boiling point of water in degrees Celsius?", ("100",)),
    ("What is the freezing point of water in degrees Celsius?", ("0", "zero")),
    ("Which ocean is the largest?", ("Pacific",)),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("What color do you get when you mix blue and yellow?", ("green",)),
    ("How many continents are there on Earth?", ("seven", "7")),
    ("What is the closest star to the Earth?", ("Sun",)),
    ("What do bees make?", ("honey",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is two plus two?", ("four", "4")),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("What is the main language spoken in Brazil?", ("Portuguese",)),
    ("In which country are the pyramids of Giza?", ("Egypt",)),
    ("What is the currency of the United Kingdom?", ("pound", "sterling")),
    ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    ("What is the hardest natural substance?", ("diamond",)),
    ("Which organ pumps blood through the body?", ("heart",)),
    ("What is the largest mammal?", ("blue whale", "whale")),
)

INSTRUCTIONS: tuple[str, ...] = (
    "Write one sentence about the sea.",
    "List three colors.",
    "Give me a tip for sleeping better.",
    "Describe a cat in one sentence.",
    "Suggest a name for a small bakery.",
    "Explain what a computer is to a child.",
    "Write a short greeting for a birthday card.",
    "Tell me one benefit of drinking water.",
    "Say hello in a friendly way.",
    "Give me a simple recipe idea for breakfast.",
)

CHITCHAT_OPENINGS = 20  # first user turns of the first conversations (sorted ids) with text
MAX_OPENING_CHARS = 300


def correct(reply: str, answers: tuple[str, ...]) -> bool:
    """Whether ``reply`` contains one of ``answers`` as a whole word or phrase, ignoring case."""
    return any(re.search(rf"(?<![\w]){re.escape(a)}(?![\w])", reply, flags=re.IGNORECASE) for a in answers)


def opening_turns(from_last: bool = False) -> Iterator[str]:
    """The first user turn (at most :data:`MAX_OPENING_CHARS` characters) of each embedded
    conversation that has one, in sorted-id order, or from the last id backwards."""
    from stac_lm.convert.texts import chitchat_data, turn_texts

    _, data = chitchat_data()
    for cid in sorted(data, reverse=from_last):
        texts = [t for t in turn_texts(data[cid]) if t]
        if texts and len(texts[0]) <= MAX_OPENING_CHARS:
            yield texts[0]


def chitchat_openings(n: int = CHITCHAT_OPENINGS) -> list[str]:
    """The first user turn of the first ``n`` embedded conversations (sorted ids) that have one."""
    return list(islice(opening_turns(), n))


KINDS = ("question", "instruction", "chitchat")


def prompts(kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """The prompts of ``kinds`` as ``{"kind", "text", "answers"}`` (answers only for questions)."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown prompt kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
    rows = [{"kind": "question", "text": q, "answers": list(a)} for q, a in QUESTIONS] if "question" in kinds else []
    rows += [{"kind": "instruction", "text": t, "answers": None} for t in INSTRUCTIONS] if "instruction" in kinds else []
    rows += [{"kind": "chitchat", "text": t, "answers": None} for t in chitchat_openings()] if "chitchat" in kinds else []
    return rows
