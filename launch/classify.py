#!/usr/bin/env python
"""Trains and evaluates an InternImage classifier on an ImageFolder or a Hugging Face dataset on disk.

The recipe is the InternImage release's ImageNet recipe, built from timm's parts: AdamW (wd 0.05, none on
1-D weights) with layer-wise lr decay, warm-up then per-step cosine, mixup/cutmix with label smoothing,
EMA, grad clip 5.0. Checkpoints resume exactly on a CPU.

    # one process (CPU or one GPU); a tiny model that trains on a laptop in seconds:
    python launch/classify.py --data DIR --output runs/cls-tiny --img-size 32 --dcn-backend reference \
        --model-kwargs channels=16 depths=1,1,2,1 groups=1,2,4,8 --epochs 5 --batch-size 16 --warmup-epochs 1
    # several GPUs or nodes, ZeRO stage 2, bf16:
    deepspeed launch/classify.py --deepspeed --zero-stage 2 --data DIR --output runs/cls-t --model internimage_t

DIR is an ImageFolder root (DIR/train/<class>/*.png, DIR/val/<class>/*.png) or a DatasetDict written by
`datasets`' `save_to_disk` (splits train and validation, val or test; columns image and label).
OUTPUT receives log.jsonl (one JSON line per epoch, plus step lines), checkpoint-last.pt (or deepspeed/ under
DeepSpeed) and the final weights model.safetensors (model-ema.safetensors with --model-ema).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
for folder in (REPO_ROOT, REPO_ROOT / "launch"):  # the project's packages, and checkpoint_io.py beside this script
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timm.data import Mixup, create_transform  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402
from timm.scheduler import CosineLRScheduler  # noqa: E402
from timm.utils import ModelEmaV3, accuracy  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, DistributedSampler  # noqa: E402
from tqdm import tqdm  # noqa: E402

from internimage import create_model, list_models  # noqa: E402
from internimage.model import HEAD_MODULES  # noqa: E402
from internimage.transforms import build_eval_transform  # noqa: E402
from checkpoint_io import atomic_save, atomic_write, rng_state, set_rng_state  # noqa: E402
from runtime import Runtime  # noqa: E402

CHECKPOINT_NAME = "checkpoint-last.pt"
DEEPSPEED_DIR = "deepspeed"
EVAL_SPLITS = {"imagefolder": ("val",), "hf": ("validation", "val", "test")}


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
    model.add_argument("--model-kwargs", nargs="+", type=parse_model_kwarg, default=[], metavar="KEY=VALUE|JSON",
                       help="overrides for create_model, e.g. channels=16 depths=1,1,2,1")
    model.add_argument("--drop-path", type=float, default=None, help="drop-path rate (default: the variant's)")
    model.add_argument("--dcn-backend", default="auto", choices=("auto", "reference", "cpu", "cuda"))
    model.add_argument("--pretrained", default=None, help="weights to start from (.pth or .safetensors); a head "
                       "with another number of classes is replaced by a fresh one")
    model.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward")

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

    run = parser.add_argument_group("run")
    run.add_argument("--output", default="runs/classify")
    run.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                     help="continue from PATH, or without PATH from the checkpoint in --output (the schedule "
                     "of the original run continues too)")
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
    positive = {"--img-size": args.img_size, "--batch-size": args.batch_size, "--epochs": args.epochs}
    for flag, value in positive.items():
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.workers < 0 or args.save_every_steps < 0 or args.log_every_steps < 0:
        parser.error("--workers, --save-every-steps and --log-every-steps cannot be negative")
    if not 0.0 < args.layer_decay <= 1.0:
        parser.error(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if not 0.0 <= args.smoothing < 1.0:
        parser.error(f"--smoothing must be in [0, 1), got {args.smoothing}")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        parser.error(f"mixup/cutmix pair each sample with another: --batch-size must be even, got {args.batch_size}")
    if "num_classes" in args.model_kwargs:
        parser.error("--model-kwargs: num_classes comes from the dataset's classes; leave it out")
    if args.eval_only and not (args.pretrained or args.resume):
        parser.error("--eval-only needs weights: give --pretrained PATH or --resume [PATH]")
    if args.model_ema and args.deepspeed and args.zero_stage == 3:
        parser.error("--model-ema needs whole parameters on every rank: use --zero-stage 0, 1 or 2")
    return args


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
        seed = int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])
        with local_seed(seed):
            return self.dataset[index]


@contextlib.contextmanager
def local_seed(seed: int) -> Iterator[None]:
    """Seeds the Python, NumPy and torch CPU generators (those torchvision and timm transforms draw from) and
    restores them after, so the caller's random streams are untouched."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


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


