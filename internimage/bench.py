"""Throughput of InternImage-T with each DCNv3 backend beside timm's ConvNeXt-T and Swin-T:
`python -m internimage.bench`.

Prints a table and writes JSON. Everything is measured in one run with the models timed in turn within
every repeat (these machines are noisy), so the ratios are the numbers to read. On a GPU it also measures
batch-1 latency and large-batch throughput in bf16 and fp16, eager and compiled.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from torch import nn

from ops.bench import interleaved_median_ms

from .registry import create_model

PEERS = ("convnext_tiny", "swin_tiny_patch4_window7_224")


def cpu_models(backends: list[str], peers: list[str]) -> dict[str, nn.Module]:
    import timm
    models = {f"internimage_t[{b}]": create_model("internimage_t", dcn_backend=b) for b in backends}
    for name in peers:
        models[name] = timm.create_model(name, pretrained=False)
    return {name: model.eval() for name, model in models.items()}


def throughput_table(models: dict[str, nn.Module], batch: int, size: int, device: str, dtype: torch.dtype,
                     repeats: int, warmup: int, channels_last: bool = False) -> dict[str, dict]:
    """Images per second of each model, forward in eval mode, timed in turn within each repeat."""
    images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    if channels_last:
        images = images.to(memory_format=torch.channels_last)

    def runner(model):
        def run():
            with torch.inference_mode():
                model(images)
        return run

    times = interleaved_median_ms({name: runner(m) for name, m in models.items()}, device, warmup, repeats)
    return {name: {"ms_per_batch": ms, "images_per_s": batch * 1000 / ms} for name, ms in times.items()}


def print_table(rows: dict[str, dict], baseline: str, title: str) -> None:
    print(f"\n{title}")
    print(f"{'model':<34}{'ms/batch':>10}{'img/s':>9}{'vs ' + baseline:>30}")
    base = rows[baseline]["images_per_s"]
    for name, row in rows.items():
        row[f"ratio_vs_{baseline}"] = row["images_per_s"] / base
        print(f"{name:<34}{row['ms_per_batch']:>10.1f}{row['images_per_s']:>9.1f}{row['images_per_s'] / base:>29.2f}x")


def gpu_rows(repeats: int) -> dict[str, dict]:
    """Batch-1 latency and batch-128 throughput of InternImage-T in bf16/fp16, eager and compiled."""
    rows = {}
    for dtype_name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        model = create_model("internimage_t", dcn_backend="cuda").cuda().to(dtype).eval()
        model = model.to(memory_format=torch.channels_last)
        variants = {"eager": model, "compiled": torch.compile(model, mode="max-autotune")}
        for batch in (1, 128):
            timed = throughput_table(variants, batch, 224, "cuda", dtype, repeats, warmup=10, channels_last=True)
            for mode, row in timed.items():
                rows[f"internimage_t {dtype_name} b{batch} {mode}"] = {**row, "latency_ms": row["ms_per_batch"]}
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backends", default="reference,cpu", help="comma-separated DCNv3 backends for the CPU table")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated timm models to time alongside")
    parser.add_argument("--gpu", action="store_true", help="also run the GPU table (needs CUDA)")
    parser.add_argument("--out", default="bench_results/internimage.json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "batch": args.batch, "size": args.size, "repeats": args.repeats}
    backends = [b for b in args.backends.split(",") if b]
    peers = [p for p in args.peers.split(",") if p]
    rows = throughput_table(cpu_models(backends, peers), args.batch, args.size, "cpu", torch.float32, args.repeats,
                            args.warmup)
    print_table(rows, f"internimage_t[{backends[0]}]",
                f"CPU, float32, batch {args.batch} at {args.size}x{args.size}, {torch.get_num_threads()} threads")
    if "convnext_tiny" in rows:
        for name, row in rows.items():
            row["ratio_vs_convnext_tiny"] = row["images_per_s"] / rows["convnext_tiny"]["images_per_s"]
        print("vs convnext_tiny: " + ", ".join(f"{n} {r['ratio_vs_convnext_tiny']:.2f}x" for n, r in rows.items()))
    result["cpu"] = rows
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device is available")
        result["gpu_name"] = torch.cuda.get_device_name()
        result["gpu"] = gpu_rows(args.repeats)
        print(f"\nGPU ({result['gpu_name']})")
        for name, row in result["gpu"].items():
            print(f"{name:<40}{row['ms_per_batch']:>10.2f} ms{row['images_per_s']:>10.1f} img/s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
