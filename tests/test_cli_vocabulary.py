"""One flag vocabulary across every CLI (stac_common.cli): the shared flags carry the same names in each
--help, old spellings still parse to the same values, one T range, --dtype honoured or refused in
one line, and parsing the flags loads no torch."""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import chat
import run_conversion
import stac_common.cli as stac_cli
import test_conversational_snn as validate
from spike_modules import quantizer
from text_cls import cli as text_cls_cli

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]

# every command line: how to start it, and the shared flags it takes
CLIS = {
    "run_conversion.py": (["run_conversion.py"],
                          ["model_name_or_path", "model_dir", "timesteps", "output_dir", "device", "dtype", "seed"]),
    "chat.py": (["chat.py"], ["model_dir", "timesteps", "device", "dtype", "seed"]),
    "test_conversational_snn.py": (["test_conversational_snn.py"], ["model_dir", "timesteps", "device", "dtype"]),
    "text_cls": (["-m", "text_cls"],
                 ["model_name_or_path", "timesteps", "output_dir", "device", "dtype", "seed", "batch_size"]),
    # scores saved SNNs, whose T was fixed at conversion: no --timesteps
    "stac_lm.eval.harness": (["-m", "stac_lm.eval.harness"], ["model_dir", "device", "seed", "batch_size"]),
}
MODULE_OF = {"run_conversion.py": "run_conversion", "chat.py": "chat", "test_conversational_snn.py":
             "test_conversational_snn", "text_cls": "text_cls.cli",
             "stac_lm.eval.harness": "stac_lm.eval.harness"}
# each console script of pyproject.toml runs one of the CLIs above
SCRIPT_CLI = {"stac-convert": "run_conversion.py", "stac-chat": "chat.py",
              "stac-validate": "test_conversational_snn.py", "stac-text-cls": "text_cls", "stac-lm-eval": "stac_lm.eval.harness"}
# names the vocabulary replaced; none may be offered in a --help
RETIRED = ["model_name", "savedir", "time_steps", "time_step", "batchsize", "eval_batchsize", "dev", "T"]


def help_text(command: list[str]) -> str:
    res = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def offered(text: str) -> set[str]:
    """The long options a --help offers (its option lines, not the older spellings listed at its end)."""
    body = text.split("older spellings, still accepted:")[0]
    return set(re.findall(r"(?<![\w-])--([A-Za-z][\w-]*)", body.split("options:", 1)[1]))


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return {name: help_text(command) for name, (command, _) in CLIS.items()}


@pytest.mark.parametrize("name", CLIS)
def test_help_offers_the_shared_flags_in_both_spellings(helps, name):
    flags = offered(helps[name])
    for f in CLIS[name][1]:
        assert {f, f.replace("_", "-")} <= flags, f"{name}: --{f}"
    assert not flags & set(RETIRED), f"{name} offers retired names {sorted(flags & set(RETIRED))}"
    if "timesteps" in CLIS[name][1]:
        assert "-T T" in helps[name] or "-T T[,T...]" in helps[name], f"{name}: -T"
        assert f"1..{stac_cli.MAX_TIMESTEPS}" in helps[name]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_scripts_show_the_same_help(helps, script):
    module, func = SCRIPTS[script].split(":")
    assert module == MODULE_OF[SCRIPT_CLI[script]]
    code = f"import sys, {module} as m; sys.exit(m.{func}(['--help']))"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert offered(res.stdout) == offered(helps[SCRIPT_CLI[script]])


# --- old spellings parse to what the new ones do; nothing heavy loads while parsing -----------------