def load_pretrained(model: nn.Module, path: str) -> str:
    """Loads weights to start from. A head trained for another number of classes is replaced by the model's
    freshly initialised one (fine-tuning); any other mismatch is the checkpoint loader's error."""
    from internimage.checkpoint import CheckpointError, check_compatible, load_checkpoint, read_state_dict

    try:
        report = load_checkpoint(model, path)
        return f"loaded {len(report.loaded)} tensors from {path}"
    except CheckpointError:
        state = read_state_dict(path)
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


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on 1-D tensors (norms, biases, layer-scale gammas); lr scaled by
    layer_decay ** (distance from the head). timm's schedulers multiply each group's lr by its lr_scale."""
    ids, head_id = layer_ids(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and not name.endswith(".bias") and "gamma" not in name.rsplit(".", 1)[-1]
        key = (ids[name], decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": layer_decay ** (head_id - ids[name]),
                           "name": f"layer{ids[name]}_{'decay' if decay else 'no_decay'}"}
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def build_scheduler(optimizer, args, total_steps: int, warmup_steps: int) -> CosineLRScheduler:
    """Linear warm-up from --warmup-lr for `warmup_steps`, then cosine to --min-lr, updated every step."""
    if warmup_steps >= total_steps:
        raise ValueError(f"warm-up of {warmup_steps} steps leaves no steps of the {total_steps}-step schedule "
                         "(--epochs x steps per epoch); shorten --warmup-epochs/--warmup-steps")
    return CosineLRScheduler(optimizer, t_initial=total_steps - warmup_steps, lr_min=args.min_lr,
                             warmup_t=warmup_steps, warmup_lr_init=args.warmup_lr, warmup_prefix=True,
                             t_in_epochs=False)


def build_criterion(args, num_classes: int) -> tuple[nn.Module, Mixup | None]:
    """With mixup/cutmix the targets are soft and label smoothing is folded into them."""
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing), None
    return nn.CrossEntropyLoss(), None


# ------------------------------------------------------------------------------------------------- runtime
def setup_runtime(args) -> Runtime:
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible")
    bf16 = args.precision == "bf16" or (args.precision == "auto" and use_cuda)
    if not args.deepspeed:
        return Runtime(torch.device("cuda" if use_cuda else "cpu"), bf16=bf16)
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return Runtime(device, dist.get_rank(), dist.get_world_size(), bf16=bf16, deepspeed=deepspeed)


def deepspeed_config(args, runtime: Runtime) -> dict[str, Any]:
    """ZeRO at --zero-stage; gradient clipping by the engine; bf16 where asked (the default on GPUs)."""
    return {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": args.clip_grad,
        "zero_optimization": {"stage": args.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW with our layer-decay groups
        "bf16": {"enabled": runtime.bf16},
        "steps_per_print": 10 ** 9,
    }


# ---------------------------------------------------------------------------------------------- training
@dataclass
class Trainer:
    """Everything a step changes, and where the run is: `epoch` and the batches done in it, `step` overall."""
    model: nn.Module                     # the plain module (inside the engine under DeepSpeed)
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler | None  # None when only evaluating
    criterion: nn.Module
    mixup: Mixup | None
    ema: ModelEmaV3 | None
    runtime: Runtime
    engine: Any = None                   # the DeepSpeed engine, when there is one
    epoch_steps: int = 0                 # batches per epoch and rank
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    epoch_loss: list[float] = field(default_factory=lambda: [0.0, 0])  # sum and count of this epoch's losses

    @property
    def forward_module(self) -> nn.Module:
        return self.engine if self.engine is not None else self.model


def check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"step {step}: the loss is {loss.item()}; lower --lr or check the data")


def train_step(trainer: Trainer, images: torch.Tensor, targets: torch.Tensor, clip_grad: float) -> dict[str, float]:
    runtime = trainer.runtime
    images = images.to(runtime.device, non_blocking=True)
    targets = targets.to(runtime.device, non_blocking=True)
    if trainer.mixup is not None:
        images, targets = trainer.mixup(images, targets)
    trainer.forward_module.train()
    if trainer.engine is not None:
        dtype = next(trainer.model.parameters()).dtype  # bf16 under DeepSpeed's bf16 mode
        loss = trainer.criterion(trainer.engine(images.to(dtype)).float(), targets)
        check_finite(loss, trainer.step + 1)
        trainer.engine.backward(loss)
        trainer.engine.step()
        grad_norm = trainer.engine.get_global_grad_norm()
    else:
        with torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=runtime.bf16):
            logits = trainer.model(images)
        loss = trainer.criterion(logits.float(), targets)
        check_finite(loss, trainer.step + 1)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(trainer.model.parameters(), clip_grad if clip_grad > 0 else math.inf)
        trainer.optimizer.step()
    trainer.step += 1
    trainer.batch_in_epoch += 1
    trainer.scheduler.step_update(num_updates=trainer.step)
    if trainer.ema is not None:
        trainer.ema.update(trainer.model, step=trainer.step)
    loss_value = loss.item()
    trainer.epoch_loss[0] += loss_value
    trainer.epoch_loss[1] += 1
    return {"loss": loss_value, "lr": max(group["lr"] for group in trainer.optimizer.param_groups),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}


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


# --------------------------------------------------------------------------------------------- checkpoints
def run_state(trainer: Trainer, args, classes: list[str]) -> dict[str, Any]:
    """What a resume needs besides the model and optimiser."""
    return {"scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
            "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
            "epoch": trainer.epoch, "batch_in_epoch": trainer.batch_in_epoch, "step": trainer.step,
            "epoch_loss": list(trainer.epoch_loss), "args": vars(args), "classes": classes}


def save_checkpoint(trainer: Trainer, args, classes: list[str], output: Path) -> None:
    state = run_state(trainer, args, classes)
    if trainer.engine is not None:
        _save_deepspeed(trainer, state, output / DEEPSPEED_DIR)
        return
    state.update(model=trainer.model.state_dict(), optimizer=trainer.optimizer.state_dict(), rng=rng_state())
    atomic_save(state, output / CHECKPOINT_NAME)


def _save_deepspeed(trainer: Trainer, state: dict[str, Any], directory: Path) -> None:
    """The engine's own (sharded) checkpoint under a new tag; `latest` moves to it only once it is complete,
    then older tags are removed. Each rank keeps its own random streams beside it."""
    tag = f"step{trainer.step:08d}"
    trainer.engine.save_checkpoint(str(directory), tag=tag, client_state=state)
    atomic_save(rng_state(), directory / tag / f"rng-rank{trainer.runtime.rank}.pt")
    trainer.runtime.barrier()
    if trainer.runtime.is_main:
        for old in directory.glob("step*"):
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    trainer.runtime.barrier()


def resume_path(args, output: Path) -> Path:
    """--resume PATH, or the checkpoint this script writes in --output."""
    expected = "a DeepSpeed checkpoint folder" if args.deepspeed else f"a {CHECKPOINT_NAME} file"
    default = output / (DEEPSPEED_DIR if args.deepspeed else CHECKPOINT_NAME)
    path = default if args.resume == "auto" else Path(args.resume)
    if not path.exists():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint; expected {expected} written by this script")
    return path


def load_resume(trainer: Trainer, args, path: Path, load_training_state: bool = True) -> None:
    """Restores model, optimiser, schedule, EMA, position and random streams (the last, so that nothing
    draws from them before the first resumed step)."""
    if trainer.engine is not None:
        _, state = trainer.engine.load_checkpoint(str(path), load_optimizer_states=load_training_state,
                                                  load_lr_scheduler_states=False)
        if state is None:
            raise FileNotFoundError(f"--resume {path}: no DeepSpeed checkpoint found there (no 'latest' tag)")
        _check_same_model(state.get("args", {}), args, path)
        tag = (path / "latest").read_text().strip()
        rng = torch.load(path / tag / f"rng-rank{trainer.runtime.rank}.pt", weights_only=False)
    else:
        # Our own file: besides tensors it holds the args and the Python/NumPy random states.
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "model" not in state or "step" not in state:
            raise ValueError(f"--resume {path}: not a checkpoint of launch/classify.py (no model/step entries)")
        _check_same_model(state.get("args", {}), args, path)
        trainer.model.load_state_dict(state["model"])
        if load_training_state:
            trainer.optimizer.load_state_dict(state["optimizer"])
        rng = state["rng"]
    if trainer.ema is not None and state.get("ema") is not None:
        trainer.ema.load_state_dict(state["ema"])
    elif trainer.ema is not None:  # EMA switched on at resume: start it from the current weights
        trainer.ema.set(trainer.model)
    trainer.epoch, trainer.batch_in_epoch, trainer.step = state["epoch"], state["batch_in_epoch"], state["step"]
    if not load_training_state:
        return
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.epoch_loss = list(state["epoch_loss"])
    set_rng_state(rng)


def _check_same_model(saved: dict[str, Any], args, path: Path) -> None:
    for key in ("model", "model_kwargs"):
        if key in saved and json.dumps(saved[key], sort_keys=True) != json.dumps(getattr(args, key), sort_keys=True):
            raise ValueError(f"--resume {path}: the checkpoint was trained with --{key.replace('_', '-')} "
                             f"{json.dumps(saved[key])}, this run asks for {json.dumps(getattr(args, key))}")


def final_state_dicts(trainer: Trainer, output: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The weights to export, in fp32: under ZeRO the master weights gathered from the last checkpoint."""
    weights = {}
    if trainer.engine is not None and trainer.engine.zero_optimization_stage() > 0:
        trainer.runtime.barrier()
        if trainer.runtime.is_main:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            weights["model"] = get_fp32_state_dict_from_zero_checkpoint(str(output / DEEPSPEED_DIR))
    elif trainer.runtime.is_main:
        weights["model"] = {k: v.float() if v.is_floating_point() else v for k, v in trainer.model.state_dict().items()}
    if trainer.ema is not None and trainer.runtime.is_main:
        weights["model-ema"] = trainer.ema.module.state_dict()
    return weights


