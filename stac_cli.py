"""What every STAC command line shares: one-line errors (exit 2 for bad input) and flags that take
both spellings (``--model_name`` and ``--model-name``)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def fail(prog: str, message: object, code: int = 2) -> NoReturn:
    """Print ``PROG: error: MESSAGE`` on one line to stderr and exit with ``code``."""
    one_line = " ".join(str(message).replace("\n  - ", "; ").split())
    print(f"{prog}: error: {one_line}", file=sys.stderr)
    sys.exit(code)


class Parser(argparse.ArgumentParser):
    """argparse with the module docstring as description and a one-line usage error (argparse
    prints the whole usage otherwise)."""

    def __init__(self, prog: str, description: str | None, **kw):
        super().__init__(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                         **kw)

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see --help)")


def flag(p, name: str, *aliases: str, short: tuple[str, ...] = (), unset: bool = False, **kw) -> None:
    """Add ``--name`` (and each alias), each also as ``--name-with-dashes`` when it has underscores,
    plus the ``short`` options; the value lands in ``name``. ``unset=True`` leaves a flag that is
    not given out of the namespace, so the defaults live in one place (the options dataclass)."""
    spellings = list(short)
    for n in (name, *aliases):
        spellings += [f"--{n}"] + ([f"--{n.replace('_', '-')}"] if "_" in n else [])
    if unset:
        kw.setdefault("default", argparse.SUPPRESS)
    p.add_argument(*spellings, dest=kw.pop("dest", name), **kw)
