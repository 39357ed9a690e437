"""The retrieval index's metadata and embeddings in one SQLite file (`index.sqlite`): the source of truth that a
killed build never corrupts. Each file's entries (its picture, its video frames, its regions) and its row in `files`
are written in one transaction, so after a crash a file is either wholly indexed or not at all: a rerun adds no
duplicate and misses no entry. The arrays FAISS searches (`*.npy`, `*.faiss`) are derived from it, stamped with the
store's generation, and rebuilt whenever the stamp is stale.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, kind TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    status TEXT NOT NULL, reason TEXT);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, kind TEXT NOT NULL, time REAL,
    width INTEGER NOT NULL, height INTEGER NOT NULL, parent INTEGER, x0 REAL, y0 REAL, x1 REAL, y1 REAL,
    score REAL, embedding BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS entries_by_path ON entries(path);
CREATE INDEX IF NOT EXISTS entries_by_parent ON entries(parent);
"""
STORE_FILE = "index.sqlite"


@dataclass
class Entry:
    """A searchable thing: a picture, a video frame (`time` in seconds) or a region (`box` xyxy in its picture's
    pixels, `parent` the id of its picture or frame, `score` its objectness)."""
    path: str
    kind: str                       # "picture", "frame" or "region"
    width: int
    height: int
    embedding: np.ndarray
    time: float | None = None
    box: tuple[float, float, float, float] | None = None
    score: float | None = None
    parent: int | None = None
    id: int | None = None


class IndexStore:
    """index.sqlite in `folder`: files, entries with their embeddings, and the index's metadata."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # one connection, shared by a web server's threads under the caller's lock
        self.db = sqlite3.connect(self.folder / STORE_FILE, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")      # a reader never sees half a transaction
        self.db.execute("PRAGMA synchronous=NORMAL")    # WAL: a power cut may lose the last commit, never corrupt
        self.db.executescript(SCHEMA)
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------------------------------------- meta
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @property
    def generation(self) -> int:
        """Counts the committed changes: the derived arrays are valid for one generation."""
        return int(self.get_meta("generation") or 0)

    # ------------------------------------------------------------------------------------------------ files
    def known_files(self) -> dict[str, tuple[int, int]]:
        return {path: (size, mtime) for path, size, mtime in self.db.execute("SELECT path, size, mtime_ns FROM files")}

    def skipped_files(self) -> list[tuple[str, str]]:
        return list(self.db.execute("SELECT path, reason FROM files WHERE status = 'skipped' ORDER BY path"))

    def replace_file(self, path: str, kind: str, size: int, mtime_ns: int, entries: Sequence[Entry],
                     reason: str | None = None) -> None:
        """One file's new state, atomically: its old entries go, its new ones (a picture or frames, each followed
        by its regions, whose `parent` is the index of their picture or frame in `entries`) come in."""
        with self.db:
            self._drop(path)
            ids: list[int] = []
            for entry in entries:
                parent = ids[entry.parent] if entry.kind == "region" else None
                box = entry.box or (None, None, None, None)
                cursor = self.db.execute(
                    "INSERT INTO entries (path, kind, time, width, height, parent, x0, y0, x1, y1, score, embedding) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (path, entry.kind, entry.time, entry.width, entry.height, parent, *box, entry.score,
                     np.ascontiguousarray(entry.embedding, dtype=np.float32).tobytes()))
                ids.append(cursor.lastrowid)
            self.db.execute("INSERT OR REPLACE INTO files (path, kind, size, mtime_ns, status, reason) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (path, kind, size, mtime_ns, "skipped" if reason else "indexed", reason))
            self._bump()

    def remove_files(self, paths: Iterable[str]) -> int:
        paths = list(paths)
        if paths:
            with self.db:
                for path in paths:
                    self._drop(path)
                self._bump()
        return len(paths)

    def _drop(self, path: str) -> None:
        self.db.execute("DELETE FROM entries WHERE path = ?", (path,))
        self.db.execute("DELETE FROM files WHERE path = ?", (path,))

    def _bump(self) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('generation', ?)", (str(self.generation + 1),))

    # ---------------------------------------------------------------------------------------------- entries
    def embeddings(self, regions: bool, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,), embeddings (N, dim)) of the pictures and frames, or of the regions, in id order."""
        condition = "kind = 'region'" if regions else "kind != 'region'"
        rows = self.db.execute(f"SELECT id, embedding FROM entries WHERE {condition} ORDER BY id").fetchall()
        ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
        vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32).reshape(len(rows), dim)
        return ids, vectors

    def entries(self, ids: Sequence[int]) -> dict[int, Entry]:
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(f"SELECT id, path, kind, time, width, height, parent, x0, y0, x1, y1, score, embedding "
                               f"FROM entries WHERE id IN ({marks})", ids).fetchall()
        return {row[0]: _entry(row) for row in rows}

    def regions_of(self, parents: Sequence[int]) -> dict[int, list[Entry]]:
        parents = [int(i) for i in parents]
        found: dict[int, list[Entry]] = {p: [] for p in parents}
        if not parents:
            return found
        marks = ",".join("?" * len(parents))
        for row in self.db.execute(f"SELECT id, path, kind, time, width, height, parent, x0, y0, x1, y1, score, "
                                   f"embedding FROM entries WHERE parent IN ({marks}) ORDER BY id", parents):
            found[row[6]].append(_entry(row))
        return found

    def counts(self) -> dict[str, int]:
        counts = dict(self.db.execute("SELECT kind, COUNT(*) FROM entries GROUP BY kind").fetchall())
        counts["files"] = self.db.execute("SELECT COUNT(*) FROM files WHERE status = 'indexed'").fetchone()[0]
        counts["skipped"] = self.db.execute("SELECT COUNT(*) FROM files WHERE status = 'skipped'").fetchone()[0]
        return counts

    def describe(self) -> str:
        return json.dumps(self.counts())


def _entry(row) -> Entry:
    (id_, path, kind, time, width, height, parent, x0, y0, x1, y1, score, blob) = row
    box = None if x0 is None else (x0, y0, x1, y1)
    return Entry(path, kind, width, height, np.frombuffer(blob, dtype=np.float32), time, box, score, parent, id_)
