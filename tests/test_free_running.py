"""The validator's free-running fidelity gate (stac_lm.checks.free_running) on a tiny trained Llama: it
passes when the SNN writes what its reference writes, and fails on a degraded SNN (thresholds x10
and x1000) against its real ANN."""

import pytest
import torch

from spike_modules import iter_sites
from stac_lm.checks import free_running, suite
from stac_lm.generate.processor import TemporalSpikeProcessor
from stac_lm.io.saving import load_snn

T = 8
PROMPTS = ["Hi!", "Good morning, a question on my garden.", "A poem?", "What of the king?"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(trained_snn_dir):
    snn, tok, config = load_snn(trained_snn_dir)
    assert config["timesteps"] == T
    return snn, tok, suite.load_ann(config, torch.device("cpu"))


def rows_for(tok, ann):
    """The chit-chat prompts, and one question whose right answer is the first word of the ANN's reply."""
    rows = [{"kind": "chitchat", "text": t, "answers": None} for t in PROMPTS]
    first = tok.decode(free_running.greedy_reply(ann, free_running.chat_ids(tok, PROMPTS[0]), 8,
                                                  free_running.stop_ids(tok)), skip_special_tokens=True).split()
    rows.append({"kind": "question", "text": PROMPTS[0], "answers": first[:1]})
    return rows


def gate(snn, tok, reference):
    proc = TemporalSpikeProcessor(snn, T, pad_token_id=0)
    rows, measured = free_running.free_running(proc, reference, tok, rows_for(tok, reference), new_tokens=8)
    assert not proc.conversations  # every conversation the gate opened is closed again
    return {r["name"].split(":")[0]: r for r in rows}, measured


def scaled(snn, f):
    kept = {n: s.theta.detach().clone() for n, s in iter_sites(snn)}
    for n, s in iter_sites(snn):
        s.set_params(kept[n] * f, s.psi.detach().clone(), s.phi.detach().clone(), s.burst.detach().clone())
    return kept


def test_the_snn_against_itself_passes_every_row(trained):
    snn, tok, _ = trained
    rows, measured = gate(snn, tok, snn)  # the SNN in parallel mode, decoded with its own cache, is the reference
    assert measured["identity"] == 1.0 and measured["kept_ann_correct"] == 1.0
    assert all(r["passed"] for r in rows.values()), rows
    assert len(measured["prompts"]) == len(PROMPTS) + 1


@pytest.mark.parametrize("factor", [10.0, 1000.0])
def test_a_degraded_snn_fails_the_identity_row_against_its_real_ann(trained, factor):
    snn, tok, ann = trained
    kept = scaled(snn, factor)
    try:
        rows, measured = gate(snn, tok, ann)
    finally:
        for n, s in iter_sites(snn):
            s.set_params(kept[n], s.psi.detach().clone(), s.phi.detach().clone(), s.burst.detach().clone())
    row = rows["free-running replies"]
    assert row["passed"] is False and measured["identity"] < free_running.IDENTITY_MIN, row


def test_the_gate_is_part_of_the_validator():
    assert "fidelity" in suite.GROUPS


def test_no_prompts_is_refused(trained):
    snn, tok, ann = trained
    with pytest.raises(ValueError, match="at least one prompt"):
        free_running.free_running(TemporalSpikeProcessor(snn, T, pad_token_id=0), ann, tok, [])
