"""python -m eval SUITE --model FOLDER [suite options] [--out results.json]: evaluate a saved model
(`UniPerceiver.save_pretrained` folder), print a markdown table and optionally write the results as JSON."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import get_suite, list_suites


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
    commands = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name in list_suites():
        suite = get_suite(name)
        sub = commands.add_parser(name, help=suite.help, description=suite.help)
        sub.add_argument("--model", required=True, help="a folder written by UniPerceiver.save_pretrained")
        sub.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
        sub.add_argument("--out", default=None, help="write the results here as JSON")
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")
        suite.add_arguments(sub)
    return parser


def load_model(folder: str, device: str | None = None):
    import torch

    from uniperceiver import UniPerceiver

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return UniPerceiver.from_pretrained(folder).to(device).eval()


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    suite = get_suite(args.suite)
    model = load_model(args.model, args.device)
    results = suite.run(model, args)
    results["model"] = str(Path(args.model))
    print(suite.format(results))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print(f"results written to {out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
