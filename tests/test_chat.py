"""chat.py: the REPL typed at through a pseudo-terminal, and the turn logic behind it
(chat template fed incrementally, streaming, :set, the ANN's cached loop)."""

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
import torch
from tiny_models import save_tiny, tiny_model
from transformers import AutoTokenizer

import chat
from stac_lm.chat.engines import ANNEngine, Reply, open_engine
from stac_lm.chat.format import ChatFormat
from stac_lm.chat.session import PROMPT, ChatSession, Settings, _Stream
from stac_lm.convert.options import ConvertOptions
from stac_lm.convert.pipeline import run
from stac_lm.generate.sampling import SamplingConfig

ROOT = Path(__file__).resolve().parents[1]
# ChatML as SmolLM2 writes it, without its default system message
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def snn_dir(tmp_path_factory):
    """A tiny llama converted in simplified mode at T=8 (no chat template: the plain format)."""
    base = tmp_path_factory.mktemp("chat")
    opts = ConvertOptions(model_name=str(save_tiny(base / "model", "llama")), output_dir=str(base / "snn"),
                          calib_tokens=256, eval_tokens=512, verify=False, timesteps=8, simplified=True)
    run(opts, progress=False)
    return base / "snn"


@pytest.fixture
def tiny_tok(snn_dir):
    return AutoTokenizer.from_pretrained(str(snn_dir))  # the tokenizer sits beside the weights


def chatml_tok(tok):
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML
    return tok