def export_safetensors(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """The final weights in the format `internimage.checkpoint.load_checkpoint` reads."""
    from safetensors.torch import save

    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    atomic_write(path, lambda f: f.write(save(tensors, metadata=metadata)))


# -------------------------------------------------------------------------------------------------- main
class JsonLog:
    """Appends one JSON object per line to OUTPUT/log.jsonl (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def build_trainer(args, runtime: Runtime, splits: Splits, train_set: Dataset | None) -> Trainer:
    """Model (from --pretrained), EMA, optimiser, schedule and loss; the DeepSpeed engine around them when
    there is one; then the state of --resume."""
    num_classes = len(splits.classes)
    seed_everything(args.seed)  # the same initial weights on every rank
    model = build_model(args, num_classes)
    if args.pretrained:
        message = load_pretrained(model, args.pretrained)
        if runtime.is_main:
            print(message)
    model.to(runtime.device)
    ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) if args.model_ema else None
    seed_everything(args.seed + runtime.rank)  # but each rank its own drop-path and mixup draws

    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay, args.layer_decay), lr=args.lr)
    engine = None
    if runtime.deepspeed is not None:
        engine, optimizer, _, _ = runtime.deepspeed.initialize(model=model, optimizer=optimizer,
                                                               config=deepspeed_config(args, runtime))
    scheduler, epoch_steps = None, 0
    if train_set is not None:
        epoch_steps = steps_per_epoch(train_set, args, runtime)
        warmup = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_epochs * epoch_steps)
        scheduler = build_scheduler(optimizer, args, args.epochs * epoch_steps, warmup)
    criterion, mixup = build_criterion(args, num_classes)
    trainer = Trainer(model, optimizer, scheduler, criterion, mixup, ema, runtime, engine, epoch_steps)
    if args.resume:
        load_resume(trainer, args, resume_path(args, Path(args.output)), load_training_state=not args.eval_only)
    return trainer


def fit(trainer: Trainer, args, train_set: SeededSamples, val_loader: DataLoader, classes: list[str],
        log: JsonLog) -> dict[str, Any]:
    """Trains to --epochs (or --max-steps), evaluating and checkpointing after every epoch; returns the last
    evaluation."""
    output, progress = Path(args.output), trainer.runtime.is_main and not args.no_progress
    max_steps = min(args.max_steps or math.inf, args.epochs * trainer.epoch_steps)
    start = time.time()
    metrics: dict[str, Any] = {}
    while trainer.epoch < args.epochs and trainer.step < max_steps:
        metrics = {}
        loader = train_loader(train_set, args, trainer.runtime, trainer.epoch, trainer.batch_in_epoch)
        bar = tqdm(loader, desc=f"epoch {trainer.epoch + 1}/{args.epochs}", disable=not progress,
                   initial=trainer.batch_in_epoch, total=trainer.epoch_steps, dynamic_ncols=True)
        for images, targets in bar:
            stats = train_step(trainer, images, targets, args.clip_grad)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}", refresh=False)
            if args.log_every_steps and trainer.step % args.log_every_steps == 0:
                log.write({"event": "step", "epoch": trainer.epoch, "step": trainer.step, **stats})
            if args.save_every_steps and trainer.step % args.save_every_steps == 0:
                save_checkpoint(trainer, args, classes, output)
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
        save_checkpoint(trainer, args, classes, output)

    if not metrics:  # stopped inside an epoch (or resumed a finished run): checkpoint where we are, evaluate
        save_checkpoint(trainer, args, classes, output)
        metrics = evaluate_all(trainer, val_loader, len(classes), progress)
        log.write({"event": "stop", "epoch": trainer.epoch, "step": trainer.step, **metrics})
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the command line `argv`; returns the last evaluation and where training stopped."""
    args = parse_args(argv)
    runtime = setup_runtime(args)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    log = JsonLog(output / "log.jsonl", runtime.is_main)
    splits = open_splits(args.data, build_train_transform(args), build_eval_transform(args.img_size),
                         need_train=not args.eval_only)
    train_set = SeededSamples(splits.train, args.seed) if splits.train is not None else None
    trainer = build_trainer(args, runtime, splits, train_set)
    val_loader = eval_loader(splits.eval, args, runtime)

    if args.eval_only:
        metrics = evaluate_all(trainer, val_loader, len(splits.classes), runtime.is_main and not args.no_progress)
        log.write({"event": "eval", "step": trainer.step, **metrics})
    else:
        metrics = fit(trainer, args, train_set, val_loader, splits.classes, log)
        metadata = {"model": args.model, "model_kwargs": json.dumps(args.model_kwargs),
                    "num_classes": str(len(splits.classes)), "classes": json.dumps(splits.classes),
                    "step": str(trainer.step)}
        for name, state_dict in final_state_dicts(trainer, output).items():
            export_safetensors(state_dict, output / f"{name}.safetensors", metadata)
        runtime.barrier()
    if runtime.is_main:
        print(json.dumps({"step": trainer.step, **metrics}))
    return {"step": trainer.step, "epoch": trainer.epoch, **metrics}


if __name__ == "__main__":
    main()