PARSE_CASES = {
    "run_conversion": [(["--model_name", "m", "--timesteps", "8"], ["--model-name-or-path", "m", "-T", "8"])],
    "text_cls.cli": [
        (["--pretrained_model", "m", "--savedir", "d", "--time_steps", "2,4", "--T", "4", "--batchsize", "8",
          "--eval_batchsize", "16", "--dev", "0"],
         ["--model_name_or_path", "m", "--output-dir", "d", "-T", "2,4", "--primary_timesteps", "4", "--batch_size",
          "8", "--eval-batch-size", "16", "--device", "0"]),
        (["--model_name", "m", "--time-step", "8"], ["--model_name_or_path", "m", "--primary-timesteps", "8"]),
    ],
}
PROBE = """
import importlib, json, sys
cases = json.loads(sys.argv[1])
out = {}
for module, pairs in cases.items():
    parser = importlib.import_module(module).build_parser()
    out[module] = [[vars(parser.parse_args(a)) for a in pair] for pair in pairs]
for module in ("chat", "test_conversational_snn"):
    importlib.import_module(module).build_parser().parse_args(["--model_dir", "d", "-T", "8"])
heavy = sorted(m for m in ("torch", "transformers", "spikingjelly", "numpy") if m in sys.modules)
print(json.dumps({"parsed": out, "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    """Parse in a fresh interpreter: the CLI modules imported and every parser built and used."""
    res = subprocess.run([sys.executable, "-c", PROBE, json.dumps(PARSE_CASES)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def test_parsing_the_flags_imports_no_torch(probe):
    assert probe["heavy"] == []


@pytest.mark.parametrize("module", PARSE_CASES)
def test_old_spellings_parse_to_the_new_ones(probe, module):
    for old, new in probe["parsed"][module]:
        assert old == new


def test_text_cls_flags_land_in_the_options_fields():
    from text_cls.options import TextClsOptions

    args = vars(text_cls_cli.build_parser().parse_args(["-T", "2,4", "--output_dir", "d", "--batch_size", "8"]))
    opts = TextClsOptions(**args)
    assert (opts.time_steps, opts.time_step, opts.savedir, opts.batchsize) == ((2, 4), 4, "d", 8)


# --- one T range -------------------------------------------------------------------------------------

def test_the_cli_T_range_is_one_constant_that_the_quantizer_agrees_with():
    from stac_lm.convert.options import MAX_CLI_TIMESTEPS
    from text_cls.options import MAX_T

    assert MAX_CLI_TIMESTEPS == MAX_T == stac_cli.MAX_TIMESTEPS <= quantizer.MAX_TIMESTEPS
    assert stac_cli.MAX_WEIGHTED_TIMESTEPS == quantizer.MAX_WEIGHTED_TIMESTEPS


PARSERS = {"run_conversion": (run_conversion.build_parser, []), "chat": (chat.build_parser, ["--model_dir", "d"]),
           "validate": (validate.build_parser, []), "text_cls": (text_cls_cli.build_parser, [])}


@pytest.mark.parametrize("name", PARSERS)
@pytest.mark.parametrize("T, ok", [("1", True), (str(stac_cli.MAX_TIMESTEPS), True), ("0", False),
                                   (str(stac_cli.MAX_TIMESTEPS + 1), False), ("many", False)])
def test_every_cli_takes_the_same_T_range(name, T, ok, capsys):
    build, base = PARSERS[name]
    if ok:
        assert build().parse_args([*base, "-T", T]) is not None
        return
    with pytest.raises(SystemExit) as e:
        build().parse_args([*base, "-T", T])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "argument --timesteps/-T" in err, err
    assert (f"between 1 and {stac_cli.MAX_TIMESTEPS}, got {T}" if T != "many" else "invalid int value") in err


def test_a_T_sweep_checks_each_T(capsys):
    with pytest.raises(SystemExit):
        text_cls_cli.build_parser().parse_args(["-T", f"4,{stac_cli.MAX_TIMESTEPS + 1}"])
    assert f"got {stac_cli.MAX_TIMESTEPS + 1}" in capsys.readouterr().err


# --- --dtype: honoured or refused in one line --------------------------------------------------------

REFUSED = [
    (run_conversion.main, ["--dtype", "float16"], "run_conversion.py: error: --dtype float16 is not supported"),
    (validate.main, ["--dtype", "bfloat16"], "test_conversational_snn.py: error: --dtype bfloat16 is not supported"),
    (text_cls_cli.main, ["--dtype", "float16"], "python -m text_cls: error: --dtype float16 is not supported"),
    (chat.main, ["--model_dir", "{tmp}", "--dtype", "bfloat16"], "chat.py: error: --dtype bfloat16 is not supported"),
]


@pytest.mark.parametrize("main, args, message", REFUSED, ids=[r[2].split(":")[0] for r in REFUSED])
def test_a_dtype_the_program_cannot_run_in_is_refused_before_any_work(main, args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert "float32" in err


@pytest.mark.parametrize("main, args", [(run_conversion.main, []), (text_cls_cli.main, [])])
def test_an_unknown_dtype_is_a_usage_error(main, args, capsys):
    with pytest.raises(SystemExit) as e:
        main([*args, "--dtype", "float64"])
    assert e.value.code == 2 and "invalid choice: 'float64'" in capsys.readouterr().err
