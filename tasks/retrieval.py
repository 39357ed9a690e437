"""Image-text retrieval: the candidates of an image are the texts of the batch (of every rank) and vice versa.
The loss is open_clip's `ClipLoss` with a local loss and a gather that keeps gradients, so that each rank
scores its own images and texts against all ranks' and the gradient reaches every rank's encoders."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .base import Task, register_task, require_fields, stack_images
from .negatives import check_word_groups, negative_captions


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


def clip_loss_with_negatives(image_embeddings: Tensor, text_embeddings: Tensor, negative_embeddings: Tensor,
                             logit_scale: Tensor, rank: int | None = None, world_size: int | None = None) -> Tensor:
    """`clip_loss` whose image-to-text half also ranks each image against extra negative texts (N, D) of its
    own rank (hard negatives; see `negatives.py`). The text-to-image half is open_clip's, unchanged."""
    from open_clip.loss import ClipLoss

    if rank is None or world_size is None:
        rank, world_size = rank_and_world_size()
    loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    per_image, per_text = loss.get_logits(image_embeddings, text_embeddings, logit_scale)
    labels = loss.get_ground_truth(image_embeddings.device, per_image.shape[0])
    per_image = torch.cat([per_image, logit_scale * image_embeddings @ negative_embeddings.T], dim=1)
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


@register_task("retrieval")
class RetrievalTask(Task):
    """Batch: {"images": (B, 3, H, W), "texts": B strings}, text i describing image i.
    Predictions: for each image, the index of its best-scoring text in the batch.

    negative_words: groups of interchangeable words (e.g. the shapes world's shape names); with them each training
    caption also yields `negatives_per_text` false variants with words of a group swapped, which its picture is
    ranked against beside the batch's captions (`negatives.py` says why). None: plain CLIP loss."""

    family = "retrieval"

    def __init__(self, negative_words: Sequence[Sequence[str]] | None = None, negatives_per_text: int = 1,
                 image_size: int = 224):
        super().__init__(image_size)
        if negatives_per_text < 1:
            raise ValueError(f"task 'retrieval': negatives_per_text must be >= 1, got {negatives_per_text}")
        self.negative_words = None if negative_words is None else check_word_groups(
            negative_words, "task 'retrieval': negative_words")
        self.negatives_per_text = negatives_per_text

    def format_batch(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Samples {"image": tensor or PIL, "caption": str} (or "text")."""
        for i, sample in enumerate(samples):
            if "caption" not in sample and "text" not in sample:
                raise KeyError(f"task 'retrieval': sample {i} lacks 'caption' (or 'text'); it has {sorted(sample)}")
        require_fields(samples, ["image"], self.name)
        batch = {"images": stack_images([s["image"] for s in samples], self.image_size),
                 "texts": [s["caption"] if "caption" in s else s["text"] for s in samples]}
        if self.negative_words is not None:
            seeds = [int(s["sample_seed"]) for s in samples] if all("sample_seed" in s for s in samples) else None
            batch["negative_texts"] = negative_captions(batch["texts"], self.negative_words,
                                                        self.negatives_per_text, seeds)
        return batch

    def embeddings(self, model, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        images, texts = batch["images"], list(batch["texts"])
        if len(texts) != images.shape[0]:
            raise ValueError(f"task 'retrieval': {images.shape[0]} images but {len(texts)} texts; "
                             "each image needs exactly one text")
        return model.encode_image(images), model.encode_text(texts)

    def loss(self, model, batch: dict[str, Any]) -> Tensor:
        image_embeddings, text_embeddings = self.embeddings(model, batch)
        scale = model.readout.scale(self.family)
        negatives = batch.get("negative_texts")
        if not negatives:
            return clip_loss(image_embeddings, text_embeddings, scale)
        return clip_loss_with_negatives(image_embeddings, text_embeddings, model.encode_text(negatives), scale)

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
