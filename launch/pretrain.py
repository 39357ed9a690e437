#!/usr/bin/env python
"""Multitask pre-training of the generalist model from a recipe (data_recipes.recipe), then the built-in zero-shot
evaluation.

    python launch/pretrain.py                                   # the tiny recipe on the built-in shapes data, 1 process
    python launch/pretrain.py --recipe tiny steps=100 optimizer.name=tbgn tasks.captioning.ratio=0.5
    deepspeed launch/pretrain.py                                # DeepSpeed: gloo + fp32 on CPUs, NCCL + bf16 on GPUs
    deepspeed --num_gpus 8 launch/pretrain.py --recipe my.yaml deepspeed.zero_stage=2
    python launch/pretrain.py --resume                          # continue from OUTPUT/checkpoints/latest

Every step trains ONE task on every rank (unmixed sampling, drawn from (seed, step)); its batch comes from a
deterministic per-task stream, so a resumed run repeats the uninterrupted one exactly (on a CPU, bit for bit).
OUTPUT (recipe.output_dir, or --output) receives:
  checkpoints/step_XXXXXX/   model + optimizer + RNG + data positions + the recipe, and export/ (a
                             `UniPerceiver.from_pretrained` folder); written to a temporary folder and renamed,
                             so a crash mid-write leaves the previous one whole. `checkpoints/latest` names the newest.
  export/                    the newest checkpoint's export, swapped in by renames
  log.jsonl, tb/, loss_curve.png, eval_test.json
SIGTERM (or a first Ctrl-C) finishes the current step, checkpoints and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
for folder in (REPO_ROOT, REPO_ROOT / "launch"):  # the project's packages, and checkpoint_io.py beside this script
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

from data_recipes.formats import open_dataset, parse_spec  # noqa: E402
from data_recipes.recipe import Recipe, TaskRecipe, load_recipe  # noqa: E402
from data_recipes.sampler import UnmixedTaskSampler, step_seed  # noqa: E402
from checkpoint_io import atomic_write, fsync_dir, rng_state, set_rng_state  # noqa: E402
from runtime import Runtime  # noqa: E402

CHECKPOINTS, EXPORT, LATEST, STATE_FILE, ENGINE_TAG = "checkpoints", "export", "latest", "state.pt", "engine"
CHECKPOINT_PREFIX, TEMPORARY_PREFIX = "step_", ".tmp-"
CHECKPOINT_FORMAT = 1


class TrainingStopped(RuntimeError):
    """The run cannot go on (repeated non-finite losses); the message says why and what to try."""


# ----------------------------------------------------------------------------------------------- arguments
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="recipe overrides, e.g. steps=100 optimizer.lr=3e-4 tasks.vqa.batch_size=8")
    parser.add_argument("--recipe", default="tiny", help="a built-in recipe name (launch/recipes/) or a YAML path")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/latest "
                        "(starts afresh, saying so, when there is none)")
    parser.add_argument("--output", default=None, help="the run folder (default: the recipe's output_dir)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="checkpoint and exit at this step (the schedule still spans the recipe's steps): "
                        "a time slice of a long run, continued with --resume")
    parser.add_argument("--no-eval", action="store_true", help="skip the zero-shot evaluation at the end")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed
    return parser.parse_intermixed_args(argv)


# ------------------------------------------------------------------------------------------------- runtime
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup_runtime(recipe: Recipe) -> Runtime:
    """DeepSpeed when started by a launcher (RANK and WORLD_SIZE set) or when the recipe asks for ZeRO; else a
    plain loop. GPUs: NCCL, bf16 where the recipe's deepspeed.bf16 allows; CPUs: gloo, fp32."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available()
    wanted = recipe.deepspeed.bf16
    if wanted is True and not cuda:
        raise ValueError("recipe deepspeed.bf16: true needs a GPU; on a CPU use auto or false (training runs in fp32)")
    bf16 = cuda and (wanted is True or (wanted == "auto" and torch.cuda.is_bf16_supported()))
    if not (launched or recipe.deepspeed.zero_stage > 0):
        return Runtime(torch.device("cuda" if cuda else "cpu"), bf16=bf16)
    import deepspeed

    if not launched:  # `python launch/pretrain.py deepspeed.zero_stage=2`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Runtime(device, dist.get_rank(), dist.get_world_size(), bf16=bf16, deepspeed=deepspeed)


