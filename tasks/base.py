"""The task interface and the registry of tasks by name: a task turns raw samples into a batch, a batch into a
loss, and a batch into per-sample predictions, all through the public `UniPerceiver` API."""
from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

_TASKS: dict[str, type["Task"]] = {}
T = TypeVar("T", bound=type["Task"])


class Task:
    """One objective of the generalist model.

    name:   the registry key (set by `register_task`).
    family: the readout family whose temperature the task's logits use ("retrieval", "classification",
            "caption", "vqa", "detection").

    Subclasses implement `loss` and `predict`; `format_batch` collates raw samples (dicts with "image" as a
    (3, H, W) tensor or a PIL image, plus the task's text fields) into the batch dict that both take.
    """

    name: str = ""
    family: str = ""

    def __init__(self, image_size: int = 224):
        self.image_size = image_size  # only used to preprocess PIL images in `format_batch`

    def format_batch(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError(f"task {self.name!r} does not collate raw samples")

    def loss(self, model, batch: dict[str, Any]) -> Tensor:
        """A scalar training loss."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, model, batch: dict[str, Any]) -> list:
        """One prediction per sample of the batch."""
        raise NotImplementedError

    @classmethod
    def reads_boxes(cls, kwargs: dict[str, Any]) -> bool:
        """Whether the task, built with `kwargs`, reads the samples' boxes (augmentation must then leave the
        objects where they are)."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, family={self.family!r})"


def stack_images(images: Sequence[Any], image_size: int = 224) -> Tensor:
    """Images as (3, H, W) tensors (already normalised) or PIL images -> a (B, 3, H, W) float tensor.
    PIL images go through the evaluation preprocessing (resize, centre crop, ImageNet normalisation)."""
    if not images:
        raise ValueError("stack_images: no images")
    transform = None
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, Tensor):
            if not hasattr(image, "convert"):
                raise TypeError(f"sample {i}: 'image' must be a (3, H, W) tensor or a PIL image, "
                                f"got {type(image).__name__}")
            if transform is None:
                from internimage.transforms import build_eval_transform
                transform = build_eval_transform(image_size)
            image = transform(image.convert("RGB"))
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"sample {i}: image tensor must have shape (3, H, W), got {tuple(image.shape)}")
        out.append(image.float())
    shapes = {tuple(image.shape) for image in out}
    if len(shapes) > 1:
        raise ValueError(f"stack_images: images of different shapes {sorted(shapes)}; resize them first")
    return torch.stack(out)


def mean_count_over_ranks(count: Tensor) -> Tensor:
    """This rank's number of loss terms, replaced by the mean number per rank when training distributed. A rank's
    sum of terms divided by it makes the gradients the ranks average (and the losses averaged over them) those of
    the mean over every term of the global batch, as one process with the whole batch computes them; a per-rank
    mean would weigh a rank's terms by 1 / its own count. Not reduced outside autograd (evaluation, inference)."""
    count = count.detach().float()
    if torch.is_grad_enabled() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = count.clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count


def require_fields(samples: Sequence[dict[str, Any]], keys: Sequence[str], task: str) -> None:
    """A clear error when a raw sample lacks a field the task needs."""
    for i, sample in enumerate(samples):
        missing = [key for key in keys if key not in sample]
        if missing:
            raise KeyError(f"task {task!r}: sample {i} lacks {missing}; it has {sorted(sample)}")


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator: `@register_task("retrieval") class RetrievalTask(Task): ...`."""
    def decorate(cls: T) -> T:
        if name in _TASKS and _TASKS[name] is not cls:
            raise ValueError(f"task {name!r} is already registered by {_TASKS[name].__qualname__}")
        cls.name = name
        _TASKS[name] = cls
        return cls
    return decorate


def get_task(name: str, **kwargs) -> Task:
    """A new instance of the task registered as `name`, built with `kwargs`."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {list_tasks()}")
    return _TASKS[name](**kwargs)


def registered_task(name: str) -> type[Task] | None:
    """The class registered as `name`, or None."""
    return _TASKS.get(name)


def list_tasks() -> list[str]:
    return sorted(_TASKS)
