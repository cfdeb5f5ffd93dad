"""The documents of the Tempest tasks, built from the play's text (``custom_dataset`` of the YAMLs).

A speech is a speaker's line (``PROSPERO.``) and the verse lines after it up to a blank line;
stage directions in brackets are dropped. Both tasks are deterministic: no randomness beyond a
fixed-seed choice of the cloze distractors.
"""

from __future__ import annotations

import random
import re

SPEAKER = re.compile(r"^[A-Z][A-Z ,']+\.$")
LAST_WORD = re.compile(r"([A-Za-z][A-Za-z']*[A-Za-z])([^A-Za-z]*)$")
MIN_LASTWORD_WORDS = 25
MIN_CLOZE_LINES = 3
MIN_DISTRACTOR_WORDS = 4
CHOICES = 4
MAX_CONTEXT_LINES = 4  # the last lines of a long speech only: bounded cost, the same for every model
SEED = 1611  # the year of the play's first recorded performance


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """``[(speaker, verse lines)]`` in the order of the play."""
    out, speaker, lines = [], None, []
    for raw in text.splitlines() + [""]:
        line = re.sub(r"\[[^\]]*\]?", "", raw).strip() if "[" in raw else raw.strip()
        if raw.strip().startswith("[") and "]" not in raw:  # a stage direction that goes on to the next line
            continue
        if SPEAKER.match(raw.strip()):
            if speaker and lines:
                out.append((speaker, lines))
            speaker, lines = raw.strip(), []
        elif not raw.strip():
            if speaker and lines:
                out.append((speaker, lines))
            speaker, lines = None, []
        elif speaker and line and not line.endswith("]"):
            lines.append(line)
    return out


def lastword_docs(text: str) -> list[dict]:
    """Speeches of at least :data:`MIN_LASTWORD_WORDS` words ending in a word of two letters or more:
    ``context`` (the speaker and the speech's last :data:`MAX_CONTEXT_LINES` lines up to that word, no
    trailing space) and ``target`` (the word)."""
    docs = []
    for speaker, lines in speeches(text):
        body = "\n".join(lines)
        m = LAST_WORD.search(body)
        if m is None or len(body.split()) < MIN_LASTWORD_WORDS:
            continue
        kept = "\n".join(body[:m.start(1)].split("\n")[-MAX_CONTEXT_LINES:])
        context = f"{speaker}\n{kept}".rstrip()
        docs.append({"context": context, "target": m.group(1)})
    return docs


def cloze_docs(text: str) -> list[dict]:
    """Speeches of at least :data:`MIN_CLOZE_LINES` lines: ``context`` (speaker and up to
    :data:`MAX_CONTEXT_LINES` lines before the last), ``choices`` (the last line and three lines of other
    speeches, seeded order) and ``gold``."""
    all_speeches = speeches(text)
    pool = [(i, line) for i, (_, lines) in enumerate(all_speeches) for line in lines
            if len(line.split()) >= MIN_DISTRACTOR_WORDS]
    rng = random.Random(SEED)
    docs = []
    for i, (speaker, lines) in enumerate(all_speeches):
        if len(lines) < MIN_CLOZE_LINES:
            continue
        answer = lines[-1]
        others = []
        while len(others) < CHOICES - 1:
            j, line = pool[rng.randrange(len(pool))]
            if j != i and line != answer and line not in others:
                others.append(line)
        choices = others + [answer]
        rng.shuffle(choices)
        context = "\n".join([speaker, *lines[:-1][-MAX_CONTEXT_LINES:]])
        docs.append({"context": context, "choices": choices, "gold": choices.index(answer)})
    return docs


def _dataset(docs: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def _play() -> str:
    from stac_common.assets import shakespeare_text
    from stac_lm.convert.texts import EVAL_PLAYS

    return shakespeare_text(list(EVAL_PLAYS))


def lastword_dataset(**kwargs):
    """``custom_dataset`` of ``tempest_lastword.yaml`` (lm-eval passes the task's metadata; unused)."""
    return _dataset(lastword_docs(_play()))


def cloze_dataset(**kwargs):
    """``custom_dataset`` of ``tempest_cloze.yaml``."""
    return _dataset(cloze_docs(_play()))
