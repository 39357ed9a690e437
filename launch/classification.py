"""The image-classification job that `launch/classify.py` runs: an InternImage classifier on an ImageFolder or a
Hugging Face dataset on disk, trained with the InternImage release's recipe from timm's parts (layer-wise lr
decay, warm-up and cosine, mixup/cutmix with label smoothing, EMA, gradient clipping) on the training engine
(`launch.training`): the same step loop, checkpoints, NaN policy and seeding as pretraining."""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, accuracy
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from internimage import create_model
from internimage.model import HEAD_MODULES

from .training.checkpoints import ENGINE_TAG, RunFolder, differences
from .training.files import atomic_write
from .training.loop import NonfiniteGuard, StepRunner, TrainingStopped  # noqa: F401 (raised through fit)
from .training.optim import build_optimizer, parameter_groups
from .training.runtime import Runtime
from .training.schedule import build_scheduler, set_learning_rate
from .training.seeding import RANK, SAMPLE, WEIGHTS, derive_seed, local_seed, seed_everything

EVAL_SPLITS = {"imagefolder": ("val",), "hf": ("validation", "val", "test")}
# Arguments a resumed run may change (how it runs, not what it trains); every other one must match.
RUN_ONLY_ARGUMENTS = {"output", "resume", "overwrite", "workers", "no_progress", "max_steps", "save_every_steps",
                      "log_every_steps", "local_rank", "device", "eval_only", "pretrained", "allow_pickle"}


# ----------------------------------------------------------------------------------------------- arguments
def parse_model_kwarg(text: str) -> dict[str, Any]:
    """One `--model-kwargs` item: a JSON object, or key=value where value is JSON or a comma list
    (`depths=1,1,2,1`), so that shells need no quoting for the common cases."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"not a JSON object: {text!r} ({error})") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
        return value
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected a JSON object or key=value, got {text!r}")
    return {key.strip(): _parse_value(raw.strip())}


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    if "," in raw:
        return [_parse_value(item.strip()) for item in raw.split(",") if item.strip()]
    return {"true": True, "false": False, "none": None}.get(raw.lower(), raw)



def argument_problem(args: argparse.Namespace) -> str | None:
    """The first thing wrong with the command line of launch/classify.py (None: nothing), as argparse reports it."""
    positive = {"--img-size": args.img_size, "--batch-size": args.batch_size, "--epochs": args.epochs}
    for flag, value in positive.items():
        if value < 1:
            return f"{flag} must be at least 1, got {value}"
    if args.max_steps is not None and args.max_steps < 1:
        return f"--max-steps must be at least 1, got {args.max_steps}"
    if args.workers < 0 or args.save_every_steps < 0 or args.log_every_steps < 0:
        return "--workers, --save-every-steps and --log-every-steps cannot be negative"
    if not 0.0 < args.layer_decay <= 1.0:
        return f"--layer-decay must be in (0, 1], got {args.layer_decay}"
    if not 0.0 <= args.smoothing < 1.0:
        return f"--smoothing must be in [0, 1), got {args.smoothing}"
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        return f"mixup/cutmix pair each sample with another: --batch-size must be even, got {args.batch_size}"
    if "num_classes" in args.model_kwargs:
        return "--model-kwargs: num_classes comes from the dataset's classes; leave it out"
    if args.eval_only and not (args.pretrained or args.resume):
        return "--eval-only needs weights: give --pretrained PATH or --resume (the run in --output)"
    if args.max_nonfinite_steps < 1:
        return f"--max-nonfinite-steps must be at least 1, got {args.max_nonfinite_steps}"
    if args.model_ema and args.deepspeed and args.zero_stage == 3:
        return "--model-ema needs whole parameters on every rank: use --zero-stage 0, 1 or 2"
    return None


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class Splits:
    """The two splits of a classification dataset and its class names (index = label)."""
    train: Dataset | None
    eval: Dataset
    classes: list[str]


class HFImageClassification(Dataset):
    """A Hugging Face split as (transformed image, label) pairs, so both sources feed the same loader."""

    def __init__(self, split, transform, image_column: str, label_column: str):
        self.split, self.transform = split, transform
        self.image_column, self.label_column = image_column, label_column

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        row = self.split[int(index)]
        image = row[self.image_column]
        if not hasattr(image, "convert"):
            raise TypeError(f"column {self.image_column!r} holds {type(image).__name__}, expected a PIL image "
                            "(a datasets Image feature)")
        return self.transform(image.convert("RGB")), int(row[self.label_column])



class SeededSamples(Dataset):
    """Draws the augmentation of sample i in epoch e from its own seed (seed, e, i): a batch is then the same
    whatever the number of workers, and after a resume in the middle of an epoch."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with local_seed(derive_seed(self.seed, SAMPLE, self.epoch, int(index))):
            return self.dataset[index]


