"""text_cls with weighted spikes (``--coding weighted``): 2**T - 1 levels per site, the time-stepped
simulation gives the parallel answers, the choice is saved and reloaded, and bad T's are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spike_modules import iter_sites
from tests.test_text_cls_pipeline import FAST, workdir  # noqa: F401  (the tiny BERT and its data)
from text_cls import TextClsOptions, classify, load_text_snn, run
from text_cls.batching import encode, eval_batches, model_inputs
from text_cls.data import read_rows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weighted(workdir):
    opts = TextClsOptions(train_file=str(workdir / "train.csv"), model_name=str(workdir / "bert"),
                          savedir=str(workdir / "run_weighted"), time_steps=(2, 4), time_step=4, ann_epochs=6,
                          trainsnn_epochs=1, coding="weighted", **FAST)
    return opts, run(opts)


def test_weighted_sites_have_2_to_the_T_minus_1_levels_and_simulate_exactly(weighted):
    opts, results = weighted
    by_T = {row["T"]: row for row in results["per_T"]}
    assert results["model"]["coding"] == "weighted" and results["options"]["coding"] == "weighted"
    for T, row in by_T.items():
        assert row["agreement"] == 1.0, (T, row["agreement"])  # the weighted neuron waits for its window: exact
        assert row["energy"]["op_counts_consistent"] and row["spike_rate"] > 0
    # 15 levels at T=4 follow the float network more closely than 3 at T=2
    assert by_T[4]["agreement_with_ann"] >= by_T[2]["agreement_with_ann"]
    assert "Weighted spikes" in (Path(opts.savedir) / "results.md").read_text()


def test_a_saved_weighted_model_reloads_weighted_to_the_same_accuracy(weighted):
    opts, results = weighted
    d = Path(opts.savedir) / "model"
    assert json.loads((d / "config.json").read_text())["site_spec"]["coding"] == "weighted"
    rows = [(t, ["negative", "neutral", "positive"].index(y))
            for t, y in read_rows(Path(opts.savedir) / "data" / "test.jsonl", "text", "label")]
    for row in results["per_T"]:
        model, tok, config = load_text_snn(d, T=row["T"])
        assert {site.coding for _, site in iter_sites(model)} == {"weighted"}
        assert {site.levels for _, site in iter_sites(model)} == {2 ** row["T"] - 1}
        batches = eval_batches(encode(tok, rows, config["max_len"]), opts.eval_batchsize)
        with torch.no_grad():
            correct = sum(int((classify(model, **model_inputs(b)).argmax(-1) == b["labels"]).sum()) for b in batches)
        assert correct / len(rows) == row["acc_snn_parallel"]


@pytest.mark.parametrize("kw, message", [
    (dict(coding="weighted", time_steps=(8, 17)), "weighted coding takes T from 1 to 16"),
    (dict(coding="phase"), "coding"),
])
def test_bad_coding_options_are_refused(workdir, kw, message):
    with pytest.raises(ValueError, match=message):
        TextClsOptions(train_file=str(workdir / "train.csv"), **kw)


def test_fine_tune_options_without_a_fine_tune_are_refused(workdir):
    """Weighted coding converts the float ANN as it is by default (--trainsnn_epochs 0): options that only
    shape the DA-QCFS fine-tune would do nothing, so they are refused, and accepted with the fine-tune."""
    base = dict(train_file=str(workdir / "train.csv"), time_steps=(4, 8))
    for kw in (dict(distill_samples=4000), dict(train_cycle=(4, 8, 8)), dict(distill_temperature=2.0),
               dict(hidden_distill=0.1), dict(distill=0.5), dict(train_thresholds="shared")):
        with pytest.raises(ValueError, match="shape.* the DA-QCFS fine-tune.*--trainsnn_epochs 1"):
            TextClsOptions(**base, **kw)
        assert TextClsOptions(**base, **kw, trainsnn_epochs=1).trainsnn_epochs == 1
    assert TextClsOptions(**base).trainsnn_epochs == 0 and TextClsOptions(**base, coding="rate").trainsnn_epochs == 1


def test_a_rate_neuron_choice_is_refused_with_weighted_coding(weighted, workdir):
    """--sequential_neuron chooses between rate-coded neurons; with weighted sites it would do nothing."""
    base = dict(train_file=str(workdir / "train.csv"), time_steps=(4, 8))
    with pytest.raises(ValueError, match="--sequential_neuron if.*--coding rate"):
        TextClsOptions(**base, sequential_neuron="if")
    assert TextClsOptions(**base, sequential_neuron="if", coding="rate").sequential_neuron == "if"
    from text_cls.model import set_sequential_schedule

    model = load_text_snn(Path(weighted[0].savedir) / "model", T=4)[0]
    with pytest.raises(ValueError, match="rate-coded neuron"):
        set_sequential_schedule(model, "causal", "if")
    set_sequential_schedule(model, "held", "catch_up")  # the norm schedule still applies
