"""Training augmentation per task, given in the recipe as torchvision.transforms.v2 transforms by name:

    augment:
      - ColorJitter: {brightness: 0.3, contrast: 0.3}
      - RandomAffine: {degrees: 8, translate: [0.05, 0.05]}

A transform must keep the task's targets true. A mirror turns "left of" into "right of" and reverses the
left-to-right order a caption lists its objects in, so flips are refused for every task whose targets are text
about the picture (retrieval, captioning, VQA); classification by colour or kind may flip. Crops that may cut
an object off (RandomResizedCrop, RandomCrop) are refused for the same tasks: a caption would name an object the
picture no longer shows. A task that reads the objects' boxes (detection, and text to image with an
`object_weight`) also refuses transforms that move or resize the picture's content (RandomAffine, RandomRotation,
Resize, ...): the boxes are not moved with them. Each picture's draw is seeded by (seed, task, epoch, index), so
a batch is the same whatever the number of DataLoader workers and after a resume."""
from __future__ import annotations

from typing import Any, Callable

# Transforms that can make a text target false: a mirror (sides, order) or a crop (an object cut away).
CHANGES_TEXT_TARGETS = {"RandomHorizontalFlip": "mirrors the picture, swapping 'left' and 'right'",
                        "RandomVerticalFlip": "mirrors the picture, swapping 'above' and 'below'",
                        "RandomResizedCrop": "may crop an object out of the picture",
                        "RandomCrop": "may crop an object out of the picture",
                        "RandomIoUCrop": "may crop an object out of the picture",
                        "RandomErasing": "may erase an object"}
TEXT_TARGET_TASKS = {"retrieval", "captioning", "vqa", "detection", "text_to_image"}
# Transforms that move or resize what the picture shows: a task that reads the objects' boxes would read them in
# the wrong place.
MOVES_OBJECTS = {"RandomAffine", "RandomRotation", "RandomPerspective", "ElasticTransform", "RandomZoomOut",
                 "Resize", "RandomResize", "ScaleJitter", "RandomShortestSize", "CenterCrop", "Pad", "FiveCrop",
                 "TenCrop"}


def _entries(spec: list) -> list[tuple[str, dict[str, Any]]]:
    entries = []
    for i, item in enumerate(spec):
        if isinstance(item, str):
            entries.append((item, {}))
        elif isinstance(item, dict) and len(item) == 1:
            name, kwargs = next(iter(item.items()))
            if kwargs is not None and not isinstance(kwargs, dict):
                raise ValueError(f"[{i}] {name}: expected a mapping of keywords, got {kwargs!r}")
            entries.append((str(name), dict(kwargs or {})))
        else:
            raise ValueError(f"[{i}]: expected a transform name or {{Name: {{keyword: value}}}}, got {item!r}")
    return entries


def reads_boxes(task: str, kwargs: dict[str, Any] | None = None) -> bool:
    """Whether `task`, built with `kwargs`, reads the samples' boxes, as its class says (`Task.reads_boxes`):
    detection always, text to image when it weighs the objects' pixels. An unknown task is refused elsewhere."""
    from tasks import registered_task

    cls = registered_task(task)
    return cls is not None and cls.reads_boxes(kwargs or {})


def augment_problem(spec: list, task: str, task_kwargs: dict[str, Any] | None = None) -> str | None:
    """What is wrong with an `augment` list for `task` built with `task_kwargs` (None: nothing), as the
    expected-value part of a recipe error."""
    try:
        build_augmentation(spec, task, task_kwargs)
    except (ValueError, TypeError) as error:
        return str(error)
    return None


def build_augmentation(spec: list, task: str, task_kwargs: dict[str, Any] | None = None
                       ) -> Callable[[Any], Any] | None:
    """The transform an `augment` list describes (PIL image in, PIL image out), or None for an empty list.
    `task_kwargs`: the task's own, which decide whether it reads the boxes (`reads_boxes`)."""
    if not spec:
        return None
    from torchvision.transforms import v2

    boxes_read = reads_boxes(task, task_kwargs)
    transforms = []
    for name, kwargs in _entries(spec):
        cls = getattr(v2, name, None)
        if not (isinstance(cls, type) and issubclass(cls, v2.Transform)):
            raise ValueError(f"{name}: not a torchvision.transforms.v2 transform")
        if task in TEXT_TARGET_TASKS and name in CHANGES_TEXT_TARGETS:
            raise ValueError(f"{name} {CHANGES_TEXT_TARGETS[name]}, which makes the {task} targets of the picture "
                             "false; leave it out for this task")
        if boxes_read and name in MOVES_OBJECTS:
            raise ValueError(f"{name} moves the picture's objects, and the {task} task reads their boxes, which "
                             "stay where they were; use photometric transforms only for this task")
        try:
            transforms.append(cls(**kwargs))
        except TypeError as error:
            raise TypeError(f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {error}") from None
    return v2.Compose(transforms)
