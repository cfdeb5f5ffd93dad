"""The conversational checks (stac_lm.checks.conversation / quality / suite, test_conversational_snn.py)
on tiny converted models: they pass on a healthy model, and each fails on a model broken on purpose
(cache zeroed, or zeroed at each new turn; thresholds zeroed, x10 or x1000; sites passing float
through; positions reset per turn; the attention mask ignored; T without effect; a different-seed
"ANN" or one that recalls what the SNN cannot). Quality rows are scored against the model's real
source ANN, on a tiny Llama trained for a few seconds (``trained_tiny``: on a random one a silent
SNN agrees with its ANN)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny, tiny_model

from calibration import CalibrationConfig
from spike_modules import iter_sites, set_mode
from spike_modules.kv_cache import SpikeKVCache
from spike_modules.site import DAQCFSSite
from stac_lm.chat import segments
from stac_lm.checks import conversation, masks, quality, suite
from stac_lm.convert.options import ConvertOptions
from stac_lm.convert.pipeline import run
from stac_lm.generate.processor import TemporalSpikeProcessor
from stac_lm.io.saving import load_snn

REPO = Path(__file__).resolve().parents[1]
T = 8
# short conversations keep the tiny runs fast (the tiny tokenizer spends a token on every few letters)
SHORT_TURNS = [("user", "Hi! A trip to the hills next week?"), ("assistant", "Take boots."),
               ("user", "Alone?"), ("assistant", "With friends."), ("user", "And food?"), ("assistant", "Pasta.")]
SHORT_OPENERS = ["Hi!", "Good morning, a question on my garden.", "A poem?"]
EXACT = (conversation.cache_contract, conversation.turn_boundaries, conversation.context_limit, masks.masks)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny Llama (rotary positions) and GPT-2 (learned positions) converted in full mode and saved."""
    out = {}
    for arch in ("llama", "gpt2"):
        base = tmp_path_factory.mktemp(arch)
        opts = ConvertOptions(model_name=str(save_tiny(base / "model", arch)), output_dir=str(base / "snn"),
                              calib_tokens=256, eval_tokens=512, verify=False, timesteps=T, coding="rate")
        run(opts, progress=False)
        out[arch] = opts.output_dir
    return out


@pytest.fixture(scope="module")
def models(saved):
    return {arch: load_snn(d)[:2] for arch, d in saved.items()}


@pytest.fixture(scope="module")
def calibrations(saved):
    return {arch: CalibrationConfig(**load_snn(d)[2]["calibration_config"]) for arch, d in saved.items()}


@pytest.fixture(scope="module")
def trained(trained_snn_dir):
    """The trained tiny Llama converted in full mode at T: ``(snn, tokenizer, ann, calibration config)``."""
    snn, tok, config = load_snn(trained_snn_dir)
    assert config["timesteps"] == T
    return snn, tok, suite.load_ann(config, torch.device("cpu")), CalibrationConfig(**config["calibration_config"])


@pytest.fixture(autouse=True)
def short_conversations(monkeypatch):
    monkeypatch.setattr(conversation, "THREE_TURNS", SHORT_TURNS)
    monkeypatch.setattr(masks, "BATCH_OPENERS", SHORT_OPENERS)
    monkeypatch.setattr(masks, "GREEDY_TOKENS", 4)


def processor(models, arch, exact=False):
    """The deployed (float32) processor, or (``exact``) one over a float64 copy, as the suite runs them."""
    snn, tok = models[arch]
    set_mode(snn, "parallel")
    proc = TemporalSpikeProcessor(snn, T, pad_token_id=0)
    return (conversation.exact_processor(proc) if exact else proc), tok


def rows_of(fn, proc, tok) -> dict:
    return {r["name"]: r for r in fn(proc, tok)[0]}


def failed(rows: dict) -> list[str]:
    return [n for n, r in rows.items() if r["passed"] is False]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_healthy_model_passes_every_check(models, calibrations, arch):
    exact, tok = processor(models, arch, exact=True)
    proc, _ = processor(models, arch)
    spikes = lambda p, t: conversation.spike_rates(p, t, calibrations[arch])  # noqa: E731
    for fn, p in [(fn, exact) for fn in EXACT] + [(conversation.cache_contract, proc), (spikes, proc)]:
        rows = rows_of(fn, p, tok)
        assert rows and not failed(rows), (fn, [rows[n] for n in failed(rows)])
        assert not p.conversations, "the checks clean up their conversations"
    assert any("(float64)" in n for n in rows_of(masks.masks, exact, tok))
    assert any(n.startswith("site activity matches calibration") for n in rows_of(spikes, proc, tok))


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
    bad = failed(rows_of(conversation.cache_contract, proc, tok))
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
    bad = failed(rows_of(conversation.turn_boundaries, proc, tok))
    assert "turn boundaries vs one full pass (float64): relative logit error" in bad, bad
    assert any("relative logit error" in n for n in failed(rows_of(conversation.cache_contract, proc, tok)))


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
    bad = failed(rows_of(conversation.spike_rates, proc, tok))
    for what in fails:
        assert any(n.startswith(what) for n in bad), (theta, what, bad)


