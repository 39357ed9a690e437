"""The image-text retrieval demo, command line: index folders of pictures and videos with a saved model, then search
them by text or by an example picture.

    python launch/retrieval_demo.py --model runs/shapes-tiny/export --images photos/ [--videos clips/] \\
        [--index DIR] --query "a red circle" --top 5 --out hits.png
    python launch/retrieval_demo.py --model DIR --images photos/ --query-image example.png
    python launch/retrieval_demo.py --model DIR --images photos/ --serve     # the web page on 127.0.0.1:7860

Each run first brings the index up to date (only new or changed files are embedded; deleted ones are dropped; a
build killed at any moment resumes to the same index), then prints each hit's score, path, video time and box,
lists the files it skipped and why, and writes a contact sheet of the hits. The index lives in `--index` (default:
a folder under the project cache named after the model and the folders).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

MAX_QUERY_CHARS = 500


def default_index_folder(model: str, images: str | None, videos: str | None) -> Path:
    from data_recipes.shapes import cache_dir

    key = json.dumps([str(Path(p).resolve()) if p else None for p in (model, images, videos)])
    return Path(cache_dir()) / "retrieval" / hashlib.sha256(key.encode()).hexdigest()[:16]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python launch/retrieval_demo.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved UniPerceiver folder (e.g. runs/shapes-tiny/export)")
    parser.add_argument("--images", help="a folder of pictures (searched recursively)")
    parser.add_argument("--videos", help="a folder of videos; frames are sampled by timestamp")
    parser.add_argument("--index", help="the index folder (default: under the project cache)")
    parser.add_argument("--rebuild", action="store_true", help="delete the index folder's index and start anew")
    parser.add_argument("--query", help="a text query")
    parser.add_argument("--query-image", help="an example picture to search by")
    parser.add_argument("--regions", action="store_true", help="search the detected regions instead of pictures")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--out", help="write a contact sheet of the hits (PNG)")
    parser.add_argument("--every-seconds", type=float, default=2.0, help="video sampling interval")
    parser.add_argument("--max-frames", type=int, default=16, help="frames per video at most")
    parser.add_argument("--no-boxes", action="store_true", help="do not index detected regions")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--serve", action="store_true", help="then serve the web page until interrupted")
    parser.add_argument("--host", default="127.0.0.1", help="the address to serve on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if not args.images and not args.videos:
        raise SystemExit("give --images FOLDER, --videos FOLDER or both")
    if args.query and len(args.query) > MAX_QUERY_CHARS:
        raise SystemExit(f"--query: {len(args.query)} characters; at most {MAX_QUERY_CHARS}")
    if args.query and args.query_image:
        raise SystemExit("give --query or --query-image, not both")

    from launch.retrieval.index import RetrievalIndex, model_fingerprint
    from launch.retrieval.media import PICTURE_SUFFIXES, VIDEO_SUFFIXES
    from launch.retrieval.store import STORE_FILE
    from uniperceiver import UniPerceiver

    model_folder = Path(args.model)
    if not (model_folder / "config.json").is_file() or not (model_folder / "model.safetensors").is_file():
        raise SystemExit(f"--model {args.model}: not a saved model folder (expected config.json and "
                         "model.safetensors written by UniPerceiver.save_pretrained)")
    folder = Path(args.index) if args.index else default_index_folder(args.model, args.images, args.videos)
    if args.rebuild:
        for name in os.listdir(folder) if folder.is_dir() else []:
            if name.startswith(STORE_FILE) or name.endswith((".faiss", ".npy")) or name == "derived.json":
                (folder / name).unlink()
    model = UniPerceiver.from_pretrained(model_folder, device=args.device)
    index = RetrievalIndex(folder, model, model_fingerprint(model_folder), batch_size=args.batch_size,
                           boxes=False if args.no_boxes else None)
    try:
        report = index.update(args.images, args.videos, args.every_seconds, args.max_frames,
                              progress=not args.no_progress)
        counts = index.store.counts()
        print(f"index {folder}: {counts.get('picture', 0)} pictures, {counts.get('frame', 0)} video frames, "
              f"{counts.get('region', 0)} regions; this run added {report.added}, changed {report.changed}, "
              f"removed {report.removed}, left {report.unchanged} unchanged")
        for path, reason in report.skipped:
            print(f"skipped {path}: {reason}")
        if counts.get("picture", 0) + counts.get("frame", 0) == 0:
            print(f"the index is empty: no readable pictures ({', '.join(PICTURE_SUFFIXES)}) or videos "
                  f"({', '.join(VIDEO_SUFFIXES)}) under {' and '.join(f for f in (args.images, args.videos) if f)}")
        result = {"index": str(folder), "update": report.to_dict(), "counts": counts}
        query = args.query or args.query_image
        if query:
            hits = index.search(query, top=args.top, regions=args.regions)
            for rank, hit in enumerate(hits, 1):
                print(f"{rank:3d}. {hit.describe()}")
            result["hits"] = [hit.__dict__ for hit in hits]
            if args.out:
                from launch.retrieval.sheet import contact_sheet
                from launch.training.files import atomic_write

                sheet = contact_sheet(hits, f"{'regions' if args.regions else 'pictures'} for: {query}")
                atomic_write(Path(args.out), lambda f: sheet.save(f, format="PNG"))
                print(f"contact sheet: {args.out}")
        if args.serve:
            from launch.retrieval.web import create_app
            from launch.web import serve

            print(f"serving the retrieval page on http://{args.host}:{args.port}/ (Ctrl-C stops)")
            serve(create_app(index, [f for f in (args.images, args.videos) if f]), args.host, args.port)
        return result
    finally:
        index.close()


def cli() -> None:
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":  # the project is installed (pip install -e .), so the script imports it as is
    cli()
