"""Zero-shot evaluation suites and their metrics. A suite is registered by name and run from one CLI:

    python -m eval shapes --model runs/shapes-tiny/export --limit 100 --out results.json
    python -m eval coco_retrieval --model runs/x/export --data /data/coco --compare old.json
    torchrun --nproc_per_node 8 -m eval imagenet --model runs/x/export --data /data/imagenet

or from Python: `from eval.shapes import evaluate_shapes, format_table`, `from eval.benchmarks import
evaluate_retrieval, evaluate_captioning, evaluate_vqa, evaluate_classification`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Suite:
    """An evaluation suite. `add_arguments` adds the suite's own CLI options (the CLI adds --model, --data,
    --limit, --batch-size, --out, --compare to every suite); `run(model, args, world)` evaluates a loaded model
    on this rank's share (`eval.distributed.EvalWorld`) and returns a JSON-able results dict on rank 0, None on
    the others; `format(results)` renders it for the terminal."""
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Any, argparse.Namespace, Any], Optional[dict]]
    format: Callable[[dict], str]


_SUITES: dict[str, Suite] = {}


def register_suite(suite: Suite) -> Suite:
    if suite.name in _SUITES and _SUITES[suite.name] is not suite:
        raise ValueError(f"evaluation suite {suite.name!r} is already registered")
    _SUITES[suite.name] = suite
    return suite


def get_suite(name: str) -> Suite:
    if name not in _SUITES:
        raise ValueError(f"unknown evaluation suite {name!r}; registered suites: {list_suites()}")
    return _SUITES[name]


def list_suites() -> list[str]:
    return sorted(_SUITES)


# Importing a suite module registers it.
from . import benchmarks, detection, shapes, text_to_image  # noqa: E402,F401

__all__ = ["Suite", "get_suite", "list_suites", "register_suite"]
