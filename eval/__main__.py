"""python -m eval SUITE --model FOLDER [--data ROOT] [--limit N] [--out results.json] [--compare old.json]

Evaluates a saved model (a `UniPerceiver.save_pretrained` folder, e.g. runs/<name>/export) on a benchmark,
prints a markdown table and optionally writes the results as JSON. Under `torchrun` or `deepspeed` the images
are split across the ranks and rank 0 reports."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import get_suite, list_suites


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # the deepspeed launcher puts --local_rank=N before the suite's name, torchrun sets LOCAL_RANK instead
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name in list_suites():
        suite = get_suite(name)
        sub = commands.add_parser(name, help=suite.help, description=suite.help)
        sub.add_argument("--model", required=True, help="a folder written by UniPerceiver.save_pretrained")
        sub.add_argument("--data", default=None, help="the dataset's root folder, in its official layout")
        sub.add_argument("--limit", type=int, default=None, help="only N images: the first N (questions for vqav2), "
                         "evenly spaced over the classes for imagenet")
        sub.add_argument("--batch-size", type=int, default=32)
        sub.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1) // 2,
                         help="DataLoader processes decoding images (0: in the main process)")
        sub.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
        sub.add_argument("--out", default=None, help="write the results here as JSON")
        sub.add_argument("--compare", default=None, help="an earlier results JSON: print the differences")
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")
        suite.add_arguments(sub)
    return parser


def load_model(folder: str, device: str | None = None):
    import torch

    from uniperceiver import UniPerceiver

    if not Path(folder).is_dir():
        raise FileNotFoundError(f"--model {folder}: no such folder; expected a UniPerceiver.save_pretrained folder "
                                "(e.g. runs/<name>/export)")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # one GPU per rank under torchrun / deepspeed
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    return UniPerceiver.from_pretrained(folder, device=device)


def write_json(path: str | Path, results: dict) -> Path:
    """Written to a temporary file and renamed: an interrupted run never leaves half a results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(results, indent=1, default=str))
    os.replace(temporary, path)
    return path


def main(argv: list[str] | None = None) -> dict | None:
    """Runs the command line; returns the results on rank 0 (None on the other ranks)."""
    import torch

    from .compare import compare, format_comparison, load_results
    from .distributed import eval_world

    args = build_parser().parse_args(argv)
    suite = get_suite(args.suite)
    previous = load_results(args.compare) if args.compare else None  # a bad file fails before the long part
    model = load_model(args.model, args.device)
    world = eval_world(next(model.parameters()).device)
    with torch.no_grad():
        results = suite.run(model, args, world)
    world.close()  # not on an error: a barrier would wait for the failed rank until the timeout
    if not world.is_main:
        return None
    results["model"] = str(Path(args.model))
    results["world_size"] = world.world_size
    print(suite.format(results))
    if previous is not None:
        if previous.get("suite") != results["suite"]:
            print(f"\nnote: {args.compare} holds results of suite {previous.get('suite')!r}, not {results['suite']!r}")
        print(f"\ncompared with {args.compare}:\n")
        print(format_comparison(compare(results, previous), Path(args.compare).name))
    if args.out:
        predictions = results.pop("predictions", None)
        if predictions is not None:  # COCO's caption results / the VQA server's format, ready to submit
            path = Path(args.out)
            results["predictions_file"] = str(write_json(path.with_name(f"{path.stem}.predictions.json"),
                                                         predictions))
        print(f"results written to {write_json(args.out, results)}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
