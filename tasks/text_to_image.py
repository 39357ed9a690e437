"""Text to image: the diffusion branch learns to denoise a picture given the decoder's states of its caption.

The decoder and the text encoder see this loss with gradients stopped by default (`DiffusionConfig.
train_condition`): the branch reads the states the ranking and generation tasks shape, and a denoising loss, noisy
at every timestep, does not pull those shared states around (on the shapes world, the retrieval and VQA numbers
are what a recipe tunes for). With `train_condition: true` the loss trains them too.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from uniperceiver.diffusion import from_pil

from .base import Task, register_task, require_fields


def first_caption(caption: Any, index: int) -> str:
    """A sample's caption: the string, or the first of a list (for the shapes data: the bare description)."""
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (list, tuple)) and caption and isinstance(caption[0], str):
        return caption[0]
    raise ValueError(f"task 'text_to_image': sample {index} has caption {caption!r}; expected a string or a list "
                     "of strings")


def pictures_in_unit_range(images: Sequence[Any], size: int) -> Tensor:
    """PIL pictures or (3, H, W) tensors normalised with ImageNet's statistics -> (B, 3, size, size) in [-1, 1]."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    import torch.nn.functional as F

    out = []
    for i, image in enumerate(images):
        if hasattr(image, "convert"):
            out.append(from_pil([image], size)[0])
        elif isinstance(image, Tensor) and image.dim() == 3 and image.shape[0] == 3:
            mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
            std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
            pixels = (image.float() * std + mean) * 2 - 1
            if pixels.shape[-2:] != (size, size):
                pixels = F.interpolate(pixels[None], size=(size, size), mode="bilinear", antialias=True,
                                       align_corners=False)[0]
            out.append(pixels.clamp(-1, 1))
        else:
            raise TypeError(f"task 'text_to_image': sample {i} has an image of type {type(image).__name__}; "
                            "expected a PIL image or a normalised (3, H, W) tensor")
    return torch.stack(out)


def object_weight_maps(samples: Sequence[dict[str, Any]], size: int, weight: float, task: str) -> Tensor:
    """(B, 1, size, size): `weight` on the pixels inside a sample's boxes (COCO [x, y, w, h] in its picture's
    pixels), 1 elsewhere. The picture's own side scales the boxes, so the map fits the picture at any size."""
    ys = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    maps = torch.ones(len(samples), 1, size, size)
    for i, sample in enumerate(samples):
        image = sample["image"]
        width, height = image.size if hasattr(image, "size") and not isinstance(image, Tensor) else (
            image.shape[-1], image.shape[-2])
        for box in sample["boxes"]:
            if len(box) != 4:
                raise ValueError(f"task {task!r}: sample {i} has box {box!r}; expected COCO [x, y, w, h]")
            x, y, w, h = (float(v) for v in box)
            inside_x = (ys >= x / width) & (ys < (x + w) / width)
            inside_y = (ys >= y / height) & (ys < (y + h) / height)
            maps[i, 0][inside_y[:, None] & inside_x[None, :]] = weight
    return maps


@register_task("text_to_image")
class TextToImageTask(Task):
    """Batch: {"pixels": (B, 3, S, S) in [-1, 1], "prompts": [str], optionally "noise_seeds": [int], each
    sample's seed for its noise, timestep and condition dropout, and "pixel_weights" (B, 1, S, S) with an
    `object_weight`}. Predictions: one PIL picture per prompt.

    steps, guidance: the sampler's for `predict`.
    object_weight: the denoising loss's weight on the pixels inside the samples' boxes (the background's is 1;
        the samples then need "boxes"). The words name the objects, and the objects are a small part of the
        picture: at 1, most of the loss is the background's, which the prompt says nothing about
        (docs/shapes-world.md). Boxes marked iscrowd are weighted too: they are objects the prompt may name."""

    family = "diffusion"

    @classmethod
    def reads_boxes(cls, kwargs: dict[str, Any]) -> bool:
        """With an `object_weight`, the loss weighs the pixels inside the boxes."""
        return kwargs.get("object_weight", 1) != 1

    def __init__(self, steps: int = 20, guidance: float | None = None, object_weight: float = 1.0,
                 image_size: int = 224):
        super().__init__(image_size=image_size)
        if isinstance(object_weight, bool) or not isinstance(object_weight, (int, float)) or not (
                math.isfinite(object_weight) and object_weight > 0):
            raise ValueError(f"text_to_image: object_weight {object_weight!r}; expected a finite number > 0")
        self.steps, self.guidance, self.object_weight = steps, guidance, float(object_weight)

    def format_batch(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        require_fields(samples, ["image", "caption"] + (["boxes"] if self.object_weight != 1 else []), self.name)
        prompts = [first_caption(sample["caption"], i) for i, sample in enumerate(samples)]
        batch = {"pixels": pictures_in_unit_range([sample["image"] for sample in samples], self.image_size),
                 "prompts": prompts}
        if self.object_weight != 1:
            batch["pixel_weights"] = object_weight_maps(samples, self.image_size, self.object_weight, self.name)
        if all("sample_seed" in sample for sample in samples):  # the training streams' per-sample seeds
            batch["noise_seeds"] = [int(sample["sample_seed"]) for sample in samples]
        return batch

    def loss(self, model, batch: dict[str, Any]) -> Tensor:
        model._require_diffusion()
        states, valid = model.prompt_states(batch["prompts"])
        idle = None
        if not model.diffusion.config.train_condition:
            # 0 x the states: the decoder and the text encoder get zero gradients, not none (see UniPerceiver.forward)
            idle, states = 0.0 * states.sum(), states.detach()
        loss = model.diffusion.loss(batch["pixels"], states, valid, seeds=batch.get("noise_seeds"),
                                    pixel_weights=batch.get("pixel_weights"))
        return loss if idle is None else loss + idle

    @torch.no_grad()
    def predict(self, model, batch: dict[str, Any]) -> list:
        return model.generate_images(batch["prompts"], steps=self.steps, guidance=self.guidance)
