"""Output that is never half-written: build in a temporary sibling, then rename."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class OutputExistsError(ValueError):
    """The output path exists and ``overwrite`` was not given."""


def check_output_free(path: str | Path, overwrite: bool) -> Path:
    """Fail early, before any work, if ``path`` exists and may not be replaced."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it, "
                                "or choose another output path")
    return path


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block finishes.

    On any exception (Ctrl-C included) the temporary directory is removed and ``path``
    is left as it was. An existing ``path`` is replaced only with ``overwrite=True``.
    """
    path = check_output_free(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        check_output_free(path, overwrite)  # something may have appeared meanwhile
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` through a temporary file and a rename: a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: object) -> None:
    """Write sorted, indented JSON atomically (:func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_saved_config(d: Path, bad: str, config_file: str, files: tuple[str, ...], dirs: tuple[str, ...],
                      fmt: str, version: int, what: str, redo: str) -> dict:
    """The JSON config of a saved directory, checked before anything is built from it: every
    file and folder is there, the format and version are this STAC's, and each file listed under
    ``files`` in the config still has its recorded sha256.

    Raises:
        ValueError: a clear message, prefixed with ``bad`` (what was being loaded), naming what is
            wrong; ``what`` names the kind of directory, ``redo`` how to get a good one.
    """
    missing = [n for n in (config_file, *files) if not (d / n).is_file()]
    missing += [n + "/" for n in dirs if not (d / n).is_dir()]
    if missing:
        raise ValueError(f"{bad}: missing {', '.join(missing)} (not a complete {what} directory)")
    try:
        config = json.loads((d / config_file).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{bad}: {config_file} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != fmt:
        raise ValueError(f"{bad}: {config_file} is not a {what} config (format {fmt!r} expected)")
    if config.get("format_version") != version:
        raise ValueError(f"{bad}: format_version {config.get('format_version')!r}, this STAC reads {version}; "
                         f"{redo}")
    for name, sha in config.get("files", {}).items():
        if sha256_file(d / name) != sha:
            raise ValueError(f"{bad}: {name} does not match its sha256 in {config_file} (truncated or edited)")
    return config