def build_train_transform(args: argparse.Namespace):
    """The release's training augmentation through timm: random resized crop, flip, colour jitter (auto-augment
    and random erasing only when asked, they cost time), bicubic, ImageNet mean/std."""
    return create_transform(args.img_size, is_training=True, auto_augment=args.aa, re_prob=args.reprob,
                            interpolation="bicubic")


def open_splits(path: str | os.PathLike, train_transform, eval_transform, need_train: bool = True) -> Splits:
    """Opens DIR as a save_to_disk dataset when it holds one, otherwise as an ImageFolder root."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such directory; expected an ImageFolder root with train/ and "
                                "val/ subfolders, or a Hugging Face dataset saved with save_to_disk")
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        return _open_hf(root, train_transform, eval_transform, need_train)
    return _open_image_folder(root, train_transform, eval_transform, need_train)


def _open_image_folder(root: Path, train_transform, eval_transform, need_train: bool) -> Splits:
    from torchvision.datasets import ImageFolder

    wanted = ("train", "val") if need_train else ("val",)
    missing = [name for name in wanted if not (root / name).is_dir()]
    if missing:
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"--data {root}: missing split folder(s) {', '.join(m + '/' for m in missing)}; "
                                f"expected {' and '.join(w + '/' for w in wanted)} with one subfolder per class "
                                f"(found folders: {found or 'none'}), or a save_to_disk dataset")
    eval_set = ImageFolder(str(root / "val"), transform=eval_transform)
    train_set = ImageFolder(str(root / "train"), transform=train_transform) if need_train else None
    if train_set is not None and train_set.classes != eval_set.classes:
        raise ValueError(f"--data {root}: train/ and val/ have different class folders "
                         f"({train_set.classes} vs {eval_set.classes})")
    return Splits(train_set, eval_set, list(eval_set.classes))


def _open_hf(root: Path, train_transform, eval_transform, need_train: bool) -> Splits:
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"--data {root} is a Hugging Face dataset; reading it needs `pip install datasets`") \
            from error
    loaded = datasets.load_from_disk(str(root))
    if not isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"--data {root}: a single split was saved; expected a DatasetDict with splits train and "
                         "one of validation/val/test (save the DatasetDict, not one Dataset)")
    eval_name = next((name for name in EVAL_SPLITS["hf"] if name in loaded), None)
    if eval_name is None or (need_train and "train" not in loaded):
        raise ValueError(f"--data {root}: splits {sorted(loaded)}; expected train and one of "
                         f"{'/'.join(EVAL_SPLITS['hf'])}")
    columns = loaded[eval_name].column_names
    image_column = next((c for c in ("image", "img") if c in columns), None)
    label_column = next((c for c in ("label", "labels") if c in columns), None)
    if image_column is None or label_column is None:
        raise ValueError(f"--data {root}: columns {columns}; expected an image column ('image' or 'img') and a "
                         "label column ('label' or 'labels')")
    label_feature = loaded[eval_name].features[label_column]
    if hasattr(label_feature, "names"):
        classes = list(label_feature.names)
    else:
        labels = set(loaded[eval_name][label_column]) | (set(loaded["train"][label_column]) if need_train else set())
        classes = [str(i) for i in range(max(labels) + 1)]
    def wrap(split: str, transform) -> HFImageClassification:
        return HFImageClassification(loaded[split], transform, image_column, label_column)

    return Splits(wrap("train", train_transform) if need_train else None, wrap(eval_name, eval_transform), classes)



def train_loader(dataset: SeededSamples, args, runtime: Runtime, epoch: int, skip_batches: int) -> DataLoader:
    """Epoch `epoch`'s batches for this rank, shuffled by (seed, epoch), from batch `skip_batches` on."""
    dataset.epoch = epoch
    sampler = DistributedSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    indices = indices[skip_batches * args.batch_size:(len(indices) // args.batch_size) * args.batch_size]
    return _loader(dataset, indices, args, runtime)


def _loader(dataset: Dataset, indices: list[int], args, runtime: Runtime) -> DataLoader:
    # A generator of its own keeps the loader from drawing its workers' base seed from the global RNG.
    return DataLoader(dataset, batch_size=args.batch_size, sampler=indices, num_workers=args.workers,
                      pin_memory=runtime.device.type == "cuda", generator=torch.Generator().manual_seed(args.seed))


class PaddedSplit(Dataset):
    """A split padded with copies of its first sample labelled -1, which evaluation skips: every rank then
    runs the same number of batches (under ZeRO-3 a forward pass is a collective)."""

    def __init__(self, dataset: Dataset, length: int):
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if index < len(self.dataset):
            return self.dataset[index]
        return self.dataset[0][0], -1


def eval_loader(dataset: Dataset, args, runtime: Runtime) -> DataLoader:
    """Every sample exactly once over all ranks, so the counts are exact."""
    padded = math.ceil(len(dataset) / runtime.world_size) * runtime.world_size
    if padded != len(dataset):
        dataset = PaddedSplit(dataset, padded)
    return _loader(dataset, list(range(runtime.rank, padded, runtime.world_size)), args, runtime)



def steps_per_epoch(train_set: Dataset, args, runtime: Runtime) -> int:
    steps = (len(train_set) // runtime.world_size) // args.batch_size
    if steps == 0:
        raise ValueError(f"--data {args.data}: {len(train_set)} training images are fewer than one batch of "
                         f"{args.batch_size} per process on {runtime.world_size} process(es); lower --batch-size")
    return steps


# ------------------------------------------------------------------------------------------ model, optimiser
def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    overrides = dict(args.model_kwargs)
    if args.drop_path is not None:
        overrides["drop_path_rate"] = args.drop_path
    try:
        model = create_model(args.model, num_classes=num_classes, dcn_backend=args.dcn_backend, **overrides)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--model {args.model} --model-kwargs {json.dumps(args.model_kwargs)}: {error}") from error
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def load_pretrained(model: nn.Module, path: str, allow_pickle: bool = False) -> str:
    """Loads weights to start from. A head trained for another number of classes is replaced by the model's
    freshly initialised one (fine-tuning); any other mismatch is the checkpoint loader's error. A .pth that
    needs full unpickling loads only with `allow_pickle` (--allow-pickle)."""
    from internimage.checkpoint import CheckpointError, check_compatible, load_checkpoint, read_state_dict

    try:
        report = load_checkpoint(model, path, allow_pickle=allow_pickle)
        return f"loaded {len(report.loaded)} tensors from {path}"
    except CheckpointError:
        state = read_state_dict(path, allow_pickle=allow_pickle)
        head = {f"head.{key}": value for key, value in model.head.state_dict().items()}
        if not all(key in state and state[key].shape != value.shape for key, value in head.items()):
            raise
    state.update(head)
    report = check_compatible(model, state, source=f"checkpoint {path}")
    model.load_state_dict({key: state[key] for key in report.loaded}, strict=not report.kept_initialised)
    return f"loaded {len(report.loaded) - len(head)} tensors from {path}; new head for {model.num_classes} classes"


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """A depth for each parameter, for layer-wise lr decay as in BEiT: 0 for the stem, 1..N for the blocks in
    order over all levels (a level's norm and downsample go with its last block, the level-2 post norms with
    the block they follow), N + 1 for the head. Returns the ids and N + 1."""
    depths = [len(level.blocks) for level in model.levels]
    head_id = sum(depths) + 1
    ids = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "patch_embed":
            ids[name] = 0
        elif parts[0] == "levels":
            level = int(parts[1])
            first = sum(depths[:level]) + 1
            if parts[2] == "blocks":
                ids[name] = first + int(parts[3])
            elif parts[2] == "post_norms":
                ids[name] = first + model.levels[level].post_norm_block_ids[int(parts[3])]
            else:
                ids[name] = first + depths[level] - 1
        else:
            if parts[0] not in HEAD_MODULES:
                raise ValueError(f"layer-wise lr decay: no layer for parameter {name!r}")
            ids[name] = head_id
    return ids, head_id




def build_criterion(args, num_classes: int) -> tuple[nn.Module, Mixup | None]:
    """With mixup/cutmix the targets are soft and label smoothing is folded into them."""
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing), None
    return nn.CrossEntropyLoss(), None



@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, runtime: Runtime, num_classes: int, desc: str,
             progress: bool) -> dict[str, float]:
    """Top-1, top-5 (top-k for fewer than five classes) and cross-entropy over the whole split."""
    model.eval()
    topk = (1, min(5, num_classes))
    dtype = next(model.parameters()).dtype
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-k hits, samples
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        images, targets = images.to(runtime.device, dtype), targets.to(runtime.device)
        with torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=runtime.bf16 and dtype == torch.float32):
            logits = model(images).float()
        if (targets < 0).any():  # padding (see PaddedSplit)
            logits, targets = logits[targets >= 0], targets[targets >= 0]
            if not targets.numel():
                continue
        top1, top5 = accuracy(logits, targets, topk=topk)
        n = targets.numel()
        totals += torch.tensor([F.cross_entropy(logits, targets, reduction="sum").item(),
                                top1.item() * n / 100, top5.item() * n / 100, n], dtype=torch.float64)
    totals = runtime.all_reduce_sum(totals.to(runtime.device)).cpu()
    count = max(totals[3].item(), 1)
    return {"top1": 100 * totals[1].item() / count, "top5": 100 * totals[2].item() / count,
            "loss": totals[0].item() / count, "count": int(totals[3].item())}


