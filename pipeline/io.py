"""Outputs land whole or not at all: write to a temporary sibling, then rename over the target.

Inputs that cannot be used raise `DataFileError`, whose message starts with the file's path.
"""
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class DataFileError(ValueError):
    """An input file that is missing, empty or corrupt; the message starts with its path
    and ends with `(line N)` where a line is at fault."""


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> None:
    """Call `write(tmp_path)`, then rename the result onto `path` (same folder, so same filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are ordinary data files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def atomic_write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Rows of one shape as a CSV with a header: what `dvc plots` reads."""
    import pandas as pd

    atomic_write(path, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A fresh temporary folder that replaces `path` (and whatever was there) when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes: identifies an input when keying checkpoints."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