# ---------------------------------------------------------------------------------------------------- data
def unwrap_dataset(dataset):
    """The format loader inside `SkipBadImages`."""
    return getattr(dataset, "dataset", dataset)


def sample_for_task(kind: str, sample, seed: int) -> dict[str, Any]:
    """A `Sample` as the dict the task's `format_batch` takes: captioning trains on the first caption (the others
    are references), retrieval on one caption drawn from `seed`, VQA on the most common answer."""
    record = sample.to_dict() if hasattr(sample, "to_dict") else dict(sample)
    captions = record.get("captions")
    if captions and "caption" not in record:
        if kind == "retrieval":
            record["caption"] = captions[random.Random(seed).randrange(len(captions))]
        else:
            record["caption"] = list(captions)
    if "answer" not in record and "question" in record:
        answer = record.get("multiple_choice_answer") or (record.get("answers") or [None])[0]
        if answer is not None:
            record["answer"] = answer
    return record


class TaskStream:
    """An endless, deterministic stream of one task's batches. Epoch e is a permutation of the dataset drawn from
    (seed, task index, e); rank r takes every world_size-th index of it; a batch is the next `batch_size` of those
    (the remainder of an epoch is dropped). The position (epoch, index) is the whole state: a checkpoint stores it."""

    def __init__(self, name: str, index: int, dataset, task, kind: str, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.name, self.dataset, self.task, self.kind, self.batch_size = name, dataset, task, kind, batch_size
        self.seed = step_seed(seed, 1_000_003 * (index + 1))
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order: tuple[int, list[int]] | None = None
        per_rank = len(dataset) // world_size
        if per_rank < batch_size:
            raise ValueError(f"recipe tasks.{name}: the dataset has {len(dataset)} samples, fewer than one batch of "
                             f"{batch_size} per rank on {world_size} rank(s); lower tasks.{name}.batch_size")

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(step_seed(self.seed, epoch))
            permutation = torch.randperm(len(self.dataset), generator=generator).tolist()
            self._order = (epoch, permutation[self.rank::self.world_size])
        return self._order[1]

    def next_batch(self) -> dict[str, Any]:
        order = self.order(self.epoch)
        if self.position + self.batch_size > len(order):
            self.epoch, self.position = self.epoch + 1, 0
            order = self.order(self.epoch)
        indices = order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        samples = [sample_for_task(self.kind, self.dataset[i], step_seed(self.seed ^ 0x5EED, self.epoch * 2 ** 32 + i))
                   for i in indices]
        return self.task.format_batch(samples)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


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
    from collections import Counter

    from tasks.vqa import normalize_answer
    inner = unwrap_dataset(dataset)
    counts: Counter[str] = Counter()
    for i in range(len(inner)):
        sample = inner[i]
        answer = sample.multiple_choice_answer or (sample.answers or [None])[0]
        if answer is not None:
            counts[normalize_answer(answer)] += 1
    return [answer for answer, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def open_task_datasets(recipe: Recipe) -> dict[str, Any]:
    datasets = {}
    for entry in recipe.tasks:
        try:
            datasets[entry.name] = open_dataset(entry.dataset, skip_bad=True)
        except (ValueError, FileNotFoundError, TypeError) as error:
            raise ValueError(f"recipe tasks.{entry.name}.dataset {entry.dataset!r}: {error}") from error
        if not hasattr(datasets[entry.name], "__len__"):
            raise ValueError(f"recipe tasks.{entry.name}.dataset {entry.dataset!r}: a streaming dataset; "
                             "launch/pretrain.py needs a map-style one (with a length) for exact resume")
    return datasets


def build_tasks(recipe: Recipe, datasets: dict[str, Any], image_size: int) -> dict[str, Any]:
    """The recipe's tasks, completed from their data where the recipe leaves a field out: the image size is the
    model's, a ranking VQA task gets the dataset's answer list (data_recipes.shapes.answer_list for shapes)."""
    for entry in recipe.tasks:
        if entry.task == "vqa" and entry.kwargs.get("mode", "rank") == "rank" and "answer_list" not in entry.kwargs:
            config = shapes_config_of(entry.dataset)
            if config is not None:
                from data_recipes.shapes import answer_list
                entry.kwargs = {**entry.kwargs, "answer_list": answer_list(config)}
            else:
                entry.kwargs = {**entry.kwargs, "answer_list": answer_texts(datasets[entry.name])}
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
            texts += answer_texts(dataset) if entry.task == "vqa" else caption_texts(dataset)
    config.caption_vocab = caption_vocabulary(tokenizer, texts)
    return config


# ------------------------------------------------------------------------------------------------ optimizer
def parameter_groups(model: nn.Module, weight_decay: float, encoder_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """No weight decay on 1-D tensors (norms, biases, temperatures, layer scales); the encoders' parameters (see
    `UniPerceiver.encoder_modules`) in groups of their own whose `lr_scale` is `encoder_lr_scale`.

    Randomly initialised encoders trained at the decoder's learning rate collapse in a few steps: every image
    (and every text) gets the same embedding, the logits become uniform and the loss sits at exactly log(N)
    from then on. A 10x lower rate for the encoders avoids that (launch/recipes/tiny.yaml)."""
    encoder_params = set()
    if encoder_lr_scale != 1.0:
        encoder_params = {id(p) for module in model.encoder_modules() for p in module.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault((id(param) in encoder_params, param.ndim > 1), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             "lr_scale": encoder_lr_scale if encoder else 1.0}
            for (encoder, decay), params in sorted(groups.items())]


def build_optimizer(model: nn.Module, recipe: Recipe, runtime: Runtime) -> torch.optim.Optimizer:
    opt = recipe.optimizer
    if opt.name == "adamw":
        return torch.optim.AdamW(parameter_groups(model, opt.weight_decay, opt.encoder_lr_scale), lr=opt.lr,
                                 betas=opt.betas, eps=opt.eps)
    from tasks.tbgn import TBGNAdamW
    zero = runtime.deepspeed is not None and recipe.deepspeed.zero_stage > 0
    if not zero:
        groups = parameter_groups(model, opt.weight_decay, opt.encoder_lr_scale)
    else:
        # Under ZeRO, DeepSpeed steps one parameter group at a time: TBGN needs ONE group to see the global norm
        # (see tasks/tbgn.py), so weight decay then applies to every tensor and all train at one rate.
        if opt.encoder_lr_scale != 1.0:
            raise ValueError(f"recipe optimizer.encoder_lr_scale={opt.encoder_lr_scale}: TBGN under ZeRO stage "
                             f"{recipe.deepspeed.zero_stage} keeps every parameter in one group at one learning "
                             "rate; set optimizer.encoder_lr_scale=1.0, or use optimizer.name=adamw")
        groups = [p for p in model.parameters() if p.requires_grad]
    return TBGNAdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay,
                     grad_norm_reduction="sum" if zero else "local")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(recipe: Recipe, runtime: Runtime) -> dict[str, Any]:
    """Batches are formed by the task streams, so the engine's micro batch is nominal (1); gradient clipping by
    the engine under adamw, none under tbgn (it normalises the gradient itself)."""
    clip = recipe.optimizer.grad_clip if recipe.optimizer.name == "adamw" and recipe.optimizer.grad_clip else 0.0
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": recipe.deepspeed.gradient_accumulation_steps,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": recipe.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": runtime.bf16},
        "steps_per_print": 10 ** 9,
    }
    return _merge(config, recipe.deepspeed.extra)


# ---------------------------------------------------------------------------------------------- the trainer
@dataclass
class Trainer:
    recipe: Recipe
    runtime: Runtime
    model: nn.Module                      # the plain module (inside the engine under DeepSpeed)
    optimizer: torch.optim.Optimizer      # the optimizer we built (its param_groups carry the lr)
    tasks: dict[str, Any]
    streams: dict[str, TaskStream]
    sampler: UnmixedTaskSampler
    output: Path
    engine: Any = None
    step: int = 0                         # optimizer steps done
    consecutive_nonfinite: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "task", "loss"} per step, for the plot
    _all_params: list[nn.Parameter] = field(default_factory=list)

    @property
    def zero3(self) -> bool:
        return self.engine is not None and self.engine.zero_optimization_stage() == 3


