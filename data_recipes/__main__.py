"""Command line of data_recipes:

    python -m data_recipes check SPEC [--limit N] [--json FILE]   validate a dataset, exit 1 on problems
    python -m data_recipes formats                                list the dataset formats and their layouts
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else "--help"
    if command == "check":
        from .check import main as check_main
        return check_main(argv)
    if command == "formats":
        from .formats import FORMATS, format_class
        for name in FORMATS:
            print(f"{name:<15} {format_class(name).layout}")
        return 0
    print(__doc__.strip())
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