def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (ChatML template, eos <|im_end|>): the cached copy, else the GGUF."""
    from stac_common.assets import MissingAssetError, smollm2_cache, smollm2_gguf

    cached = smollm2_cache()
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    try:
        gguf = smollm2_gguf()
    except MissingAssetError as e:  # the asset package is pinned and installed by make setup: a broken install
        pytest.fail(f"{e} (run `make setup`)")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def converse(fmt, tok, users, replies):
    """Feed a conversation turn by turn as the REPL does; the replies come back as canonical token
    ids ending with the end-of-turn token. Returns the token stream fed and the turns."""
    stream, turns = [], []
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for user, reply in zip(users, replies):
        turn = fmt.prepare(user)
        turns.append(turn)
        reply_ids = tok.encode(reply, add_special_tokens=False) + [end]
        stream += fmt.encode(turn.text) + reply_ids
        assert fmt.commit(turn, reply_ids) == reply
    return stream, turns


# -- chat template, fed one turn at a time ------------------------------------------------------

USERS = ["Hi! Who are you?", "What is 2 + 2?", "Thanks, bye."]
REPLIES = ["I am a small model.", "It is 4.", "Goodbye, friend!"]


@pytest.mark.parametrize("system", [None, "You answer briefly."])
def test_smollm2_turns_fed_one_by_one_equal_the_whole_conversation(system):
    tok = smollm2_tokenizer()
    fmt = ChatFormat(tok, system)
    stream, turns = converse(fmt, tok, USERS, REPLIES)
    messages = ([{"role": "system", "content": system}] if system else [])
    for u, r in zip(USERS, REPLIES):
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": r}]
    whole = tok.apply_chat_template(messages, tokenize=False)
    assert stream == tok.encode(whole, add_special_tokens=False)[:len(stream)]
    assert whole.startswith(fmt.fed) and whole[len(fmt.fed):] == "\n"  # the template's tail of the last reply: fed with the next turn
    assert not any(t.restart for t in turns)
    assert turns[1].text.startswith("\n<|im_start|>user\n") and turns[1].text.endswith("<|im_start|>assistant\n")
    assert (system or "SmolLM") in turns[0].text  # no system given: the template's own default
    assert fmt.stop_ids == {tok.convert_tokens_to_ids("<|im_end|>")}


def test_chatml_on_tiny_tokenizer(tiny_tok):
    tok = chatml_tok(tiny_tok)
    fmt = ChatFormat(tok)
    stream, turns = converse(fmt, tok, USERS, REPLIES)
    whole = tok.apply_chat_template(
        [m for u, r in zip(USERS, REPLIES) for m in ({"role": "user", "content": u},
                                                    {"role": "assistant", "content": r})], tokenize=False)
    assert stream == tok.encode(whole, add_special_tokens=False)[:len(stream)] and len(stream) == len(
        tok.encode(whole, add_special_tokens=False)) - 1  # all but the final "\n"
    assert {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id} <= fmt.stop_ids
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert fmt.reply_text(tok.encode("It is 4.", add_special_tokens=False) + [end]) == "It is 4."
    assert fmt.history() == [(role, text) for u, r in zip(USERS, REPLIES) for role, text in (("user", u),
                                                                                           ("assistant", r))]


def test_reply_cut_short_gets_the_template_tail_next_turn(tiny_tok):
    fmt = ChatFormat(chatml_tok(tiny_tok))
    turn = fmt.prepare("Tell me a story.")
    fmt.commit(turn, fmt.encode("Once upon"))  # max_new_tokens hit: no end-of-turn token
    assert fmt.prepare("Go on.").text == "<|im_end|>\n<|im_start|>user\nGo on.<|im_end|>\n<|im_start|>assistant\n"


def test_template_that_rewrites_old_turns_starts_over(tiny_tok):
    tok = chatml_tok(tiny_tok)
    tok.chat_template = CHATML.replace("message['content']", "message['content'] | trim")
    fmt = ChatFormat(tok)
    fmt.commit(fmt.prepare("Hi"), fmt.encode(" Hello") + [tok.convert_tokens_to_ids("<|im_end|>")])
    turn = fmt.prepare("Again")  # the template trims the fed " Hello": what was fed is no prefix
    assert turn.restart and turn.text == turn.rendered and turn.text.startswith("<|im_start|>user\nHi")


def test_template_refusing_a_system_message_is_a_clear_error(tiny_tok):
    tok = chatml_tok(tiny_tok)
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" \
        + CHATML
    with pytest.raises(ValueError, match="system"):
        ChatFormat(tok, system="Be nice.")


def test_plain_format_without_template(tiny_tok):
    fmt = ChatFormat(tiny_tok)
    newline = [i for i in range(len(tiny_tok)) if "\n" in tiny_tok.decode([i])]
    assert not fmt.templated and newline and set(newline) | {tiny_tok.eos_token_id} == fmt.stop_ids
    turn = fmt.prepare("Hello there")
    assert turn.text == "User: Hello there\nAssistant:"
    reply = fmt.encode(" Fine, and you?") + fmt.encode("\n")
    assert fmt.reply_text(reply) == " Fine, and you?"
    fmt.commit(turn, reply)
    assert fmt.prepare("Good.").text == "User: Good.\nAssistant:"  # the reply's own newline ends its line
    fmt.commit(fmt.prepare("Good."), fmt.encode(" Yes"))  # cut short: the template closes the line
    assert fmt.prepare("And?").text == "\nUser: And?\nAssistant:"
    assert fmt.history()[-1] == ("assistant", "Yes")


def test_stream_prints_whole_characters_only(tiny_tok):
    fmt = ChatFormat(chatml_tok(tiny_tok))
    text = " café 😀 ok"
    ids = fmt.encode(text)
    assert any("\ufffd" in fmt.decode([i]) for i in ids), "the test needs characters split over several tokens"
    out = io.StringIO()
    stream = _Stream(fmt, out)
    pieces = []
    for tok in ids:
        before = out.tell()
        stream(tok)
        pieces.append(out.getvalue()[before:])
    assert "\ufffd" not in out.getvalue() and out.getvalue() == text.lstrip()
    assert sum(1 for p in pieces if p) > 3  # printed as it came, not at the end


# -- the session's commands without a model -------------------------------------------------------

class FakeEngine:
    """Replies with fixed tokens; with ``interrupt_after``, raises Ctrl-C after that many tokens."""

    kind, limit, T, last = "snn", 512, 8, None

    def __init__(self, reply, interrupt_after=None):
        self.reply, self.interrupt_after, self.fed, self.resets = reply, interrupt_after, [], 0

    def set_timesteps(self, T):
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        self.T = T

    def reset(self):
        self.resets += 1

    def generate(self, ids, max_new_tokens, sampling, stops, on_token):
        self.fed.append((ids, max_new_tokens, sampling))
        for i, tok in enumerate(self.reply[:max_new_tokens]):
            if i == self.interrupt_after:
                raise KeyboardInterrupt
            on_token(tok)
        return Reply(self.reply[:max_new_tokens], "max_new_tokens", 0)


def session(tok, engine, **settings):
    out = io.StringIO()
    return ChatSession(engine, ChatFormat(tok), Settings(**settings), out), out


def test_set_changes_sampling_and_T(tiny_tok):
    s, out = session(tiny_tok, FakeEngine(tiny_tok.encode(" ok\n")))
    s.handle(":set temperature=0.7 top_k=50 top_p=0.9 seed=1 max_new_tokens=64 T=4")
    assert s.settings.sampling() == SamplingConfig(True, 0.7, 50, 0.9, 1) and s.engine.T == 4
    s.handle("hi")
    assert s.engine.fed[-1][1] == 64 and s.engine.fed[-1][2].do_sample
    s.handle(":set temperature=0 seed=none")
    assert s.settings.sampling() == SamplingConfig(False, 1.0, 50, 0.9, None)
    for bad, says in [(":set top_p=2", "top_p"), (":set temperature=-1", "temperature"), (":set T=0", "T must"),
                      (":set T=x", "bad value for T"), (":set foo=1", "settable: T, temperature"), (":set", "usage")]:
        before = (s.settings, s.engine.T)
        s.handle(bad)
        assert says in out.getvalue().splitlines()[-1] and (s.settings, s.engine.T) == before, bad
    s.handle(":nope")
    assert "unknown command :nope" in out.getvalue()


def test_interrupted_reply_is_kept_and_session_goes_on(tiny_tok):
    engine = FakeEngine(tiny_tok.encode(" one two three four\n"), interrupt_after=2)
    s, out = session(tiny_tok, engine)
    s.handle("count")
    assert "stopped by Ctrl-C" in out.getvalue()
    assert s.fmt.history() == [("user", "count"), ("assistant", tiny_tok.decode(engine.reply[:2]).strip())]
    engine.interrupt_after = None
    s.handle("again")
    assert engine.fed[-1][0] == s.fmt.encode("\nUser: again\nAssistant:")  # the cut reply's line is closed first
    s.handle(":reset")
    assert engine.resets == 1 and s.fmt.history() == []


def test_dropped_turns_and_restarts_are_told(tiny_tok):
    tok = chatml_tok(tiny_tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    engine = FakeEngine(tok.encode(" Hello", add_special_tokens=False) + [end])
    engine.generate = lambda *a, gen=engine.generate: Reply(gen(*a).tokens, "stop_token", 1)  # 1 turn dropped
    s, out = session(tok, engine)
    s.handle("Hi")
    assert "no longer sees the 1 oldest turn(s)" in out.getvalue() and engine.resets == 0
    s.handle(":history")
    assert "(the model no longer sees the 1 oldest turn(s): context limit)" in out.getvalue()
    s.fmt.template = CHATML.replace("message['content']", "message['content'] | trim")
    s.handle("Again")  # the template now rewrites the fed " Hello": the engine starts over with everything
    assert engine.resets == 1 and tok.decode(engine.fed[-1][0]).startswith("<|im_start|>user\nHi<|im_end|>")


def test_bad_settings_on_the_command_line_exit_2(tmp_path, capsys):
    for flags, says in [(["--temperature", "-1"], "temperature"), (["--top_p", "0"], "top_p"),
                        (["--max_new_tokens", "0"], "max_new_tokens"), (["--max_context_length", "1"], "context"),
                        (["--ann", "--float_weights"], "float already")]:
        with pytest.raises(SystemExit) as exit_:
            chat.main(["--model_dir", str(tmp_path), *flags])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and says in err, (flags, err)


def test_ann_engine_cached_loop_matches_recomputing(tiny_tok):
    """Two turns through the ANN engine's KV cache give the tokens a full recomputation picks."""
    model = tiny_model("llama", len(tiny_tok))
    engine = ANNEngine(model, 256)
    greedy, context = SamplingConfig(), []
    for text in ["User: Hello\nAssistant:", "\nUser: More\nAssistant:"]:
        ids = tiny_tok.encode(text)
        reply = engine.generate(ids, 6, greedy, frozenset(), lambda t: None)
        context += ids
        expect = []
        with torch.no_grad():
            for _ in range(6):
                expect.append(int(model(torch.tensor([context + expect])).logits[0, -1].argmax()))
        assert reply.tokens == expect and reply.stop_reason == "max_new_tokens"
        context += expect
    assert engine.last.tokens == 6 and engine.last.spike_rates is None and engine.last.energy_pj > 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_ann_runs_in_the_dtype_asked_and_the_snn_refuses_it(snn_dir, dtype):
    """--dtype casts the original network (--ann); the SNN stays float32, where its spike counts are exact."""
    engine, tok, _ = open_engine(str(snn_dir), "cpu", None, 256, ann=True, dtype=dtype)
    assert {p.dtype for p in engine.model.parameters()} == {getattr(torch, dtype)}
    sampling = SamplingConfig(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=1)
    reply = engine.generate(tok.encode("User: Hello\nAssistant:"), 4, sampling, frozenset(), lambda t: None)
    assert len(reply.tokens) == 4 and engine.last.energy_pj > 0
    with pytest.raises(ValueError, match="the SNN runs in float32 only"):
        open_engine(str(snn_dir), "cpu", None, 256, ann=False, dtype=dtype)


