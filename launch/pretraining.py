"""The multitask pretraining job that `launch/pretrain.py` runs: the recipe's datasets, tasks and model, built
on the training engine (`launch.training`), one optimizer step per unmixed task, periodic evaluation, checkpoints
with a `UniPerceiver.from_pretrained` export, and the zero-shot evaluation at the end."""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_recipes.formats import open_dataset, parse_spec
from data_recipes.sampler import UnmixedTaskSampler

from .training.augment import build_augmentation
from .training.checkpoints import RunFolder, differences
from .training.data import TaskStream, sample_for_task, unwrap_dataset
from .training.loop import NonfiniteGuard, StepRunner
from .training.optim import build_optimizer, parameter_groups
from .training.recipe import Recipe, TaskRecipe
from .training.runtime import Runtime
from .training.schedule import build_scheduler, set_learning_rate
from .training.seeding import seed_everything

# The recipe sections a resumed run must share with the checkpoint (the others, like logging, may change).
RESUME_SECTIONS = ("model", "tasks", "steps", "optimizer", "seed", "deepspeed")


# ---------------------------------------------------------------------------------------------------- data
def open_task_datasets(recipe: Recipe) -> dict[str, Any]:
    datasets = {}
    for entry in recipe.tasks:
        try:
            datasets[entry.name] = open_dataset(entry.dataset, skip_bad=True)
        except (ValueError, FileNotFoundError, TypeError) as error:
            raise ValueError(f"recipe tasks.{entry.name}.dataset {entry.dataset!r}: {error}") from error
    return datasets


def is_streaming(dataset) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset)


def shapes_config_of(spec: str):
    """The ShapesConfig a 'shapes?...' SPEC generates, or None for another format."""
    name, _, options = parse_spec(spec)
    if name != "shapes":
        return None
    from data_recipes.formats.shapes import _config_from_options
    return _config_from_options({k: v for k, v in options.items() if k not in ("split", "task")})


def caption_texts(dataset) -> list[str]:
    """Every caption of a map-style dataset of Samples (no image is decoded)."""
    inner = unwrap_dataset(dataset)
    data = getattr(inner, "data", None)
    if data is not None and "captions" in getattr(data, "column_names", ()):  # shapes: read the column at once
        from data_recipes.shapes import caption_corpus
        return caption_corpus(data)
    texts = []
    for i in range(len(inner)):
        texts += inner[i].captions or []
    return texts


