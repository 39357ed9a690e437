"""Validate a dataset before training on it: open every image and count what is wrong.

    python -m data_recipes check "coco_karpathy:/data/coco?split=test" [--limit N] [--json report.json]

The report counts samples, missing files, unreadable images, empty captions, boxes outside the image (or
with a non-positive size) and questions without answers; the exit code is 1 when any is non-zero.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from itertools import islice

from torch.utils.data import IterableDataset
from tqdm import tqdm

from .formats import open_dataset
from .samples import MissingImageError, Sample, UnreadableImageError

PROBLEMS = ("missing_files", "unreadable_images", "empty_captions", "bad_boxes", "unanswered_questions",
            "stream_errors")
LABELS = {"samples": "samples", "images": "images opened", "missing_files": "missing files",
          "unreadable_images": "unreadable images", "empty_captions": "empty captions",
          "bad_boxes": "boxes outside the image or with non-positive size",
          "unanswered_questions": "questions without answers", "stream_errors": "corrupt shard members"}
MAX_EXAMPLES = 5  # problem examples listed per kind


@dataclass
class CheckReport:
    spec: str
    samples: int = 0
    images: int = 0
    missing_files: int = 0
    unreadable_images: int = 0
    empty_captions: int = 0
    bad_boxes: int = 0
    unanswered_questions: int = 0
    stream_errors: int = 0
    examples: dict = field(default_factory=dict)

    @property
    def problems(self) -> int:
        return sum(getattr(self, name) for name in PROBLEMS)

    def note(self, kind: str, message: str, count: int = 1) -> None:
        setattr(self, kind, getattr(self, kind) + count)
        examples = self.examples.setdefault(kind, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(message)

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in ("spec", "samples", "images", *PROBLEMS)}
        return {**out, "problems": self.problems, "examples": self.examples}

    def format(self) -> str:
        width = max(len(label) for label in LABELS.values())
        lines = [f"check {self.spec}"]
        for name, label in LABELS.items():
            value = getattr(self, name)
            if name != "stream_errors" or value:
                lines.append(f"  {label:<{width}}  {value}")
        for kind, examples in self.examples.items():
            lines.append(f"  {LABELS[kind]}, e.g.:")
            lines.extend(f"    {example}" for example in examples)
        lines.append("OK: no problems found" if not self.problems else f"FAILED: {self.problems} problem(s)")
        return "\n".join(lines)


def _box_problem(box, width, height) -> str | None:
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        return f"malformed box {box!r}"
    if w <= 0 or h <= 0:
        return f"box {box} has a non-positive size"
    if width is not None and height is not None:
        eps = 1e-3
        if x < -eps or y < -eps or x + w > width + eps or y + h > height + eps:
            return f"box {box} is outside the {width}x{height} image"
    return None


def check_sample(sample: Sample, report: CheckReport, task_fields, image_status: dict) -> None:
    """Add one sample's problems to `report`. `image_status` caches per file so an image that several samples
    share (VQA: several questions per image) is opened and counted once."""
    report.samples += 1
    key = sample.image_name or str(sample.image_id)
    if key not in image_status:
        try:
            image = sample.image
            image_status[key] = image.size
            report.images += 1
        except MissingImageError as error:
            image_status[key] = None
            report.note("missing_files", str(error))
        except UnreadableImageError as error:
            image_status[key] = None
            report.note("unreadable_images", str(error))
    size = image_status[key]
    where = f"sample {sample.image_id}"
    if "captions" in task_fields or sample.captions is not None:
        captions = sample.captions or []
        blank = sum(1 for c in captions if not str(c).strip())
        if not captions or blank:
            report.note("empty_captions", f"{where}: {'no captions' if not captions else f'{blank} empty caption(s)'}",
                        count=max(blank, 1))
    if sample.boxes:
        width, height = size if size else (sample.width, sample.height)
        for box in sample.boxes:
            problem = _box_problem(box, width, height)
            if problem:
                report.note("bad_boxes", f"{where}: {problem}")
    if sample.question is not None and sample.answers is not None and not any(str(a).strip() for a in sample.answers):
        report.note("unanswered_questions",
                    f"{where}: question {sample.question_id} {sample.question!r} has no answers")


def check_dataset(spec: str, limit: int | None = None, progress: bool = True) -> CheckReport:
    """Iterate the dataset SPEC names (the first `limit` samples), opening every image; return the counts."""
    dataset = open_dataset(spec)
    report = CheckReport(spec=spec)
    for url in getattr(dataset, "missing_shards", []):
        report.note("missing_files", f"{url}: no such shard")
    task_fields = tuple(getattr(dataset, "task_fields", ()))
    try:
        total = len(dataset)
    except TypeError:
        total = None
    if limit is not None:
        total = min(total, limit) if total is not None else limit
    if isinstance(dataset, IterableDataset) or total is None:
        samples = iter(dataset)
    else:
        samples = (dataset[i] for i in range(total))
    if limit is not None:
        samples = islice(samples, limit)
    image_status: dict = {}
    for sample in tqdm(samples, total=total, desc="check", unit="sample", disable=not progress, file=sys.stderr):
        check_sample(sample, report, task_fields, image_status)
    for error, count in getattr(dataset, "stream_errors", {}).items():
        report.note("stream_errors", f"{count} x {error}", count=count)
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m data_recipes check", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="FORMAT:PATH?key=value&..., e.g. 'vqav2:/data/vqa?split=val'")
    parser.add_argument("--limit", type=int, default=None, help="check only the first N samples")
    parser.add_argument("--json", default=None, help="also write the report to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        report = check_dataset(args.spec, limit=args.limit, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, ImportError) as error:  # a missing annotation file, a bad spec
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.format())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 1 if report.problems else 0
