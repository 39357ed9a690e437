"""Text to image on the shapes world, judged by a trained model (by default the generating model itself: its
classification, detection and retrieval, which are evaluated on real pictures by the `shapes` suite).

    python -m eval text_to_image --model runs/shapes-tiny/export [--seeds 4] [--grid samples.png]
    python -m eval text_to_image --model DIR --inception-weights pt_inception-2015-12-05.pth --real FOLDER

Prompts: every colour-and-shape pair alone ("a red circle", 30 by default) and the two-object descriptions of
the test split ("a red circle and a blue star"), each with `seeds` seeds. Per picture:
- colour: the judge's zero-shot classification over the colours (the largest shape's colour) is the prompt's;
- shape: the judge's best detection over the shape names is the prompt's shape;
- count: the number of the judge's detections (score >= BOX_THRESHOLD; boxes overlapping by IoU >= OBJECT_IOU
  counted once, the best-scoring name kept) is the prompt's number of objects;
- both: colour and shape right (one-object prompts); for two-object prompts, each prompted (colour, shape) is
  found among the detections, a detection's colour classified on its crop;
- retrieval: the picture's own prompt ranks first among the distinct prompts (`encode_image` vs `encode_text`).
FID and KID (torch-fidelity) are opt-in: the Inception weights cannot be downloaded here, so they come from a
file, with a folder of real pictures to compare with.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from . import Suite, register_suite

BOX_THRESHOLD = 0.3  # a detection counts as an object from this score (the examples picture's threshold)
OBJECT_IOU = 0.5     # detections of one blob under several names (NMS is per name) count as one object
CROP_MARGIN = 0.15   # a detected box is widened by this share of its side before its colour is classified


def one_object_prompts(config) -> list[tuple[str, list[tuple[str, str]]]]:
    """(prompt, [(colour, shape)]) for every colour-and-shape pair of the world."""
    from data_recipes.text_corpus import describe
    return [(describe(colour, shape), [(colour, shape)]) for colour in config.colours for shape in config.shapes]


def two_object_prompts(rows, config, limit: int) -> list[tuple[str, list[tuple[str, str]]]]:
    """The distinct descriptions of the split's pictures that hold two different objects, first `limit`."""
    from data_recipes.text_corpus import describe, join_phrases
    out: dict[str, list[tuple[str, str]]] = {}
    for objects in rows["objects"]:
        if len(objects["category"]) != 2 or "colour" not in objects:
            continue
        kinds = [(config.colours[c], config.shapes[s]) for c, s in zip(objects["colour"], objects["category"])]
        if kinds[0] != kinds[1]:
            out.setdefault(join_phrases([describe(c, s) for c, s in kinds]), kinds)
        if len(out) >= limit:
            break
    return list(out.items())


def _normalised(pictures: Sequence[Any], size: int) -> Tensor:
    from uniperceiver.detection import resize_for_detection
    return resize_for_detection(list(pictures), size)[0]


def _crops(picture, boxes: Tensor) -> list:
    """The detected boxes of a PIL picture, each widened by CROP_MARGIN, as pictures."""
    out = []
    for x0, y0, x1, y1 in boxes.tolist():
        mx, my = (x1 - x0) * CROP_MARGIN, (y1 - y0) * CROP_MARGIN
        box = (max(0, x0 - mx), max(0, y0 - my), min(picture.width, x1 + mx), min(picture.height, y1 + my))
        out.append(picture.crop(tuple(round(v) for v in box)))
    return out


def distinct_objects(found):
    """One detection per object: class-agnostic NMS over a picture's detections (best first)."""
    from torchvision.ops import nms

    from uniperceiver.detection import Detections
    if len(found) < 2:
        return found
    keep = nms(found.boxes.float(), found.scores.float(), OBJECT_IOU)
    return Detections(found.boxes[keep], found.scores[keep], found.labels[keep])


