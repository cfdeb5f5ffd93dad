"""bench.doc_blocks: runs a page's Python blocks in order and compares what they print with the page."""

from __future__ import annotations

import json

import pytest

from bench.doc_blocks import main, shown_lines

PAGE = '''# A page

```python
x = 2
print(x * 21)
# -> 42      (0.1 s on a loaded machine)
```

Text between.

```python
print(f"{x} out/a")
# -> 2 /tmp/b/a
```
'''


def test_blocks_share_names_and_are_compared_with_the_page(tmp_path):
    (tmp_path / "page.md").write_text(PAGE)
    main([str(tmp_path / "page.md"), "--replace", "out/=/tmp/b/", "--out", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert [b["printed"] for b in report["blocks"]] == [["42"], ["2 /tmp/b/a"]]
    assert report["all_same_as_page"] and report["replace"] == ["out/=/tmp/b/"]
    (tmp_path / "page.md").write_text(PAGE.replace("# -> 42", "# -> 43"))
    main([str(tmp_path / "page.md"), "--out", str(tmp_path / "s.json")])
    report = json.loads((tmp_path / "s.json").read_text())
    assert [b["same_as_page"] for b in report["blocks"]] == [False, False]


def test_shown_lines_drop_the_note_after_two_spaces():
    assert shown_lines("a = 1\n# -> 'x y'     (3 s)\n# -> |a |b|") == ["'x y'", "|a |b|"]


def test_a_page_without_python_blocks_is_refused(tmp_path):
    (tmp_path / "p.md").write_text("no code\n")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "p.md"), "--out", str(tmp_path / "r.json")])