def answer_texts(dataset) -> list[str]:
    """The distinct answers of a VQA dataset of Samples, most frequent first."""
    from tasks.vqa import normalize_answer
    inner = unwrap_dataset(dataset)
    counts: Counter[str] = Counter()
    for i in range(len(inner)):
        sample = inner[i]
        answer = sample.multiple_choice_answer or (sample.answers or [None])[0]
        if answer is not None:
            counts[normalize_answer(answer)] += 1
    return [answer for answer, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def build_tasks(recipe: Recipe, datasets: dict[str, Any], image_size: int) -> dict[str, Any]:
    """The recipe's tasks, completed from their data where the recipe leaves a field out: the image size is the
    model's, a ranking VQA task gets the dataset's answer list (data_recipes.shapes.answer_list for shapes), a
    detection task the dataset's category names (the shapes of a shapes dataset)."""
    for entry in recipe.tasks:
        if entry.task == "vqa" and entry.kwargs.get("mode", "rank") == "rank" and "answer_list" not in entry.kwargs:
            config = shapes_config_of(entry.dataset)
            if config is not None:
                from data_recipes.shapes import answer_list
                entry.kwargs = {**entry.kwargs, "answer_list": answer_list(config)}
            elif is_streaming(datasets[entry.name]):
                raise ValueError(f"recipe tasks.{entry.name}.kwargs.answer_list: a streaming dataset cannot be "
                                 "scanned for its answers; give the answer list in the recipe")
            else:
                entry.kwargs = {**entry.kwargs, "answer_list": answer_texts(datasets[entry.name])}
        if entry.task == "detection" and "category_names" not in entry.kwargs:
            config = shapes_config_of(entry.dataset)
            names = list(config.shapes) if config is not None else getattr(
                unwrap_dataset(datasets[entry.name]), "class_names", None)
            if names is None:
                raise ValueError(f"recipe tasks.{entry.name}.kwargs.category_names: the dataset does not list its "
                                 "categories; give the category names in the recipe")
            entry.kwargs = {**entry.kwargs, "category_names": names}
    built = recipe.build_tasks()
    for entry in recipe.tasks:
        if "image_size" not in entry.kwargs:
            built[entry.name].image_size = image_size
    return built


def needs_caption_vocab(entry: TaskRecipe) -> bool:
    return entry.task == "captioning" or (entry.task == "vqa" and entry.kwargs.get("mode") == "generate")


def model_config_for(recipe: Recipe, datasets: dict[str, Any]):
    """The recipe's model config with the caption vocabulary restricted to the tokens of the captions (and
    generated answers) the run trains and evaluates on, unless the recipe sets model.caption_vocab itself."""
    config = recipe.model_config()
    entries = [entry for entry in recipe.tasks if needs_caption_vocab(entry)]
    if config.caption_vocab is not None or not entries:
        return config
    from transformers import AutoTokenizer

    from tasks.captioning import caption_vocabulary
    from uniperceiver.text_encoder import resolve_text_model

    source, local = resolve_text_model(config.text.name_or_path, need_weights=False)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    texts: list[str] = []
    for entry in entries:
        for spec, dataset in ((entry.dataset, datasets[entry.name]), (entry.eval_dataset, None)):
            if spec is None:
                continue
            dataset = dataset if dataset is not None else open_dataset(spec)
            if is_streaming(dataset):
                raise ValueError(f"recipe tasks.{entry.name}: a streaming dataset cannot be scanned for the caption "
                                 "vocabulary; set model.caption_vocab in the recipe")
            texts += answer_texts(dataset) if entry.task == "vqa" else caption_texts(dataset)
    config.caption_vocab = caption_vocabulary(tokenizer, texts)
    return config


def skipped_images(datasets: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Missing and unreadable images each task's data skipped so far (SkipBadImages' counters)."""
    return {name: dict(dataset.skipped) for name, dataset in datasets.items() if hasattr(dataset, "skipped")}


# ------------------------------------------------------------------------------------------ optimizer, engine
def scaled_lr_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """The engine's weight-decay rule, with the image backbone and the language model (`encoder_modules`) at
    `optimizer.encoder_lr_scale` and the text-to-image branch's UNet at `optimizer.diffusion_lr_scale` (its
    projection and null condition, new even when the UNet is loaded, train at `lr`). Randomly
    initialised encoders trained at the decoder's learning rate collapse in a few steps (every image, and every
    text, gets the same embedding and the loss sits at log(N)); a 10x lower rate avoids that
    (launch/recipes/tiny.yaml)."""
    opt = recipe.optimizer
    scales = {}
    if opt.encoder_lr_scale != 1.0:
        scales.update(_parameter_names(model, model.encoder_modules(), ("encoder", opt.encoder_lr_scale)))
    if opt.diffusion_lr_scale != 1.0:
        if not getattr(model, "has_diffusion", False):
            raise ValueError(f"recipe optimizer.diffusion_lr_scale={opt.diffusion_lr_scale}: the model has no "
                             "text-to-image branch (model.diffusion) for it to scale; leave it at 1.0")
        scales.update(_parameter_names(model, (model.diffusion.unet,), ("diffusion", opt.diffusion_lr_scale)))
    group = lambda name: scales.get(name, ("decoder", 1.0))  # noqa: E731 - (group key, lr scale)
    return parameter_groups(model.named_parameters(), opt.weight_decay, lr_scale=lambda name: group(name)[1],
                            group_key=lambda name: group(name)[0])


def _parameter_names(model: nn.Module, modules, value) -> dict[str, Any]:
    """{name: value} for the model's parameters that belong to `modules`."""
    ids = {id(p) for module in modules for p in module.parameters()}
    return {name: value for name, p in model.named_parameters() if id(p) in ids}


def make_optimizer(model: nn.Module, recipe: Recipe, runtime: Runtime) -> torch.optim.Optimizer:
    opt = recipe.optimizer
    zero_stage = recipe.deepspeed.zero_stage if runtime.deepspeed is not None else None
    for key in ("encoder_lr_scale", "diffusion_lr_scale"):
        if opt.name == "tbgn" and zero_stage and getattr(opt, key) != 1.0:
            raise ValueError(f"recipe optimizer.{key}={getattr(opt, key)}: TBGN under ZeRO stage {zero_stage} keeps "
                             f"every parameter in one group at one learning rate; set optimizer.{key}=1.0, or use "
                             "optimizer.name=adamw")
    return build_optimizer(opt.name, scaled_lr_groups(model, recipe), opt.lr, opt.betas, opt.eps, opt.weight_decay,
                           zero_stage)


