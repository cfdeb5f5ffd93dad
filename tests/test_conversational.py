"""The conversational checks (stac_lm.conv_checks / conv_quality / conv_suite, test_conversational_snn.py)
on tiny converted models: they pass on a healthy model, and each fails on a model broken on purpose
(cache dropped, thresholds zeroed or sites silenced, positions reset per turn, T without effect)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny

from spike_modules import iter_sites, set_mode
from spike_modules.kv_cache import SpikeKVCache
from stac_lm import chat_segments, conv_checks, conv_masks, conv_quality, conv_suite
from stac_lm.options import ConvertOptions
from stac_lm.pipeline import run
from stac_lm.processor import TemporalSpikeProcessor
from stac_lm.saving import load_snn

REPO = Path(__file__).resolve().parents[1]
T = 8
# short conversations keep the tiny runs fast (the tiny tokenizer spends a token on every few letters)
SHORT_TURNS = [("user", "Hi! A trip to the hills next week?"), ("assistant", "Take boots."),
               ("user", "Alone?"), ("assistant", "With friends."), ("user", "And food?"), ("assistant", "Pasta.")]
SHORT_OPENERS = ["Hi!", "Good morning, a question on my garden.", "A poem?"]
EXACT = (conv_checks.cache_contract, conv_checks.turn_boundaries, conv_checks.context_limit, conv_masks.masks)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from threads, and spinning threads slow a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny Llama (rotary positions) and GPT-2 (learned positions) converted in full mode and saved."""
    out = {}
    for arch in ("llama", "gpt2"):
        base = tmp_path_factory.mktemp(arch)
        opts = ConvertOptions(model_name=str(save_tiny(base / "model", arch)), output_dir=str(base / "snn"),
                              calib_tokens=256, eval_tokens=512, verify=False, timesteps=T)
        run(opts, progress=False)
        out[arch] = opts.output_dir
    return out


@pytest.fixture(scope="module")
def models(saved):
    return {arch: load_snn(d)[:2] for arch, d in saved.items()}


@pytest.fixture(autouse=True)
def short_conversations(monkeypatch):
    monkeypatch.setattr(conv_checks, "THREE_TURNS", SHORT_TURNS)
    monkeypatch.setattr(conv_masks, "BATCH_OPENERS", SHORT_OPENERS)
    monkeypatch.setattr(conv_masks, "GREEDY_TOKENS", 4)


def processor(models, arch, exact=False):
    """The deployed (float32) processor, or (``exact``) one over a float64 copy, as the suite runs them."""
    snn, tok = models[arch]
    set_mode(snn, "parallel")
    proc = TemporalSpikeProcessor(snn, T, pad_token_id=0)
    return (conv_checks.exact_processor(proc) if exact else proc), tok


def rows_of(fn, proc, tok) -> dict:
    return {r["name"]: r for r in fn(proc, tok)[0]}


def failed(rows: dict) -> list[str]:
    return [n for n, r in rows.items() if r["passed"] is False]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_healthy_model_passes_every_check(models, arch):
    exact, tok = processor(models, arch, exact=True)
    proc, _ = processor(models, arch)
    for fn, p in [(fn, exact) for fn in EXACT] + [(conv_checks.cache_contract, proc), (conv_checks.spike_rates, proc)]:
        rows = rows_of(fn, p, tok)
        assert rows and not failed(rows), (fn.__name__, [rows[n] for n in failed(rows)])
        assert not p.conversations, "the checks clean up their conversations"
    assert any("(float64)" in n for n in rows_of(conv_masks.masks, exact, tok))