def evaluate_all(trainer: Trainer, loader: DataLoader, num_classes: int, progress: bool) -> dict[str, Any]:
    metrics = {"eval": evaluate(trainer.forward_module, loader, trainer.runtime, num_classes, "eval", progress)}
    if trainer.ema is not None:
        metrics["eval_ema"] = evaluate(trainer.ema.module, loader, trainer.runtime, num_classes, "eval ema", progress)
    return metrics


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """The engine's weight-decay rule, with lr scaled by layer_decay ** (distance from the head), as BEiT."""
    ids, head_id = layer_ids(model)
    return parameter_groups(model.named_parameters(), weight_decay,
                            lr_scale=lambda name: layer_decay ** (head_id - ids[name]),
                            group_key=lambda name: f"layer{ids[name]:03d}")


# ---------------------------------------------------------------------------------------------- training
def deepspeed_config(args, runtime: Runtime) -> dict[str, Any]:
    """ZeRO at --zero-stage; gradient clipping by the engine; bf16 where asked (the default on GPUs)."""
    return {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
            "gradient_clipping": args.clip_grad, "zero_optimization": {"stage": args.zero_stage},
            "zero_allow_untested_optimizer": True,  # torch's AdamW with our layer-decay groups
            "bf16": {"enabled": runtime.bf16}, "steps_per_print": 10 ** 9}