def test_timesteps_that_never_reach_the_sites_fail_the_timestep_check(models, monkeypatch):
    """The field's old failure: T set on the wrapper but never on the neurons."""
    proc, tok = processor(models, "llama")
    monkeypatch.setattr("stac_lm.generate.processor.set_timesteps", lambda model, T: None)
    row = rows_of(conversation.spike_rates, proc, tok)
    change = next(r for n, r in row.items() if n.startswith("T changes"))
    assert change["passed"] is False and change["value"] == 0.0


def test_mask_violations_catch_gaps_and_lost_tokens():
    pos = lambda *rows: torch.tensor(rows)  # noqa: E731
    first = {"ids": torch.ones(2, 3, dtype=torch.long), "past": 0, "mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
             "positions": pos([0, 0, 1], [0, 1, 2])}
    good = {"ids": torch.ones(2, 1, dtype=torch.long), "past": 3, "mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]),
            "positions": pos([2], [3])}
    assert masks.mask_violations([first, good], [3, 4]) == 0
    gap = dict(good, mask=torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1]]))           # a real token masked out
    skip = dict(good, positions=pos([3], [3]))                                  # a position skipped
    padded_in = dict(good, mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]]))     # a pad slot attended
    for broken in (gap, skip, padded_in):
        assert masks.mask_violations([first, broken], [3, 4]) == 1
    assert masks.mask_violations([first, good], [3, 5]) == 1             # a fed token never attended


CHATML = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<eos>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_segments_add_up_to_the_template_and_replies_end_with_eos(models):
    tok = models["llama"][1]
    msgs = conversation.messages(SHORT_TURNS)
    plain = segments.segments(tok, msgs)
    assert [s.reply for s in plain] == [False, True] * 3
    assert tok.decode(torch.cat([s.ids for s in plain])).startswith("User: Hi! A trip")
    tok.chat_template = CHATML
    try:
        segs = segments.segments(tok, msgs)
        whole = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids
    finally:
        tok.chat_template = None
    assert torch.cat([s.ids for s in segs]).tolist() == whole[:-1]  # the newline after the last reply is left out
    assert all(int(s.ids[-1]) == tok.eos_token_id for s in segs if s.reply)
    with pytest.raises(ValueError, match="alternate"):
        segments.segments(tok, msgs[1:])


def scale_thresholds(snn, f: float) -> dict:
    kept = {n: s.theta.detach().clone() for n, s in iter_sites(snn)}
    for n, s in iter_sites(snn):
        s.set_params(kept[n] * f, s.psi.detach().clone(), s.phi.detach().clone(), s.burst.detach().clone())
    return kept


def restore_thresholds(snn, kept: dict) -> None:
    for n, s in iter_sites(snn):
        s.set_params(kept[n], s.psi.detach().clone(), s.phi.detach().clone(), s.burst.detach().clone())


def test_thresholds_x10_fail_the_activity_row(trained):
    snn, tok, _, calib = trained
    kept = scale_thresholds(snn, 10.0)
    try:
        rows = {r["name"]: r for r in conversation.spike_rates(TemporalSpikeProcessor(snn, T), tok, calib)[0]}
    finally:
        restore_thresholds(snn, kept)
    bad = failed(rows)
    assert any(n.startswith("site activity matches calibration") for n in bad), bad
    assert not any(n.startswith("every site fires") for n in bad)  # what let x10 through before


def test_float_pass_through_fails_the_spike_rate_rows(trained, monkeypatch):
    snn, tok, _, calib = trained
    inner = DAQCFSSite.forward
    monkeypatch.setattr(DAQCFSSite, "forward", lambda self, x: (inner(self, x), x)[1])
    bad = failed({r["name"]: r for r in conversation.spike_rates(TemporalSpikeProcessor(snn, T), tok, calib)[0]})
    assert any(n.startswith("no site passes float through") for n in bad), bad
    assert any(n.startswith("T changes") for n in bad), bad


