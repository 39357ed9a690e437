"""Benchmark of the DCNv3 backends on the InternImage-T stage shapes: `python -m ops.bench`.

Prints a table and writes JSON: forward and forward+backward time per backend, the speed-up over the
pure-PyTorch reference (all measured in this one run, since these machines are noisy), and peak memory.
CPU peak memory is the rise of the process's resident-set high-water mark during one forward+backward,
measured in a fresh subprocess per case so that memory freed by an earlier case cannot hide it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ops import dcnv3_core
from ops.build import kernel_status

# InternImage-T at 224x224: (name, spatial size, channels, groups); group width is 16 throughout.
STAGES = [("stage1", 56, 64, 4), ("stage2", 28, 128, 8), ("stage3", 14, 256, 16), ("stage4", 7, 512, 32)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def make_inputs(stage: str, batch: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Inputs as the InternImage-T module produces them: softmax-normalised mask, offsets of a few pixels."""
    _, size, channels, groups = next(s for s in STAGES if s[0] == stage)
    points = 9
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, size, size, channels, generator=gen)
    offset = torch.randn(batch, size, size, groups * points * 2, generator=gen) * 2
    mask = torch.randn(batch, size, size, groups, points, generator=gen).softmax(-1).reshape(batch, size, size, -1)
    tensors = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (x, offset, mask)]
    scalars = (3, 3, 1, 1, 1, 1, 1, 1, groups, channels // groups, 1.0, False)
    return tensors, scalars


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def forward_backward(tensors, scalars, backend):
    out = dcnv3_core(*tensors, *scalars, backend=backend)
    out.backward(torch.ones_like(out))
    for t in tensors:
        t.grad = None


def forward_only(tensors, scalars, backend):
    with torch.no_grad():
        dcnv3_core(*tensors, *scalars, backend=backend)


def interleaved_median_ms(fns: dict, device: str, warmup: int, repeats: int) -> dict:
    """Median milliseconds of each function, timed in turn within every repeat, so that all backends see
    the same machine state (these machines are noisy) and their ratio is meaningful."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def _proc_status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmHWM: high-water mark, VmRSS: now)."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_memory_child(stage: str, backend: str, batch: int, dtype: str) -> float:
    """In a fresh process: MiB the resident set rises during one forward+backward (inputs excluded)."""
    # A one-image call first, so that loading the kernel and the first-call imports of torch's dispatch
    # machinery are not counted; it frees almost nothing that the measured call could reuse.
    forward_backward(*make_inputs(stage, 1, DTYPES[dtype], "cpu"), backend)
    tensors, scalars = make_inputs(stage, batch, DTYPES[dtype], "cpu")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    baseline = _proc_status_kib("VmRSS")
    forward_backward(tensors, scalars, backend)
    return (_proc_status_kib("VmHWM") - baseline) / 1024


def peak_memory_mib(stage: str, backend: str, batch: int, dtype: str, device: str) -> float | None:
    if device == "cuda":
        tensors, scalars = make_inputs(stage, batch, DTYPES[dtype], device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        forward_backward(tensors, scalars, backend)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    if not Path("/proc/self/clear_refs").exists():
        return None  # not Linux: no resettable high-water mark
    result = subprocess.run([sys.executable, "-m", "ops.bench", "--memory-probe", stage, backend, "--batch", str(batch),
                             "--dtype", dtype], capture_output=True, text=True, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    return float(result.stdout.strip().splitlines()[-1])


def machine_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def run(args) -> dict:
    device = args.device
    backends = ["reference"]
    kernel = "cuda" if device == "cuda" else "cpu"
    available, reason = kernel_status(kernel)
    if available:
        backends.append(kernel)
    else:
        print(f"note: the {kernel} kernel is unavailable ({reason.splitlines()[0]}); timing the reference only")
    dtype = DTYPES[args.dtype]
    rows = []
    for stage, size, channels, groups in STAGES:
        if args.stages and stage not in args.stages:
            continue
        tensors, scalars = make_inputs(stage, args.batch, dtype, device)
        forward_ms = interleaved_median_ms({b: (lambda b=b: forward_only(tensors, scalars, b)) for b in backends},
                                           device, args.warmup, args.repeats)
        forward_backward_ms = interleaved_median_ms(
            {b: (lambda b=b: forward_backward(tensors, scalars, b)) for b in backends}, device, args.warmup, args.repeats)
        for backend in backends:
            rows.append({"stage": stage, "shape": f"{args.batch}x{size}x{size}x{channels}/g{groups}", "backend": backend,
                         "forward_ms": forward_ms[backend], "forward_backward_ms": forward_backward_ms[backend],
                         "forward_speedup": forward_ms["reference"] / forward_ms[backend],
                         "forward_backward_speedup": forward_backward_ms["reference"] / forward_backward_ms[backend],
                         "peak_memory_mib": None if args.no_memory
                         else peak_memory_mib(stage, backend, args.batch, args.dtype, device)})
    return {"device": device, "machine": machine_description(device), "torch": torch.__version__,
            "dtype": args.dtype, "batch": args.batch, "repeats": args.repeats, "rows": rows}


def format_table(result: dict) -> str:
    header = ("stage", "shape", "backend", "fwd ms", "fwd x", "fwd+bwd ms", "fwd+bwd x", "peak MiB")
    lines = [f"DCNv3 on {result['machine']} ({result['device']}, {result['dtype']}, torch {result['torch']}); "
             "x = speed-up over reference in this run",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result["rows"]:
        memory = "n/a" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.1f}"
        lines.append(f"| {r['stage']} | {r['shape']} | {r['backend']} | {r['forward_ms']:.2f} | {r['forward_speedup']:.1f} "
                     f"| {r['forward_backward_ms']:.2f} | {r['forward_backward_speedup']:.1f} | {memory} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--stages", nargs="*", choices=[s[0] for s in STAGES], help="default: all four")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", default="bench_results/dcnv3.json")
    parser.add_argument("--memory-probe", nargs=2, metavar=("STAGE", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        print(peak_memory_child(*args.memory_probe, args.batch, args.dtype))
        return
    result = run(args)
    print(format_table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
