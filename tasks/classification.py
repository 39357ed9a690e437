"""Classification: the candidates of an image are class names passed through prompt templates; the logits
are the scaled cosine similarities between the image and each class embedding (the normalised mean of its
normalised template embeddings), and the loss is cross-entropy over them (label smoothing as Uni-Perceiver)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from uniperceiver.model import DEFAULT_TEMPLATES

from .base import Task, register_task, require_fields, stack_images


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in label order (open_clip's, cleaned up for prompting)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    return list(IMAGENET_CLASSNAMES)


def imagenet_templates(kind: str = "openai") -> list[str]:
    """ImageNet prompt templates from open_clip: "openai" (CLIP's 80) or "simple" (its 7 selected ones).
    Each template holds one "{}" for the class name."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
    table = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}
    if kind not in table:
        raise ValueError(f"imagenet_templates: unknown kind {kind!r}; expected one of {sorted(table)}")
    # open_clip stores them as callables (lambda c: f"a photo of a {c}."); ours are format strings.
    return [template("{}") if callable(template) else template for template in table[kind]]


def class_embeddings(model, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                     classes_per_chunk: int | None = None) -> Tensor:
    """(num_classes, embed_dim) class embeddings, encoding `classes_per_chunk` classes' prompts at a time
    (1000 classes x 80 templates do not fit one forward pass)."""
    if not class_names:
        raise ValueError("class_embeddings: no class names")
    chunk = classes_per_chunk or len(class_names)
    return torch.cat([model.class_embeddings(list(class_names[i:i + chunk]), templates)
                      for i in range(0, len(class_names), chunk)])


@register_task("classification")
class ClassificationTask(Task):
    """Batch: {"images": (B, 3, H, W), "labels": LongTensor (B,) indexing "class_names": list[str]}; a batch may
    instead carry precomputed "class_embeddings" (C, D), e.g. for evaluation over many batches.
    Predictions: the index of the best-scoring class of each image.

    class_names: the label set `format_batch` uses (samples may give labels as indices or as names);
    templates: prompt templates with one "{}", or "imagenet" / "imagenet-simple" for open_clip's;
    label_smoothing: 0.1 by default, as Uni-Perceiver uses for its non-generative tasks.
    """

    family = "classification"

    def __init__(self, class_names: Sequence[str] | str | None = None,
                 templates: Sequence[str] | str = DEFAULT_TEMPLATES, label_smoothing: float = 0.1,
                 image_size: int = 224):
        super().__init__(image_size=image_size)
        if class_names == "imagenet":
            class_names = imagenet_class_names()
        elif isinstance(class_names, str):
            raise ValueError(f"classification: class_names must be a list of names or 'imagenet', got {class_names!r}")
        if templates in ("imagenet", "imagenet-simple"):
            templates = imagenet_templates("openai" if templates == "imagenet" else "simple")
        elif isinstance(templates, str):
            raise ValueError(f"classification: templates must be a list of strings with '{{}}', 'imagenet' or "
                             f"'imagenet-simple', got {templates!r}")
        bad = [t for t in templates if "{}" not in t]
        if not templates or bad:
            raise ValueError(f"classification: every template needs one '{{}}' for the class name; got {bad or 'none'}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"classification: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.class_names = list(class_names) if class_names is not None else None
        self.templates = list(templates)
        self.label_smoothing = label_smoothing

    def format_batch(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Samples {"image": tensor or PIL, "label": int index or class name} -> a batch over `class_names`."""
        require_fields(samples, ["image", "label"], self.name)
        if self.class_names is None:
            raise ValueError("task 'classification': format_batch needs the label set; build the task with "
                             "class_names=[...] (or 'imagenet')")
        index = {name: i for i, name in enumerate(self.class_names)}
        labels = []
        for i, sample in enumerate(samples):
            label = sample["label"]
            if isinstance(label, str):
                if label not in index:
                    raise ValueError(f"task 'classification': sample {i} has label {label!r}, not one of the "
                                     f"{len(index)} class names")
                label = index[label]
            label = int(label)
            if not 0 <= label < len(self.class_names):
                raise ValueError(f"task 'classification': sample {i} has label {label}, outside "
                                 f"[0, {len(self.class_names)})")
            labels.append(label)
        return {"images": stack_images([s["image"] for s in samples], self.image_size),
                "labels": torch.tensor(labels, dtype=torch.long), "class_names": list(self.class_names)}

    def class_embeddings(self, model, batch: dict[str, Any]) -> Tensor:
        if batch.get("class_embeddings") is not None:
            return batch["class_embeddings"]
        names = batch.get("class_names", self.class_names)
        if not names:
            raise KeyError("task 'classification': the batch has neither 'class_names' nor 'class_embeddings', "
                           "and the task was built without class_names")
        return class_embeddings(model, names, self.templates)

    def logits(self, model, batch: dict[str, Any]) -> Tensor:
        """(B, num_classes) scaled cosine similarities."""
        return model.readout.similarity(model.encode_image(batch["images"]), self.class_embeddings(model, batch),
                                        self.family)

    def loss(self, model, batch: dict[str, Any]) -> Tensor:
        logits = self.logits(model, batch)
        labels = batch["labels"].to(logits.device)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def predict(self, model, batch: dict[str, Any]) -> list[int]:
        return self.logits(model, batch).argmax(dim=-1).tolist()