# -- chat.py through a pseudo-terminal ------------------------------------------------------------

def spawn(*args, timeout=90):
    env = {**os.environ, "TERM": "dumb", "PYTHONPATH": str(ROOT)}
    # a suite started in the background (``make test &``) ignores SIGINT, and a child inherits that:
    # give chat.py the default disposition a terminal user's shell gives it, so Ctrl-C reaches it
    child = pexpect.spawn(sys.executable, [str(ROOT / "chat.py"), *args], cwd=str(ROOT), env=env,
                          encoding="utf-8", timeout=timeout, dimensions=(50, 250),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # start-up imports torch, transformers and SpikingJelly: slow on a loaded 2-core machine, so it
    # gets a wider bound than each reply (a bound against hangs, not a speed test)
    child.expect_exact(PROMPT, timeout=max(timeout, 300))
    return child


def ask(child, line: str) -> str:
    """Type a line; return what came back before the next prompt."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before


def wait_for_input(child, bound: float = 60.0) -> None:
    """Return once the child sleeps in select()/poll() waiting for the terminal. A Ctrl-C that lands
    after the prompt is written but before readline blocks in select() is only seen at the next key
    (CPython checks signals when select() is interrupted), so an interrupt sent the instant the
    prompt shows can be lost on a loaded machine; a sleep elsewhere (a flush, a lock) is not enough.
    Where the kernel does not name the wait (``wchan`` reads ``0``), three sleeping looks 20 ms apart
    stand in for it."""
    proc = Path(f"/proc/{child.pid}")
    deadline, asleep = time.monotonic() + bound, 0
    while time.monotonic() < deadline:
        sleeping = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "S"
        wchan = (proc / "wchan").read_text().strip()
        if sleeping and ("poll" in wchan or "select" in wchan):
            return
        asleep = asleep + 1 if sleeping and wchan in ("", "0") else 0
        if asleep == 3:
            return
        time.sleep(0.02)
    raise AssertionError(f"chat.py did not wait for input within {bound} s")


def reply_of(output: str, label: str = "snn> ") -> str:
    return output.split(label, 1)[1].split("\r\n", 1)[0]


def test_conversation_in_a_terminal(snn_dir):
    child = spawn("--model_dir", str(snn_dir), "--max_new_tokens", "6")
    assert "T=8" in child.before and "plain 'User:/Assistant:'" in child.before
    first = reply_of(ask(child, "Hello there, how are you?"))
    second = reply_of(ask(child, "What is your name?"))
    assert first.strip() and second.strip()

    stats = ask(child, ":stats")
    assert re.search(r"6 tokens in [\d.]+ s, [\d.]+ tokens/s \(stop: max_new_tokens; SNN, T=8\)", stats), stats
    rates = {g: float(r) for g, r in re.findall(r"^  (model\S+|all sites)\s+([\d.]+)\r?$", stats, re.M)}
    assert len(rates) > 4 and "model.layers.*.mlp.down_proj.site" in rates and 0 < rates["all sites"] < 1, stats
    assert re.search(r"µJ/token; SNN/ANN 0\.\d+", stats), stats

    assert "(T=4," in ask(child, ":set T=4")
    third = reply_of(ask(child, "And now?"))
    assert "SNN, T=4)" in ask(child, ":stats")

    history = re.findall(r"^(user|assistant): (.*?)\r?$", ask(child, ":history"), re.M)
    assert history == [("user", "Hello there, how are you?"), ("assistant", first.strip()),
                       ("user", "What is your name?"), ("assistant", second.strip()),
                       ("user", "And now?"), ("assistant", third.strip())]

    wait_for_input(child)
    child.sendintr()  # at the prompt: a hint, the session goes on
    child.expect_exact("Ctrl-D or :exit ends the session")
    child.expect_exact(PROMPT)

    assert "conversation cleared" in ask(child, ":reset")
    assert "(no conversation yet)" in ask(child, ":history")

    # a reply far longer than the test waits for: stop it once some of it has streamed
    ask(child, ":set max_new_tokens=100000")
    child.sendline("Hello there, how are you?")
    child.expect_exact("snn> ")
    child.expect(r"\S{8}")
    child.sendintr()
    child.expect_exact("reply stopped by Ctrl-C")
    child.expect_exact(PROMPT)
    assert "stop: interrupted" in ask(child, ":stats")
    ask(child, ":set max_new_tokens=4")
    assert reply_of(ask(child, "Still there?")).strip()
    assert re.findall(r"^user: (.*?)\r?$", ask(child, ":history"), re.M) == ["Hello there, how are you?",
                                                                              "Still there?"]

    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ann_mode_in_a_terminal(snn_dir):
    child = spawn("--model-dir", str(snn_dir), "--ann", "--max_new_tokens", "4")
    assert "original network" in child.before
    assert reply_of(ask(child, "Hello"), "ann> ").strip()
    stats = ask(child, ":stats")
    assert "4 tokens in" in stats and "(stop: max_new_tokens; ANN)" in stats and "do not apply" in stats
    assert "T does not apply" in ask(child, ":set T=4")
    child.sendline(":exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# -- bad directories ---------------------------------------------------------------------------------

def broken_copies(snn_dir, base):
    import shutil

    truncated, no_config = base / "truncated", base / "no_config"
    for d in (truncated, no_config):
        shutil.copytree(snn_dir, d)
    weights = truncated / "snn_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (no_config / "config.json").unlink()
    return {"truncated": truncated, "no_config": no_config}


def test_missing_directory_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--model_dir", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "not a directory" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupt_directory_is_one_line_error(snn_dir, tmp_path, capsys):
    dirs = broken_copies(snn_dir, tmp_path)
    for name, says in [("truncated", "does not match its sha256"), ("no_config", "missing config.json")]:
        with pytest.raises(SystemExit) as exit_:
            chat.main(["--model_dir", str(dirs[name])])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and says in err, (name, err)
    # the same through a real process: no traceback on stderr
    proc = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--model_dir", str(dirs["truncated"])],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("chat.py: error: saved SNN in")


# -- the real model (optional) ------------------------------------------------------------------------

@pytest.mark.slow
def test_real_smollm2_chat():
    """Set STAC_CHAT_MODEL_DIR to a converted SmolLM2 directory (make chat writes out/chat_smollm2_T7)."""
    model_dir = os.environ.get("STAC_CHAT_MODEL_DIR")
    if not model_dir:
        pytest.skip("set STAC_CHAT_MODEL_DIR to a converted SmolLM2 directory")
    child = spawn("--model_dir", model_dir, "--max_new_tokens", "24", timeout=300)
    assert "chat template" in child.before
    assert "Paris" in reply_of(ask(child, "What is the capital of France? Answer in one word."))
    assert reply_of(ask(child, "And of Italy?")).strip()
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