def deepspeed_config(recipe: Recipe, runtime: Runtime) -> dict[str, Any]:
    """Batches are formed by the task streams, so the engine's micro batch is nominal (1); gradient clipping by
    the engine under adamw, none under tbgn (it normalises the gradient itself)."""
    clip = recipe.optimizer.grad_clip if recipe.optimizer.name == "adamw" and recipe.optimizer.grad_clip else 0.0
    config = {"train_micro_batch_size_per_gpu": 1,
              "gradient_accumulation_steps": recipe.deepspeed.gradient_accumulation_steps,
              "gradient_clipping": clip, "zero_optimization": {"stage": recipe.deepspeed.zero_stage},
              "zero_allow_untested_optimizer": True, "bf16": {"enabled": runtime.bf16}, "steps_per_print": 10 ** 9}
    return _merge(config, recipe.deepspeed.extra)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ---------------------------------------------------------------------------------------------- the trainer
@dataclass
class Trainer:
    recipe: Recipe
    runtime: Runtime
    model: nn.Module                      # the plain module (inside the engine under DeepSpeed)
    optimizer: torch.optim.Optimizer      # the optimizer we built (its param_groups carry the lr)
    scheduler: Any
    runner: StepRunner
    tasks: dict[str, Any]
    datasets: dict[str, Any]
    streams: dict[str, Any]
    sampler: UnmixedTaskSampler
    folder: RunFolder
    engine: Any = None
    step: int = 0                         # optimizer steps done
    guard: NonfiniteGuard | None = None
    given_recipe: dict[str, Any] = field(default_factory=dict)  # as the user wrote it (the tasks add fields)
    eval_sets: dict[str, Any] = field(default_factory=dict)     # the eval_dataset of each task, opened once
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "task", "loss"} per step, for the plot


def make_stream(recipe: Recipe, entry: TaskRecipe, index: int, dataset, task, runtime: Runtime):
    augment = build_augmentation(entry.augment, entry.task, entry.kwargs)
    if is_streaming(dataset):
        from .training.streaming import ShardStream
        return ShardStream(entry.name, index, dataset, entry.task, task.format_batch, entry.batch_size, recipe.seed,
                           runtime.rank, runtime.world_size, recipe.workers, augment)
    return TaskStream(entry.name, index, dataset, entry.task, task.format_batch, entry.batch_size, recipe.seed,
                      runtime.rank, runtime.world_size, recipe.workers, augment)


def build_trainer(recipe: Recipe, runtime: Runtime, folder: RunFolder) -> Trainer:
    from uniperceiver import UniPerceiver

    given = recipe.to_dict()
    datasets = open_task_datasets(recipe)
    config = model_config_for(recipe, datasets)
    tasks = build_tasks(recipe, datasets, config.image.image_size)
    seed_everything(recipe.seed)  # the same initial weights on every rank
    model = UniPerceiver(config).to(runtime.device)
    optimizer = make_optimizer(model, recipe, runtime)
    engine = None
    if runtime.deepspeed is not None:
        engine, _, _, _ = runtime.deepspeed.initialize(model=model, optimizer=optimizer,
                                                       config=deepspeed_config(recipe, runtime))
    opt = recipe.optimizer
    scheduler = build_scheduler(optimizer, opt.lr, recipe.steps, opt.warmup_steps, 0.0, opt.min_lr, opt.schedule)
    grad_clip = opt.grad_clip if opt.name == "adamw" else None
    runner = StepRunner(model, optimizer, runtime, engine, grad_clip, recipe.deepspeed.gradient_accumulation_steps)
    streams = {entry.name: make_stream(recipe, entry, i, datasets[entry.name], tasks[entry.name], runtime)
               for i, entry in enumerate(recipe.tasks)}
    return Trainer(recipe, runtime, model, optimizer, scheduler, runner, tasks, datasets, streams, recipe.sampler(),
                   folder, engine, guard=NonfiniteGuard(recipe.max_nonfinite_steps), given_recipe=given)


