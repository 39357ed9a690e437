"""python -m launch.retrieval.bench [--model DIR] [--pictures 10000] [--entries 100000] [--sizes 100000 1000000]

The retrieval demo's numbers, in one run:
1. building the index of a folder of 64-pixel pictures (PNG, decoding included) in pictures/s, with and without
   the detected regions, and a second run over the unchanged folder as a share of the first build's time;
2. query latency at `--entries` indexed entries (random unit vectors in the store, real text queries through the
   model): text encoding + FAISS search + metadata, p50 and p99, exact and HNSW;
3. FAISS alone on random unit vectors at each of `--sizes`: exact inner product against HNSW, recall@10 of HNSW
   against the exact top 10, p50/p99 per query, build time and memory.
Prints tables and writes JSON (default bench_results/retrieval.json). The model defaults to the tiny recipe's,
untrained (speed does not depend on the weights).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

QUERIES = ["a red circle", "two blue squares", "a green star left of a yellow triangle", "a purple diamond",
           "an orange circle and a red star", "three shapes", "a small square", "a blue triangle above a circle"]


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def write_pictures(folder: Path, count: int) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        picture = Image.new("RGB", (64, 64), tuple(int(c) for c in rng.integers(0, 255, 3)))
        x, y = rng.integers(4, 36, 2)
        ImageDraw.Draw(picture).ellipse([int(x), int(y), int(x) + 20, int(y) + 20],
                                        fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        picture.save(folder / f"{i:06d}.png")


def build_speed(model, model_id: str, pictures: Path, count: int, work: Path, boxes: bool) -> dict:
    from .index import RetrievalIndex

    folder = work / f"index-{'boxes' if boxes else 'plain'}"
    index = RetrievalIndex(folder, model, model_id, boxes=boxes)
    start = time.perf_counter()
    index.update(images=pictures)
    first = time.perf_counter() - start
    start = time.perf_counter()
    report = index.update(images=pictures)
    second = time.perf_counter() - start
    index.close()
    assert report.unchanged == count and report.embedded == 0
    return {"pictures": count, "first_seconds": first, "pictures_per_second": count / first,
            "second_seconds": second, "second_share_of_first": second / first}


def fill_store(folder: Path, count: int, dim: int, model_id: str) -> None:
    """`count` entries with random unit embeddings, written in one transaction (the bench needs the size, not the
    pictures)."""
    from .store import IndexStore

    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = IndexStore(folder)
    store.set_meta("model", model_id)
    store.set_meta("embed_dim", str(dim))
    with store.db:
        store.db.executemany(
            "INSERT INTO entries (path, kind, width, height, embedding) VALUES (?, 'picture', 64, 64, ?)",
            ((f"/synthetic/{i:07d}.png", vectors[i].tobytes()) for i in range(count)))
        store.db.executemany("INSERT INTO files (path, kind, size, mtime_ns, status) VALUES (?, 'picture', 0, 0, "
                             "'indexed')", ((f"/synthetic/{i:07d}.png",) for i in range(count)))
        store._bump()
    store.close()


def query_latency(model, model_id: str, folder: Path, repeats: int) -> dict:
    from .index import RetrievalIndex

    index = RetrievalIndex(folder, model, model_id, boxes=False)
    index.search(QUERIES[0], top=10)  # loads the FAISS index, warms the model
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        index.search(QUERIES[r % len(QUERIES)], top=10)
        times.append(time.perf_counter() - start)
    index.close()
    return {"p50_ms": 1000 * percentile(times, 50), "p99_ms": 1000 * percentile(times, 99), "queries": repeats}


def faiss_alone(size: int, dim: int, queries: int) -> dict:
    import faiss

    from . import index as index_module

    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((size, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    probes = rng.standard_normal((queries, dim)).astype(np.float32)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    rows = {}
    exact_top = None
    for kind in ("exact", "hnsw"):
        start = time.perf_counter()
        if kind == "exact":
            index = faiss.IndexFlatIP(dim)
        else:
            index = index_module.hnsw_index(dim)
        index.add(vectors)
        built = time.perf_counter() - start
        times, tops = [], []
        for probe in probes:
            start = time.perf_counter()
            _, top = index.search(probe[None], 10)
            times.append(time.perf_counter() - start)
            tops.append(top[0])
        tops = np.stack(tops)
        if kind == "exact":
            exact_top = tops
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(tops, exact_top)]))
        rows[kind] = {"build_seconds": built, "p50_ms": 1000 * percentile(times, 50),
                      "p99_ms": 1000 * percentile(times, 99), "recall@10": recall,
                      "memory_mib": len(faiss.serialize_index(index)) / 2**20}
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m launch.retrieval.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a saved model (default: the tiny recipe's, untrained)")
    parser.add_argument("--pictures", type=int, default=10_000)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", default="bench_results/retrieval.json")
    args = parser.parse_args(argv)

    from eval.__main__ import write_json
    from uniperceiver import UniPerceiver

    from . import index as index_module
    from .index import model_fingerprint

    work = Path(tempfile.mkdtemp(prefix="retrieval-bench-"))
    try:
        if args.model:
            export = Path(args.model)
        else:
            from eval.inference_bench import tiny_export
            export = tiny_export(work / "model")
        model, model_id = UniPerceiver.from_pretrained(export), model_fingerprint(export)
        model.encode_image(np.zeros((64, 64, 3), np.uint8))  # a first forward builds the kernels: not timed
        result: dict = {"threads": torch.get_num_threads(), "model": str(args.model or "tiny recipe, untrained")}

        pictures = work / "pictures"
        write_pictures(pictures, args.pictures)
        result["build"] = {"without regions": build_speed(model, model_id, pictures, args.pictures, work, False)}
        if model.has_detection:
            result["build"]["with regions"] = build_speed(model, model_id, pictures, args.pictures, work, True)
        print(f"\nbuilding the index of {args.pictures} pictures of 64 px ({result['threads']} threads)\n")
        print("| index | first build s | pictures/s | unchanged rerun s | share of the first |\n|---|---:|---:|---:|---:|")
        for name, row in result["build"].items():
            print(f"| {name} | {row['first_seconds']:.1f} | {row['pictures_per_second']:.0f} | "
                  f"{row['second_seconds']:.2f} | {100 * row['second_share_of_first']:.1f}% |")

        result["latency"] = {}
        for kind, limit in (("exact", args.entries + 1), ("hnsw", 0)):
            index_module.EXACT_LIMIT = limit
            folder = work / f"latency-{kind}"
            fill_store(folder, args.entries, model.config.embed_dim, model_id)
            result["latency"][kind] = query_latency(model, model_id, folder, args.queries)
        print(f"\nquery latency at {args.entries} entries: text encoding + search + metadata, top 10\n")
        print("| index | p50 ms | p99 ms |\n|---|---:|---:|")
        for kind, row in result["latency"].items():
            print(f"| {kind} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} |")

        result["faiss"] = {size: faiss_alone(size, model.config.embed_dim, args.queries) for size in args.sizes}
        print(f"\nFAISS alone, random unit vectors of {model.config.embed_dim} dimensions, one query at a time\n")
        print("| vectors | index | build s | p50 ms | p99 ms | recall@10 vs exact | memory MiB |\n"
              "|---:|---|---:|---:|---:|---:|---:|")
        for size, rows in result["faiss"].items():
            for kind, row in rows.items():
                print(f"| {size} | {kind} | {row['build_seconds']:.1f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                      f"{row['recall@10']:.3f} | {row['memory_mib']:.0f} |")
        write_json(args.out, result)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
