"""Crash-safe files of a run: every file is written whole by a rename (`atomic_write`, `atomic_json`) or, for
the append-only log, read tolerantly (`read_jsonl` drops a torn last line)."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO, Callable


def fsync_dir(path: Path) -> None:
    """Persists renames inside `path` (not possible on every filesystem, hence best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Writes to a temporary file beside `path`, syncs it, then renames: a crash leaves the old file whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_save(obj: Any, path: Path) -> None:
    import torch
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_json(path: Path, obj: Any, indent: int | None = 1) -> None:
    atomic_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One JSON object per line, flushed at once. A crash can tear only the last line: `read_jsonl` drops it."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file. A last line that does not parse (a write cut short by a crash) is
    dropped with a note; a bad line before the end is an error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                print(f"note: {path}: line {number} is incomplete (a crash mid-write?); it is dropped",
                      file=sys.stderr)
                break
            raise ValueError(f"{path}: line {number} is not JSON ({error}); the log is damaged") from None
    return records


def rewrite_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write(path, lambda f: f.write("".join(json.dumps(r, default=str) + "\n" for r in records).encode()))