def _to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    return {key: value.to(device, dtype if value.is_floating_point() else None, non_blocking=True)
            if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def train_step(trainer: Trainer) -> dict[str, Any]:
    """One optimizer step of the task the sampler draws for it (skipped on every rank when non-finite)."""
    recipe, runtime, step = trainer.recipe, trainer.runtime, trainer.step
    name = trainer.sampler.task_at(step)
    entry, task = recipe.task(name), trainer.tasks[name]
    lr = set_learning_rate(trainer.scheduler, step)
    tbgn = recipe.optimizer.name == "tbgn"
    if tbgn:
        trainer.optimizer.set_task(name, trainer.sampler.probability(name, step), entry.loss_weight)
    dtype = trainer.runner.compute_dtype
    outcome = trainer.runner.step(lambda: _to_device(trainer.streams[name].next_batch(), runtime.device, dtype),
                                  lambda forward, batch: forward(task, batch), weight=1.0 if tbgn else entry.loss_weight)
    if outcome.finite and getattr(task, "family", "") == "diffusion":
        trainer.model.diffusion.update_ema()  # the averaged weights follow the branch's own steps
    trainer.step += 1
    samples = entry.batch_size * recipe.deepspeed.gradient_accumulation_steps * runtime.world_size
    return {"step": trainer.step, "task": name, "loss": outcome.loss, "lr": lr, "outcome": outcome,
            "time": outcome.seconds, "samples": samples}


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_losses(trainer: Trainer) -> dict[str, float]:
    """The mean loss of every task that has an eval_dataset, on its first eval.max_samples samples (the same
    number of batches on every rank: under ZeRO-3 a forward pass is a collective)."""
    recipe, runtime, model = trainer.recipe, trainer.runtime, trainer.model
    results = {}
    was_training = model.training
    model.eval()
    for entry in recipe.tasks:
        if entry.eval_dataset is None:
            continue
        if entry.name not in trainer.eval_sets:
            trainer.eval_sets[entry.name] = open_dataset(entry.eval_dataset, skip_bad=True)
        dataset = trainer.eval_sets[entry.name]
        count = min(len(dataset), recipe.eval.max_samples or len(dataset))
        size = recipe.eval.batch_size
        batches = count // (size * runtime.world_size) or 1
        totals = torch.zeros(2, dtype=torch.float64)
        for b in range(batches):
            indices = [i % len(dataset) for i in range((b * runtime.world_size + runtime.rank) * size,
                                                       (b * runtime.world_size + runtime.rank + 1) * size)]
            samples = [sample_for_task(entry.task, dataset[i], i) for i in indices]
            batch = _to_device(trainer.tasks[entry.name].format_batch(samples), runtime.device,
                               trainer.runner.compute_dtype)
            loss = trainer.tasks[entry.name].loss(model, batch).float().item()
            totals += torch.tensor([loss * len(indices), len(indices)], dtype=torch.float64)
        totals = runtime.all_reduce_sum(totals.to(runtime.collective_device)).cpu()
        results[entry.name] = float(totals[0] / totals[1])
    model.train(was_training)
    return results


def zero_shot_evaluation(recipe: Recipe, export: Path, output: Path, progress: bool,
                         device: torch.device | None = None) -> dict[str, Any] | None:
    """The built-in zero-shot evaluation (the `shapes` suite of `python -m eval`) of the exported model on the
    test split of the shapes data the run trained on, and on the same scenes' test split drawn in the held-out
    "shifted" style (its question-only baseline taken from the training data: the prior the model could have
    learnt). Printed as one table beside chance level; written to OUTPUT/eval_test.json and
    OUTPUT/eval_test_shifted.json."""
    from datasets import DatasetDict

    from .training.files import atomic_json

    spec = shapes_test_spec(recipe)
    if spec is None:
        print("zero-shot evaluation skipped: the built-in evaluation covers the shapes dataset, which no task uses")
        return None
    try:
        from eval.shapes import evaluate_shapes, format_side_by_side, resolve_shapes_data
    except ImportError as error:
        print(f"zero-shot evaluation skipped: the evaluation suite (eval.shapes) is not available ({error})")
        return None
    import dataclasses

    from data_recipes.shapes import build_shapes_dataset
    from uniperceiver import UniPerceiver
    test, train, config = resolve_shapes_data("test", spec)
    model = UniPerceiver.from_pretrained(export, device=device)
    results = {"test": evaluate_shapes(model, dataset=DatasetDict(train=train, test=test), config=config,
                                       batch_size=recipe.eval.batch_size, progress=progress)}
    atomic_json(output / "eval_test.json", results["test"])
    if config.style != "shifted":
        shifted_config = dataclasses.replace(config, style="shifted", train_size=0, val_size=0)
        shifted = build_shapes_dataset(None, shifted_config)["test"]
        results["test, shifted style"] = evaluate_shapes(model, dataset=DatasetDict(train=train, test=shifted),
                                                         config=shifted_config, batch_size=recipe.eval.batch_size,
                                                         progress=progress)
        atomic_json(output / "eval_test_shifted.json", results["test, shifted style"])
    counts = ", ".join(f"{v} {k}" for k, v in results["test"].get("counts", {}).items())
    print(f"\nzero-shot evaluation, shapes [test]: {counts}; value (x chance)\n\n{format_side_by_side(results)}")
    summary = results["test"] if len(results) == 1 else {**results["test"], "styles": results}
    if model.has_diffusion:
        summary["text_to_image"] = text_to_image_evaluation(model, test, config, output, progress,
                                                            recipe.eval.samples_seeds)
    return summary


def text_to_image_evaluation(model, test, config, output: Path, progress: bool, seeds: int = 4) -> dict[str, Any]:
    """The `text_to_image` suite, judged by the model itself: OUTPUT/eval_text_to_image.json and samples.png."""
    from eval.text_to_image import evaluate_text_to_image, format_results

    from .training.files import atomic_json

    results = evaluate_text_to_image(model, config=config, rows=test, seeds=range(seeds), grid=output / "samples.png",
                                     progress=progress)
    atomic_json(output / "eval_text_to_image.json", results)
    counts = ", ".join(f"{v} {k}" for k, v in results["counts"].items())
    print(f"\ntext to image, judged by the model itself ({counts}):\n\n{format_results(results)}")
    return results


def shapes_test_spec(recipe: Recipe) -> str | None:
    """The SPEC of the shapes data the recipe's first shapes task trains on, without its split and task options
    (what the zero-shot evaluation and the example pictures open), or None when no task uses the shapes data."""
    from urllib.parse import urlencode

    specs = [entry.dataset for entry in recipe.tasks if entry.dataset and parse_spec(entry.dataset)[0] == "shapes"]
    if not specs:
        return None
    _, folder, options = parse_spec(specs[0])
    options = {k: v for k, v in options.items() if k not in ("split", "task")}
    return "shapes" + (f":{folder}" if folder else "") + (f"?{urlencode(options)}" if options else "")


# ---------------------------------------------------------------------------------------------- checkpoints
def export_model(trainer: Trainer, folder: Path, engine_dir: Path) -> None:
    """Rank 0 writes a `from_pretrained` folder in fp32 (under ZeRO, gathered from the checkpoint just written)."""
    from uniperceiver import UniPerceiver

    from .training.checkpoints import ENGINE_TAG

    model, engine = trainer.model, trainer.engine
    if engine is not None and (engine.zero_optimization_stage() > 0 or trainer.runtime.bf16):
        if engine.zero_optimization_stage() > 0:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            state = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=ENGINE_TAG)
        else:
            state = {k: v.float() for k, v in model.state_dict().items()}
        export = UniPerceiver(model.config, load_text_weights=False, load_image_checkpoint=False)
        missing, unexpected = export.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"export: the gathered weights do not fit the model (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]})")
        model = export
    model.save_pretrained(folder)


