"""The standard zero-shot benchmarks, each on its standard split, with the field's metric code, read from the
layout of the dataset's official release (the loaders of `data_recipes.formats`):

- coco_caption: COCO Karpathy test (5k images); BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE by pycocoevalcap
  after its PTB tokenizer (`eval.caption_metrics`). `--format flickr30k` or `--annotations FILE` score any
  caption set in Karpathy's JSON format.
- coco_retrieval (5k test) and flickr30k_retrieval (1k test): every image against every caption (5 per image);
  R@1/5/10 both ways, a query hitting when any of its correct matches is in its top K (CLIP_benchmark).
- vqav2: the val split (the test splits have no public answers: their predictions are written in the
  evaluation server's format); the official accuracy overall and per answer type.
- imagenet: ImageNet val in the ImageFolder layout (or any ImageFolder with a class-name file); zero-shot
  top-1, top-5 and mean per-class recall, each class the mean of its normalised template embeddings.

Every suite splits its images over the ranks of a `torchrun` / `deepspeed` launch (`eval.distributed`) and
computes the metrics on rank 0.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import Suite, register_suite
from .distributed import EvalWorld
from .encoding import encode_images, encode_texts, first, map_images, map_in_batches, require_samples, spread
from .metrics import mean_per_class_recall, mean_vqa_accuracy, retrieval_recall, topk_accuracy

RECALL_KS = (1, 5, 10)


def _open(spec_format: str, root: str | None, suite: str, **options):
    """The dataset of an official layout, or a clear error when --data is missing."""
    from data_recipes.formats import open_dataset

    if not root:
        raise ValueError(f"suite {suite}: give --data ROOT, the folder of the dataset's official release "
                         f"(see the README's evaluation section)")
    return open_dataset(f"{spec_format}:{root}", **{key: value for key, value in options.items() if value is not None})


def _results(suite: str, split: str, root: str | None, counts: dict, settings: dict) -> dict[str, Any]:
    return {"suite": suite, "split": split, "data": str(root) if root else None, "counts": counts,
            "settings": settings, "metrics": {}, "seconds": {}}


# ----------------------------------------------------------------------------------------------- retrieval
def evaluate_retrieval(model, dataset, world: EvalWorld, batch_size: int = 64, limit: int | None = None,
                       progress: bool = True, suite: str = "retrieval", workers: int = 0) -> dict[str, Any] | None:
    """Image<->text recall@1/5/10 over the first `limit` images of a captions dataset (all their captions).
    Rank 0 returns the results, other ranks None."""
    require_samples(dataset, suite)
    indices = first(len(dataset), limit)
    texts, text_to_image = [], []
    for position, index in enumerate(indices):
        captions = dataset[index].captions or []
        if not captions:
            raise ValueError(f"{suite}: image {dataset[index].image_name} has no caption")
        texts += captions
        text_to_image += [position] * len(captions)
    start = time.perf_counter()
    images = encode_images(model, world, dataset, batch_size, progress, indices, workers)
    text_embeddings = encode_texts(model, world, texts, batch_size, progress, "captions")
    if not world.is_main:
        return None
    results = _results(suite, getattr(dataset, "split", None), getattr(dataset, "root", None),
                       {"images": len(indices), "texts": len(texts)}, {"limit": limit, "ks": list(RECALL_KS)})
    results["metrics"] = retrieval_recall(images @ text_embeddings.T, text_to_image, RECALL_KS)
    results["seconds"]["retrieval"] = round(time.perf_counter() - start, 3)
    return results


# ---------------------------------------------------------------------------------------------- captioning
def evaluate_captioning(model, dataset, world: EvalWorld, batch_size: int = 32, limit: int | None = None,
                        progress: bool = True, beams: int = 3, suite: str = "coco_caption",
                        metrics: Sequence[str] | None = None, workers: int = 0) -> dict[str, Any] | None:
    """Captions of the first `limit` images scored against all their references by the official COCO caption
    evaluation. Rank 0 returns the results (with the predictions in COCO's results format), others None."""
    from .caption_metrics import coco_caption_scores

    require_samples(dataset, suite)
    indices = first(len(dataset), limit)
    samples = [dataset[i] for i in indices]  # the annotations are checked before the long generation
    empty = [s.image_name for s in samples if not s.captions]
    if empty:
        raise ValueError(f"{suite}: {len(empty)} image(s) have no reference caption, e.g. {empty[0]}")
    ids = [s.image_id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{suite}: image ids repeat in the annotation file (e.g. {ids[0]!r}); each image once")
    start = time.perf_counter()
    predictions = map_images(model, world, dataset, indices, lambda images, _: model.caption(images, beams=beams),
                             batch_size, progress, "captions", workers)
    if not world.is_main:
        return None
    kwargs = {} if metrics is None else {"metrics": tuple(metrics)}
    scores = coco_caption_scores(dict(zip(ids, predictions)), {s.image_id: list(s.captions) for s in samples},
                                 **kwargs)
    results = _results(suite, getattr(dataset, "split", None), getattr(dataset, "root", None),
                       {"images": len(indices)}, {"limit": limit, "beams": beams, "format": dataset.format_name,
                                                  "tokenizer": "pycocoevalcap PTBTokenizer (Java)"})
    unavailable = scores.pop("unavailable", {}) or {}
    results["metrics"] = {f"caption/{name}": value for name, value in scores.items()}
    if unavailable:
        results["unavailable"] = unavailable
    results["predictions"] = [{"image_id": i, "caption": p} for i, p in zip(ids, predictions)]
    results["seconds"]["captioning"] = round(time.perf_counter() - start, 3)
    return results


# ---------------------------------------------------------------------------------------------------- VQA
def read_answer_list(path: str | Path) -> list[str]:
    """A candidate-answer file: a JSON list of strings, or text with one answer per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--answers {path}: no such file; expected a JSON list or one answer per line")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
            raise ValueError(f"--answers {path}: expected a JSON list of answer strings")
        answers = data
    else:
        answers = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not answers:
        raise ValueError(f"--answers {path}: no answers")
    return answers


def default_vqa_answers(dataset) -> tuple[list[str], str]:
    """VQAv2's 3,129 most frequent train answers when the train annotations sit in the root, else those of the
    evaluated split (an optimistic vocabulary: every correct answer is a candidate); and where they came from."""
    from tasks.vqa import vqav2_answer_list

    root = Path(dataset.root)
    for candidate in (root / "v2_mscoco_train2014_annotations.json",
                      root / "annotations" / "v2_mscoco_train2014_annotations.json"):
        if candidate.is_file():
            return vqav2_answer_list(candidate), str(candidate)
    if not getattr(dataset, "has_answers", False):
        raise ValueError(f"vqav2: split {dataset.split!r} has no answers and {root} holds no "
                         "v2_mscoco_train2014_annotations.json; give the candidate answers with --answers FILE")
    return vqav2_answer_list(dataset.annotations_path), f"{dataset.annotations_path} (the evaluated split)"


def evaluate_vqa(model, dataset, world: EvalWorld, batch_size: int = 32, limit: int | None = None,
                 progress: bool = True, answers: Sequence[str] | None = None, mode: str = "rank",
                 beams: int = 1, workers: int = 0) -> dict[str, Any] | None:
    """Answers to the first `limit` questions, ranked over `answers` (mode "rank") or generated ("generate");
    the official VQA accuracy overall and per answer type when the split has answers. The predictions are
    returned in the evaluation server's format ([{"question_id", "answer"}])."""
    if mode not in ("rank", "generate"):
        raise ValueError(f"vqav2: --mode must be rank or generate, got {mode!r}")
    require_samples(dataset, "vqav2")
    source = None
    if mode == "rank" and answers is None:
        answers, source = default_vqa_answers(dataset)
    indices = first(len(dataset), limit)
    if getattr(dataset, "has_answers", True):
        few = [dataset[i].question_id for i in indices if len(dataset[i].answers or []) < 2]
        if few:
            raise ValueError(f"vqav2: {dataset.annotations_path}: question(s) {few[:5]} have fewer than 2 human "
                             "answers; the official accuracy needs VQAv2's 10")
    start = time.perf_counter()
    answer_embeddings = None
    if mode == "rank":
        answer_embeddings = encode_texts(model, world, list(answers), batch_size, progress, "answers")
        answer_embeddings = world.broadcast(answer_embeddings)

    def answer(images, positions: list[int]) -> list[str]:
        questions = [dataset[indices[i]].question for i in positions]
        if mode == "generate":
            return model.answer(images, questions, beams=beams)
        queries = F.normalize(model.vqa_query(images, questions).float(), dim=-1)
        best = (queries @ answer_embeddings.to(queries.device).T).argmax(dim=-1).tolist()
        return [answers[i] for i in best]

    predictions = map_images(model, world, dataset, indices, answer, batch_size, progress, "questions", workers)
    if not world.is_main:
        return None
    samples = [dataset[i] for i in indices]
    results = _results("vqav2", dataset.split, dataset.root, {"questions": len(indices)},
                       {"limit": limit, "mode": mode, "answers": len(answers) if answers else None,
                        "answer_source": source, "beams": beams if mode == "generate" else None})
    results["predictions"] = [{"question_id": s.question_id, "answer": p} for s, p in zip(samples, predictions)]
    if getattr(dataset, "has_answers", True):
        gt = [s.answers for s in samples]
        results["metrics"]["vqa/accuracy"] = mean_vqa_accuracy(predictions, gt)
        for kind in sorted({s.answer_type for s in samples if s.answer_type}):
            picked = [i for i, s in enumerate(samples) if s.answer_type == kind]
            results["metrics"][f"vqa/accuracy[{kind}]"] = mean_vqa_accuracy([predictions[i] for i in picked],
                                                                            [gt[i] for i in picked])
    else:
        results["note"] = (f"split {dataset.split!r} has no public answers: submit the predictions to the "
                           "evaluation server")
    results["seconds"]["vqa"] = round(time.perf_counter() - start, 3)
    return results


# ---------------------------------------------------------------------------------------- classification
def resolve_templates(value: str) -> list[str]:
    """'openai' (CLIP's 80 ImageNet templates), 'simple' (open_clip's 7), or a file with one template per line."""
    from tasks.classification import imagenet_templates

    if value in ("openai", "simple"):
        return imagenet_templates(value)
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"--templates {value}: expected openai, simple or a file with one template "
                                "(holding '{}') per line")
    templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"--templates {path}: every line needs '{{}}' for the class name; bad: {bad[:3]}")
    return templates