@dataclass
class Trainer:
    """Everything a step changes, and where the run is: `epoch` and the batches done in it, `step` overall."""
    model: nn.Module                     # the plain module (inside the engine under DeepSpeed)
    optimizer: torch.optim.Optimizer
    scheduler: Any                       # None when only evaluating
    runner: StepRunner
    criterion: nn.Module
    mixup: Mixup | None
    ema: ModelEmaV3 | None
    runtime: Runtime
    folder: RunFolder
    guard: NonfiniteGuard
    engine: Any = None                   # the DeepSpeed engine, when there is one
    epoch_steps: int = 0                 # batches per epoch and rank
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    epoch_loss: list[float] = field(default_factory=lambda: [0.0, 0])  # sum and count of this epoch's good losses

    @property
    def forward_module(self) -> nn.Module:
        return self.engine if self.engine is not None else self.model


def build_trainer(args, runtime: Runtime, splits: Splits, train_set: Dataset | None, folder: RunFolder) -> Trainer:
    """Model (from --pretrained), EMA, optimiser, schedule and loss; the DeepSpeed engine around them when
    there is one."""
    num_classes = len(splits.classes)
    seed_everything(derive_seed(args.seed, WEIGHTS))  # the same initial weights on every rank
    model = build_model(args, num_classes)
    if args.pretrained:
        runtime.print(load_pretrained(model, args.pretrained, args.allow_pickle))
    model.to(runtime.device)
    ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) if args.model_ema else None
    seed_everything(derive_seed(args.seed, RANK, runtime.rank))  # but each rank its own drop-path and mixup draws
    optimizer = build_optimizer("adamw", layer_decay_groups(model, args.weight_decay, args.layer_decay), args.lr)
    engine = None
    if runtime.deepspeed is not None:
        engine, _, _, _ = runtime.deepspeed.initialize(model=model, optimizer=optimizer,
                                                       config=deepspeed_config(args, runtime))
    scheduler, epoch_steps = None, 0
    if train_set is not None:
        epoch_steps = steps_per_epoch(train_set, args, runtime)
        total = args.epochs * epoch_steps
        warmup = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_epochs * epoch_steps)
        if warmup >= total:
            raise ValueError(f"warm-up of {warmup} steps leaves no steps of the {total}-step schedule "
                             "(--epochs x steps per epoch); shorten --warmup-epochs/--warmup-steps")
        scheduler = build_scheduler(optimizer, args.lr, total, warmup, args.warmup_lr, args.min_lr)
    runner = StepRunner(model, optimizer, runtime, engine, args.clip_grad or None, touch_idle=False)
    criterion, mixup = build_criterion(args, num_classes)
    return Trainer(model, optimizer, scheduler, runner, criterion, mixup, ema, runtime, folder,
                   NonfiniteGuard(args.max_nonfinite_steps), engine, epoch_steps)