def save(trainer: Trainer) -> Path:
    client = {"recipe": trainer.given_recipe, "history": trainer.history,
              "streams": {name: stream.state_dict() for name, stream in trainer.streams.items()},
              "consecutive_nonfinite": trainer.guard.consecutive, "skipped_images": skipped_images(trainer.datasets)}
    return trainer.folder.save(trainer.step, client, trainer.model, trainer.optimizer, trainer.engine,
                               export=lambda folder, engine_dir: export_model(trainer, folder, engine_dir))


def check_same_recipe(saved: dict[str, Any], recipe: Recipe, checkpoint: Path) -> None:
    """A resumed run must be the run that wrote the checkpoint: the same model, tasks and datasets, steps,
    optimizer, seed and engine settings."""
    current = recipe.to_dict()
    try:  # a key added to the recipe since the checkpoint was written counts as unchanged at its default
        saved = Recipe.from_dict(saved, source=str(checkpoint)).to_dict()
    except (ValueError, TypeError):
        pass  # the raw saved recipe: its differences are reported below
    changed = [line for section in RESUME_SECTIONS
               for line in differences({section: saved.get(section)}, {section: current.get(section)})]
    if changed:
        raise ValueError(f"--resume: the recipe differs from the one {checkpoint} was trained with: "
                         + "; ".join(changed) + ". Resume with the original recipe, or start a new run in "
                         "another --output")