def imagenet_names_for(dataset) -> list[str]:
    """The dataset's names file when it has one; for ImageNet's 1000 wnid folders (n01440764...) without one,
    open_clip's readable class names, which follow the sorted-wnid order."""
    from tasks.classification import imagenet_class_names

    names = list(dataset.class_names)
    if names == list(dataset.folders) and all(re.fullmatch(r"n\d{8}", n) for n in names):
        if len(names) != 1000:
            raise ValueError(f"imagenet: {dataset.root} has {len(names)} WordNet-id folders, not ImageNet's 1000: "
                             "give their readable names with --classnames FILE (or ROOT/<split>/classnames.txt)")
        return imagenet_class_names()
    return names


def evaluate_classification(model, dataset, world: EvalWorld, batch_size: int = 64, limit: int | None = None,
                            progress: bool = True, templates: Sequence[str] = ("a photo of a {}.",),
                            class_names: Sequence[str] | None = None, workers: int = 0) -> dict[str, Any] | None:
    """Zero-shot top-1, top-5 (with 5 classes or more) and mean per-class recall over the first `limit` images;
    each class is the normalised mean of its normalised template embeddings. Rank 0 returns the results."""
    from tasks.classification import class_embeddings

    require_samples(dataset, "imagenet")
    names = list(class_names or dataset.class_names)
    indices = spread(len(dataset), limit)  # the records are sorted by class
    start = time.perf_counter()
    images = encode_images(model, world, dataset, batch_size, progress, indices, workers)

    def encode_classes(batch: list[int]) -> Tensor:  # ~1k prompts per forward (ImageNet: 1000 x 80 in all)
        return F.normalize(class_embeddings(model, [names[i] for i in batch], list(templates)).float(), dim=-1)

    classes = map_in_batches(world, len(names), encode_classes, max(1, 1024 // len(templates)), progress, "classes")
    if not world.is_main:
        return None
    logits = images @ torch.stack(classes).T
    labels = torch.tensor([dataset.records[i][1] for i in indices])
    ks = (1, 5) if len(names) >= 5 else (1,)
    results = _results("imagenet", getattr(dataset, "split", None), str(dataset.root),
                       {"images": len(indices), "classes": len(names)},
                       {"limit": limit, "templates": len(templates)})
    results["metrics"] = {f"classification/{k}": v for k, v in topk_accuracy(logits, labels, ks).items()}
    results["metrics"]["classification/mean_per_class_recall"] = mean_per_class_recall(logits, labels)
    results["seconds"]["classification"] = round(time.perf_counter() - start, 3)
    return results


# ------------------------------------------------------------------------------------------------ the CLI
def _retrieval_suite(name: str, fmt: str, default_split: str, description: str) -> Suite:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--split", default=default_split, help=f"Karpathy split (default: {default_split})")

    def run(model, args, world):
        dataset = _open(fmt, args.data, name, split=args.split)
        return evaluate_retrieval(model, dataset, world, args.batch_size, args.limit, not args.no_progress, name,
                                  workers=args.workers)

    return Suite(name, description, add, run, format_results)


def _add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="test", help="Karpathy split (default: test)")
    parser.add_argument("--format", default="coco_karpathy", choices=("coco_karpathy", "flickr30k"),
                        help="the caption set's layout (both are Karpathy's JSON)")
    parser.add_argument("--annotations", default=None, help="a Karpathy-format JSON other than ROOT's default")
    parser.add_argument("--beams", type=int, default=3, help="beam size (1: greedy)")


def _run_captioning(model, args, world):
    dataset = _open(args.format, args.data, "coco_caption", split=args.split, annotations=args.annotations)
    return evaluate_captioning(model, dataset, world, args.batch_size, args.limit, not args.no_progress, args.beams,
                               workers=args.workers)


def _add_vqa_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="val", choices=("val", "test-dev", "test", "train"))
    parser.add_argument("--mode", default="rank", choices=("rank", "generate"))
    parser.add_argument("--answers", default=None, help="candidate answers (JSON list or one per line); default: "
                        "the 3,129 most frequent of ROOT/v2_mscoco_train2014_annotations.json")
    parser.add_argument("--beams", type=int, default=1, help="beam size in generate mode")