@torch.no_grad()
def judge_pictures(judge, pictures: Sequence[Any], objects: Sequence[list[tuple[str, str]]], config,
                   batch_size: int = 32) -> list[dict[str, Any]]:
    """Per picture: what the judge sees (colour, shapes, count) and which checks pass."""
    colours, shapes = list(config.colours), list(config.shapes)
    size = judge.config.image.image_size
    device = next(judge.parameters()).device
    verdicts = []
    for start in range(0, len(pictures), batch_size):
        chunk = pictures[start:start + batch_size]
        upscaled = [p.resize((size, size)) for p in chunk]
        pixels = _normalised(upscaled, size).to(device)
        colour_of = judge.classify(pixels, colours).argmax(-1).tolist()
        found = judge.detect(pixels, shapes, score_threshold=BOX_THRESHOLD)
        for k, (picture, item) in enumerate(zip(upscaled, found)):
            item = distinct_objects(item)
            wanted = objects[start + k]
            seen_shapes = [shapes[i] for i in item.labels.tolist()]
            crop_colours = []
            if len(item):
                crops = _normalised([c.resize((size, size)) for c in _crops(picture, item.boxes.cpu())], size)
                crop_colours = [colours[i] for i in judge.classify(crops.to(device), colours).argmax(-1).tolist()]
            seen = list(zip(crop_colours, seen_shapes))
            verdict = {"colour": colours[colour_of[k]], "shapes": seen_shapes, "objects": seen,
                       "count_right": len(item) == len(wanted),
                       "all_found": all(kind in seen for kind in wanted)}
            if len(wanted) == 1:
                verdict["colour_right"] = colours[colour_of[k]] == wanted[0][0]
                verdict["shape_right"] = bool(seen_shapes) and seen_shapes[0] == wanted[0][1]
                verdict["both_right"] = verdict["colour_right"] and verdict["shape_right"]
            verdicts.append(verdict)
    return verdicts


@torch.no_grad()
def prompt_retrieval(judge, pictures: Sequence[Any], prompts: Sequence[str], batch_size: int = 32) -> float:
    """The share of pictures whose own prompt ranks first among the distinct prompts."""
    distinct = list(dict.fromkeys(prompts))
    size = judge.config.image.image_size
    device = next(judge.parameters()).device
    texts = torch.cat([judge.encode_text(distinct[i:i + batch_size]) for i in range(0, len(distinct), batch_size)])
    hits = 0
    for start in range(0, len(pictures), batch_size):
        pixels = _normalised([p.resize((size, size)) for p in pictures[start:start + batch_size]], size).to(device)
        best = (judge.encode_image(pixels) @ texts.T).argmax(-1).tolist()
        hits += sum(distinct[b] == prompts[start + k] for k, b in enumerate(best))
    return hits / len(pictures)


def generate(model, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float | None,
             batch_size: int, progress: bool) -> list:
    """Every prompt with every seed, prompt-major: picture p * len(seeds) + s."""
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    pictures = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc="text to image", unit="picture")
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        pictures += model.generate_images([p for p, _ in chunk], steps=steps, guidance=guidance,
                                          seed=[s for _, s in chunk])
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return pictures


