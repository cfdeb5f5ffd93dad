"""Run the Python blocks of a Markdown page in order and compare what they print with the page.

A page such as docs/python_api.md shows code blocks with the lines they printed after ``# ->``.
This runs every ```` ```python ```` block of the page in one namespace (a later block sees an
earlier block's names), captures what each prints and its wall time, and reports for each block
whether the printed lines equal the page's ``# ->`` lines. ``--replace OLD=NEW`` rewrites text
in the code before it runs (for example output folders), and is recorded in the report.

    python -m bench.doc_blocks docs/python_api.md --replace out/=/tmp/apidoc/ --out /tmp/python_api_blocks.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import time
from pathlib import Path

from stac_common.io import check_output_free, write_json

BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SHOWN = re.compile(r"^# -> ?(.*?)(?:\s{2,}\(.*\))?$")  # '# -> text', optionally '   (note)' after two spaces


def blocks(markdown: str) -> list[str]:
    return [m.group(1) for m in BLOCK.finditer(markdown)]


def shown_lines(code: str) -> list[str]:
    """The lines a block says it printed: each ``# ->`` line, any ``(note)`` after two spaces dropped."""
    return [m.group(1).rstrip() for line in code.splitlines() if (m := SHOWN.match(line.strip()))]


def run_blocks(codes: list[str], replace: list[tuple[str, str]]) -> list[dict]:
    namespace: dict = {"__name__": "__doc_blocks__"}
    rows = []
    for i, code in enumerate(codes, 1):
        source = code
        for old, new in replace:
            source = source.replace(old, new)
        buffer = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(buffer):
            exec(compile(source, f"<block {i}>", "exec"), namespace)  # the page's own code, run as documented
        printed = [line.rstrip() for line in buffer.getvalue().splitlines()]
        expected = shown_lines(code)
        rows.append({"block": i, "first_line": code.splitlines()[0], "seconds": time.perf_counter() - t0,
                     "printed": printed, "page_shows": expected, "same_as_page": printed == expected})
        print(f"block {i}: {rows[-1]['seconds']:.1f} s, same as the page: {rows[-1]['same_as_page']}",
              file=sys.stderr)
        for line in printed:
            print(f"    {line}", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("page", help="a Markdown file")
    p.add_argument("--replace", action="append", default=[], metavar="OLD=NEW",
                   help="rewrite OLD to NEW in the code before running it (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    out = check_output_free(args.out, args.overwrite)
    pairs = []
    for item in args.replace:
        if "=" not in item:
            p.error(f"--replace takes OLD=NEW, got {item!r}")
        pairs.append(tuple(item.split("=", 1)))
    codes = blocks(Path(args.page).read_text(encoding="utf-8"))
    if not codes:
        p.error(f"{args.page} holds no ```python blocks")
    rows = run_blocks(codes, pairs)
    write_json(out, {"page": args.page, "replace": args.replace, "blocks": rows,
                     "all_same_as_page": all(r["same_as_page"] for r in rows),
                     "command": " ".join(["python -m bench.doc_blocks", *(argv if argv is not None else sys.argv[1:])])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
