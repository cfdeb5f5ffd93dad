"""text_cls data: tiny offline fixtures (a random BertConfig model, a word-level tokenizer, synthetic
sentiment data), the embedded tweets, local files, splits, and the bad inputs that must fail early."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from text_cls.batching import encode, eval_batches, train_batches
from text_cls.data import DataError, class_names, load_splits, read_rows, read_tweets, stratified_split, write_splits

WORDS = {"positive": ["good", "great", "love", "happy", "nice"], "negative": ["bad", "awful", "hate", "sad", "ugly"],
         "neutral": ["the", "a", "car", "road", "today"]}
FILLER = ["it", "is", "was", "this", "that", "so", "very", "and"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """Sentences whose class shows in their words (learnable by a tiny model in a few steps)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("negative", "neutral", "positive")[i % 3]
        words = [rng.choice(WORDS[label]) for _ in range(rng.randint(1, 3))] + rng.sample(FILLER, rng.randint(1, 6))
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {i}", "label": label})
    return rows


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = SPECIAL + sorted({w for ws in WORDS.values() for w in ws} | set(FILLER)) + [str(i) for i in range(10)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def save_tiny_bert(directory: Path, seed: int = 0) -> Path:
    """A random 2-layer, 32-wide BERT and its tokenizer, saved as a Hugging Face folder."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertForSequenceClassification(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def write_file(path: Path, rows: list[dict], text="text", label="label") -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({text: r["text"], label: r["label"]}) + "\n" for r in rows))
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        path.write_text(f"{text}{sep}{label}\n" + "".join(f"{r['text']}{sep}{r['label']}\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def synthetic_csv(tmp_path_factory) -> Path:
    return write_file(tmp_path_factory.mktemp("data") / "train.csv", synthetic_rows(300))


torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine is shared


# --- the embedded tweets -------------------------------------------------------------------------

def test_tweets_are_read_with_three_classes_and_split_stratified_and_seeded():
    rows, source = read_tweets()
    assert len(rows) == 38158 and source["rows"] == 38158
    assert class_names([y for _, y in rows]) == ["negative", "neutral", "positive"]
    a = load_splits(seed=0, max_train_samples=None, max_eval_samples=None)
    b = load_splits(seed=0, max_train_samples=None, max_eval_samples=None)
    c = load_splits(seed=1, max_train_samples=None, max_eval_samples=None)
    assert a.test == b.test and a.train == b.train and a.test != c.test
    texts = {t for t, _ in a.train}
    assert not texts & {t for t, _ in a.test} and not texts & {t for t, _ in a.validation}
    assert a.source["duplicates_dropped"] > 0  # repeated tweets would leak from train into test
    n = len(a.train) + len(a.validation) + len(a.test)
    assert abs(len(a.test) / n - 0.1) < 0.001
    for part in (a.train, a.test):  # each class keeps its share of the whole
        share = torch.bincount(torch.tensor([y for _, y in part]), minlength=3) / len(part)
        whole = torch.bincount(torch.tensor([y for _, y in a.train + a.validation + a.test]), minlength=3) / n
        assert torch.allclose(share, whole, atol=0.002)
    small = load_splits(seed=0, max_train_samples=300, max_eval_samples=90)
    assert (len(small.train), len(small.test), len(small.validation)) == (300, 90, 90)
    assert set(small.test) <= set(a.test)


# --- local files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_local_files_with_named_columns(tmp_path, suffix):
    rows = synthetic_rows(60)
    train = write_file(tmp_path / f"train{suffix}", rows[:45], text="sentence", label="y")
    test = write_file(tmp_path / f"test{suffix}", rows[45:], text="sentence", label="y")
    s = load_splits(train_file=str(train), test_file=str(test), text_column="sentence", label_column="y", seed=3)
    assert s.classes == ["negative", "neutral", "positive"]
    assert [t for t, _ in s.test] == [r["text"] for r in rows[45:]] or len(s.test) == 15
    assert len(s.train) + len(s.validation) == 45 and len(s.test) == 15
    assert all(s.classes[y] == {r["text"]: r["label"] for r in rows}[t] for t, y in s.train + s.test)


def test_integer_labels_keep_their_ids_and_a_seeded_split_is_written(tmp_path):
    rows = [{"text": f"text number {i}", "label": i % 2} for i in range(40)]
    path = write_file(tmp_path / "d.jsonl", rows)
    s = load_splits(train_file=str(path), seed=0)
    assert s.classes == ["0", "1"] and len(s.test) == 4 and len(s.validation) == 4
    assert all(y == int(t.split()[-1]) % 2 for t, y in s.train)
    write_splits(s, tmp_path / "out")
    again = load_splits(train_file=str(tmp_path / "out" / "train.jsonl"), test_file=str(tmp_path / "out" / "test.jsonl"))
    assert sorted(again.test) == sorted(s.test)
    assert json.loads((tmp_path / "out" / "split.json").read_text())["sizes"]["test"] == 4


def test_written_splits_read_back_with_unicode_line_separators_inside_texts(tmp_path):
    """Real tweets hold U+2028 and U+0085: legal unescaped in JSON strings, so JSON Lines splits on \\n only."""
    rows = [{"text": f"tweet {i}\u2028second line\x85 and {chr(0x2029)} more", "label": "ab"[i % 2]} for i in range(40)]
    s = load_splits(train_file=str(write_file(tmp_path / "d.csv", rows)), seed=0)
    write_splits(s, tmp_path / "out")
    assert "\u2028" in (tmp_path / "out" / "test.jsonl").read_text(encoding="utf-8")
    again = load_splits(train_file=str(tmp_path / "out" / "train.jsonl"), test_file=str(tmp_path / "out" / "test.jsonl"))
    assert sorted(again.test) == sorted(s.test)
    assert sorted(again.train + again.validation) == sorted(s.train)


BAD = [
    ("unknown dataset", dict(dataset="mnist"), "unknown dataset 'mnist'"),
    ("missing column", dict(rows="text,sentiment\nhello,pos\nbye,neg\n"), "no column 'label'"),
    ("empty file", dict(rows=""), "the file is empty"),
    ("header only", dict(rows="text,label\n"), "header but no rows"),
    ("one class", dict(rows="text,label\na,x\nb,x\nc,x\n"), "at least 2"),
    ("fractional label", dict(rows="text,label\na,1\nb,0\n", jsonl='{"text": "c", "label": 1.5}\n'), "not a class"),
    ("empty label", dict(rows="text,label\na,1\nb,\n"), "is not a class"),
    ("mixed labels", dict(rows="text,label\na,1\nb,pos\nc,neg\n"), "mix class names and integer ids"),
    ("unseen test label", dict(rows="text,label\na,pos\nb,neg\nc,pos\nd,neg\n", test="text,label\ne,meh\n"),
     r"label\(s\) \['meh'\] are not classes"),
    ("empty text", dict(rows="text,label\na,pos\n ,neg\n"), "empty or missing text"),
    ("bad suffix", dict(suffix=".xlsx"), "unknown file type"),
    ("bad json", dict(jsonl='{"text": "a", "label": "x"}\nnot json\n'), "not valid JSON"),
    ("not utf-8", dict(raw=b"text,label\ncaf\xe9,x\nb,y\n"), "--encoding"),
]


@pytest.mark.parametrize("case,given,message", BAD, ids=[b[0] for b in BAD])
def test_bad_data_fails_with_a_clear_message(tmp_path, case, given, message):
    kwargs = {}
    if "dataset" in given:
        kwargs["dataset"] = given["dataset"]
    else:
        if "jsonl" in given:
            train = tmp_path / "d.jsonl"
            train.write_text(given["jsonl"])
        elif "raw" in given:
            train = tmp_path / "d.csv"
            train.write_bytes(given["raw"])
        else:
            train = tmp_path / f"d{given.get('suffix', '.csv')}"
            train.write_text(given.get("rows", "text,label\na,b\n"))
        kwargs["train_file"] = str(train)
        if "test" in given:
            (tmp_path / "t.csv").write_text(given["test"])
            kwargs["test_file"] = str(tmp_path / "t.csv")
    with pytest.raises(DataError, match=message):
        load_splits(**kwargs)


def test_hub_datasets_need_the_datasets_package_offline(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as without it (lm-eval's extra installs it)
    with pytest.raises(DataError, match="pip install datasets"):
        load_splits(dataset="sst2")


# --- tokenized batches ---------------------------------------------------------------------------

def test_batches_keep_fixed_length_samples_and_drop_only_all_padding_columns():
    tok = tiny_tokenizer()
    rows = [(r["text"], i % 3) for i, r in enumerate(synthetic_rows(50))]
    data = encode(tok, rows, 24)
    assert data.input_ids.shape == (50, 24) and data.attention_mask.shape == (50, 24)
    batches = eval_batches(data, 8)
    assert sum(len(b["labels"]) for b in batches) == 50
    for b in batches:
        assert b["attention_mask"][:, -1].any()  # the last kept column is real for some row
        assert b["input_ids"].shape == b["attention_mask"].shape
    lengths = [int(b["attention_mask"].sum(1).max()) for b in batches]
    assert lengths == sorted(lengths)  # grouped by length
    one = train_batches(data, 8, torch.Generator().manual_seed(0))
    two = train_batches(data, 8, torch.Generator().manual_seed(0))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(one, two))
