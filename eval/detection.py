"""Box detection measured by pycocotools, on COCO's official layout or on the built-in shapes boxes.

    python -m eval coco_detection --model runs/x/export --data /data/coco --out det.json

writes det.json (AP, AP50, AP75, APs/APm/APl, AR@100) and det.predictions.json, the detections in COCO's results
format ([{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]) with the annotation file's own image and
category ids, ready for any COCO tool. The category names the model ranks come from the annotation file.
"""
from __future__ import annotations

import argparse
import contextlib
import io
from typing import Any, Sequence

from . import Suite, register_suite
from .distributed import EvalWorld
from .encoding import first, map_in_batches, require_samples

# COCOeval.stats, in its order
BOX_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100", "ARs", "ARm", "ARl")
REPORTED = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@100")


def coco_box_metrics(ground_truth: dict[str, Any], results: Sequence[dict[str, Any]],
                     image_ids: Sequence[Any] | None = None) -> dict[str, float]:
    """pycocotools' box metrics of `results` (COCO results format) against a COCO instances dict, over
    `image_ids` (default: every image of the ground truth). An empty result set scores 0 everywhere (COCO's
    loadRes refuses one); a ground truth without "info" is accepted (older pycocotools need the key)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    known = {image["id"] for image in ground_truth["images"]}
    stray = sorted({r["image_id"] for r in results} - known, key=str)
    if stray:
        raise ValueError(f"detection results name image ids {stray[:5]} that the ground truth does not have")
    if not results:
        return dict.fromkeys(BOX_METRICS, 0.0)
    coco = COCO()
    coco.dataset = {"info": {}, "licenses": [], **ground_truth}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
        detections = coco.loadRes([dict(r) for r in results])
        evaluator = COCOeval(coco, detections, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where a size range has no ground truth; that is "not measured", kept as such
    return {name: float(value) for name, value in zip(BOX_METRICS, evaluator.stats)}


def to_coco_results(image_id: Any, detections: dict[str, list], category_ids: Sequence[int]) -> list[dict]:
    """One picture's detections (xyxy boxes, scores, labels indexing `category_ids`) in COCO's results format."""
    out = []
    for (x0, y0, x1, y1), score, label in zip(detections["boxes"], detections["scores"], detections["labels"]):
        out.append({"image_id": image_id, "category_id": category_ids[int(label)],
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "score": round(float(score), 5)})
    return out


def detect_pictures(model, world: EvalWorld, count: int, picture, categories: Sequence[str], batch_size: int,
                    score_threshold: float, max_detections: int, progress: bool) -> list[dict] | None:
    """`model.detect` over this rank's share of pictures 0..count-1 (`picture(i)` -> PIL); rank 0 gets every
    picture's detections as plain lists, in order."""
    def detect(indices: list[int]) -> list[dict]:
        found = model.detect([picture(i) for i in indices], categories, score_threshold, max_detections)
        return [item.to_dict() for item in found]

    return map_in_batches(world, count, detect, batch_size, progress, "detection")


def _box_results(suite: str, split: str, data, counts: dict, settings: dict) -> dict[str, Any]:
    return {"suite": suite, "split": split, "data": data, "counts": counts, "settings": settings, "metrics": {},
            "seconds": {}}


def evaluate_boxes(model, dataset, world: EvalWorld, batch_size: int = 16, limit: int | None = None,
                   progress: bool = True, score_threshold: float = 0.05, max_detections: int = 100,
                   suite: str = "coco_detection") -> dict[str, Any] | None:
    """A `coco_instances` dataset (its `annotation_path` JSON and its pictures): every category name of the
    file ranked per region, results mapped back to the file's image and category ids, pycocotools' metrics.
    Rank 0 returns the results (with "predictions", the COCO results list), the others None."""
    import time

    from data_recipes.formats.base import read_json

    require_samples(dataset, suite)
    start = time.perf_counter()
    picked = first(len(dataset), limit)
    category_ids = sorted(dataset.categories)
    names = [dataset.categories[i] for i in category_ids]
    found = detect_pictures(model, world, len(picked), lambda i: dataset[picked[i]].image, names, batch_size,
                            score_threshold, max_detections, progress)
    if not world.is_main:
        return None
    image_ids = [dataset[i].image_id for i in picked]
    predictions = [r for image_id, item in zip(image_ids, found) for r in to_coco_results(image_id, item, category_ids)]
    ground_truth = read_json(dataset.annotation_path)
    metrics = coco_box_metrics(ground_truth, predictions, image_ids)
    results = _box_results(suite, dataset.split, str(dataset.root),
                           {"images": len(picked), "categories": len(names), "detections": len(predictions)},
                           {"score_threshold": score_threshold, "max_detections": max_detections,
                            "annotations": str(dataset.annotation_path)})
    results["metrics"] = {f"detection/{name}": metrics[name] for name in REPORTED}
    results["seconds"]["detection"] = round(time.perf_counter() - start, 3)
    results["predictions"] = predictions
    return results