def resume(trainer: Trainer, checkpoint: Path, client: dict[str, Any]) -> None:
    """Restores model, optimizer, position, data streams and loss history, then (last) the random streams."""
    trainer.folder.load(checkpoint, trainer.model, trainer.optimizer, trainer.engine)
    trainer.step, trainer.history = int(client["step"]), list(client["history"])
    trainer.guard.consecutive = int(client.get("consecutive_nonfinite", 0))
    for name, state in client["streams"].items():
        if name in trainer.streams:
            trainer.streams[name].load_state_dict(state)
    trainer.folder.restore_rng()


# --------------------------------------------------------------------------------------------------- the loop
def fit(trainer: Trainer, log, stop, progress, stop_after: int | None, resumed_at: int | None) -> dict[str, Any]:
    """Trains to recipe.steps: logs every step, evaluates every eval.every_steps, checkpoints every
    checkpoint.every_steps, on a signal and at the end. Returns where it stopped."""
    recipe, runtime = trainer.recipe, trainer.runtime
    every, eval_every = recipe.checkpoint.every_steps, recipe.eval.every_steps
    last_saved, window = resumed_at, []
    while trainer.step < recipe.steps:
        stats = train_step(trainer)
        outcome = stats.pop("outcome")
        trainer.history.append({"step": stats["step"], "task": stats["task"], "loss": stats["loss"]})
        window.append(stats)
        log.write({"event": "step", **stats, **({"grad_norm": outcome.grad_norm} if outcome.grad_norm else {}),
                   **({} if outcome.finite else {"skipped": True})})
        message = trainer.guard.record(outcome, stats["step"], f"task {stats['task']!r}")  # may stop the run
        if message:
            log.write({"event": "nonfinite", "step": stats["step"], "task": stats["task"], "what": outcome.skipped,
                       "loss": str(stats["loss"]), "consecutive": trainer.guard.consecutive})
            runtime.print(message, file=sys.stderr)
        else:
            log.scalars(stats["step"], {f"loss/{stats['task']}": stats["loss"], "lr": stats["lr"]})
        if progress is not None:
            progress.update(1)
            progress.set_postfix(task=stats["task"], loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.1e}",
                                 refresh=False)
        if len(window) >= recipe.log_every:
            seconds = sum(s["time"] for s in window)
            log.scalars(trainer.step, {"throughput/samples_per_s": sum(s["samples"] for s in window) / seconds,
                                       "throughput/s_per_step": seconds / len(window)})
            window = []
        if eval_every and trainer.step % eval_every == 0 and trainer.step < recipe.steps:
            losses = evaluate_losses(trainer)
            if losses:
                log.write({"event": "eval", "step": trainer.step, "loss": losses})
                log.scalars(trainer.step, {f"eval/loss/{name}": value for name, value in losses.items()})
        signalled = runtime.any(stop.signal is not None)
        stopping = signalled or (stop_after is not None and trainer.step >= stop_after)
        if (every and trainer.step % every == 0) or stopping or trainer.step == recipe.steps:
            save(trainer)
            last_saved = trainer.step
        if stopping:
            reason = (f"--stop-after {stop_after}" if not signalled else stop.name or "another rank's signal")
            log.write({"event": "stopped", "step": trainer.step, "signal": reason})
            runtime.print(f"\n{reason}: checkpointed at step {trainer.step}; continue with --resume")
            return {"step": trainer.step, "stopped": reason, "history": trainer.history}
    if last_saved != trainer.step:  # a resumed run that was already finished
        save(trainer)
    return {"step": trainer.step, "history": trainer.history}