def train_step(trainer: Trainer, images: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    runtime = trainer.runtime
    lr = set_learning_rate(trainer.scheduler, trainer.step)
    images = images.to(runtime.device, trainer.runner.compute_dtype, non_blocking=True)
    targets = targets.to(runtime.device, non_blocking=True)
    if trainer.mixup is not None:
        images, targets = trainer.mixup(images, targets)
    outcome = trainer.runner.step(lambda: (images, targets),
                                  lambda forward, batch: trainer.criterion(forward(batch[0]).float(), batch[1]))
    trainer.step += 1
    trainer.batch_in_epoch += 1
    if outcome.finite:
        if trainer.ema is not None:
            trainer.ema.update(trainer.model, step=trainer.step)
        trainer.epoch_loss[0] += outcome.loss
        trainer.epoch_loss[1] += 1
    return {"loss": outcome.loss, "lr": lr, "outcome": outcome,
            "grad_norm": outcome.grad_norm if outcome.grad_norm is not None else float("nan")}


# ------------------------------------------------------------------------------------------- checkpoints
def training_arguments(args) -> dict[str, Any]:
    """The arguments that define what is trained: a resume must match them."""
    return {key: value for key, value in vars(args).items() if key not in RUN_ONLY_ARGUMENTS}


def export_weights(trainer: Trainer, args, classes: list[str], folder: Path, engine_dir: Path) -> None:
    """export/model.safetensors (and model-ema.safetensors) in fp32, which `load_checkpoint` reads; under ZeRO the
    master weights gathered from the checkpoint just written."""
    from safetensors.torch import save

    if trainer.engine is not None and trainer.engine.zero_optimization_stage() > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        weights = {"model": get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=ENGINE_TAG)}
    else:
        weights = {"model": {k: v.float() if v.is_floating_point() else v for k, v in trainer.model.state_dict().items()}}
    if trainer.ema is not None:
        weights["model-ema"] = trainer.ema.module.state_dict()
    metadata = {"model": args.model, "model_kwargs": json.dumps(args.model_kwargs), "num_classes": str(len(classes)),
                "classes": json.dumps(classes), "step": str(trainer.step)}
    folder.mkdir(parents=True, exist_ok=True)
    for name, state in weights.items():
        tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
        atomic_write(folder / f"{name}.safetensors", lambda f, t=tensors: f.write(save(t, metadata=metadata)))


def save(trainer: Trainer, args, classes: list[str]) -> Path:
    client = {"arguments": training_arguments(args), "classes": classes, "epoch": trainer.epoch,
              "batch_in_epoch": trainer.batch_in_epoch, "epoch_loss": list(trainer.epoch_loss),
              "consecutive_nonfinite": trainer.guard.consecutive}
    extra = {"ema": trainer.ema.state_dict()} if trainer.ema is not None else None
    return trainer.folder.save(trainer.step, client, trainer.model, trainer.optimizer, trainer.engine,
                               export=lambda folder, engine_dir: export_weights(trainer, args, classes, folder,
                                                                                 engine_dir), extra=extra)


