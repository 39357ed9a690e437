"""python -m eval.sampling_bench [--model DIR] [--pictures 16] [--steps 20] [--sizes 32 64] [--out FILE]

Times `generate_images` (DPM-Solver++, classifier-free guidance: two UNet passes a step in one doubled batch) for
a batch of prompts: the branch of a saved model at its own size, and the same UNet built at every `--sizes` side
(random weights: the time does not depend on them), each in float32 and under bfloat16 autocast (`bf16=True`;
the table gives how far its pictures are from float32's). Prints a table and writes JSON (default
bench_results/sampling.json). The cases are timed in turn within each repeat and the median kept, so that their
ratios come from one run on a noisy machine."""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

PROMPTS = ["a red circle", "a green square", "a blue triangle", "a yellow star", "a purple diamond",
           "an orange circle and a red star", "two blue squares", "a green diamond"]


def model_at(base, size: int):
    """`base` with its diffusion branch rebuilt at `size` pixels (the same UNet layout)."""
    from uniperceiver import UniPerceiver

    config = replace(base.config, diffusion=replace(base.config.diffusion, image_size=size, pretrained=None))
    model = UniPerceiver(config, load_text_weights=False, load_image_checkpoint=False)
    model.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("diffusion.")},
                          strict=False)
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m eval.sampling_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a saved model with the diffusion branch (default: the "
                        "tiny recipe's model, untrained)")
    parser.add_argument("--pictures", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_results/sampling.json")
    args = parser.parse_args(argv)

    from uniperceiver import UniPerceiver

    from .__main__ import write_json

    if args.model:
        base = UniPerceiver.from_pretrained(args.model)
    else:
        from launch.training.recipe import load_recipe
        base = UniPerceiver(load_recipe("tiny", []).model_config())
    if not base.has_diffusion:
        raise SystemExit(f"--model {args.model}: the model has no diffusion branch")
    cases = {f"{base.diffusion.image_size} px ({'the model' if args.model else 'the recipe, untrained'})": base}
    for size in args.sizes:
        if size != base.diffusion.image_size:
            cases[f"{size} px (same UNet)"] = model_at(base, size)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.pictures)]
    seeds = list(range(len(prompts)))
    runs = [(name, bf16) for name in cases for bf16 in (False, True)]
    times: dict[tuple[str, bool], list[float]] = {run: [] for run in runs}
    pictures: dict[tuple[str, bool], list] = {}
    for name, bf16 in runs:  # warm-up
        cases[name].generate_images(prompts[:2], steps=2, guidance=args.guidance, bf16=bf16)
    for _ in range(args.repeats):
        for name, bf16 in runs:
            start = time.perf_counter()
            pictures[name, bf16] = cases[name].generate_images(prompts, steps=args.steps, guidance=args.guidance,
                                                               seed=seeds, bf16=bf16)
            times[name, bf16].append(time.perf_counter() - start)
    rows = {}
    for name in cases:
        float32, bf16 = statistics.median(times[name, False]), statistics.median(times[name, True])
        difference = max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())
                         for a, b in zip(pictures[name, False], pictures[name, True]))
        rows[name] = {"seconds": float32, "runs": times[name, False], "bf16_seconds": bf16,
                      "bf16_runs": times[name, True], "bf16_speedup": float32 / bf16,
                      "bf16_max_pixel_difference": difference,
                      "unet_parameters": sum(p.numel() for p in cases[name].diffusion.unet.parameters())}
    print(f"\n{args.pictures} pictures, {args.steps} DPM-Solver++ steps, guidance {args.guidance}, "
          f"{torch.get_num_threads()} threads (median of {args.repeats})\n")
    print("| case | float32 s | bf16 s | bf16 speed-up | bf16 max pixel difference (of 255) | UNet parameters |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['seconds']:.2f} | {row['bf16_seconds']:.2f} | {row['bf16_speedup']:.2f}x | "
              f"{row['bf16_max_pixel_difference']} | {row['unet_parameters'] / 1e6:.2f}M |")
    result = {"pictures": args.pictures, "steps": args.steps, "guidance": args.guidance,
              "threads": torch.get_num_threads(), "cases": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