def _to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype if value.is_floating_point() else None, non_blocking=True)
        out[key] = value
    return out


def _touch_every_parameter(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """0 x (one element of every parameter): added to the loss, it gives the parameters a task does not use a
    zero gradient instead of none, so the plain loop and DeepSpeed treat idle parameters alike (as
    Uni-Perceiver v1 does under unmixed sampling)."""
    return torch.stack([p.reshape(-1)[0] for p in params]).sum() * 0.0


def train_step(trainer: Trainer) -> dict[str, Any]:
    """One optimizer step of the task the sampler draws for it; skipped (no update) when the loss is not finite."""
    recipe, runtime, step = trainer.recipe, trainer.runtime, trainer.step
    name = trainer.sampler.task_at(step)
    entry, task = recipe.task(name), trainer.tasks[name]
    lr = recipe.optimizer.lr_at(step, recipe.steps)
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    tbgn = recipe.optimizer.name == "tbgn"
    if tbgn:
        trainer.optimizer.set_task(name, trainer.sampler.probability(name), entry.loss_weight)
    weight = 1.0 if tbgn else entry.loss_weight
    dtype = torch.bfloat16 if trainer.engine is not None and runtime.bf16 else torch.float32
    accumulation = recipe.deepspeed.gradient_accumulation_steps
    trainer.model.train()
    if trainer.engine is None:
        trainer.optimizer.zero_grad(set_to_none=True)
    losses, finite, started = [], True, time.perf_counter()
    for _ in range(accumulation):
        batch = _to_device(trainer.streams[name].next_batch(), runtime.device, dtype)
        if not finite and trainer.engine is None:
            continue  # keep the stream where the uninterrupted run would be
        autocast = trainer.engine is None and runtime.bf16
        with torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = task.loss(trainer.model, batch).float()
        finite = finite and not runtime.any(not bool(torch.isfinite(loss.detach())))
        losses.append(loss.item())
        if trainer.engine is None:
            if finite:
                ((loss * weight + _touch_every_parameter(trainer._all_params)) / accumulation).backward()
        else:
            if finite:
                total = loss * weight
                if not trainer.zero3:
                    total = total + _touch_every_parameter(trainer._all_params)
            else:  # the engine counts micro-steps: hand it a zero gradient, and an lr of 0 below
                total = _touch_every_parameter(trainer._all_params)
            trainer.engine.backward(total)
    if trainer.engine is None:
        if finite:
            if recipe.optimizer.grad_clip and not tbgn:
                nn.utils.clip_grad_norm_(trainer.model.parameters(), recipe.optimizer.grad_clip)
            trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    else:
        if not finite:
            for group in trainer.optimizer.param_groups:
                group["lr"] = 0.0
        trainer.engine.step()
    trainer.step += 1
    loss_value = sum(losses) / len(losses)
    samples = entry.batch_size * accumulation * runtime.world_size
    return {"step": trainer.step, "task": name, "loss": loss_value, "lr": lr, "finite": finite,
            "time": time.perf_counter() - started, "samples": samples}


# ---------------------------------------------------------------------------------------------- checkpoints
def _sync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def checkpoint_dirs(output: Path) -> list[Path]:
    """The complete checkpoints (renamed into place), oldest first."""
    folder = output / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(output: Path) -> Path | None:
    """The folder `checkpoints/latest` names; the newest complete one if the pointer is missing or stale."""
    pointer = output / CHECKPOINTS / LATEST
    if pointer.is_file():
        candidate = output / CHECKPOINTS / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
    found = checkpoint_dirs(output)
    return found[-1] if found else None


def _export_weights(trainer: Trainer, folder: Path) -> None:
    """Rank 0 writes a `from_pretrained` folder in fp32 (under ZeRO, gathered from the checkpoint just written)."""
    from uniperceiver import UniPerceiver

    model = trainer.model
    if trainer.engine is not None and (trainer.engine.zero_optimization_stage() > 0 or trainer.runtime.bf16):
        state = None
        if trainer.engine.zero_optimization_stage() > 0:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=ENGINE_TAG)
        else:
            state = {k: v.float() for k, v in model.state_dict().items()}
        export_model = UniPerceiver(model.config, load_text_weights=False, load_image_checkpoint=False)
        missing, unexpected = export_model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"export: the gathered weights do not fit the model (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]})")
        model = export_model
    model.save_pretrained(folder)