def _run_vqa(model, args, world):
    dataset = _open("vqav2", args.data, "vqav2", split=args.split)
    answers = read_answer_list(args.answers) if args.answers else None
    return evaluate_vqa(model, dataset, world, args.batch_size, args.limit, not args.no_progress, answers,
                        args.mode, args.beams, workers=args.workers)


def _add_imagenet_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="val", help="the sub-folder of ROOT to read (default: val; '' for ROOT). "
                        "ROOT may also hold the official ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz: "
                        "they are sorted into ROOT/val/<wnid>/ on first use")
    parser.add_argument("--classnames", default=None, help="class names file (.txt one per line in sorted-folder "
                        "order, or .json); default: ROOT/<split>/classnames.txt, or open_clip's ImageNet names")
    parser.add_argument("--templates", default="openai", help="openai (80), simple (7) or a file")


def prepare_official_imagenet_val(root: str | Path) -> None:
    """ImageNet's official release, ILSVRC2012_img_val.tar (50k images in one folder) and
    ILSVRC2012_devkit_t12.tar.gz (their labels) in ROOT, sorted once into ROOT/val/<wnid>/ by torchvision's
    `ImageNet`, which checks the archives' MD5 sums and reads the devkit's ground truth. Nothing to do when
    ROOT/val exists already (the layout torchvision and timm leave) or ROOT holds no archive."""
    root = Path(root)
    if (root / "val").is_dir() or not (root / "ILSVRC2012_img_val.tar").is_file():
        return
    if not (root / "ILSVRC2012_devkit_t12.tar.gz").is_file():
        raise FileNotFoundError(f"{root / 'ILSVRC2012_devkit_t12.tar.gz'}: no such file; the labels of "
                                "ILSVRC2012_img_val.tar come from the official devkit archive, expected beside it")
    from torchvision.datasets import ImageNet

    ImageNet(str(root), split="val")


