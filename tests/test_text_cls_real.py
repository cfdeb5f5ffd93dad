"""text_cls on the real MiniLM-L6 and a few hundred embedded tweets (slow: several minutes on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from text_cls import TextClsOptions, classify, load_text_snn, run
from text_cls.batching import encode, eval_batches, model_inputs
from text_cls.data import read_rows

pytestmark = pytest.mark.slow


def test_minilm_on_tweets_end_to_end(tmp_path):
    opts = TextClsOptions(max_train_samples=400, max_eval_samples=150, time_steps=(4, 16), time_step=16,
                          calib_samples=128, savedir=str(tmp_path / "run"), progress=False)
    results = run(opts)
    # trained: above the majority class (42% of the tweets are negative) on accuracy and on macro-F1
    assert results["acc_ann"] > 0.45 and results["f1_ann"] > 0.3
    by_T = {row["T"]: row for row in results["per_T"]}
    for row in by_T.values():
        rates = row["spike_rate_per_site"]
        assert len(rates) == 30 and all(0 < r < 1 for r in rates.values())  # every site fires, none saturates
    assert abs(by_T[16]["acc_snn_parallel"] - results["acc_ann"]) <= 0.05
    assert by_T[16]["agreement"] >= 0.9 and by_T[16]["agreement_with_ann"] >= 0.85
    assert by_T[4]["agreement_with_ann"] < by_T[16]["agreement_with_ann"]
    assert by_T[16]["qcfs_parallel_max_abs_logit_diff"] == 0.0
    model, tok, config = load_text_snn(Path(opts.savedir) / "model")
    rows = [(t, config["classes"].index(y)) for t, y in read_rows(Path(opts.savedir) / "data" / "test.jsonl",
                                                                   "text", "label")]
    batches = eval_batches(encode(tok, rows, config["max_len"]), opts.eval_batchsize)
    correct = sum(int((classify(model, **model_inputs(b)).argmax(-1) == b["labels"]).sum()) for b in batches)
    assert correct / len(rows) == by_T[16]["acc_snn_parallel"]