def save_checkpoint(trainer: Trainer) -> Path:
    """checkpoints/step_XXXXXX/ (written under .tmp-step_XXXXXX, then renamed), the `latest` pointer, OUTPUT/export
    refreshed by renames; the oldest checkpoints beyond `checkpoint.keep` removed."""
    runtime, output = trainer.runtime, trainer.output
    folder = output / CHECKPOINTS
    name = f"{CHECKPOINT_PREFIX}{trainer.step:06d}"
    final, tmp = folder / name, folder / f"{TEMPORARY_PREFIX}{name}"
    if runtime.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    runtime.barrier()
    client = {"format": CHECKPOINT_FORMAT, "step": trainer.step, "recipe": trainer.recipe.to_dict(),
              "streams": {k: s.state_dict() for k, s in trainer.streams.items()}, "history": trainer.history,
              "consecutive_nonfinite": trainer.consecutive_nonfinite, "world_size": runtime.world_size}
    if trainer.engine is None:
        torch.save({**client, "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                    "rng": rng_state()}, tmp / STATE_FILE)
    else:
        trainer.engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, client_state=client, save_latest=False)
        torch.save(rng_state(), tmp / f"rng_rank{runtime.rank}.pt")
    runtime.barrier()
    if runtime.is_main:
        _export_weights(trainer, tmp / EXPORT)
        _sync_tree(tmp)
        if final.exists():  # the same step saved again (a resumed run that stops where it started)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(folder)
        atomic_write(folder / LATEST, lambda f: f.write(name.encode()))
        _refresh_export(final / EXPORT, output / EXPORT)
        for old in checkpoint_dirs(output)[:-trainer.recipe.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
    return final


def _refresh_export(source: Path, target: Path) -> None:
    """Copies the checkpoint's export beside `target`, then swaps it in by two renames."""
    staging, old = target.with_name(f".{target.name}.new"), target.with_name(f".{target.name}.old")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    shutil.copytree(source, staging)
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(trainer: Trainer, folder: Path) -> None:
    """Restores model, optimizer, position, data streams, loss history and (last) the random streams."""
    if trainer.engine is None:
        path = folder / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"--resume: {folder} has no {STATE_FILE}; was it written by a DeepSpeed run? "
                                    "Resume it under DeepSpeed (deepspeed launch/pretrain.py --resume)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        _check_resumable(state, trainer, folder)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        rng = state["rng"]
    else:
        if not (folder / ENGINE_TAG).is_dir():
            raise FileNotFoundError(f"--resume: {folder} holds no DeepSpeed checkpoint ({ENGINE_TAG}/); it was "
                                    "written by a plain run: resume it with python launch/pretrain.py --resume")
        _, state = trainer.engine.load_checkpoint(str(folder), tag=ENGINE_TAG, load_lr_scheduler_states=False)
        _check_resumable(state, trainer, folder)
        rng_file = folder / f"rng_rank{trainer.runtime.rank}.pt"
        rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
    trainer.step, trainer.history = int(state["step"]), list(state["history"])
    trainer.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
    for name, stream_state in state["streams"].items():
        if name in trainer.streams:
            trainer.streams[name].load_state_dict(stream_state)
    if rng is not None:
        set_rng_state(rng)


def _check_resumable(state: dict[str, Any], trainer: Trainer, folder: Path) -> None:
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"--resume: {folder} is not a checkpoint of launch/pretrain.py (format {CHECKPOINT_FORMAT})")
    saved_model = state["recipe"]["model"]
    if json.dumps(saved_model, sort_keys=True) != json.dumps(trainer.recipe.model, sort_keys=True):
        raise ValueError(f"--resume: {folder} was trained with model {json.dumps(saved_model)}, this recipe asks for "
                         f"{json.dumps(trainer.recipe.model)}")
    if state.get("world_size", 1) != trainer.runtime.world_size:
        print(f"note: {folder} was written by {state.get('world_size')} rank(s), this run has "
              f"{trainer.runtime.world_size}: the data streams are re-sharded, so batches differ from an "
              "uninterrupted run", file=sys.stderr)


# ------------------------------------------------------------------------------------------------- logging
class RunLog:
    """log.jsonl (one JSON object per line), TensorBoard scalars (loss per task, lr, throughput) on rank 0."""

    def __init__(self, output: Path, enabled: bool, purge_step: int | None):
        self.enabled, self.path, self.writer = enabled, output / "log.jsonl", None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(output / "tb"), purge_step=purge_step)
        except ImportError:
            print("note: TensorBoard logs are off: `pip install tensorboard` to write them", file=sys.stderr)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _truncate_log(path: Path, step: int) -> None:
    """Drops the lines of steps after `step` (run after the checkpoint was written, then lost to a crash): the
    resumed run writes them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
    atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


def plot_losses(history: list[dict[str, Any]], path: Path) -> Path | None:
    """One curve per task (its raw losses, faint, and a running mean), x = step."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no loss curve: `pip install matplotlib` to draw it", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in sorted({h["task"] for h in history}):
        points = [(h["step"], h["loss"]) for h in history if h["task"] == name and math.isfinite(h["loss"])]
        if not points:
            continue
        steps, losses = zip(*points)
        window = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        line, = ax.plot(steps[window - 1:], smooth, label=name)
        ax.plot(steps, losses, alpha=0.25, color=line.get_color(), linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("loss per task")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------------- eval
def zero_shot_evaluation(recipe: Recipe, export: Path, output: Path, progress: bool,
                         device: torch.device | None = None) -> dict[str, Any] | None:
    """The built-in zero-shot evaluation (the `shapes` suite of `python -m eval`) of the exported model on the
    test split of the shapes data the run trained on, printed as a table beside chance level and written to
    OUTPUT/eval_test.json."""
    from urllib.parse import urlencode

    specs = [entry.dataset for entry in recipe.tasks if parse_spec(entry.dataset)[0] == "shapes"]
    if not specs:
        print("zero-shot evaluation skipped: the built-in evaluation covers the shapes dataset, which no task uses")
        return None
    try:
        from eval.shapes import evaluate_shapes, format_table
    except ImportError as error:
        print(f"zero-shot evaluation skipped: the evaluation suite (eval.shapes) is not available ({error})")
        return None
    from uniperceiver import UniPerceiver
    _, folder, options = parse_spec(specs[0])
    options = {k: v for k, v in options.items() if k not in ("split", "task")}
    dataset = "shapes" + (f":{folder}" if folder else "") + (f"?{urlencode(options)}" if options else "")
    model = UniPerceiver.from_pretrained(export).to(device or "cpu")
    results = evaluate_shapes(model, split="test", dataset=dataset, batch_size=recipe.eval.batch_size,
                              progress=progress)
    counts = ", ".join(f"{v} {k}" for k, v in results.get("counts", {}).items())
    print(f"\nzero-shot evaluation, shapes [test]: {counts}\n\n{format_table(results)}")
    with open(output / "eval_test.json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    return results


# --------------------------------------------------------------------------------------------------- main
class StopFlag:
    """Set by SIGTERM (and a first Ctrl-C): the loop checkpoints at the end of the current step and exits 0."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)


def build_trainer(recipe: Recipe, runtime: Runtime, output: Path) -> Trainer:
    from uniperceiver import UniPerceiver

    datasets = open_task_datasets(recipe)
    config = model_config_for(recipe, datasets)
    tasks = build_tasks(recipe, datasets, config.image.image_size)
    torch.manual_seed(recipe.seed)  # the same initial weights on every rank
    random.seed(recipe.seed)
    np.random.seed(recipe.seed % 2 ** 32)
    model = UniPerceiver(config).to(runtime.device)
    optimizer = build_optimizer(model, recipe, runtime)
    engine = None
    if runtime.deepspeed is not None:
        engine, _, _, _ = runtime.deepspeed.initialize(model=model, optimizer=optimizer,
                                                       config=deepspeed_config(recipe, runtime))
    kinds = {entry.name: entry.task for entry in recipe.tasks}
    streams = {entry.name: TaskStream(entry.name, i, datasets[entry.name], tasks[entry.name], kinds[entry.name],
                                      entry.batch_size, recipe.seed, runtime.rank, runtime.world_size)
               for i, entry in enumerate(recipe.tasks)}
    trainer = Trainer(recipe, runtime, model, optimizer, tasks, streams, recipe.sampler(), output, engine)
    trainer._all_params = [p for p in model.parameters() if p.requires_grad]
    return trainer


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the command line `argv`; returns where training stopped, its last losses and the evaluation."""
    args = parse_args(argv)
    overrides = list(args.overrides)
    recipe = load_recipe(args.recipe, overrides)
    if args.output:
        recipe.output_dir = args.output
    output = Path(recipe.output_dir)
    runtime = setup_runtime(recipe)
    if runtime.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    trainer = build_trainer(recipe, runtime, output)
    if args.resume:
        found = latest_checkpoint(output)
        if found is None:
            if runtime.is_main:
                print(f"--resume: no checkpoint in {output / CHECKPOINTS}; starting from step 0")
        else:
            load_checkpoint(trainer, found)
            if runtime.is_main:
                _truncate_log(output / "log.jsonl", trainer.step)
                print(f"resumed from {found} at step {trainer.step}")
    start_step = trainer.step
    log = RunLog(output, runtime.is_main, purge_step=start_step if start_step else None)
    stop = StopFlag()
    stop.install()
    progress = None
    if runtime.is_main and not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=recipe.steps, initial=start_step, desc=recipe.name, dynamic_ncols=True)
    every = recipe.checkpoint.every_steps
    last_saved = start_step if args.resume and start_step else None
    window: list[dict[str, Any]] = []
    try:
        while trainer.step < recipe.steps:
            stats = train_step(trainer)
            trainer.history.append({"step": stats["step"], "task": stats["task"], "loss": stats["loss"]})
            window.append(stats)
            log.write({"event": "step", **{k: v for k, v in stats.items() if k != "finite"},
                       **({} if stats["finite"] else {"skipped": True})})
            if stats["finite"]:
                trainer.consecutive_nonfinite = 0
                log.scalars(stats["step"], {f"loss/{stats['task']}": stats["loss"], "lr": stats["lr"]})
            else:
                trainer.consecutive_nonfinite += 1
                message = (f"step {stats['step']}: task {stats['task']!r} gave a non-finite loss ({stats['loss']}); "
                           f"the step was skipped ({trainer.consecutive_nonfinite} in a row)")
                log.write({"event": "nonfinite", "step": stats["step"], "task": stats["task"],
                           "loss": str(stats["loss"]), "consecutive": trainer.consecutive_nonfinite})
                if runtime.is_main:
                    print(message, file=sys.stderr)
                if trainer.consecutive_nonfinite >= recipe.max_nonfinite_steps:
                    raise TrainingStopped(
                        f"stopping: {trainer.consecutive_nonfinite} consecutive steps had a non-finite loss (the last "
                        f"at step {stats['step']}, task {stats['task']!r}); the weights are those of the last good "
                        f"step. Lower optimizer.lr, raise optimizer.warmup_steps or check the data of that task "
                        f"(recipe max_nonfinite_steps={recipe.max_nonfinite_steps})")
            if progress is not None:
                progress.update(1)
                progress.set_postfix(task=stats["task"], loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.1e}",
                                     refresh=False)
            if len(window) >= recipe.log_every:
                seconds = sum(s["time"] for s in window)
                log.scalars(trainer.step, {"throughput/samples_per_s": sum(s["samples"] for s in window) / seconds,
                                           "throughput/s_per_step": seconds / len(window)})
                window = []
            signalled = runtime.any(stop.signal is not None)
            stopping = signalled or (args.stop_after is not None and trainer.step >= args.stop_after)
            if (every and trainer.step % every == 0) or stopping or trainer.step == recipe.steps:
                save_checkpoint(trainer)
                last_saved = trainer.step
            if stopping:
                if not signalled:
                    reason = f"--stop-after {args.stop_after}"
                elif stop.signal is not None:
                    reason = signal.Signals(stop.signal).name
                else:
                    reason = "another rank's signal"
                log.write({"event": "stopped", "step": trainer.step, "signal": reason})
                if runtime.is_main:
                    print(f"\n{reason}: checkpointed at step {trainer.step}; continue with --resume")
                return {"step": trainer.step, "stopped": reason, "history": trainer.history}
        if last_saved != trainer.step:  # a resumed run that was already finished
            save_checkpoint(trainer)
    finally:
        stop.restore()
        if progress is not None:
            progress.close()
        log.close()
    summary: dict[str, Any] = {"step": trainer.step, "history": trainer.history}
    if runtime.is_main:
        summary["loss_curve"] = plot_losses(trainer.history, output / "loss_curve.png")
        if not args.no_eval:
            summary["eval"] = zero_shot_evaluation(recipe, output / EXPORT, output, progress is not None,
                                                   runtime.device)
    runtime.barrier()
    return summary


if __name__ == "__main__":
    try:
        main()
    except TrainingStopped as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except ValueError as error:  # a recipe or data problem the user can fix: the message says which
        if "recipe" in str(error) or "override" in str(error):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        raise