def save_grid(pictures: Sequence[Any], prompts: Sequence[str], seeds: Sequence[int], path: str | Path,
              cell: int = 64) -> Path:
    """A PNG of prompts (rows, labelled) by seeds (columns)."""
    from PIL import Image, ImageDraw

    label = 150
    grid = Image.new("RGB", (label + cell * len(seeds), 14 + cell * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for s, seed in enumerate(seeds):
        draw.text((label + s * cell + 4, 1), f"seed {seed}", fill="black")
    for r, prompt in enumerate(prompts):
        draw.text((4, 14 + r * cell + cell // 2 - 6), prompt[:26], fill="black")
        for s in range(len(seeds)):
            picture = pictures[r * len(seeds) + s].resize((cell, cell))
            grid.paste(picture, (label + s * cell, 14 + r * cell))
    from launch.training.files import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: grid.save(f, format="PNG"))
    return path


def fidelity_metrics(pictures: Sequence[Any], real_folder: str | Path, inception_weights: str | Path,
                     kid_subset_size: int | None = None) -> dict[str, float]:
    """FID and KID of the pictures against a folder of real pictures, by torch-fidelity with a local Inception
    file (`feature_extractor_weights_path`: nothing is downloaded)."""
    import torch_fidelity

    for path, what in ((real_folder, "--real"), (inception_weights, "--inception-weights")):
        if not Path(path).exists():
            raise FileNotFoundError(f"text_to_image {what} {path}: no such file or folder")
    with tempfile.TemporaryDirectory() as folder:
        for i, picture in enumerate(pictures):
            picture.convert("RGB").save(Path(folder) / f"{i:05d}.png")
        metrics = torch_fidelity.calculate_metrics(
            input1=folder, input2=str(real_folder), fid=True, kid=True, cuda=torch.cuda.is_available(),
            feature_extractor_weights_path=str(inception_weights), verbose=False,
            kid_subset_size=kid_subset_size or min(1000, len(pictures)), samples_find_deep=True)
    return {"FID": float(metrics["frechet_inception_distance"]),
            "KID": float(metrics["kernel_inception_distance_mean"])}


def evaluate_text_to_image(model, judge=None, config=None, rows=None, seeds: Sequence[int] = (0, 1, 2, 3),
                           two_object_limit: int = 12, steps: int = 20, guidance: float | None = None,
                           batch_size: int = 32, grid: str | Path | None = None, progress: bool = False,
                           inception_weights: str | Path | None = None, real_folder: str | Path | None = None
                           ) -> dict[str, Any]:
    """The accuracies of the module docstring (keys "t2i/..."), over one-object and two-object prompts; `grid`
    writes the one-object prompts (and the first two-object ones) by seeds as a PNG. `rows`: the split whose
    two-object descriptions are prompted (default: the built-in test split of `config`)."""
    from data_recipes.shapes import ShapesConfig, build_shapes_dataset

    model._require_diffusion()
    judge = judge or model
    config = config or ShapesConfig()
    if rows is None:
        rows = build_shapes_dataset(None, config)["test"]
    ones = one_object_prompts(config)
    twos = two_object_prompts(rows, config, two_object_limit)
    prompted = ones + twos
    seeds = list(seeds)
    texts = [prompt for prompt, _ in prompted]
    pictures = generate(model, texts, seeds, steps, guidance, batch_size, progress)
    objects = [kinds for _, kinds in prompted for _ in seeds]
    verdicts = judge_pictures(judge, pictures, objects, config, batch_size)
    single = [v for v in verdicts if "colour_right" in v]
    double = [v for v, kinds in zip(verdicts, objects) if len(kinds) == 2]

    def share(items, key):
        return sum(bool(v[key]) for v in items) / max(1, len(items))

    results = {"t2i/colour": share(single, "colour_right"), "t2i/shape": share(single, "shape_right"),
               "t2i/count": share(single, "count_right"), "t2i/both": share(single, "both_right"),
               "t2i/two_objects": share(double, "all_found"), "t2i/two_count": share(double, "count_right"),
               "t2i/retrieval_R@1": prompt_retrieval(judge, pictures, [t for t in texts for _ in seeds], batch_size)}
    chance = {"t2i/colour": 1 / len(config.colours), "t2i/shape": 1 / len(config.shapes),
              "t2i/retrieval_R@1": 1 / len(set(texts))}
    out: dict[str, Any] = {"suite": "text_to_image", "metrics": results, "chance": chance,
                           "counts": {"one_object_prompts": len(ones), "two_object_prompts": len(twos),
                                      "seeds": len(seeds), "pictures": len(pictures)},
                           "settings": {"steps": steps, "guidance": guidance if guidance is not None else
                                        model.diffusion.config.guidance, "box_threshold": BOX_THRESHOLD,
                                        "judge": "the generating model" if judge is model else "another model"}}
    if grid is not None:
        shown = len(ones) + min(len(twos), 6)
        out["grid"] = str(save_grid(pictures[: shown * len(seeds)], texts[:shown], seeds, grid))
    if inception_weights is not None:
        if real_folder is None:
            raise ValueError("text_to_image --inception-weights needs --real FOLDER: the real pictures to compare with")
        results.update({f"t2i/{k}": v for k, v in fidelity_metrics(pictures, real_folder, inception_weights).items()})
    return out


def format_results(results: dict[str, Any]) -> str:
    chance = results.get("chance", {})
    lines = ["| metric | value | chance |", "|---|---|---|"]
    for name, value in results["metrics"].items():
        lines.append(f"| {name} | {value:.3f} | {chance[name]:.3f} |" if name in chance else
                     f"| {name} | {value:.3f} | |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- the CLI
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt (0..N-1)")
    parser.add_argument("--two-object-prompts", type=int, default=12, help="two-object descriptions prompted")
    parser.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: config's)")
    parser.add_argument("--judge", default=None, help="another saved model to judge the pictures (default: itself)")
    parser.add_argument("--dataset", default=None, help="a shapes SPEC whose test split gives the two-object "
                        "prompts (default: the built-in dataset)")
    parser.add_argument("--grid", default=None, help="write the prompts-by-seeds grid here (PNG)")
    parser.add_argument("--inception-weights", default=None,
                        help="a local torch-fidelity Inception file (pt_inception-2015-12-05): adds FID and KID")
    parser.add_argument("--real", default=None, help="a folder of real pictures for FID/KID")


def _run(model, args: argparse.Namespace, world) -> dict | None:
    """Small: rank 0 generates and judges alone."""
    if not world.is_main:
        return None
    from .shapes import resolve_shapes_data
    judge = None
    if args.judge:
        from .__main__ import load_model
        judge = load_model(args.judge, args.device)
    rows, _, config = resolve_shapes_data("test", args.dataset or (f"shapes:{args.data}" if args.data else None))
    return evaluate_text_to_image(model, judge, config, rows, seeds=range(args.seeds),
                                  two_object_limit=args.two_object_prompts, steps=args.steps, guidance=args.guidance,
                                  batch_size=args.batch_size, grid=args.grid, progress=not args.no_progress,
                                  inception_weights=args.inception_weights, real_folder=args.real)


register_suite(Suite("text_to_image", "the diffusion branch on the shapes world: colour, shape, count and both "
                     "right, judged by a trained model; FID/KID with a local Inception file",
                     _add_arguments, _run, format_results))