def test_a_forgetful_cache_fails_the_float32_top1_row(trained, forgetful_cache):
    snn, tok, _, _ = trained
    rows = rows_of(conversation.cache_contract, TemporalSpikeProcessor(snn, T), tok)
    assert all("(float32)" in n for n in rows)
    assert [n for n in failed(rows) if n.endswith("top-1 equal")], rows  # measured 0.61 (bar 0.75)


def test_a_garbled_cache_fails_both_float32_rows(trained, monkeypatch):
    """The float32 relative-error bar (0.5) sits above what rounding does to SmolLM2 (~0.2); on this tiny
    model a forgetful cache moves the logits by 0.17 only, so the row is shown to fail on a cache whose
    earlier entries read back as noise (measured 0.53; healthy: 0.0)."""
    snn, tok, _, _ = trained
    update = SpikeKVCache.update

    def garbled(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = (t.clone() for t in update(self, key_states, value_states, layer_idx, *args, **kwargs))
        n, g = key_states.shape[-2], torch.Generator().manual_seed(0)
        for t in (keys, values):
            t[..., :-n, :] = torch.randn(t[..., :-n, :].shape, generator=g, dtype=t.dtype) * t.std() * 3
        return keys, values

    monkeypatch.setattr(SpikeKVCache, "update", garbled)
    rows = rows_of(conversation.cache_contract, TemporalSpikeProcessor(snn, T), tok)
    assert set(failed(rows)) == set(rows) and all("(float32)" in n for n in rows), rows


@pytest.fixture
def cache_zeroed_each_turn(monkeypatch):
    """A cache that forgets earlier turns: a multi-token step (a turn's prompt) zeroes what was held."""
    update = SpikeKVCache.update

    def zeroing(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = (t.clone() for t in update(self, key_states, value_states, layer_idx, *args, **kwargs))
        n = key_states.shape[-2]
        if n > 1:
            keys[..., :-n, :], values[..., :-n, :] = 0, 0
        return keys, values

    monkeypatch.setattr(SpikeKVCache, "update", zeroing)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_cache_zeroed_between_turns_fails_cache_and_boundary_rows(models, arch, cache_zeroed_each_turn):
    proc, tok = processor(models, arch, exact=True)
    assert any("relative logit error" in n for n in failed(rows_of(conversation.cache_contract, proc, tok)))
    assert "turn boundaries vs one full pass (float64): relative logit error" in \
        failed(rows_of(conversation.turn_boundaries, proc, tok))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_an_ignored_attention_mask_fails_the_mask_rows(models, arch, monkeypatch):
    proc, tok = processor(models, arch, exact=True)
    inner = proc.model.forward

    def maskless(*args, **kw):
        kw.pop("attention_mask", None)
        return inner(*args, **kw)

    monkeypatch.setattr(proc.model, "forward", maskless)
    bad = failed(rows_of(masks.masks, proc, tok))
    assert "batched (left-padded) vs alone (float64): relative logit error" in bad, bad


def quality_rows(proc, ann, tok, n=2) -> tuple[dict, dict]:
    rows, measured = quality.multi_turn_quality(proc, ann, tok, n, "full")
    return {r["name"]: r for r in rows}, measured


def ratio_row(rows: dict) -> dict:
    return next(r for n, r in rows.items() if n.startswith("chit-chat all replies: perplexity"))


def agreement_rows(rows: dict) -> list[dict]:
    return [r for n, r in rows.items() if n.startswith("chit-chat reply") and "agreement" in n]


# at T=8 the converter issue names a perplexity bar only; this agreement bar lets the test see the agreement
# rows judge (measured per reply: healthy trained tiny model 0.84-0.89 against its ANN, 0.03-0.08 against a
# different-seed ANN)
TINY_AGREEMENT_BAR = 0.6


def test_quality_rows_score_the_snn_against_its_real_ann(trained, monkeypatch):
    snn, tok, ann, _ = trained
    monkeypatch.setitem(quality.TARGETS, T, {"ppl_ratio": 1.30, "agreement": TINY_AGREEMENT_BAR})
    proc = TemporalSpikeProcessor(snn, T, pad_token_id=0)
    rows, measured = quality_rows(proc, ann, tok)
    assert not failed(rows), [rows[n] for n in failed(rows)]
    ids = measured["conversation_ids"]
    assert len(ids) == 2 and ids == sorted(ids)
    assert len(agreement_rows(rows)) == quality.EXCHANGES
    ratio = ratio_row(rows)
    assert ratio["bar"] == "<= 1.3" and ratio["value"] != 1.0  # a measurement against another network
    total = measured["all_replies"]
    assert ratio["value"] == pytest.approx(total["ppl_snn"] / total["ppl_ann"])
    assert not proc.conversations


def test_a_different_seed_ann_fails_the_agreement_rows(trained, monkeypatch):
    snn, tok, _, _ = trained
    monkeypatch.setitem(quality.TARGETS, T, {"ppl_ratio": 1.30, "agreement": TINY_AGREEMENT_BAR})
    other = tiny_model("llama", len(tok), seed=1)
    rows, _ = quality_rows(TemporalSpikeProcessor(snn, T, pad_token_id=0), other, tok)
    assert all(r["passed"] is False for r in agreement_rows(rows)), agreement_rows(rows)


def test_thresholds_x1000_fail_the_perplexity_row(trained, monkeypatch):
    snn, tok, ann, _ = trained
    kept = scale_thresholds(snn, 1000.0)
    try:
        rows, _ = quality_rows(TemporalSpikeProcessor(snn, T, pad_token_id=0), ann, tok)
    finally:
        restore_thresholds(snn, kept)
    assert ratio_row(rows)["passed"] is False, ratio_row(rows)


def test_recall_rows_against_the_real_ann_and_an_ann_that_recalls(trained, monkeypatch):
    snn, tok, ann, _ = trained
    monkeypatch.setattr(quality, "FACTS", quality.FACTS[:3])
    monkeypatch.setattr(quality, "RECALL_NEW_TOKENS", 4)
    proc = TemporalSpikeProcessor(snn, T, pad_token_id=0)
    rows, measured = quality.recall(proc, ann, tok)
    assert len(measured["probes"]) == 3 and rows[0]["passed"], rows[0]
    assert all(p["ann"]["reply"] != p["snn"]["reply"] or p["ann"]["fact_logprob"] != p["snn"]["fact_logprob"]
               for p in measured["probes"])  # two networks, not one scored against itself
    assert not measured["recall_rate"]["snn"]  # a tiny model recalls nothing: the next test gives it a rival

    def recalling_ann(model, ids, new_tokens, stop):  # an "ANN" whose greedy reply names the probe's facts
        facts = next(f for f in quality.FACTS if f[0] in tok.decode(ids))
        return tok(" " + " ".join(facts), add_special_tokens=False).input_ids

    monkeypatch.setattr(quality, "ann_greedy", recalling_ann)
    rows, measured = quality.recall(proc, ann, tok)
    assert measured["recall_rate"]["ann"] == 1.0 and rows[0]["passed"] is False, rows[0]
    assert not proc.conversations


def test_recall_span_is_the_fact(models):
    tok = models["llama"][1]
    msgs, answer, fact = quality.probe(0)
    segs, span = quality.fact_span(tok, msgs, answer, fact)
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
    table = suite.markdown_table(result).splitlines()
    assert len(table) == 2 + len(result["checks"]) and table[2].endswith("| PASS |")
    again = cli("--test_positions", "--model-dir", saved["gpt2"], "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.parametrize("args, message", [
    (["--model_dir", "/nonexistent/snn"], "no such directory"),
    (["--conversations", "x"], "invalid int value"),
    (["--test_everything"], "unrecognized arguments"),
    (["--timesteps", "0"], "between 1 and"),
    (["--conversations", "0"], "--conversations must be >= 1"),
    (["--max_memory", "cpu=lots"], "not a size"),
    (["--max_memory", "0=6GiB"], "on the CPU only"),
    (["--max_memory", "cpu=6GiB", "--device", "cuda"], "on the CPU only"),
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
    from stac_lm.convert import pipeline

    seen = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "run", seen.append)
    args = cli_main.build_parser().parse_args(["--timesteps", "8", "--device", "cpu"])
    assert cli_main.converted_dir(args) == "out/chat_smollm2_T8"
    (opts,) = seen
    assert (opts.calib_text, opts.percentile, opts.timesteps, opts.simplified, opts.coding) == \
        ("chitchat", 99.9, 8, False, "weighted")
    (tmp_path / "out" / "chat_smollm2_T8").mkdir(parents=True)
    assert cli_main.converted_dir(args) == "out/chat_smollm2_T8" and len(seen) == 1  # reused, not converted again


def test_cli_exits_1_and_names_the_check_on_pass_through_sites(saved, tmp_path, monkeypatch, capsys):
    import test_conversational_snn as cli_main  # in process, so the broken site reaches the CLI's model

    inner = DAQCFSSite.forward
    monkeypatch.setattr(DAQCFSSite, "forward", lambda self, x: (inner(self, x), x)[1])
    code = cli_main.main(["--test_spike_rates", "--model_dir", saved["llama"], "--out", str(tmp_path / "c.json"),
                          "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "FAILED:" in err and "no site passes float through" in err, err
