"""Image-text retrieval: the candidates of an image are the texts of the batch (of every rank) and vice versa.
The loss is open_clip's `ClipLoss` with a local loss and a gather that keeps gradients, so that each rank
scores its own images and texts against all ranks' and the gradient reaches every rank's encoders."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .base import Task, register_task, require_fields, stack_images


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def clip_loss(image_embeddings: Tensor, text_embeddings: Tensor, logit_scale: Tensor,
              rank: int | None = None, world_size: int | None = None) -> Tensor:
    """Symmetric InfoNCE with open_clip's semantics: `ClipLoss(local_loss=True, gather_with_grad=True)`.
    Embeddings are unit-norm (B, D) with row i of each a pair; `logit_scale` is the multiplier itself (already
    exponentiated), as open_clip expects and as `SimilarityReadout.scale` returns. rank / world size default to
    the initialised process group's."""
    from open_clip.loss import ClipLoss  # imported on first use: open_clip pulls in its whole model zoo

    if rank is None or world_size is None:
        rank, world_size = rank_and_world_size()
    loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    return loss(image_embeddings, text_embeddings, logit_scale)


@register_task("retrieval")
class RetrievalTask(Task):
    """Batch: {"images": (B, 3, H, W), "texts": B strings}, text i describing image i.
    Predictions: for each image, the index of its best-scoring text in the batch."""

    family = "retrieval"

    def format_batch(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Samples {"image": tensor or PIL, "caption": str} (or "text")."""
        for i, sample in enumerate(samples):
            if "caption" not in sample and "text" not in sample:
                raise KeyError(f"task 'retrieval': sample {i} lacks 'caption' (or 'text'); it has {sorted(sample)}")
        require_fields(samples, ["image"], self.name)
        return {"images": stack_images([s["image"] for s in samples], self.image_size),
                "texts": [s["caption"] if "caption" in s else s["text"] for s in samples]}

    def embeddings(self, model, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        images, texts = batch["images"], list(batch["texts"])
        if len(texts) != images.shape[0]:
            raise ValueError(f"task 'retrieval': {images.shape[0]} images but {len(texts)} texts; "
                             "each image needs exactly one text")
        return model.encode_image(images), model.encode_text(texts)

    def loss(self, model, batch: dict[str, Any]) -> Tensor:
        image_embeddings, text_embeddings = self.embeddings(model, batch)
        return clip_loss(image_embeddings, text_embeddings, model.readout.scale(self.family))

    @torch.no_grad()
    def logits(self, model, batch: dict[str, Any]) -> Tensor:
        """(B images, B texts) scaled cosine similarities within the batch; transpose for text -> image."""
        image_embeddings, text_embeddings = self.embeddings(model, batch)
        return model.readout.similarity(image_embeddings, text_embeddings, self.family)

    @torch.no_grad()
    def predict(self, model, batch: dict[str, Any]) -> list[int]:
        return self.logits(model, batch).argmax(dim=-1).tolist()

    @torch.no_grad()
    def predict_text_to_image(self, model, batch: dict[str, Any]) -> list[int]:
        """For each text, the index of its best-scoring image in the batch."""
        return self.logits(model, batch).argmax(dim=0).tolist()
