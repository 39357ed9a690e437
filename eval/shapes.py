"""The zero-shot suite of the built-in "shapes" dataset: retrieval, classification, VQA and captioning of one
split, each metric next to its chance level, so that a tiny model's numbers can be read at a glance.

    from eval.shapes import evaluate_shapes, format_table
    results = evaluate_shapes(model, split="test")      # {"metrics", "chance", "x_chance", ...}
    print(format_table(results))

What is measured (every task ranks candidates by cosine similarity, as the model is trained to):
- retrieval: every image against every distinct caption string of the split. An image's correct texts are all
  its captions (4 templates); a text is correct for every image it describes (two scenes of one red circle
  share "a red circle"). Recall@1/5/10 both ways; chance is the exact expected recall of a random ranking.
- classification: the image against `class_names(config)` in the template "a photo of a {}." (the
  classification task's default, which the tiny recipe trains with); top-1 and mean per-class recall.
- vqa: the [image, question] query ranked against the whole `answer_list(config)`; exact-match accuracy
  (shapes has one answer per question) overall and per question type, chance 1/len(answer list), and the
  blind baseline overall and per type (`blind_vqa_accuracies`: the train split's most frequent answer to the
  same question). With a grounding layer (`detection.ground_text`), also how often a phrase attends most to
  the context region of the one object it names, or to the "no object" slot when it names none
  (grounding_accuracy, and [object] and [no_object] apart; chance 1 / (context_regions + 1)), and with
  `detection.ground_counts` how often a counting phrase matches as many regions as it names objects
  (count_match_accuracy: the number the word carries, so an object no region found makes it wrong; its "chance"
  is one number of the 0..context_regions the layer can say, as for the grounding).
- captioning: greedy (or beam) captions against all of the image's captions, CIDEr-D and BLEU-4 by
  pycocoevalcap on Python-tokenised text (no Java). Their "chance" is the score of a real caption of another
  image (the references rolled by one): what a fluent captioner blind to the image gets.
- detection (models with a detection head): `model.detect` with the shape names as categories, box AP
  (mAP@[.5:.95]), AP50 and AP75 by pycocotools against the split's boxes; then with the 30 colour-and-shape
  phrases ("red circle"), which detection never trains on, AP and AP50 (phrases_AP, phrases_AP50). No chance
  level.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import Suite, register_suite
from .encoding import model_device, model_image_size
from .metrics import (bleu, cider_d, exact_match_accuracy, mean_per_class_recall, ratio_to_chance,
                      retrieval_chance, retrieval_recall, topk_accuracy)

TASKS = ("retrieval", "classification", "vqa", "captioning", "detection")
CLASSIFICATION_TEMPLATES = ("a photo of a {}.",)  # = uniperceiver.model.DEFAULT_TEMPLATES
RECALL_KS = (1, 5, 10)


# ------------------------------------------------------------------------------------------------- the data
def resolve_shapes_data(split: str = "test", dataset: Any = None, config=None):
    """(the split, the train split or None, the ShapesConfig) from `dataset`: None (the cached build of
    `config`, default ShapesConfig()), a SPEC "shapes[:FOLDER]?key=value..." (ShapesConfig fields; a `split`
    option wins over `split`), a DatasetDict or a single split (a `datasets.Dataset`; no blind baseline).
    `config` must describe a dataset given as data: it gives the class names and the answer list."""
    from data_recipes.shapes import ShapesConfig, build_shapes_dataset

    if isinstance(dataset, str):
        from data_recipes.formats import parse_spec
        from data_recipes.formats.shapes import _config_from_options

        name, folder, options = parse_spec(dataset)
        if name != "shapes":
            raise ValueError(f"evaluate_shapes: {dataset!r} is not a shapes SPEC (shapes[:FOLDER]?key=value&...)")
        split = options.pop("split", split)
        if options.pop("task", "image") != "image":
            raise ValueError(f"evaluate_shapes: {dataset!r}: the suite reads whole images; leave out task=")
        config = _config_from_options(options)
        dataset = build_shapes_dataset(folder, config)
    config = config or ShapesConfig()
    if dataset is None:
        dataset = build_shapes_dataset(None, config)
    if hasattr(dataset, "keys"):  # a DatasetDict
        if split not in dataset:
            raise ValueError(f"evaluate_shapes: no split {split!r}; the dataset has {sorted(dataset.keys())}")
        train = dataset["train"] if "train" in dataset and len(dataset["train"]) else None
        return dataset[split], train, config
    missing = [c for c in ("image", "captions", "questions", "answers", "qa_types", "label")
               if c not in dataset.column_names]
    if missing:
        raise ValueError(f"evaluate_shapes: the dataset lacks columns {missing}; expected a shapes split "
                         "(data_recipes.shapes.build_shapes_dataset)")
    return dataset, None, config


def _batches(count: int, batch_size: int, progress: bool, description: str):
    from tqdm.auto import tqdm

    starts = range(0, count, batch_size)
    return tqdm(starts, desc=description, disable=not progress, leave=False, unit="batch")


def _images(model, rows, start: int, stop: int, device) -> Tensor:
    from tasks.base import stack_images

    images = rows[start:stop]["image"]
    return stack_images(images, model_image_size(model, default=max(images[0].size))).to(device)


# ------------------------------------------------------------------------------------------------- the parts
def _encode_images(model, rows, batch_size, progress, device) -> Tensor:
    out = [model.encode_image(_images(model, rows, s, s + batch_size, device)).float()
           for s in _batches(len(rows), batch_size, progress, "images")]
    return F.normalize(torch.cat(out), dim=-1).cpu()


def _encode_texts(model, texts: Sequence[str], batch_size, progress, description="texts") -> Tensor:
    out = [model.encode_text(list(texts[s:s + batch_size])).float()
           for s in _batches(len(texts), batch_size, progress, description)]
    return F.normalize(torch.cat(out), dim=-1).cpu()


def _retrieval(model, rows, image_embeddings, batch_size, progress) -> tuple[dict, dict, dict]:
    captions = rows["captions"]
    texts = list(dict.fromkeys(c for caps in captions for c in caps))  # distinct, in order of appearance
    column = {text: j for j, text in enumerate(texts)}
    positives = torch.zeros(len(rows), len(texts), dtype=torch.bool)
    for i, caps in enumerate(captions):
        positives[i, [column[c] for c in caps]] = True
    similarity = image_embeddings @ _encode_texts(model, texts, batch_size, progress, "captions").T
    metrics = retrieval_recall(similarity, positives=positives, ks=RECALL_KS)
    chance = retrieval_chance(positives, RECALL_KS)
    prefix = lambda d: {f"retrieval/{k}": v for k, v in d.items()}  # noqa: E731
    return prefix(metrics), prefix(chance), {"texts": len(texts)}


def _classification(model, rows, image_embeddings, class_names) -> tuple[dict, dict, dict]:
    labels = torch.tensor(rows["label"])
    classes = F.normalize(model.class_embeddings(class_names, CLASSIFICATION_TEMPLATES).float(), dim=-1).cpu()
    logits = image_embeddings @ classes.T
    top1 = topk_accuracy(logits, labels, (1,))["top1"]
    metrics = {"classification/top1": top1,
               "classification/mean_per_class_recall": mean_per_class_recall(logits, labels)}
    chance = dict.fromkeys(metrics, 1 / len(class_names))
    return metrics, chance, {"classes": len(class_names)}


def _vqa(model, rows, train, answers: list[str], batch_size, progress, device) -> tuple[dict, dict, dict]:
    from data_recipes.shapes import blind_vqa_accuracies

    known = set(answers)
    items = []  # (row, question, answer, type)
    for row, (questions, targets, types) in enumerate(zip(rows["questions"], rows["answers"], rows["qa_types"])):
        for question, target, qa_type in zip(questions, targets, types):
            if target not in known:
                raise ValueError(f"evaluate_shapes: answer {target!r} to {question!r} is not in the answer list "
                                 f"{answers}; is `config` the dataset's ShapesConfig?")
            items.append((row, question, target, qa_type))
    if not items:
        return {}, {}, {"questions": 0}
    answer_embeddings = _encode_texts(model, answers, batch_size, False).to(device)
    predictions = []
    grounded = getattr(model, "grounding", None) is not None  # a model built with detection.ground_text
    hits = {"object": [0, 0], "no_object": [0, 0]}  # right, scored
    counted = [0, 0]  # counting phrases matching as many regions as they name objects, and scored
    for s in _batches(len(items), batch_size, progress, "questions"):
        batch = items[s:s + batch_size]
        index = [row for row, *_ in batch]
        picked = rows.select(index)
        images = _images(model, picked, 0, len(index), device)
        questions = [q for _, q, _, _ in batch]
        if grounded:
            queries, grounding = model.vqa_query_and_grounding(images, questions)
            objects = _question_objects(picked, images.shape[-1])
            for kind, (right, count) in _grounding_hits(objects, questions, grounding).items():
                hits[kind][0] += right
                hits[kind][1] += count
            if grounding.counts is not None:
                right, count = _count_hits(objects, questions, grounding)
                counted[0] += right
                counted[1] += count
        else:
            queries = model.vqa_query(images, questions)
        queries = F.normalize(queries.float(), dim=-1)
        predictions += [answers[i] for i in (queries @ answer_embeddings.T).argmax(dim=-1).tolist()]
    targets = [t for _, _, t, _ in items]
    chance_value = 1 / len(answers)
    # The question-only baseline (the train split's prior) beside the overall and each type's accuracy.
    blind = blind_vqa_accuracies(train, rows) if train is not None else {}
    metrics = {"vqa/accuracy": exact_match_accuracy(predictions, targets)}
    if blind:
        metrics["vqa/blind_baseline"] = blind["all"]
    for qa_type in sorted({t for *_, t in items}):
        picked = [i for i, item in enumerate(items) if item[3] == qa_type]
        metrics[f"vqa/accuracy[{qa_type}]"] = exact_match_accuracy([predictions[i] for i in picked],
                                                                   [targets[i] for i in picked])
        if qa_type in blind:
            metrics[f"vqa/blind_baseline[{qa_type}]"] = blind[qa_type]
    chance = dict.fromkeys(metrics, chance_value)
    counts = {"questions": len(items), "answers": len(answers)}
    if grounded:  # left out where no phrase could be scored
        slots = 1 / (model.config.detection.context_regions + 1)
        right, scored = sum(r for r, _ in hits.values()), sum(n for _, n in hits.values())
        for key, (r, n) in [("vqa/grounding_accuracy", (right, scored))] + [
                (f"vqa/grounding_accuracy[{kind}]", value) for kind, value in hits.items()]:
            if n:
                metrics[key], chance[key] = r / n, slots
        counts["grounded_phrases"] = scored
        counts["grounded_phrases_without_object"] = hits["no_object"][1]
        if counted[1]:
            metrics["vqa/count_match_accuracy"], chance["vqa/count_match_accuracy"] = counted[0] / counted[1], slots
            counts["counting_phrases"] = counted[1]
    return metrics, chance, counts


def _question_objects(rows, size: int) -> list[tuple[list[tuple[str, str]], list[list[float]]]]:
    """Per row, its objects' (colour, shape) words and their boxes in the model's input pixels: what the phrase
    labels of `_grounding_hits` and `_count_hits` are made from (each row's picture decoded once for both)."""
    from tasks.grounding import input_boxes

    colours = rows.features["objects"]["colour"].feature.names
    shapes = rows.features["objects"]["category"].feature.names
    out = []
    for row in rows:
        objects = row["objects"]
        out.append(([(colours[c], shapes[k]) for c, k in zip(objects["colour"], objects["category"])],
                    input_boxes(row["image"], objects["bbox"], size)))
    return out


def _grounding_hits(objects, questions: list[str], grounding) -> dict[str, tuple[int, int]]:
    """{"object": (right, scored), "no_object": (right, scored)}: how many of the questions' phrases attend most
    to the context region that overlaps the one object they name (IoU >= 0.5; those whose object no region found
    are not scored), or to the "no object" slot when they name none: whether the grounding layer finds what the
    words mean, apart from whether VQA then answers right. objects: each question's `_question_objects` entry."""
    from data_recipes.shapes import phrase_groundings
    from tasks.grounding import IGNORE, phrase_targets

    labelled = [[(start, end, boxes[i] if i >= 0 else None) for start, end, i in phrase_groundings(question, kinds)]
                for (kinds, boxes), question in zip(objects, questions)]
    targets = phrase_targets(grounding.offsets, labelled, grounding.boxes, grounding.valid)
    chosen = grounding.logits.argmax(-1).cpu()
    slot = grounding.boxes.shape[1]
    out = {}
    for kind, picked in (("object", (targets != IGNORE) & (targets != slot)), ("no_object", targets == slot)):
        out[kind] = (int((chosen[picked] == targets[picked]).sum()), int(picked.sum()))
    return out


def _count_hits(objects, questions: list[str], grounding) -> tuple[int, int]:
    """(right, scored): how many counting phrases ("red shapes" in "how many red shapes are there?") match, with
    a logit above 0, as many context regions as they name objects (`uniperceiver.grounding.PhraseCounts`).
    objects: each question's `_question_objects` entry."""
    from data_recipes.shapes import count_groundings
    from tasks.grounding import count_targets

    labelled, named = [], []
    for (kinds, boxes), question in zip(objects, questions):
        phrases = count_groundings(question, kinds)
        labelled.append([(start, end, [boxes[i] for i in found]) for start, end, found in phrases])
        named.append([len(found) for *_, found in phrases])
    # the phrases' last tokens are where count_targets puts their rows (one phrase a question in the shapes data)
    scored = (count_targets(grounding.offsets, labelled, grounding.boxes, grounding.valid) >= 0).any(-1)
    matches = ((grounding.counts > 0) & grounding.valid[:, None, :]).sum(-1).cpu()
    right = count = 0
    for q, token in scored.nonzero().tolist():
        right += int(matches[q, token]) == named[q][0]
        count += 1
    return right, count


def _captioning(model, rows, beams, batch_size, progress, device) -> tuple[dict, dict, dict, list]:
    references = [list(caps) for caps in rows["captions"]]
    predictions = []
    for s in _batches(len(rows), batch_size, progress, "captions"):
        predictions += model.caption(_images(model, rows, s, s + batch_size, device), beams=beams)
    cider, _ = cider_d(predictions, references)
    metrics = {"captioning/CIDEr": cider, "captioning/BLEU-4": bleu(predictions, references)[-1]}
    chance = dict.fromkeys(metrics)
    if len(rows) > 1:  # an image-blind captioner: the first caption of the next image
        blind = [references[(i + 1) % len(rows)][0] for i in range(len(rows))]
        chance = {"captioning/CIDEr": cider_d(blind, references)[0],
                  "captioning/BLEU-4": bleu(blind, references)[-1]}
    examples = [{"prediction": p, "references": r} for p, r in zip(predictions[:3], references[:3])]
    return metrics, chance, {}, examples


# ------------------------------------------------------------------------------------------------ the suite
def evaluate_shapes(model, split: str = "test", dataset: Any = None, limit: int | None = None,
                    batch_size: int = 32, beams: int = 1, progress: bool = True, config=None,
                    tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate `model` (a UniPerceiver, or anything with its encode_image / encode_text / class_embeddings /
    vqa_query / caption) on the first `limit` images (None: all) of a shapes split; see the module docstring
    for what each metric is. `dataset`/`config`: see `resolve_shapes_data`. `tasks`: a subset of TASKS
    (default: all, detection only for a model with a detection head).

    Returns {"suite", "split", "counts", "settings", "metrics", "chance", "x_chance", "examples", "seconds"}:
    "metrics", "chance" and "x_chance" (metric / chance, None where chance is 0 or unknown) share flat keys
    such as "retrieval/i2t_R@1", "vqa/accuracy[count]", "captioning/CIDEr". The model is evaluated in eval
    mode under torch.no_grad() and put back in the mode it came in."""
    from data_recipes.shapes import answer_list, class_names

    if tasks is None:
        tasks = [t for t in TASKS if t != "detection" or getattr(model, "has_detection", False)]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"evaluate_shapes: tasks {list(tasks)}: expected a non-empty subset of {list(TASKS)}")
    if batch_size < 1:
        raise ValueError(f"evaluate_shapes: batch_size must be >= 1, got {batch_size}")
    rows, train, config = resolve_shapes_data(split, dataset, config)
    if limit is not None:
        rows = rows.select(range(min(max(limit, 0), len(rows))))
    if len(rows) == 0:
        raise ValueError(f"evaluate_shapes: split {split!r} has no images to evaluate")
    names, answers = class_names(config), answer_list(config)
    device = model_device(model)
    results: dict[str, Any] = {
        "suite": "shapes", "split": split, "counts": {"images": len(rows)},
        "settings": {"classification_templates": list(CLASSIFICATION_TEMPLATES), "class_names": names,
                     "answer_list": answers, "vqa_mode": "rank", "beams": beams,
                     "caption_tokenizer": "python (lower-case words, punctuation dropped; not Java PTB)",
                     "limit": limit},
        "metrics": {}, "chance": {}, "examples": [], "seconds": {}}
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            image_embeddings = None
            for task in [t for t in TASKS if t in tasks]:
                start = time.perf_counter()
                if task in ("retrieval", "classification") and image_embeddings is None:
                    image_embeddings = _encode_images(model, rows, batch_size, progress, device)
                if task == "retrieval":
                    metrics, chance, counts = _retrieval(model, rows, image_embeddings, batch_size, progress)
                elif task == "classification":
                    metrics, chance, counts = _classification(model, rows, image_embeddings, names)
                elif task == "detection":
                    from .detection import evaluate_shapes_boxes
                    metrics = evaluate_shapes_boxes(model, rows, config, batch_size, progress)
                    chance, counts = dict.fromkeys(metrics), {"boxes": sum(len(o["bbox"]) for o in rows["objects"])}
                elif task == "vqa":
                    metrics, chance, counts = _vqa(model, rows, train, answers, batch_size, progress, device)
                else:
                    metrics, chance, counts, results["examples"] = _captioning(model, rows, beams, batch_size,
                                                                               progress, device)
                results["metrics"].update(metrics)
                results["chance"].update(chance)
                results["counts"].update(counts)
                results["seconds"][task] = round(time.perf_counter() - start, 3)
    finally:
        model.train(was_training)
    results["x_chance"] = {key: ratio_to_chance(value, results["chance"].get(key))
                           for key, value in results["metrics"].items()}
    return results


def format_table(results: dict[str, Any]) -> str:
    """A markdown table "metric | value | chance | x chance" of `evaluate_shapes`'s results."""
    def number(value):
        return "–" if value is None else f"{value:.4f}"

    lines = ["| metric | value | chance | x chance |", "|---|---:|---:|---:|"]
    for key, value in results["metrics"].items():
        ratio = results.get("x_chance", {}).get(key)
        lines.append(f"| {key} | {number(value)} | {number(results['chance'].get(key))} | "
                     f"{'–' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def format_side_by_side(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table of several `evaluate_shapes` results, one column per named result ("value (x chance)"),
    one row per metric: e.g. the test split of the training style beside the held-out shifted style."""
    names = list(results)
    keys = list(dict.fromkeys(key for result in results.values() for key in result["metrics"]))

    def cell(result, key):
        value = result["metrics"].get(key)
        if value is None:
            return "–"
        ratio = result.get("x_chance", {}).get(key)
        return f"{value:.4f}" + ("" if ratio is None or key.startswith("vqa/blind") else f" ({ratio:.1f}x)")

    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {key} | " + " | ".join(cell(results[name], key) for name in names) + " |" for key in keys]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- the CLI
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="test", help="train, val or test (default: test)")
    parser.add_argument("--dataset", default=None,
                        help="a shapes SPEC, e.g. 'shapes:/data/shapes?seed=1' (default: the built-in dataset; "
                             "--data FOLDER is short for shapes:FOLDER)")
    parser.add_argument("--beams", type=int, default=1, help="captioning beam size (1: greedy)")
    parser.add_argument("--tasks", nargs="+", default=None, choices=TASKS,
                        help="default: all (detection when the model has a detection head)")


def _run(model, args: argparse.Namespace, world) -> dict | None:
    """The shapes split is small: rank 0 evaluates it alone."""
    if not world.is_main:
        return None
    dataset = args.dataset or (f"shapes:{args.data}" if args.data else None)
    return evaluate_shapes(model, split=args.split, dataset=dataset, limit=args.limit,
                           batch_size=args.batch_size, beams=args.beams, progress=not args.no_progress,
                           tasks=args.tasks)


def _format(results: dict) -> str:
    counts = ", ".join(f"{v} {k}" for k, v in results["counts"].items())
    return f"shapes [{results['split']}]: {counts}\n\n{format_table(results)}"


register_suite(Suite("shapes", "the built-in synthetic shapes dataset: retrieval, classification, VQA, captioning, "
                     "boxes",
                     _add_arguments, _run, _format))
