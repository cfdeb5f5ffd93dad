"""text_cls distillation options: the temperature, more unlabelled training samples, a weighted T cycle,
and the choice of per-T calibration by KL divergence from the float ANN."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_text_cls_data import save_tiny_bert, synthetic_rows, write_file
from tests.test_text_cls_select import FAST
from text_cls import TextClsOptions, run
from text_cls.data import load_splits
from text_cls.train import distill_loss

torch.set_num_threads(1)


def test_distill_temperature_softens_both_distributions_and_keeps_the_gradient_scale():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 3), torch.randn(8, 3), torch.randint(0, 3, (8,))
    assert torch.equal(distill_loss(s, t, y, 1.0, 1.0), distill_loss(s, t, y, 1.0))
    p = (t / 2).softmax(-1)
    kl = (p * (p.log() - (s / 2).log_softmax(-1))).sum(-1).mean()
    assert float(distill_loss(s, t, y, 1.0, 2.0)) == pytest.approx(4 * float(kl), rel=1e-5)
    assert float(distill_loss(t, t, y, 1.0, 3.0)) == pytest.approx(0.0, abs=1e-7)


def test_options_check_the_cycle_and_the_distillation_samples():
    assert TextClsOptions(progress=False).train_cycle == (4, 8, 16)
    assert TextClsOptions(progress=False, train_cycle=(8, 4, 8), coding="rate").to_dict()["train_cycle"] == [8, 4, 8]
    with pytest.raises(ValueError, match="T's of the sweep"):
        TextClsOptions(progress=False, train_cycle=(4, 32))
    with pytest.raises(ValueError, match="at least that many"):
        TextClsOptions(progress=False, max_train_samples=500, distill_samples=100)
    with pytest.raises(ValueError, match="select_by must be one of"):
        TextClsOptions(progress=False, select_by="accuracy")
    with pytest.raises(ValueError, match="distill_temperature"):
        TextClsOptions(progress=False, distill_temperature=0.0)


def test_distillation_samples_come_from_the_training_rows_the_subset_left_out(tmp_path):
    write_file(tmp_path / "train.csv", synthetic_rows(200, seed=2))
    write_file(tmp_path / "test.csv", synthetic_rows(40, seed=9))
    common = dict(train_file=str(tmp_path / "train.csv"), test_file=str(tmp_path / "test.csv"),
                  validation_fraction=0.1, seed=0, max_train_samples=50)
    plain = load_splits(**common)
    assert plain.distill_extra == [] and len(plain.train) == 50
    more = load_splits(**common, distill_samples=80)
    assert more.train == plain.train and len(more.distill_extra) == 30
    assert not set(more.distill_extra) & set(more.train) and not set(more.distill_extra) & set(more.validation)
    every = load_splits(**common, distill_samples="all")
    assert len(every.train) + len(every.distill_extra) == 200 - len(every.validation)
    assert every.describe()["sizes"]["distill_extra"] == len(every.distill_extra)
    assert load_splits(**common, distill_samples=80).distill_extra == more.distill_extra  # seeded


def test_a_run_distils_on_more_samples_with_a_weighted_cycle_and_chooses_by_kl(tmp_path):
    save_tiny_bert(tmp_path / "bert")
    write_file(tmp_path / "train.csv", synthetic_rows(240, seed=5))
    opts = TextClsOptions(train_file=str(tmp_path / "train.csv"), model_name=str(tmp_path / "bert"),
                          savedir=str(tmp_path / "run"), time_steps=(2, 8), time_step=8, sequential_samples=4,
                          max_train_samples=80, distill_samples=150, train_cycle=(2, 8, 8), select_by="kl",
                          distill_temperature=2.0, coding="rate", **FAST)
    results = run(opts)
    stages, qcfs = results["samples_per_stage"], results["training"]["qcfs"]
    assert stages["float_fine_tune"] == 80 and stages["qcfs_fine_tune"] == qcfs["samples"] == 150
    assert results["data"]["sizes"]["distill_extra"] == 70
    assert qcfs["timesteps"] == [2, 8, 8] and qcfs["temperature"] == 2.0
    for rows in results["calibration_selection"].values():
        chosen = [r for r in rows if r.get("chosen")]
        assert len(chosen) == 1 and chosen[0]["validation_kl_from_ann"] == min(r["validation_kl_from_ann"] for r in rows)
        assert all(r["validation_kl_from_ann"] >= 0.0 for r in rows)
    n = results["samples"]
    for row in results["per_T"]:  # the changed answers account for the accuracy difference and the agreement
        c = row["changed_answers"]
        assert c["gained"] - c["lost"] == round((row["acc_snn_parallel"] - results["acc_ann"]) * n)
        assert c["changed"] == round((1 - row["agreement_with_ann"]) * n) >= c["gained"] + c["lost"]
        assert sum(c["prediction_counts"]) == n and len(c["prediction_counts"]) == 3
    assert "changed answers: gained / lost" in (tmp_path / "run" / "results.md").read_text()


def _results(seed: int, ann: float, snn: dict, **options) -> dict:
    opts = {**TextClsOptions(progress=False).to_dict(), "seed": seed, "savedir": f"/tmp/r{seed}",
            "train_file": "/data/plays/train.csv", **options}
    return {"options": opts, "acc_ann": ann, "samples": 800, "seconds_total": 1.0,
            "data": {"source": {"dataset": "files", "train_file": "/data/plays/train.csv"}},
            "machine": {"device": "cpu"},
            "per_T": [{"T": T, "acc_snn_parallel": acc, "agreement_with_ann": 0.95} for T, acc in snn.items()]}


def test_seed_spread_groups_runs_by_data_and_options_and_counts_the_targets(tmp_path):
    from bench.text_cls_seeds import main as seeds_main
    from bench.text_cls_seeds import run_row, summarise, variant

    assert variant(TextClsOptions(progress=False, seed=3, threads=1).to_dict()) == ""
    assert variant(TextClsOptions(progress=False, train_cycle=(4, 8, 8, 16), coding="rate").to_dict()) == \
        "--coding rate --train_cycle 4,8,8,16"
    old = {k: v for k, v in TextClsOptions(progress=False, coding="rate").to_dict().items() if k != "coding"}
    assert variant(old) == "--coding rate"  # a run saved before the option: rate coding, its own defaults
    rows = [run_row(_results(0, 0.70, {4: 0.69, 8: 0.696}), "a"), run_row(_results(1, 0.70, {4: 0.67, 8: 0.69}), "b"),
            run_row(_results(0, 0.70, {4: 0.70, 8: 0.71}, select_by="kl"), "c")]
    groups = summarise(rows)
    assert [(g["data"], g["variant"], g["seeds"]) for g in groups] == [
        ("plays", "(defaults)", [0, 1]), ("plays", "--select_by kl", [0])]
    t8 = groups[0]["per_T"]["8"]
    assert t8["mean"] == pytest.approx(-0.7) and t8["min"] == pytest.approx(-1.0) and t8["target_met"] == 1
    assert groups[0]["per_T"]["4"]["target_met"] == 1 and groups[1]["per_T"]["8"]["target_met"] == 1
    for name, seed in (("a", 0), ("b", 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_results(seed, 0.7, {8: 0.7})))
    seeds_main(["--runs", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "s.json"),
                "--markdown", str(tmp_path / "s.md")])
    assert "| plays | (defaults) | 2 | 70.00% |" in (tmp_path / "s.md").read_text()
    with pytest.raises(SystemExit):
        seeds_main(["--runs", str(tmp_path), "--out", str(tmp_path / "t.json")])  # no results.json there
