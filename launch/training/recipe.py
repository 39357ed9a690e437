"""Training recipes: one YAML file names the tasks (dataset, sampling ratio, batch size, loss weight), the model,
the optimizer, DeepSpeed, checkpoints and evaluation; `key=value` overrides change it from the command line.

    recipe = load_recipe("tiny", ["optimizer.lr=3e-4", "tasks.captioning.ratio=0.5", "steps=200"])

A recipe is a built-in name (`launch/recipes/<name>.yaml`, shipped inside the package) or a path. Every key is checked: an unknown key, in
the file or in an override, is an error naming its full dotted path and the keys valid there. Overrides address
a task by its name (`tasks.<name>.<field>`); values are parsed as YAML (`3e-4`, `true`, `[0.9, 0.95]`, `null`).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union


def recipes_dir() -> Path:
    """The built-in recipes, package data of `launch` (found the same way in a checkout and in an installed
    wheel)."""
    return Path(str(importlib.resources.files("launch") / "recipes"))


# ----------------------------------------------------------------------------------------------- the schema
@dataclass
class TaskRecipe:
    """One task of the mixture. `name` addresses it in overrides and logs; `task` is the registered task it runs
    (defaults to `name`, so two entries can train one task on two datasets); `dataset` is a SPEC for
    `data_recipes.formats.open_dataset` ("shapes?split=train", "coco_karpathy:/data/coco?split=train"); `ratio` its
    sampling weight (normalised over the tasks at each step); `ratio_end` the weight at the last step, reached
    linearly from `ratio` (None: constant; see `data_recipes.sampler`); `batch_size` per rank; `loss_weight` the
    TBGN weight ω (a plain loss multiplier under adamw); `kwargs` go to the task's constructor; `eval_dataset` a
    SPEC to evaluate on (None: the task is not evaluated); `augment` the training augmentation, a list of
    torchvision.transforms.v2 transforms by name with their keywords ([{ColorJitter: {brightness: 0.3}}, ...], see
    `launch.training.augment`), applied to each training picture before the task's preprocessing."""
    name: str
    dataset: str
    task: Union[str, None] = None
    ratio: float = 1.0
    ratio_end: Union[float, None] = None
    batch_size: int = 16
    loss_weight: float = 1.0
    kwargs: dict = field(default_factory=dict)
    eval_dataset: Union[str, None] = None
    augment: list = field(default_factory=list)

    def __post_init__(self):
        if self.task is None:
            self.task = self.name


@dataclass
class OptimizerConfig:
    """adamw: torch AdamW with grad-norm clipping at `grad_clip` (None: off). tbgn: `launch.training.tbgn.TBGNAdamW`,
    which normalises every gradient itself, so `grad_clip` is not applied. The learning rate warms up linearly
    over `warmup_steps`, then follows `schedule` ("cosine" down to `min_lr` at the last step, or "constant").
    `encoder_lr_scale` multiplies the learning rate of the image backbone and the language model (the parts an
    official checkpoint usually supplies); `diffusion_lr_scale` that of the text-to-image branch's UNet; the decoder,
    projections and readout train at `lr`. The schedule is `launch.training.schedule.build_scheduler`."""
    name: Literal["adamw", "tbgn"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)  # PyTorch convention (see TBGNAdamW)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: Union[float, None] = 1.0
    encoder_lr_scale: float = 1.0
    diffusion_lr_scale: float = 1.0


@dataclass
class DeepSpeedRecipe:
    """The parts of the DeepSpeed config a recipe chooses; `extra` is merged into the generated config as is
    (DeepSpeed's own keys, checked by DeepSpeed). bf16 "auto": on where the accelerator supports it."""
    zero_stage: int = 0
    bf16: Union[Literal["auto"], bool] = "auto"
    gradient_accumulation_steps: int = 1
    extra: dict = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    """A resumable checkpoint every `every_steps` optimizer steps (0: only at the end), keeping the last `keep`."""
    every_steps: int = 100
    keep: int = 2


@dataclass
class EvalConfig:
    """Evaluate the tasks that have an `eval_dataset` every `every_steps` steps (0: only at the end), on at most
    `max_samples` samples each (None: all), `batch_size` at a time. At the end, a model with the diffusion branch
    draws every text-to-image prompt with `samples_seeds` seeds (samples.png)."""
    every_steps: int = 0
    max_samples: Union[int, None] = None
    batch_size: int = 32
    samples_seeds: int = 4