@pytest.fixture
def forgetful_cache(monkeypatch):
    """A cache that loses what it held: earlier tokens' keys and values read back as zeros."""
    update = SpikeKVCache.update

    def forgetful(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = (t.clone() for t in update(self, key_states, value_states, layer_idx, *args, **kwargs))
        n = key_states.shape[-2]
        keys[..., :-n, :], values[..., :-n, :] = 0, 0
        return keys, values

    monkeypatch.setattr(SpikeKVCache, "update", forgetful)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_dropped_cache_fails_the_cache_contract(models, arch, forgetful_cache):
    proc, tok = processor(models, arch, exact=True)
    bad = failed(rows_of(conv_checks.cache_contract, proc, tok))
    assert any("relative logit error" in n for n in bad), bad


def reset_positions_per_turn(model, monkeypatch):
    """``model`` fed positions that restart at 0 with every multi-token step (each turn's prompt)."""
    inner, offset = model.forward, {}

    def forward(*args, **kw):
        pos = kw.get("position_ids")
        if pos is not None:
            if pos.shape[1] > 1 or "at" not in offset:
                offset["at"] = pos[:, :1].clone()
            kw["position_ids"] = pos - offset["at"]
        return inner(*args, **kw)

    monkeypatch.setattr(model, "forward", forward)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_positions_reset_per_turn_fail_the_positions_check(models, arch, monkeypatch):
    proc, tok = processor(models, arch, exact=True)
    reset_positions_per_turn(proc.model, monkeypatch)
    bad = failed(rows_of(conv_checks.turn_boundaries, proc, tok))
    assert "turn boundaries vs one full pass (float64): relative logit error" in bad, bad
    assert any("relative logit error" in n for n in failed(rows_of(conv_checks.cache_contract, proc, tok)))


@pytest.fixture
def thresholds(models):
    """Restores the tiny Llama's thresholds after a test sets them."""
    snn = models["llama"][0]
    kept = {n: s.theta.detach().clone() for n, s in iter_sites(snn)}

    def set_all(value: float):
        for _, site in iter_sites(snn):
            site.theta.data.fill_(value)

    yield set_all
    for n, site in iter_sites(snn):
        site.theta.data.copy_(kept[n])


@pytest.mark.parametrize("theta, fails", [
    (0.0, {"every site fires", "no site saturates"}),   # zeroed: 0/0 and x/0, nothing sensible fires
    (1e6, {"every site fires", "T changes"}),           # silent: every count rounds to zero
    (1e-6, {"T changes"}),                              # bursts carry everything: quantization vanishes
])
def test_broken_thresholds_fail_the_spike_checks(models, thresholds, theta, fails):
    thresholds(theta)
    proc, tok = processor(models, "llama")
    bad = failed(rows_of(conv_checks.spike_rates, proc, tok))
    for what in fails:
        assert any(n.startswith(what) for n in bad), (theta, what, bad)


def test_timesteps_that_never_reach_the_sites_fail_the_timestep_check(models, monkeypatch):
    """The field's old failure: T set on the wrapper but never on the neurons."""
    proc, tok = processor(models, "llama")
    monkeypatch.setattr("stac_lm.processor.set_timesteps", lambda model, T: None)
    row = rows_of(conv_checks.spike_rates, proc, tok)
    change = next(r for n, r in row.items() if n.startswith("T changes"))
    assert change["passed"] is False and change["value"] == 0.0


def test_mask_violations_catch_gaps_and_lost_tokens():
    pos = lambda *rows: torch.tensor(rows)  # noqa: E731
    first = {"ids": torch.ones(2, 3, dtype=torch.long), "past": 0, "mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
             "positions": pos([0, 0, 1], [0, 1, 2])}
    good = {"ids": torch.ones(2, 1, dtype=torch.long), "past": 3, "mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]),
            "positions": pos([2], [3])}
    assert conv_masks.mask_violations([first, good], [3, 4]) == 0
    gap = dict(good, mask=torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1]]))           # a real token masked out
    skip = dict(good, positions=pos([3], [3]))                                  # a position skipped
    padded_in = dict(good, mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]]))     # a pad slot attended
    for broken in (gap, skip, padded_in):
        assert conv_masks.mask_violations([first, broken], [3, 4]) == 1
    assert conv_masks.mask_violations([first, good], [3, 5]) == 1             # a fed token never attended


CHATML = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<eos>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_segments_add_up_to_the_template_and_replies_end_with_eos(models):
    tok = models["llama"][1]
    msgs = conv_checks.messages(SHORT_TURNS)
    plain = chat_segments.segments(tok, msgs)
    assert [s.reply for s in plain] == [False, True] * 3
    assert tok.decode(torch.cat([s.ids for s in plain])).startswith("User: Hi! A trip")
    tok.chat_template = CHATML
    try:
        segs = chat_segments.segments(tok, msgs)
        whole = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids
    finally:
        tok.chat_template = None
    assert torch.cat([s.ids for s in segs]).tolist() == whole[:-1]  # the newline after the last reply is left out
    assert all(int(s.ids[-1]) == tok.eos_token_id for s in segs if s.reply)
    with pytest.raises(ValueError, match="alternate"):
        chat_segments.segments(tok, msgs[1:])