def _run_imagenet(model, args, world):
    if args.data and args.split == "val" and world.is_main:
        prepare_official_imagenet_val(args.data)
    world.barrier()
    dataset = _open("imagefolder", args.data, "imagenet", split=args.split or None, names=args.classnames)
    return evaluate_classification(model, dataset, world, args.batch_size, args.limit, not args.no_progress,
                                   resolve_templates(args.templates), imagenet_names_for(dataset),
                                   workers=args.workers)


def format_results(results: dict[str, Any]) -> str:
    """A heading with the counts and a markdown table of the metrics."""
    counts = ", ".join(f"{v} {k}" for k, v in results.get("counts", {}).items())
    lines = [f"{results['suite']} [{results.get('split')}]: {counts}", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {key} | {value:.4f} |" for key, value in results["metrics"].items()]
    for metric, reason in results.get("unavailable", {}).items():
        lines.append(f"| {metric} | unavailable: {reason} |")
    if results.get("note"):
        lines += ["", results["note"]]
    return "\n".join(lines)


for _suite in (
        _retrieval_suite("coco_retrieval", "coco_karpathy", "test",
                         "COCO 5k test (Karpathy): image<->text R@1/5/10"),
        _retrieval_suite("flickr30k_retrieval", "flickr30k", "test",
                         "Flickr30k 1k test (Karpathy): image<->text R@1/5/10"),
        Suite("coco_caption", "COCO Karpathy test captioning: BLEU, METEOR, ROUGE-L, CIDEr, SPICE (pycocoevalcap)",
              _add_caption_arguments, _run_captioning, format_results),
        Suite("vqav2", "VQAv2 val: official accuracy overall and per answer type", _add_vqa_arguments, _run_vqa,
              format_results),
        Suite("imagenet", "ImageNet val (or any ImageFolder with class names): zero-shot top-1/top-5/mean recall",
              _add_imagenet_arguments, _run_imagenet, format_results)):
    register_suite(_suite)
