"""text_cls's robustness machinery: distillation loss, the sequential subset, the per-T calibration chosen on
validation data, and the results' record of samples per stage (tiny random BERT, synthetic data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_text_cls_data import save_tiny_bert, synthetic_rows, write_file
from text_cls import TextClsOptions, run
from text_cls.batching import Encoded, pick
from text_cls.cli import main
from text_cls.train import distill_loss

torch.set_num_threads(1)
FAST = dict(max_len=16, batchsize=16, eval_batchsize=32, calib_samples=64, progress=False, threads=1,
            learning_rate=3e-3, snn_learning_rate=1e-3, freeze_embeddings=False)


def test_distill_loss_is_cross_entropy_at_0_and_kl_at_1():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 3), torch.randn(8, 3), torch.randint(0, 3, (8,))
    assert torch.equal(distill_loss(s, t, y, 0.0), torch.nn.functional.cross_entropy(s, y))
    assert float(distill_loss(t, t, y, 1.0)) == pytest.approx(0.0, abs=1e-7)
    kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()
    assert float(distill_loss(s, t, y, 1.0)) == pytest.approx(float(kl), rel=1e-5)


def test_pick_draws_n_samples_seeded_in_order():
    data = Encoded(torch.arange(40).view(20, 2), torch.ones(20, 2, dtype=torch.long), torch.arange(20))
    a, b = pick(data, 7, seed=3), pick(data, 7, seed=3)
    assert len(a) == 7 and torch.equal(a.labels, b.labels) and bool((a.labels.diff() > 0).all())
    assert torch.equal(a.input_ids[:, 0], 2 * a.labels)  # rows stay together
    assert not torch.equal(pick(data, 7, seed=4).labels, a.labels)
    assert pick(data, None, seed=0) is data and pick(data, 20, seed=0) is data


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    d = tmp_path_factory.mktemp("text_cls_select")
    save_tiny_bert(d / "bert")
    rows = synthetic_rows(300, seed=7)
    for i in range(0, len(rows), 4):
        rows[i]["label"] = ("negative", "neutral", "positive")[(i + 1) % 3]
    write_file(d / "train.csv", rows)
    opts = TextClsOptions(train_file=str(d / "train.csv"), model_name=str(d / "bert"), savedir=str(d / "run"),
                          time_steps=(2, 8), time_step=8, trainsnn_epochs=2, sequential_samples=10,
                          threshold_candidates=("mse", "max"), **FAST)
    return opts, run(opts)


def test_calibration_is_chosen_per_T_by_agreement_with_the_float_ann(selected):
    opts, results = selected
    table = results["calibration_selection"]
    assert sorted(table) == ["2", "8"]
    for rows in table.values():
        # the training thresholds as they are (fitted per T by mse), the run's rule with the DA-QCFS shift and
        # scale, then each rule's thresholds alone
        assert [(r["rule"], r["refit"], r["fit_affine"]) for r in rows] == [
            ("mse", False, False), ("percentile", True, True), ("percentile", True, False),
            ("mse", True, False), ("max", True, False)]
        chosen = [r for r in rows if r.get("chosen")]
        assert len(chosen) == 1
        best = max((r["validation_agreement_with_ann"], r["validation_accuracy"]) for r in rows)
        assert (chosen[0]["validation_agreement_with_ann"], chosen[0]["validation_accuracy"]) == best
    qcfs = results["training"]["qcfs"]
    assert qcfs["distill"] == 1.0 and qcfs["thresholds"] == {"2": "mse", "8": "mse"}
    assert results["ann_reference"].startswith("a separate float fine-tune")
    # two epochs, each scored by agreement with the float ANN on the validation split; the better one kept
    scores = qcfs["epoch_scores"]
    assert 1 <= qcfs["epochs_run"] == len(scores) <= 2 and all(0.0 <= x <= 1.0 for x in scores)
    assert qcfs["epoch_kept"] == 1 + scores.index(max(scores))


def test_sequential_runs_on_the_subset_and_results_say_how_many_samples_each_stage_used(selected):
    opts, results = selected
    stages = results["samples_per_stage"]
    assert stages["sequential"] == 10 and stages["test"] == results["samples"] > 10
    assert stages["qcfs_fine_tune"] == stages["float_fine_tune"] == results["data"]["sizes"]["train"]
    assert stages["calibration_choice"] == stages["validation"] == results["data"]["sizes"]["validation"]
    for row in results["per_T"]:
        assert row["sequential_samples"] == 10 and 0.0 <= row["agreement"] <= 1.0
        assert row["agreement"] * 10 == round(row["agreement"] * 10)  # a share of the 10 samples
    saved = json.loads((Path(opts.savedir) / "results.json").read_text())
    assert saved["samples_per_stage"] == stages and {"step_seconds", "seconds_total"} <= set(saved)


@pytest.mark.parametrize("args,message", [
    (["--threshold_candidates", "mse,bogus"], "unknown threshold rule"),
    (["--distill", "1.5"], "distill must be a number in [0.0, 1.0]"),
    (["--float_loss", "-1"], "float_loss must be a number in [0.0, 1.0]"),
    (["--float_loss", "0.5"], "give --ann_epochs 0 with --float_loss"),
    (["--sequential_samples", "0"], "sequential_samples must be an integer >= 1"),
    (["--sequential_samples", "some"], "expected a number of samples or 'all'"),
    (["--train_thresholds", "median"], "invalid choice"),
    (["--train_cycle", "4,x"], "comma-separated whole numbers"),
    (["--train_cycle", "4,32"], "T's of the sweep"),
    (["--distill_samples", "10"], "at least that many"),
    (["--select_by", "accuracy"], "invalid choice"),
])
def test_bad_new_flags_exit_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["--savedir", str(tmp_path / "out"), "--no-progress", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


class _Stop(Exception):
    pass


@pytest.mark.parametrize("flags, expected", [
    ([], {"distill": 1.0, "float_loss": 0.0, "ann_epochs": 1}),
    (["--distill", "0.8", "--coding", "rate"], {"distill": 0.8, "float_loss": 0.0, "ann_epochs": 1}),
    (["--float_loss", "1.0", "--ann_epochs", "0", "--trainsnn_epochs", "1"],
     {"distill": 1.0, "float_loss": 1.0, "ann_epochs": 0})])
def test_bench_passes_the_distillation_weights_to_the_run(monkeypatch, tmp_path, flags, expected):
    import bench.text_cls as bench

    seen = {}

    def fake_run(opts):
        seen.update(distill=opts.distill, float_loss=opts.float_loss, ann_epochs=opts.ann_epochs)
        raise _Stop

    monkeypatch.setattr(bench, "run", fake_run)
    with pytest.raises(_Stop):
        bench.main(["--out", str(tmp_path / "b.json"), "--savedir", str(tmp_path / "run"), *flags])
    assert seen == expected


def test_a_cuda_device_without_an_index_is_set_as_gpu_0(monkeypatch, tmp_path):
    """--device auto resolves to "cuda" with no index, which torch.cuda.set_device refuses."""
    import text_cls.pipeline as pipeline

    seen = []

    def fake_set_device(device):
        seen.append(device)
        raise _Stop

    monkeypatch.setattr(pipeline, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "set_device", fake_set_device)
    with pytest.raises(_Stop):
        run(TextClsOptions(savedir=str(tmp_path / "run"), progress=False))
    assert seen == [torch.device("cuda", 0)]


def first_losses(tmp_path, option: str, weights: tuple[float, ...], T: int, **extra) -> dict[float, float]:
    """The DA-QCFS fine-tune's first recorded loss for each weight of ``option``, with a learning rate too
    small to move the weights (so the difference is the option's term)."""
    save_tiny_bert(tmp_path / "bert")
    write_file(tmp_path / "train.csv", synthetic_rows(120, seed=3))
    losses = {}
    for w in weights:
        opts = TextClsOptions(train_file=str(tmp_path / "train.csv"), model_name=str(tmp_path / "bert"),
                              savedir=str(tmp_path / f"run{w}"), time_steps=(T,), time_step=T, sequential_samples=4, trainsnn_epochs=1,
                              threshold_candidates=(), **{option: w}, **extra, **{**FAST, "snn_learning_rate": 1e-12})
        qcfs = run(opts)["training"]["qcfs"]
        assert qcfs[option] == w
        losses[w] = qcfs["first_loss"]
    return losses


def test_float_loss_adds_the_float_networks_cross_entropy_to_the_fine_tune(tmp_path):
    """--float_loss W: every DA-QCFS step also runs the batch with the sites off and adds W times its
    cross-entropy. With a learning rate too small to move the weights, the recorded loss grows by about
    W times the float network's cross-entropy (about ln 3 for a fresh 3-class head)."""
    losses = first_losses(tmp_path, "float_loss", (0.0, 0.5), T=8, ann_epochs=0)
    assert 0.25 < losses[0.5] - losses[0.0] < 1.0, losses


def test_auto_sequential_subset_follows_the_texts_length():
    """'auto': 4096 tokens' worth of samples, 32 to 256; a number or None (all) is taken as given."""
    from text_cls.batching import SEQUENTIAL_TOKENS, sequential_count

    def data(n, length):
        mask = torch.zeros(n, 160, dtype=torch.long)
        mask[:, :length] = 1
        return Encoded(torch.ones(n, 160, dtype=torch.long), mask, torch.zeros(n, dtype=torch.long))

    assert sequential_count(data(800, 16), "auto") == 256
    assert sequential_count(data(800, 64), "auto") == SEQUENTIAL_TOKENS // 64 == 64
    assert sequential_count(data(800, 100), "auto") == round(SEQUENTIAL_TOKENS / 100) == 41
    assert sequential_count(data(800, 160), "auto") == 32 and sequential_count(data(10, 100), "auto") == 41
    assert sequential_count(data(800, 128), 100) == 100 and sequential_count(data(800, 128), None) is None
    assert TextClsOptions(progress=False).sequential_samples == "auto"


class _Recorder:
    """Stands for a per-T calibration: records when the fine-tune applies it."""

    def __init__(self, T, seen):
        from calibration import CalibrationConfig

        self.T, self.seen, self.config = T, seen, CalibrationConfig(T=T, rule="mse")

    def apply_to(self, model):
        from spike_modules.site import set_timesteps

        self.seen.append(self.T)
        set_timesteps(model, self.T)


def test_per_T_training_thresholds_are_applied_as_the_cycle_moves(tmp_path):
    """--train_thresholds RULE: each DA-QCFS batch runs with the thresholds fitted for its T."""
    from accelerate import Accelerator

    from text_cls.batching import encode
    from text_cls.model import SiteSpec, convert_classifier, load_classifier
    from text_cls.train import finetune_

    save_tiny_bert(tmp_path / "bert")
    model, tok = load_classifier(str(tmp_path / "bert"), 3, {0: "a", 1: "b", 2: "c"})
    snn = convert_classifier(model, SiteSpec(T=4))
    rows = [(r["text"], i % 3) for i, r in enumerate(synthetic_rows(80, seed=1))]
    seen = []
    out = finetune_(snn, encode(tok, rows, 16), epochs=1, batch_size=16, lr=1e-4, seed=0, accelerator=Accelerator(cpu=True),
                    timesteps=(2, 4), progress=False, thresholds={2: _Recorder(2, seen), 4: _Recorder(4, seen)})
    assert seen == [2, 4, 2, 4, 2] and out["steps"] == 5
    seen.clear()  # --train_cycle: a T given twice gets twice the steps
    out = finetune_(snn, encode(tok, rows, 16), epochs=1, batch_size=16, lr=1e-4, seed=0, accelerator=Accelerator(cpu=True),
                    timesteps=(2, 4, 4), progress=False, thresholds={2: _Recorder(2, seen), 4: _Recorder(4, seen)})
    assert seen == [2, 4, 4, 2, 4] and out["timesteps"] == [2, 4, 4]
    with pytest.raises(ValueError, match="every T"):
        finetune_(snn, encode(tok, rows, 16), epochs=1, batch_size=16, lr=1e-4, seed=0,
                  accelerator=Accelerator(cpu=True), timesteps=(2, 4), thresholds={2: _Recorder(2, seen)})


def test_a_run_with_per_T_training_thresholds_offers_them_to_the_choice(tmp_path):
    save_tiny_bert(tmp_path / "bert")
    write_file(tmp_path / "train.csv", synthetic_rows(150, seed=5))
    opts = TextClsOptions(train_file=str(tmp_path / "train.csv"), model_name=str(tmp_path / "bert"),
                          savedir=str(tmp_path / "run"), time_steps=(2, 8), time_step=8, sequential_samples=4,
                          train_thresholds="mse", coding="rate", **FAST)
    results = run(opts)
    assert results["training"]["qcfs"]["thresholds"] == {"2": "mse", "8": "mse"}
    for rows in results["calibration_selection"].values():  # the first candidate: the thresholds trained with
        assert (rows[0]["rule"], rows[0]["refit"], rows[0]["fit_affine"]) == ("mse", False, False)


def test_the_fine_tune_keeps_the_best_scoring_epoch_and_stops_when_it_gets_worse(tmp_path):
    """score after every epoch: the best epoch's weights are kept; the first epoch worse than the best ends
    training (early stopping)."""
    from accelerate import Accelerator

    from text_cls.batching import encode
    from text_cls.model import SiteSpec, convert_classifier, load_classifier
    from text_cls.train import finetune_

    save_tiny_bert(tmp_path / "bert")
    model, tok = load_classifier(str(tmp_path / "bert"), 3, {0: "a", 1: "b", 2: "c"})
    snn = convert_classifier(model, SiteSpec(T=4))
    rows = [(r["text"], i % 3) for i, r in enumerate(synthetic_rows(64, seed=2))]
    marks, weights = iter([0.5, 0.7, 0.6, 0.9]), []

    def score():
        weights.append(snn.classifier.weight.detach().clone())
        return next(marks)

    out = finetune_(snn, encode(tok, rows, 16), epochs=4, batch_size=16, lr=1e-2, seed=0,
                    accelerator=Accelerator(cpu=True), timesteps=(4,), progress=False, score=score)
    assert out["epoch_scores"] == [0.5, 0.7, 0.6] and out["epochs_run"] == 3 and out["epoch_kept"] == 2
    assert out["steps"] == 12 and not torch.equal(weights[1], weights[2])
    assert torch.equal(snn.classifier.weight, weights[1])


def test_hidden_distill_adds_the_layers_relative_error_to_the_fine_tune(tmp_path):
    """--hidden_distill W: every encoder layer's hidden states are pulled toward the float ANN's. The term is
    0 for identical states and 1 for a zero student; with a learning rate too small to move the weights, the
    recorded loss grows by W times a positive layer error."""
    from text_cls.train import hidden_loss

    h = tuple(torch.randn(2, 5, 8) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert float(hidden_loss(h, h, mask)) == 0.0
    assert float(hidden_loss(tuple(torch.zeros_like(x) for x in h), h, mask)) == pytest.approx(1.0)
    noisy = tuple(x.clone() for x in h)
    noisy[1][0, 4] += 100.0  # a padded position does not count
    assert float(hidden_loss(noisy, h, mask)) == 0.0
    losses = first_losses(tmp_path, "hidden_distill", (0.0, 2.0), T=2)
    assert 0.0 < losses[2.0] - losses[0.0] < 2.0, losses


def test_site_report_says_which_sites_change_the_answers(selected, tmp_path):
    """bench.text_cls_sites: agreement with the saved weights' float version, every site kind and layer alone."""
    from bench.text_cls_sites import main as sites_main

    opts, _ = selected
    out = tmp_path / "sites.json"
    assert sites_main(["--run", opts.savedir, "-T", "8", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["sites"] == 10 and report["validation_samples"] > 0
    assert set(report["only_kind"]) == set(report["all_but_kind"]) == {
        "attention.self.query.site", "attention.self.p_site", "attention.output.dense.site",
        "intermediate.dense.site", "output.dense.site"}
    assert set(report["only_layer"]) == {"0", "1"}
    shares = [report["all_sites"], *report["only_kind"].values(), *report["only_layer"].values()]
    assert all(0.0 <= x <= 1.0 for x in shares)
    assert sites_main(["--run", opts.savedir, "--out", str(out)]) == 2  # exists: refused without --overwrite