def test_quality_and_recall_rows_reply_by_reply(models, monkeypatch):
    monkeypatch.setattr(conv_quality, "FACTS", conv_quality.FACTS[:3])
    monkeypatch.setattr(conv_quality, "RECALL_NEW_TOKENS", 4)
    proc, tok = processor(models, "llama")
    # the SNN scored against itself as the "ANN": every figure is exact, so the rows show what they measure
    rows, measured = conv_quality.multi_turn_quality(proc, proc.model, tok, 2, "full")
    assert [t["agreement"] for t in measured["per_reply"]] == [1.0] * conv_quality.EXCHANGES
    ids = measured["conversation_ids"]
    assert len(ids) == 2 and ids == sorted(ids)
    names = [r["name"] for r in rows]
    assert sum(n.startswith("chit-chat reply") and "agreement" in n for n in names) == conv_quality.EXCHANGES
    assert measured["all_replies"]["agreement_one_pass"] == 1.0
    ratio = next(r for r in rows if r["name"].startswith("chit-chat all replies"))
    assert ratio["bar"] == "<= 1.3" and ratio["passed"] and abs(ratio["value"] - 1) < 1e-4
    rows, measured = conv_quality.recall(proc, proc.model, tok)
    assert len(measured["probes"]) == 3 and rows[0]["passed"]
    assert measured["recall_rate"]["snn"] == measured["recall_rate"]["ann"]
    assert not proc.conversations


def test_recall_span_is_the_fact(models):
    tok = models["llama"][1]
    msgs, answer, fact = conv_quality.probe(0)
    segs, span = conv_quality.fact_span(tok, msgs, answer, fact)
    ids = torch.cat([s.ids for s in segs])
    assert fact in tok.decode(ids[span]) and fact not in tok.decode(ids[span][1:])
    assert segs[-1].reply and fact not in tok.decode(ids[:span.start][-3:])


def cli(*args, cwd=REPO, timeout=240):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "test_conversational_snn.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_runs_a_group_and_writes_the_table(saved, tmp_path):
    out = tmp_path / "checks.json"
    p = cli("--test-positions", "--model_dir", saved["gpt2"], "--out", str(out), "--device", "cpu")
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["groups"] == ["positions"] and result["all_passed"] and result["timesteps"] == T
    assert {r["group"] for r in result["checks"]} == {"positions"}
    assert all({"name", "value", "bar", "passed", "detail"} <= set(r) for r in result["checks"])
    assert "PASS" in p.stdout and "every check passed" in p.stderr
    table = conv_suite.markdown_table(result).splitlines()
    assert len(table) == 2 + len(result["checks"]) and table[2].endswith("| PASS |")
    again = cli("--test_positions", "--model-dir", saved["gpt2"], "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.parametrize("args, message", [
    (["--model_dir", "/nonexistent/snn"], "no such directory"),
    (["--conversations", "x"], "invalid int value"),
    (["--test_everything"], "unrecognized arguments"),
    (["--timesteps", "0"], "between 1 and"),
    (["--conversations", "0"], "--conversations must be >= 1"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, message):
    p = cli(*args, "--out", str(tmp_path / "x.json"))
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.json").exists()


def test_cli_corrupt_directory_exits_2(tmp_path, capsys):
    import test_conversational_snn as cli_main  # in process: the subprocess tests above cover the real CLI

    bad = tmp_path / "snn"
    bad.mkdir()
    (bad / "config.json").write_text("{")
    with pytest.raises(SystemExit) as exit_:
        cli_main.main(["--model_dir", str(bad), "--test_masks", "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "missing snn_model.safetensors" in err and len(err.strip().splitlines()) == 1


def test_cli_default_conversion_is_the_one_make_chat_makes(tmp_path, monkeypatch):
    import test_conversational_snn as cli_main
    from stac_lm import pipeline

    seen = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "run", seen.append)
    args = cli_main.build_parser().parse_args(["--timesteps", "8", "--device", "cpu"])
    assert cli_main.converted_dir(args) == "out/chat_smollm2_T8"
    (opts,) = seen
    assert (opts.calib_text, opts.percentile, opts.timesteps, opts.simplified) == ("chitchat", 85.0, 8, False)
    (tmp_path / "out" / "chat_smollm2_T8").mkdir(parents=True)
    assert cli_main.converted_dir(args) == "out/chat_smollm2_T8" and len(seen) == 1  # reused, not converted again