def colour_shape_categories(config) -> list[dict[str, Any]]:
    """The 30 (by default) colour-and-shape phrases as COCO categories: "red circle" has id
    colour index x number of shapes + shape index."""
    return [{"id": c * len(config.shapes) + s, "name": f"{colour} {shape}", "supercategory": "shape"}
            for c, colour in enumerate(config.colours) for s, shape in enumerate(config.shapes)]


def shapes_ground_truth(rows, config, phrases: bool = False) -> dict[str, Any]:
    """The boxes of a shapes split as a COCO instances dict (image ids = row positions), over the shapes, or
    with `phrases` over the colour-and-shape phrases (`colour_shape_categories`)."""
    from data_recipes.shapes import coco_categories

    images, annotations = [], []
    for i, (image, objects) in enumerate(zip(rows["image"], rows["objects"])):
        images.append({"id": i, "width": image.width, "height": image.height})
        colours = objects.get("colour") if phrases else None
        if phrases and colours is None:
            raise ValueError("evaluate_shapes: the split's objects have no colours; rebuild it (generator 3 or later)")
        for k, (box, category) in enumerate(zip(objects["bbox"], objects["category"])):
            category = int(colours[k]) * len(config.shapes) + int(category) if phrases else int(category)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": category,
                                "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0})
    categories = colour_shape_categories(config) if phrases else coco_categories(config)
    return {"images": images, "annotations": annotations, "categories": categories}


def evaluate_shapes_boxes(model, rows, config, batch_size: int = 16, progress: bool = False,
                          score_threshold: float = 0.05, max_detections: int = 100,
                          phrases: bool = True) -> dict[str, float]:
    """detection/AP, AP50 and AP75 over the shape categories of a shapes split (one process). With `phrases`,
    also detection/phrases_AP and phrases_AP50: the same pictures queried with the colour-and-shape phrases
    ("red circle", ...), names the detection task never trains on (open vocabulary); left out for a split built
    before the objects had colours."""
    from data_recipes.shapes import coco_categories

    pictures = rows["image"]
    metrics = {}
    phrases = phrases and "colour" in rows.features["objects"]  # builds before generator 3 have none
    for phrased in (False, True) if phrases else (False,):
        categories = colour_shape_categories(config) if phrased else coco_categories(config)
        names, ids = [c["name"] for c in categories], [c["id"] for c in categories]
        found = detect_pictures(model, EvalWorld(), len(rows), lambda i: pictures[i], names, batch_size,
                                score_threshold, max_detections, progress)
        predictions = [r for i, item in enumerate(found) for r in to_coco_results(i, item, ids)]
        scores = coco_box_metrics(shapes_ground_truth(rows, config, phrased), predictions)
        if phrased:
            metrics.update({"detection/phrases_AP": scores["AP"], "detection/phrases_AP50": scores["AP50"]})
        else:
            metrics.update({f"detection/{name}": scores[name] for name in ("AP", "AP50", "AP75")})
    return metrics


# ---------------------------------------------------------------------------------------------------- the CLI
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="val", help="COCO split: ROOT/annotations/instances_SPLIT2017.json")
    parser.add_argument("--annotations", default=None, help="an instances JSON other than ROOT's default")
    parser.add_argument("--images", default=None, help="the pictures' folder, if not ROOT/SPLIT2017/")
    parser.add_argument("--score-threshold", type=float, default=0.05,
                        help="detections scoring below this are dropped (default 0.05, as COCO evaluations use)")
    parser.add_argument("--max-detections", type=int, default=100, help="per picture (COCO's AP counts 100)")


def _run(model, args: argparse.Namespace, world) -> dict | None:
    from .benchmarks import _open

    dataset = _open("coco_instances", args.data, "coco_detection", split=args.split, annotations=args.annotations,
                    images=args.images)
    return evaluate_boxes(model, dataset, world, args.batch_size, args.limit, not args.no_progress,
                          args.score_threshold, args.max_detections)


def _format(results: dict) -> str:
    from .benchmarks import format_results
    return format_results(results)


register_suite(Suite("coco_detection", "COCO val2017 boxes: AP, AP50, AP75, APs/APm/APl, AR@100 (pycocotools)",
                     _add_arguments, _run, _format))
