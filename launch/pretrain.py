#!/usr/bin/env python
"""Multitask pretraining of the generalist model from a recipe, then the built-in zero-shot evaluation.

    python launch/pretrain.py                                   # the tiny recipe on the built-in shapes data
    python -m launch.pretrain --recipe tiny steps=100 optimizer.name=tbgn tasks.captioning.ratio=0.5
    deepspeed launch/pretrain.py                                # DeepSpeed: gloo + fp32 on CPUs, NCCL + bf16 on GPUs
    deepspeed --num_gpus 8 launch/pretrain.py --recipe my.yaml deepspeed.zero_stage=2
    python launch/pretrain.py --resume                          # continue from OUTPUT/checkpoints/latest

Every step trains ONE task on every rank (unmixed sampling, drawn from (seed, step)); its batch comes from a
deterministic per-task stream, so a resumed run repeats the uninterrupted one exactly (on a CPU, bit for bit).
OUTPUT (recipe.output_dir, or --output) receives run.json, recipe.yaml, checkpoints/step_XXXXXX/ (each with an
export/ that `UniPerceiver.from_pretrained` loads), export/ (the newest), log.jsonl, tb/, loss_curve.png,
eval_test.json and examples.png (test pictures with the model's captions and answers), and for a model with the
diffusion branch eval_text_to_image.json and samples.png (generated pictures, prompts by seeds). A folder that holds
another run is refused unless --resume or --overwrite says what to do.
SIGTERM (or a first Ctrl-C) finishes the current step, checkpoints and exits 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from launch import pretraining as job
from launch.pictures import write_run_examples
from launch.training.checkpoints import EXPORT, RunFolder, RunFolderError, read_client
from launch.training.files import atomic_json, atomic_text
from launch.training.logs import RunLog, plot_losses, progress_bar, truncate_log
from launch.training.loop import TrainingStopped
from launch.training.recipe import load_recipe
from launch.training.runtime import launched_by_a_launcher, setup_runtime
from launch.training.signals import StopFlag


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="recipe overrides, e.g. steps=100 optimizer.lr=3e-4 tasks.vqa.batch_size=8")
    parser.add_argument("--recipe", default="tiny", help="a built-in recipe name (launch/recipes/) or a YAML path")
    parser.add_argument("--resume", action="store_true", help="continue the run in OUTPUT from its latest "
                        "checkpoint (starts afresh, saying so, when there is none)")
    parser.add_argument("--overwrite", action="store_true", help="delete the run already in OUTPUT and start anew")
    parser.add_argument("--output", default=None, help="the run folder (default: the recipe's output_dir)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="checkpoint and exit at this step (the schedule still spans the recipe's steps): "
                        "a time slice of a long run, continued with --resume")
    parser.add_argument("--no-eval", action="store_true", help="skip the zero-shot evaluation at the end")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the command line `argv`; returns where training stopped, its losses and the evaluation."""
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, list(args.overrides))
    if args.output:
        recipe.output_dir = args.output
    output = Path(recipe.output_dir)
    runtime = setup_runtime(launched_by_a_launcher() or recipe.deepspeed.zero_stage > 0,
                            bf16=recipe.deepspeed.bf16)
    folder = RunFolder(output, runtime, "pretrain", keep=recipe.checkpoint.keep)
    checkpoint = folder.prepare(args.resume, args.overwrite)
    client = read_client(checkpoint) if checkpoint is not None else None
    if client is not None:
        job.check_same_recipe(client["recipe"], recipe, checkpoint)
    elif args.resume:
        runtime.print(f"--resume: no checkpoint in {output / 'checkpoints'}; starting from step 0")
    if runtime.is_main:  # only once the folder and the recipe passed their checks
        atomic_text(output / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    trainer = job.build_trainer(recipe, runtime, folder)
    if client is not None:
        job.resume(trainer, checkpoint, client)
        runtime.print(f"resumed from {checkpoint} at step {trainer.step}")
    if runtime.is_main and args.resume:
        truncate_log(output / "log.jsonl", trainer.step)
    log = RunLog(output, runtime.is_main, purge_step=trainer.step or None)
    stop = StopFlag().install()
    progress = progress_bar(recipe.steps, trainer.step, recipe.name, runtime.is_main and not args.no_progress)
    try:
        result = job.fit(trainer, log, stop, progress, args.stop_after, trainer.step if client else None)
    finally:  # also when the run stops on repeated non-finite steps: the counts of skipped images are kept
        stop.restore()
        if progress is not None:
            progress.close()
        for stream in trainer.streams.values():
            stream.close()
        skipped = job.skipped_images(trainer.datasets)
        log.write({"event": "summary", "step": trainer.step, "skipped_images": skipped})
        log.close()
    result["skipped_images"] = skipped
    if any(sum(counts.values()) for counts in skipped.values()):
        runtime.print("skipped images (missing, unreadable) per task: " + ", ".join(
            f"{name}: {counts.get('missing', 0)}, {counts.get('unreadable', 0)}" for name, counts in skipped.items()))
    if "stopped" in result:
        return result
    if runtime.is_main:
        result["loss_curve"] = plot_losses(trainer.history, output / "loss_curve.png")
        atomic_json(output / "summary.json", {"step": trainer.step, "run_id": folder.run_id,
                                              "skipped_images": skipped})
        if not args.no_eval:
            result["eval"] = job.zero_shot_evaluation(recipe, output / EXPORT, output, progress is not None,
                                                      runtime.device)
            result["examples"] = write_run_examples(recipe, output / EXPORT, output, runtime.device)
    runtime.close()
    return result


def cli() -> None:
    try:
        main()
    except TrainingStopped as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except RunFolderError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except ValueError as error:  # a recipe or data problem the user can fix: the message says which
        if "recipe" in str(error) or "override" in str(error) or "--resume" in str(error):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    cli()
