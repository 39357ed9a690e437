"""The retrieval index: pictures, video frames and detected regions of folders on disk, embedded by a saved
UniPerceiver and searched with FAISS, by text or by an example picture.

    index = RetrievalIndex("runs/retrieval", model)
    report = index.update(images="photos/", videos="clips/")      # embeds only new or changed files
    hits = index.search("a red circle", top=5)                     # best first, each with its best box

Layout of the index folder: `index.sqlite` (the source of truth: files, entries, embeddings; see `store.py`),
and derived from it for searching, `pictures.faiss`/`pictures_ids.npy`/`pictures.npy` and the same for `regions`,
with `derived.json` naming the store generation they were built from. Pictures and frames are ranked as the
retrieval task ranks them (`encode_image` against `encode_text`: the evaluation suites' ranking); regions as
detection names them (region embeddings against the query's class embedding), so that a hit can show where in
the picture the query is.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .media import PICTURE_SUFFIXES, VIDEO_SUFFIXES, Frame, MediaFile, UnreadableMediaError, read_picture, \
    sample_video, scan
from .store import Entry, IndexStore

EXACT_LIMIT = 50_000       # up to this many vectors an exact inner-product search; above it HNSW
HNSW_NEIGHBOURS = 32       # HNSW's M: memory d*4 + M*8 bytes a vector
HNSW_EF_CONSTRUCTION = 80  # a better graph for a longer build (FAISS's default is 40)
HNSW_EF_SEARCH = 512       # recall against speed at query time: 0.995 recall@10 at 10^5 random vectors, 1.4 ms
REGION_THRESHOLD = 0.3     # the objectness a proposal needs to be indexed as a region
DERIVED_FILE = "derived.json"


@dataclass
class Hit:
    """One search result: the file, its score, the video time for a frame, and the best-matching box."""
    path: str
    score: float
    kind: str
    time: float | None = None
    box: tuple[float, float, float, float] | None = None
    box_score: float | None = None
    entry_id: int | None = None

    def describe(self) -> str:
        where = f" at {self.time:.2f} s" if self.time is not None else ""
        box = (f" box [{', '.join(f'{v:.0f}' for v in self.box)}] ({self.box_score:.3f})"
               if self.box is not None else "")
        return f"{self.score:.4f}  {self.path}{where}{box}"


@dataclass
class UpdateReport:
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    embedded: int = 0                       # pictures and frames embedded in this update
    skipped: list[tuple[str, str]] = field(default_factory=list)   # every skipped file of the index, with why

    def to_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in ("added", "changed", "removed", "unchanged", "embedded")},
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}


def model_fingerprint(folder: str | Path) -> str:
    """Which model built an index: its config and its weights file's header and tail (not the whole file: a real
    model's weights are gigabytes)."""
    folder = Path(folder)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "rb") as file:
        digest.update(file.read(1 << 20))
        file.seek(max(size - (1 << 16), 0))
        digest.update(file.read())
    digest.update(str(size).encode())
    return digest.hexdigest()[:16]


