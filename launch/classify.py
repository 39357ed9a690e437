#!/usr/bin/env python
"""Trains and evaluates an InternImage classifier on an ImageFolder or a Hugging Face dataset on disk.

The recipe is the InternImage release's ImageNet recipe, built from timm's parts: AdamW (wd 0.05, none on
1-D weights) with layer-wise lr decay, warm-up then per-step cosine, mixup/cutmix with label smoothing,
EMA, grad clip 5.0. Checkpoints resume exactly on a CPU.

    # one process (CPU or one GPU); a tiny model that trains on a laptop in seconds:
    python -m launch.classify --data DIR --output runs/cls-tiny --img-size 32 --dcn-backend reference \
        --model-kwargs channels=16 depths=1,1,2,1 groups=1,2,4,8 --epochs 5 --batch-size 16 --warmup-epochs 1
    # several GPUs or nodes, ZeRO stage 2, bf16:
    deepspeed launch/classify.py --deepspeed --zero-stage 2 --data DIR --output runs/cls-t --model internimage_t

DIR is an ImageFolder root (DIR/train/<class>/*.png, DIR/val/<class>/*.png) or a DatasetDict written by
`datasets`' `save_to_disk` (splits train and validation, val or test; columns image and label).
OUTPUT receives log.jsonl (one JSON line per epoch, plus step lines), checkpoints/step_XXXXXX/ and export/
with the final weights, model.safetensors (model-ema.safetensors with --model-ema), which `load_checkpoint`
reads. A folder that holds another run is refused unless --resume or --overwrite says what to do.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from internimage import list_models
from internimage.transforms import build_eval_transform
from launch import classification as job
from launch.training.checkpoints import RunFolder, RunFolderError, latest_checkpoint, read_client
from launch.training.logs import RunLog
from launch.training.runtime import setup_runtime


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="ImageFolder root with train/ and val/, or a save_to_disk dataset")
    data.add_argument("--img-size", type=int, default=224)
    data.add_argument("--batch-size", type=int, default=128, help="per process")
    data.add_argument("--workers", type=int, default=2, help="data-loading processes per training process")
    data.add_argument("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (the release's)")
    data.add_argument("--reprob", type=float, default=0.0, help="random-erase probability (the release uses 0.25)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="internimage_t", choices=list_models())
    model.add_argument("--model-kwargs", nargs="+", type=job.parse_model_kwarg, default=[], metavar="KEY=VALUE|JSON",
                       help="overrides for create_model, e.g. channels=16 depths=1,1,2,1")
    model.add_argument("--drop-path", type=float, default=None, help="drop-path rate (default: the variant's)")
    model.add_argument("--dcn-backend", default="auto", choices=("auto", "reference", "cpu", "cuda"))
    model.add_argument("--pretrained", default=None, help="weights to start from (.pth or .safetensors); a head "
                       "with another number of classes is replaced by a fresh one")
    model.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward")
    model.add_argument("--allow-pickle", action="store_true", help="let --pretrained load a .pth that needs full "
                       "unpickling (it can run code: only for files you trust)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=300)
    optim.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (the schedule "
                       "still spans --epochs)")
    optim.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the head, used as given")
    optim.add_argument("--min-lr", type=float, default=5e-6)
    optim.add_argument("--warmup-lr", type=float, default=5e-7)
    warmup = optim.add_mutually_exclusive_group()
    warmup.add_argument("--warmup-epochs", type=float, default=20.0)
    warmup.add_argument("--warmup-steps", type=int, default=None)
    optim.add_argument("--weight-decay", type=float, default=0.05)
    optim.add_argument("--layer-decay", type=float, default=1.0, help="lr ratio per block from the head down "
                       "(0.9 in the release's fine-tuning configs; 1.0 disables)")
    optim.add_argument("--clip-grad", type=float, default=5.0, help="max gradient norm; 0 disables")
    optim.add_argument("--mixup", type=float, default=0.8, help="mixup alpha; 0 disables")
    optim.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha; 0 disables")
    optim.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    optim.add_argument("--model-ema", action="store_true", help="keep and evaluate an EMA of the weights")
    optim.add_argument("--model-ema-decay", type=float, default=0.9999)
    optim.add_argument("--model-ema-warmup", action="store_true", help="ramp the EMA decay up over early steps")
    optim.add_argument("--max-nonfinite-steps", type=int, default=5, help="stop after this many steps in a row "
                       "with a non-finite loss or gradient (each is skipped)")

    run = parser.add_argument_group("run")
    run.add_argument("--output", default="runs/classify")
    run.add_argument("--resume", action="store_true", help="continue the run in --output from its latest "
                     "checkpoint (the schedule of the original run continues too)")
    run.add_argument("--overwrite", action="store_true", help="delete the run already in --output and start anew")
    run.add_argument("--eval-only", action="store_true", help="evaluate --pretrained or --resume weights and exit")
    run.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N steps; 0: per epoch")
    run.add_argument("--log-every-steps", type=int, default=50, help="write a step line to log.jsonl every N steps")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    run.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 on GPU")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--deepspeed", action="store_true", help="run under DeepSpeed (start with the deepspeed launcher)")
    run.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2, 3))
    run.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.model_kwargs = {key: value for item in args.model_kwargs for key, value in item.items()}
    problem = job.argument_problem(args)
    if problem:
        parser.error(problem)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the command line `argv`; returns the last evaluation and where training stopped."""
    args = parse_args(argv)
    bf16 = {"auto": "auto", "fp32": False, "bf16": True}[args.precision]
    runtime = setup_runtime(args.deepspeed, args.device, bf16)
    output = Path(args.output)
    folder = RunFolder(output, runtime, "classify")
    if args.eval_only:  # reads weights, writes only an evaluation line: the run in the folder stays as it is
        checkpoint = latest_checkpoint(output) if args.resume else None
        if args.resume and checkpoint is None:
            raise RunFolderError(f"--resume: no checkpoint in {output / 'checkpoints'} to evaluate")
        output.mkdir(parents=True, exist_ok=True)
    else:
        checkpoint = folder.prepare(args.resume, args.overwrite)
        if args.resume and checkpoint is None:
            runtime.print(f"--resume: no checkpoint in {output / 'checkpoints'}; starting from step 0")
    log = RunLog(output, runtime.is_main, tensorboard=False)
    splits = job.open_splits(args.data, job.build_train_transform(args), build_eval_transform(args.img_size),
                             need_train=not args.eval_only)
    train_set = job.SeededSamples(splits.train, args.seed) if splits.train is not None else None
    trainer = job.build_trainer(args, runtime, splits, train_set, folder)
    if checkpoint is not None:
        job.resume(trainer, args, checkpoint, read_client(checkpoint), training=not args.eval_only)
    val_loader = job.eval_loader(splits.eval, args, runtime)

    if args.eval_only:
        metrics = job.evaluate_all(trainer, val_loader, len(splits.classes), runtime.is_main and not args.no_progress)
        log.write({"event": "eval", "step": trainer.step, **metrics})
    else:
        metrics = job.fit(trainer, args, train_set, val_loader, splits.classes, log)
    runtime.print(json.dumps({"step": trainer.step, **metrics}))
    return {"step": trainer.step, "epoch": trainer.epoch, **metrics}


def cli() -> None:
    try:
        main()
    except (RunFolderError, job.TrainingStopped) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, RunFolderError) else 1)


if __name__ == "__main__":
    cli()