@dataclass
class Recipe:
    """A whole training run as data. `model` is a `UniPerceiverConfig` as a nested dict (checked by
    `model_config()`); `output_dir` defaults to runs/<name>."""
    steps: int
    tasks: list[TaskRecipe]
    model: dict
    name: str = "recipe"
    seed: int = 0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    deepspeed: DeepSpeedRecipe = field(default_factory=DeepSpeedRecipe)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log_every: int = 10
    workers: int = 0   # DataLoader processes per task stream that decode (and augment) the pictures
    max_nonfinite_steps: int = 5  # stop the run after this many consecutive steps with a NaN/inf loss
    output_dir: Union[str, None] = None

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = os.path.join("runs", self.name)

    # -------------------------------------------------------------------------------------------- views
    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, numbers, strings): `Recipe.from_dict(recipe.to_dict()) == recipe`, and
        `yaml.safe_dump` writes it."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> "Recipe":
        recipe = _convert(data, Recipe, "", source)
        recipe.validate(source)
        return recipe

    def task(self, name: str) -> TaskRecipe:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"no task named {name!r} in the recipe; tasks: {[t.name for t in self.tasks]}")

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def sampling_ratios(self) -> dict[str, float]:
        """The normalised ratios s_k at the first step, by task name (`sampler()` gives those of any step)."""
        total = sum(task.ratio for task in self.tasks)
        return {task.name: task.ratio / total for task in self.tasks}

    def sampler(self):
        """The run's `UnmixedTaskSampler` (seeded with the recipe's seed)."""
        from data_recipes.sampler import UnmixedTaskSampler
        return UnmixedTaskSampler(self.task_names, [task.ratio for task in self.tasks], self.seed,
                                  [task.ratio_end for task in self.tasks], self.steps)

    def model_config(self):
        """The `UniPerceiverConfig` of `model` (imports the model code; unknown keys are errors)."""
        from uniperceiver import UniPerceiverConfig
        return UniPerceiverConfig.from_dict(self.model, source=f"recipe {self.name!r}: model")

    def build_tasks(self) -> dict[str, Any]:
        """name -> a `tasks.Task` instance built from the entry's `kwargs` (imports the task registry)."""
        from tasks import get_task
        built = {}
        for task in self.tasks:
            try:
                built[task.name] = get_task(task.task, **task.kwargs)
            except (TypeError, ValueError) as error:
                raise ValueError(f"recipe {self.name!r}: tasks.{task.name}.kwargs {sorted(task.kwargs)} do not fit "
                                 f"task {task.task!r}: {error}") from error
        return built

    # ------------------------------------------------------------------------------------------ checks
    def validate(self, source: str = "recipe") -> None:
        """Value checks the types cannot express; every problem is reported with its key."""
        problems = []

        def check(ok: bool, key: str, expected: str, value: Any) -> None:
            if not ok:
                problems.append(f"{key}: expected {expected}, got {value!r}")

        check(self.steps > 0, "steps", "a positive number of optimizer steps", self.steps)
        check(self.log_every > 0, "log_every", "> 0", self.log_every)
        check(self.workers >= 0, "workers", ">= 0 (0: decode in the training process)", self.workers)
        check(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", ">= 1", self.max_nonfinite_steps)
        check(bool(self.tasks), "tasks", "at least one task", self.tasks)
        names = self.task_names
        repeated = sorted({n for n in names if names.count(n) > 1})
        check(not repeated, "tasks", "distinct task names", repeated)
        for task in self.tasks:
            key = f"tasks.{task.name}"
            check(math.isfinite(task.ratio) and task.ratio >= 0, f"{key}.ratio", "a finite number >= 0", task.ratio)
            if task.ratio_end is not None:
                check(math.isfinite(task.ratio_end) and task.ratio_end >= 0, f"{key}.ratio_end",
                      "a finite number >= 0, or null for a constant ratio", task.ratio_end)
            check(task.batch_size > 0, f"{key}.batch_size", "> 0", task.batch_size)
            check(math.isfinite(task.loss_weight) and task.loss_weight >= 0, f"{key}.loss_weight",
                  "a finite number >= 0", task.loss_weight)
            check(bool(task.dataset), f"{key}.dataset", "a dataset SPEC such as 'shapes?split=train'", task.dataset)
            if task.augment:
                from .augment import augment_problem
                problem = augment_problem(task.augment, task.task, task.kwargs)
                check(problem is None, f"{key}.augment", problem or "", task.augment)
        if self.tasks and all(math.isfinite(t.ratio) and t.ratio >= 0 for t in self.tasks):
            check(sum(t.ratio for t in self.tasks) > 0, "tasks.*.ratio", "at least one positive ratio",
                  [t.ratio for t in self.tasks])
            ends = [t.ratio if t.ratio_end is None else t.ratio_end for t in self.tasks]
            if all(math.isfinite(e) and e >= 0 for e in ends):
                check(sum(ends) > 0, "tasks.*.ratio_end", "at least one positive weight at the last step", ends)
        opt = self.optimizer
        check(opt.lr > 0, "optimizer.lr", "> 0", opt.lr)
        check(0 <= opt.min_lr <= opt.lr, "optimizer.min_lr", f"in [0, lr={opt.lr}]", opt.min_lr)
        check(opt.weight_decay >= 0, "optimizer.weight_decay", ">= 0", opt.weight_decay)
        check(all(0 <= b < 1 for b in opt.betas), "optimizer.betas", "two numbers in [0, 1)", list(opt.betas))
        check(opt.eps >= 0, "optimizer.eps", ">= 0", opt.eps)
        check(opt.encoder_lr_scale > 0, "optimizer.encoder_lr_scale", "> 0", opt.encoder_lr_scale)
        check(opt.diffusion_lr_scale > 0, "optimizer.diffusion_lr_scale", "> 0", opt.diffusion_lr_scale)
        # a warm-up longer than the run is allowed (a short trial run of a long recipe): the lr never peaks
        check(opt.warmup_steps >= 0, "optimizer.warmup_steps", ">= 0", opt.warmup_steps)
        check(opt.grad_clip is None or opt.grad_clip > 0, "optimizer.grad_clip", "> 0 or null (off)", opt.grad_clip)
        check(self.deepspeed.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "0, 1, 2 or 3",
              self.deepspeed.zero_stage)
        check(self.deepspeed.gradient_accumulation_steps >= 1, "deepspeed.gradient_accumulation_steps", ">= 1",
              self.deepspeed.gradient_accumulation_steps)
        check(self.checkpoint.every_steps >= 0, "checkpoint.every_steps", ">= 0 (0: only at the end)",
              self.checkpoint.every_steps)
        check(self.checkpoint.keep >= 1, "checkpoint.keep", ">= 1", self.checkpoint.keep)
        check(self.eval.every_steps >= 0, "eval.every_steps", ">= 0 (0: only at the end)", self.eval.every_steps)
        check(self.eval.samples_seeds >= 1, "eval.samples_seeds", ">= 1", self.eval.samples_seeds)
        check(self.eval.max_samples is None or self.eval.max_samples > 0, "eval.max_samples", "> 0 or null",
              self.eval.max_samples)
        check(self.eval.batch_size > 0, "eval.batch_size", "> 0", self.eval.batch_size)
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------ loading
def builtin_recipes() -> list[str]:
    folder = recipes_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def resolve_recipe(name_or_path: str | os.PathLike) -> Path:
    """A path to an existing file, or the name of a built-in recipe (launch/recipes/<name>.yaml)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    builtin = recipes_dir() / f"{name_or_path}.yaml"
    if os.sep not in str(name_or_path) and builtin.is_file():
        return builtin
    raise FileNotFoundError(f"recipe {str(name_or_path)!r}: no such file, and no built-in recipe of that name; "
                            f"built-in recipes: {builtin_recipes()} (in {recipes_dir()})")


def load_recipe(name_or_path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe (a built-in name or a YAML path), apply `key=value` overrides in order, check it.
    The recipe's name defaults to the file's stem."""
    import yaml

    path = resolve_recipe(name_or_path)
    source = f"recipe {str(path)!r}"
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{source}: not valid YAML: {error}") from error
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    for override in overrides:
        apply_override(data, override)
    try:
        return Recipe.from_dict(data, source)
    except ValueError as error:
        # name the override that set a bad value, not only the file
        culprits = [o for o in overrides
                    if re.search(rf"(^|: |; ){re.escape(o.partition('=')[0].strip())}: ", str(error))]
        if culprits:
            raise ValueError(f"{error} (set by the override {culprits[-1]!r})") from None
        raise


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set one `dotted.key=value` in the raw recipe dict `data`, checking the key against the schema (a key
    that the file leaves out but the schema has is fine). Tasks are addressed by name: `tasks.<name>.ratio`."""
    import yaml

    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key or "" in key.split("."):
        raise ValueError(f"override {override!r}: expected KEY=VALUE, e.g. optimizer.lr=3e-4 or tasks.vqa.ratio=0.5")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise ValueError(f"override {override!r}: the value is not valid YAML: {error}") from error
    _set(data, Recipe, key.split("."), value, f"override {override!r}", "")


def _set(node: dict, kind: Any, parts: list[str], value: Any, source: str, prefix: str) -> None:
    part, rest = parts[0], parts[1:]
    here = _join(prefix, part)
    if not dataclasses.is_dataclass(kind):  # a free-form mapping (model, kwargs, extra): checked by its consumer
        if not rest:
            node[part] = value
            return
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{source}: {here!r} is {child!r}, not a mapping")
        return _set(child, dict, rest, value, source, here)
    valid = [f.name for f in dataclasses.fields(kind)]
    if part not in valid:
        where = f" under {prefix!r}" if prefix else ""
        raise ValueError(f"{source}: unknown key {here!r}; valid keys{where}: {valid}")
    if not rest:
        node[part] = value
        return
    sub_kind = typing.get_type_hints(kind)[part]
    if _origin(sub_kind) is list and dataclasses.is_dataclass(typing.get_args(sub_kind)[0]):  # tasks, by name
        entries = node.get(part)
        entries = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
        name, rest = rest[0], rest[1:]
        found = [e for e in entries if e.get("name") == name]
        if not found:
            names = [e.get("name") for e in entries]
            raise ValueError(f"{source}: unknown key {_join(here, name)!r}: no task named {name!r}; tasks: {names}")
        if not rest:  # a whole task entry
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {_join(here, name)!r} must be a mapping of task fields")
            found[0].clear()
            found[0].update({"name": name, **value})
            return
        return _set(found[0], typing.get_args(sub_kind)[0], rest, value, source, _join(here, name))
    if not (dataclasses.is_dataclass(sub_kind) or _is_dict(sub_kind)):
        raise ValueError(f"{source}: {here!r} is {_describe(sub_kind)}; it has no key {rest[0]!r}")
    child = node.get(part)
    if child is None:
        child = node[part] = {}
    if not isinstance(child, dict):
        raise ValueError(f"{source}: {here!r} is {child!r} in the recipe, not a mapping")
    _set(child, sub_kind, rest, value, source, here)


# ------------------------------------------------------------------------------ typed conversion
def _origin(kind: Any) -> Any:
    return typing.get_origin(kind)


def _is_dict(kind: Any) -> bool:
    return kind is dict or _origin(kind) is dict


def _describe(kind: Any) -> str:
    if kind is type(None):
        return "null"
    if isinstance(kind, type) and not dataclasses.is_dataclass(kind):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
                "dict": "a mapping", "list": "a list"}.get(kind.__name__, kind.__name__)
    if dataclasses.is_dataclass(kind):
        return f"a mapping ({kind.__name__})"
    origin, args = _origin(kind), typing.get_args(kind)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return "a mapping"
    return str(kind)


class _Mismatch(Exception):
    pass


def _convert(value: Any, kind: Any, key: str, source: str) -> Any:
    """`value` (parsed YAML) as `kind`, or a ValueError naming `key` and what was expected."""
    try:
        return _convert_or_mismatch(value, kind, key, source)
    except _Mismatch:
        shown = f"{type(value).__name__} {value!r}"
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ValueError(f"{source}: {key or 'the recipe'}: expected {_describe(kind)}, got {shown}") from None


def _convert_or_mismatch(value: Any, kind: Any, key: str, source: str) -> Any:
    origin, args = _origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise _Mismatch
        fields = {f.name: f for f in dataclasses.fields(kind)}
        unknown = [k for k in value if k not in fields]
        if unknown:
            where = f" under {key!r}" if key else ""
            raise ValueError(f"{source}: unknown key {_join(key, str(unknown[0]))!r}; valid keys{where}: "
                             f"{list(fields)}")
        hints = typing.get_type_hints(kind)
        missing = [name for name, f in fields.items() if name not in value
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{source}: {key or 'the recipe'} lacks the required key(s) {missing}")
        return kind(**{name: _convert(item, hints[name], _join(key, name), source) for name, item in value.items()})
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _convert_or_mismatch(value, arg, key, source)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise _Mismatch
    if kind is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        (item_kind,) = args
        if dataclasses.is_dataclass(item_kind):  # tasks: keyed by name in messages
            return [_convert(item, item_kind, _join(key, _entry_name(item, i)), source) for i, item in enumerate(value)]
        return [_convert(item, item_kind, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _Mismatch
        return tuple(_convert(item, arg, f"{key}[{i}]", source) for i, (item, arg) in enumerate(zip(value, args)))
    if kind is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    if kind is list:  # a free-form list (augment): checked by its consumer
        if not isinstance(value, list):
            raise _Mismatch
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if kind is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"recipe schema: unsupported type {kind!r} at {key!r}")


def _entry_name(item: Any, index: int) -> str:
    return str(item["name"]) if isinstance(item, dict) and isinstance(item.get("name"), str) else f"[{index}]"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