class RetrievalIndex:
    """A folder holding the index, bound to one model (`model_id`, e.g. `model_fingerprint(export)`)."""

    def __init__(self, folder: str | Path, model, model_id: str, batch_size: int = 64, boxes: bool | None = None):
        self.folder, self.model, self.batch_size = Path(folder), model, batch_size
        self.store = IndexStore(self.folder)
        self.boxes = model.has_detection if boxes is None else boxes
        if self.boxes and not model.has_detection:
            raise ValueError("boxes: the model has no detection head, so it cannot index regions")
        built_with = self.store.get_meta("model")
        if built_with is None:
            self.store.set_meta("model", model_id)
            self.store.set_meta("embed_dim", str(model.config.embed_dim))
        elif built_with != model_id:
            raise ValueError(f"index {self.folder} was built with another model ({built_with}, this one is "
                             f"{model_id}); pass another --index folder, or --rebuild to start it anew")
        self.dim = int(self.store.get_meta("embed_dim"))
        self._searchers: dict[bool, tuple[Any, np.ndarray]] | None = None
        self._searchers_generation = -1

    def close(self) -> None:
        self.store.close()

    # ----------------------------------------------------------------------------------------------- update
    def update(self, images: str | Path | None = None, videos: str | Path | None = None, every_seconds: float = 2.0,
               max_frames: int = 16, progress: bool = False) -> UpdateReport:
        """Brings the index in line with the folders: new and changed files are embedded, deleted ones dropped,
        unchanged ones left alone (no decoding). Unreadable files are recorded as skipped, with the reason."""
        if images is None and videos is None:
            raise ValueError("update: give an images folder, a videos folder or both")
        files = (scan(images, PICTURE_SUFFIXES, "picture") if images is not None else []) + \
                (scan(videos, VIDEO_SUFFIXES, "video") if videos is not None else [])
        known = self.store.known_files()
        report = UpdateReport()
        present = {f.path for f in files}
        report.removed = self.store.remove_files(
            path for path in known if path not in present and _under(path, images, videos))
        todo = []
        for media in files:
            before = known.get(media.path)
            if before == (media.size, media.mtime_ns):
                report.unchanged += 1
                continue
            todo.append(media)
            report.added += before is None
            report.changed += before is not None
        bar = _progress(len(todo), progress)
        pictures = [m for m in todo if m.kind == "picture"]
        for start in range(0, len(pictures), self.batch_size):
            report.embedded += self._add_pictures(pictures[start:start + self.batch_size])
            bar.update(min(self.batch_size, len(pictures) - start))
        for media in (m for m in todo if m.kind == "video"):
            report.embedded += self._add_video(media, every_seconds, max_frames)
            bar.update(1)
        bar.close()
        report.skipped = self.store.skipped_files()
        self.refresh()
        return report

    def _add_pictures(self, batch: Sequence[MediaFile]) -> int:
        readable, frames = [], []
        for media in batch:
            try:
                frames.append(Frame(read_picture(media.path)))
                readable.append(media)
            except UnreadableMediaError as error:
                self.store.replace_file(media.path, media.kind, media.size, media.mtime_ns, [], error.reason)
        if not readable:
            return 0
        for media, entries in zip(readable, self._embed_frames(frames, [m.path for m in readable])):
            self.store.replace_file(media.path, media.kind, media.size, media.mtime_ns, entries)
        return len(readable)

    def _add_video(self, media: MediaFile, every_seconds: float, max_frames: int) -> int:
        entries: list[Entry] = []
        count = 0
        try:
            for chunk in _chunks(sample_video(media.path, every_seconds, max_frames), self.batch_size):
                for frame_entries in self._embed_frames(chunk, [media.path] * len(chunk)):
                    offset = len(entries)
                    for entry in frame_entries:  # region parents point into this video's list
                        if entry.kind == "region":
                            entry.parent += offset
                    entries.extend(frame_entries)
                count += len(chunk)
        except UnreadableMediaError as error:
            self.store.replace_file(media.path, media.kind, media.size, media.mtime_ns, [], error.reason)
            return 0
        self.store.replace_file(media.path, media.kind, media.size, media.mtime_ns, entries)  # all frames at once
        return count

    @torch.no_grad()
    def _embed_frames(self, frames: Sequence[Frame], paths: Sequence[str]) -> list[list[Entry]]:
        """Per frame: its own entry, then its regions (parent 0: the frame)."""
        model = self.model
        pictures = [frame.picture for frame in frames]
        embeddings = model.encode_image(pictures).float().cpu().numpy()
        regions = self._regions(pictures) if self.boxes else [[] for _ in pictures]
        out = []
        for frame, path, embedding, found in zip(frames, paths, embeddings, regions):
            kind = "picture" if frame.time is None else "frame"
            width, height = frame.picture.size
            out.append([Entry(path, kind, width, height, embedding, frame.time)] +
                       [Entry(path, "region", width, height, vector, frame.time, box, score, parent=0)
                        for box, score, vector in found])
        return out

    def _regions(self, pictures: Sequence) -> list[list[tuple[tuple, float, np.ndarray]]]:
        """Each picture's proposals above REGION_THRESHOLD: (box in its pixels, objectness, region embedding)."""
        from uniperceiver.detection import resize_for_detection, scale_boxes

        model = self.model
        size = model.config.image.image_size
        pixels, sizes = resize_for_detection(list(pictures), size)
        pixels = pixels.to(device=model.device, dtype=model.dtype)
        tokens, kinds, maps = model.image_features(pixels)
        proposals = model.propose_regions(maps, (size, size))
        vectors = model.region_embeddings(tokens, kinds, maps, proposals.boxes, proposals.valid, (size, size))
        out = []
        for i, picture_size in enumerate(sizes):
            keep = proposals.valid[i] & (proposals.scores[i] >= REGION_THRESHOLD)
            boxes = scale_boxes(proposals.boxes[i][keep].float(), (size, size), picture_size).tolist()
            out.append([(tuple(box), float(score), vector) for box, score, vector in
                        zip(boxes, proposals.scores[i][keep].tolist(), vectors[i][keep].float().cpu().numpy())])
        return out

    # ------------------------------------------------------------------------------------------ derived
    def refresh(self) -> None:
        """Rebuilds the FAISS indexes and arrays if the store changed since they were written."""
        generation = self.store.generation
        stamp = _read_json(self.folder / DERIVED_FILE)
        if stamp.get("generation") != generation or not all(
                (self.folder / f"{name}.faiss").exists() for name in ("pictures", "regions")):
            import faiss

            from launch.training.files import atomic_json, atomic_write

            for regions, name in ((False, "pictures"), (True, "regions")):
                ids, vectors = self.store.embeddings(regions, self.dim)
                atomic_write(self.folder / f"{name}.npy", lambda f, v=vectors: np.save(f, v))
                atomic_write(self.folder / f"{name}_ids.npy", lambda f, i=ids: np.save(f, i))
                atomic_write(self.folder / f"{name}.faiss",
                             lambda f, v=vectors: f.write(faiss.serialize_index(build_faiss(v)).tobytes()))
            atomic_json(self.folder / DERIVED_FILE, {"generation": generation, **self.store.counts()})
        self._searchers = None

    def _searcher(self, regions: bool):
        generation = self.store.generation
        if self._searchers is None or self._searchers_generation != generation:
            self.refresh()
            import faiss
            self._searchers = {}
            for flag, name in ((False, "pictures"), (True, "regions")):
                index = faiss.read_index(str(self.folder / f"{name}.faiss"))
                self._searchers[flag] = (index, np.load(self.folder / f"{name}_ids.npy"))
            self._searchers_generation = generation
        return self._searchers[regions]

    # ------------------------------------------------------------------------------------------- search
    @torch.no_grad()
    def search(self, query, top: int = 5, regions: bool = False) -> list[Hit]:
        """Text (a string) or an example picture (a path or PIL image) -> the best `top` pictures and frames, each
        with its best-matching region when the index has boxes; with `regions`, the best regions themselves."""
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        model = self.model
        if isinstance(query, str):
            if not query.strip():
                raise ValueError("query: an empty text")
            vector = model.encode_text([query])
            region_vector = model.class_embeddings([query]) if self.boxes else None
        else:
            vector = model.encode_image(query)
            region_vector = vector if self.boxes else None
        if regions:
            if region_vector is None:
                raise ValueError("regions: this index holds no regions (built without boxes)")
            return self._nearest(region_vector, top, regions=True)
        hits = self._nearest(vector, top, regions=False)
        if region_vector is not None and hits:
            query_region = region_vector.float().cpu().numpy()[0]
            regions_of_hits = self.store.regions_of([hit.entry_id for hit in hits])
            for hit in hits:
                found = regions_of_hits[hit.entry_id]
                if found:
                    scores = np.stack([r.embedding for r in found]) @ query_region
                    best = int(scores.argmax())
                    hit.box, hit.box_score = found[best].box, float(scores[best])
        return hits

    def _nearest(self, vector: torch.Tensor, top: int, regions: bool) -> list[Hit]:
        index, ids = self._searcher(regions)
        if index.ntotal == 0:
            return []
        scores, positions = index.search(np.ascontiguousarray(vector.float().cpu().numpy()), min(top, index.ntotal))
        chosen = [(int(ids[p]), float(s)) for p, s in zip(positions[0], scores[0]) if p >= 0]
        entries = self.store.entries([i for i, _ in chosen])
        hits = []
        for entry_id, score in chosen:
            entry = entries[entry_id]
            hit = Hit(entry.path, score, entry.kind, entry.time, entry_id=entry_id)
            if entry.kind == "region":
                hit.box, hit.box_score = entry.box, score
            hits.append(hit)
        return hits


def build_faiss(vectors: np.ndarray):
    """Exact inner product (`IndexFlatIP`) up to EXACT_LIMIT vectors, HNSW above (no training, fast to query; its
    recall is measured by `launch.retrieval.bench`)."""
    import faiss

    dim = vectors.shape[1]
    if len(vectors) <= EXACT_LIMIT:
        index = faiss.IndexFlatIP(dim)
    else:
        index = hnsw_index(dim)
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def hnsw_index(dim: int):
    import faiss

    index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.hnsw.efSearch = HNSW_EF_SEARCH
    return index


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _under(path: str, *folders) -> bool:
    """Whether `path` lies under one of the scanned folders (files of folders not scanned this time stay)."""
    return any(folder is not None and Path(path).is_relative_to(Path(folder).expanduser().resolve())
               for folder in folders)


def _chunks(frames: Iterator[Frame], size: int) -> Iterator[list[Frame]]:
    chunk: list[Frame] = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="indexing", unit="file", disable=not enabled or total == 0)
