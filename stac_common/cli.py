"""What every STAC command line shares: one-line errors (exit 2 for bad input), flags that take
both spellings (``--model_name_or_path`` and ``--model-name-or-path``) and one vocabulary.

The vocabulary (each helper below adds one; a program adds those that mean something to it):

==========================  =====================================================================
``--model_name_or_path``    the source (ANN) model: 'embedded', a local folder or a hub name
``--model_dir``             a directory saved by ``run_conversion.py`` (a converted SNN)
``--timesteps``, ``-T``     spike timesteps, 1..:data:`MAX_TIMESTEPS` (weighted coding: 1..16)
``--output_dir``            where a run writes its directory
``--device``                auto (CUDA when present), cpu, cuda
``--dtype``                 float32, float16, bfloat16, where the program can run in it
``--seed``                  the seed of whatever the program samples
``--batch_size``            examples per batch, where the program batches
==========================  =====================================================================

Older spellings of a flag (``--model_name``, ``--savedir``, ``--time_steps``) stay accepted
but hidden; ``--help`` lists them at its end.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
from typing import NoReturn

# The T range of every CLI. Rate coding spends one spike per level, so T is the spike budget per
# value; past 512 a window costs more than the ANN's dense MACs at any spike rate worth having.
# Weighted coding reaches 2**T - 1 levels and stops at 16 (spike_modules.quantizer checks it when
# the model is built; tests/test_cli_vocabulary.py checks the two numbers agree).
MAX_TIMESTEPS = 512
MAX_WEIGHTED_TIMESTEPS = 16
TIMESTEPS_RANGE = f"1..{MAX_TIMESTEPS} (1..{MAX_WEIGHTED_TIMESTEPS} with weighted coding)"
DTYPES = ("float32", "float16", "bfloat16")


def fail(prog: str, message: object, code: int = 2) -> NoReturn:
    """Print ``PROG: error: MESSAGE`` on one line to stderr and exit with ``code``."""
    one_line = " ".join(str(message).replace("\n  - ", "; ").split())
    print(f"{prog}: error: {one_line}", file=sys.stderr)
    sys.exit(code)


class Parser(argparse.ArgumentParser):
    """argparse with the module docstring as description, a one-line usage error (argparse
    prints the whole usage otherwise) and the hidden older spellings listed at the end of --help."""

    def __init__(self, prog: str, description: str | None, **kw):
        super().__init__(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                         **kw)

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see --help)")

    def format_help(self) -> str:
        old = [f"{', '.join(a.old_names)} (now {a.alias_of})" for a in self._actions if getattr(a, "alias_of", None)]
        text = super().format_help()
        if not old:
            return text
        width = shutil.get_terminal_size().columns - 2  # what argparse's formatter uses
        line = f"older spellings, still accepted: {'; '.join(old)}"
        return text + "\n" + textwrap.fill(line, width, break_on_hyphens=False) + "\n"


def _spellings(names) -> list[str]:
    out = []
    for n in names:
        out += [f"--{n}"] + ([f"--{n.replace('_', '-')}"] if "_" in n else [])
    return out


def flag(p, name: str, *aliases: str, short: tuple[str, ...] = (), old: tuple[str, ...] = (), unset: bool = False,
         **kw) -> None:
    """Add ``--name`` (and each alias), each also as ``--name-with-dashes`` when it has underscores,
    plus the ``short`` options; the value lands in ``name`` (or ``dest``). ``old``: earlier names
    that keep working but are left out of the help. ``unset=True`` leaves a flag that is not given
    out of the namespace, so the defaults live in one place (the options dataclass)."""
    dest = kw.pop("dest", name)
    if unset:
        kw.setdefault("default", argparse.SUPPRESS)
    p.add_argument(*_spellings((name, *aliases)), *short, dest=dest, **kw)
    if old:
        assert not kw.get("required"), "a required flag cannot be given by an old spelling alone"
        hidden = p.add_argument(*_spellings(old), dest=dest, **dict(kw, help=argparse.SUPPRESS,
                                                                    default=argparse.SUPPRESS))
        hidden.alias_of, hidden.old_names = f"--{name}", [f"--{n}" for n in old]


# --- argparse types ---------------------------------------------------------------------------------

def _one_T(text: str) -> int:
    try:
        T = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 1 <= T <= MAX_TIMESTEPS:
        raise argparse.ArgumentTypeError(f"timesteps must be between 1 and {MAX_TIMESTEPS}, got {T}")
    return T


def timesteps(text: str) -> int:
    """argparse type: one T in 1..:data:`MAX_TIMESTEPS`."""
    return _one_T(text)


def timesteps_list(text: str) -> tuple[int, ...]:
    """argparse type: one T or comma-separated Ts (``4`` or ``2,4,8,16``), each in 1..:data:`MAX_TIMESTEPS`."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected T or comma-separated Ts such as 2,4,8,16, got {text!r}")
    return tuple(_one_T(t) for t in parts)


# --- the shared flags -------------------------------------------------------------------------------

def model_flag(p, help: str, **kw) -> None:
    """``--model_name_or_path NAME`` into ``model_name`` (the options field); ``--model_name`` stays."""
    flag(p, "model_name_or_path", dest="model_name", metavar="NAME", help=help,
         old=("model_name", *kw.pop("old", ())), **kw)


def model_dir_flag(p, help: str, **kw) -> None:
    """``--model_dir DIR``: a converted SNN, as ``run_conversion.py`` saves it."""
    flag(p, "model_dir", metavar="DIR", help=help, **kw)


def timesteps_flag(p, help: str, *, sweep: bool = False, **kw) -> None:
    """``--timesteps T`` / ``-T T``; with ``sweep``, one T or a comma-separated list."""
    flag(p, "timesteps", short=("-T",), type=timesteps_list if sweep else timesteps,
         metavar="T[,T...]" if sweep else "T", help=help, **kw)


def output_dir_flag(p, help: str, **kw) -> None:
    flag(p, "output_dir", metavar="DIR", help=help, **kw)


def device_flag(p, help: str = "auto = CUDA when present, else the CPU (default auto)", **kw) -> None:
    kw.setdefault("choices", ("auto", "cpu", "cuda"))
    flag(p, "device", help=help, **kw)


def dtype_flag(p, help: str, **kw) -> None:
    flag(p, "dtype", choices=DTYPES, help=help, **kw)


def seed_flag(p, help: str, **kw) -> None:
    flag(p, "seed", type=int, metavar="N", help=help, **kw)


def batch_size_flag(p, help: str, **kw) -> None:
    flag(p, "batch_size", type=int, metavar="B", help=help, **kw)


def float32_only(prog: str, dtype: str | None, why: str) -> None:
    """Exit 2 with ``why`` unless ``dtype`` is float32 (or not given)."""
    if dtype not in (None, "float32"):
        fail(prog, f"--dtype {dtype} is not supported: {why}; leave --dtype out or pass --dtype float32")
