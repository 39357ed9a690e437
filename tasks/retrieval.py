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
    return open_clip_loss(rank, world_size)(image_embeddings, text_embeddings, logit_scale)


def open_clip_loss(rank: int | None = None, world_size: int | None = None):
    """open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)` for `rank` of `world_size` (default: the
    initialised process group's)."""
    from open_clip.loss import ClipLoss  # imported on first use: open_clip pulls in its whole model zoo

    if rank is None or world_size is None:
        rank, world_size = rank_and_world_size()
    return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)


def negative_separation(text_embeddings: Tensor, negative_embeddings: Tensor, owners: Sequence[int],
                        margin: float, logit_scale: Tensor) -> Tensor:
    """How far each caption and its own hard negatives embed alike beyond `margin` (cosine), in logit units (the
    scale without its gradient): mean of scale * relu(cos - margin). A caption and a variant with one shape
    swapped describe different scenes; this keeps the text side from embedding them alike while the image side
    cannot yet tell them apart, which is where contrastive training on the shapes world stalls (`negatives.py`).
    A mean over this rank's negatives: ranks match one process when they hold as many (one per caption and
    `negatives_per_text`, as on the shapes world)."""
    owners = torch.as_tensor(list(owners), device=text_embeddings.device, dtype=torch.long)
    cosines = (text_embeddings[owners] * negative_embeddings).sum(-1)
    return (logit_scale.detach() * F.relu(cosines - margin)).mean()


def gather_negatives(negative_embeddings: Tensor, rank: int, world_size: int) -> Tensor:
    """Every rank's negatives (N_r, D), in rank order, with gradients (as open_clip gathers features with
    `gather_with_grad`): ranks may hold different numbers, so each pads to the largest before the gather."""
    from torch.distributed.nn.functional import all_gather

    count = torch.tensor([negative_embeddings.shape[0]], device=negative_embeddings.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    most = max(int(c) for c in counts)
    padded = F.pad(negative_embeddings, (0, 0, 0, most - negative_embeddings.shape[0]))
    gathered = list(all_gather(padded))
    gathered[rank] = padded  # this rank's own, as open_clip keeps its local features
    return torch.cat([part[:int(c)] for part, c in zip(gathered, counts)])


def clip_loss_with_negatives(image_embeddings: Tensor, text_embeddings: Tensor, negative_embeddings: Tensor,
                             logit_scale: Tensor, rank: int | None = None, world_size: int | None = None) -> Tensor:
    """`clip_loss` whose image-to-text half also ranks each image against extra negative texts (N, D) (hard
    negatives; see `negatives.py`), every rank's, so that ranks match one process with the whole batch. The
    text-to-image half is open_clip's, unchanged."""
    loss = open_clip_loss(rank, world_size)
    per_image, per_text = loss.get_logits(image_embeddings, text_embeddings, logit_scale)
    labels = loss.get_ground_truth(image_embeddings.device, per_image.shape[0])
    if loss.world_size > 1:
        negative_embeddings = gather_negatives(negative_embeddings, loss.rank, loss.world_size)
    per_image = torch.cat([per_image, logit_scale * image_embeddings @ negative_embeddings.T], dim=1)
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


@register_task("retrieval")
class RetrievalTask(Task):
    """Batch: {"images": (B, 3, H, W), "texts": B strings}, text i describing image i.
    Predictions: for each image, the index of its best-scoring text in the batch.

    negative_words: groups of interchangeable words (e.g. the shapes world's shape names); with them each training
    caption also yields `negatives_per_text` false variants with words of a group swapped, which its picture is
    ranked against beside the batch's captions (`negatives.py` says why). None: plain CLIP loss.
    negative_margin: with negatives, also keep each caption's embedding at most this cosine from its own
    negatives' (`negative_separation`); None: no such term."""

    family = "retrieval"

    def __init__(self, negative_words: Sequence[Sequence[str]] | None = None, negatives_per_text: int = 1,
                 negative_margin: float | None = None, image_size: int = 224):
        super().__init__(image_size)
        if negative_margin is not None and not -1.0 <= negative_margin < 1.0:
            raise ValueError(f"task 'retrieval': negative_margin is a cosine in [-1, 1), got {negative_margin}")
        if negative_margin is not None and negative_words is None:
            raise ValueError("task 'retrieval': negative_margin needs negative_words (the negatives it keeps apart)")
        if negatives_per_text < 1:
            raise ValueError(f"task 'retrieval': negatives_per_text must be >= 1, got {negatives_per_text}")
        self.negative_margin = negative_margin
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
            batch["negative_texts"], batch["negative_owners"] = negative_captions(
                batch["texts"], self.negative_words, self.negatives_per_text, seeds)
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
        if self.negative_words is None or "negative_texts" not in batch:
            return clip_loss(image_embeddings, text_embeddings, scale)
        # A batch whose captions hold no grouped word still takes the same path (with no negatives), so that every
        # rank joins the negatives' gather.
        negatives = batch["negative_texts"]
        negative_embeddings = model.encode_text(negatives) if negatives else text_embeddings[:0]
        loss = clip_loss_with_negatives(image_embeddings, text_embeddings, negative_embeddings, scale)
        if self.negative_margin is not None and negatives:
            loss = loss + negative_separation(text_embeddings, negative_embeddings, batch["negative_owners"],
                                              self.negative_margin, scale)
        return loss

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