def resume(trainer: Trainer, args, checkpoint: Path, client: dict[str, Any], training: bool = True) -> None:
    """Restores model, optimiser, EMA, position and (last) the random streams; weights only for evaluation."""
    changed = differences(client["arguments"], training_arguments(args)) if training else []
    if changed:
        raise ValueError(f"--resume: {checkpoint} was trained with other arguments: " + "; ".join(changed)
                         + ". Resume with the original arguments, or start a new run in another --output")
    client = trainer.folder.load(checkpoint, trainer.model, trainer.optimizer if training else None, trainer.engine)
    if trainer.ema is not None and "ema" in client.get("extra", {}):
        trainer.ema.load_state_dict(client["extra"]["ema"])
    elif trainer.ema is not None:  # EMA switched on at resume: start it from the current weights
        trainer.ema.set(trainer.model)
    trainer.epoch, trainer.batch_in_epoch, trainer.step = client["epoch"], client["batch_in_epoch"], client["step"]
    if training:
        trainer.epoch_loss = list(client["epoch_loss"])
        trainer.guard.consecutive = int(client.get("consecutive_nonfinite", 0))
        trainer.folder.restore_rng()


# -------------------------------------------------------------------------------------------------- the loop
def fit(trainer: Trainer, args, train_set: SeededSamples, val_loader: DataLoader, classes: list[str],
        log) -> dict[str, Any]:
    """Trains to --epochs (or --max-steps), evaluating and checkpointing after every epoch; returns the last
    evaluation."""
    progress = trainer.runtime.is_main and not args.no_progress
    max_steps = min(args.max_steps or math.inf, args.epochs * trainer.epoch_steps)
    start = time.time()
    metrics: dict[str, Any] = {}
    while trainer.epoch < args.epochs and trainer.step < max_steps:
        metrics = {}
        loader = train_loader(train_set, args, trainer.runtime, trainer.epoch, trainer.batch_in_epoch)
        bar = tqdm(loader, desc=f"epoch {trainer.epoch + 1}/{args.epochs}", disable=not progress,
                   initial=trainer.batch_in_epoch, total=trainer.epoch_steps, dynamic_ncols=True)
        for images, targets in bar:
            stats = train_step(trainer, images, targets)
            outcome = stats.pop("outcome")
            message = trainer.guard.record(outcome, trainer.step, "the batch")  # raises after too many
            if message:
                log.write({"event": "nonfinite", "epoch": trainer.epoch, "step": trainer.step,
                           "what": outcome.skipped, "loss": str(outcome.loss),
                           "consecutive": trainer.guard.consecutive})
                trainer.runtime.print(message)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}", refresh=False)
            if args.log_every_steps and trainer.step % args.log_every_steps == 0:
                log.write({"event": "step", "epoch": trainer.epoch, "step": trainer.step, **stats,
                           **({} if outcome.finite else {"skipped": True})})
            if args.save_every_steps and trainer.step % args.save_every_steps == 0:
                save(trainer, args, classes)
            if trainer.step >= max_steps:
                break
        bar.close()
        if trainer.batch_in_epoch < trainer.epoch_steps:  # stopped by --max-steps inside the epoch
            break
        metrics = evaluate_all(trainer, val_loader, len(classes), progress)
        log.write({"event": "epoch", "epoch": trainer.epoch, "step": trainer.step,
                   "train_loss": trainer.epoch_loss[0] / max(trainer.epoch_loss[1], 1),
                   "lr": max(group["lr"] for group in trainer.optimizer.param_groups),
                   "time": round(time.time() - start, 3), **metrics})
        trainer.epoch, trainer.batch_in_epoch, trainer.epoch_loss = trainer.epoch + 1, 0, [0.0, 0]
        save(trainer, args, classes)

    if not metrics:  # stopped inside an epoch (or resumed a finished run): checkpoint where we are, evaluate
        save(trainer, args, classes)
        metrics = evaluate_all(trainer, val_loader, len(classes), progress)
        log.write({"event": "stop", "epoch": trainer.epoch, "step": trainer.step, **metrics})
    return metrics
